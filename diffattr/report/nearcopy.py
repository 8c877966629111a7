"""Near-copy verdict: is the query (almost) a copy of a training image?

Attribution scores measure influence, not resemblance, and gradient methods can miss a noisy near
copy; so the verdict rests on direct similarity only: pixel RMS distance, pixel cosine, a DCT
perceptual hash and, when an embedding method is in the report, its embedding cosine. Every
threshold comes from the training set itself: a signal fires when the query is closer to a
training image than ``1 - quantile`` of all training-image pairs are to each other (default: closer
than 99.9% of the pairs), so "close" means close *for this data set*. "Probable memorisation"
needs a pixel signal, or two signals on the same training image (see :func:`verdict`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from scipy.fft import dctn

# The pair sample behind every threshold: all pairs up to this many, else a seeded random sample.
MAX_PAIRS = 200_000
DEFAULT_QUANTILE = 0.001
HASH_SIZE = 8  # 8x8 low frequencies -> 64-bit hash, as imagehash.phash
HASH_IMAGE = 32  # images are resized to 32x32 grey before the DCT, as imagehash.phash


def phash_bits(images: torch.Tensor) -> np.ndarray:
    """DCT perceptual hash of ``(n, C, H, W)`` images in ``[-1, 1]`` -> bool ``(n, 64)``.

    The imagehash ``phash`` recipe: grey (channel mean), resized to 32x32 (the project's
    antialiased bilinear rule), 2-D DCT-II, the top-left 8x8 coefficients compared with their
    median. Robust to noise, small shifts in intensity and resizing; not to crops or flips.
    """
    grey = images.to(torch.float32).mean(dim=1, keepdim=True)
    small = F.interpolate(
        grey, size=(HASH_IMAGE, HASH_IMAGE), mode="bilinear", align_corners=False, antialias=True
    )
    coeffs = dctn(small[:, 0].numpy().astype(np.float64), axes=(1, 2))
    low = coeffs[:, :HASH_SIZE, :HASH_SIZE].reshape(len(images), -1)
    return low > np.median(low, axis=1, keepdims=True)


def hamming(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Bit differences of hashes ``a (n, 64)`` and ``b (n, 64)`` or ``(64,)`` -> int ``(n,)``."""
    return np.count_nonzero(a != b, axis=-1)


def flat01(images: torch.Tensor) -> np.ndarray:
    """``(n, C, H, W)`` in ``[-1, 1]`` -> float64 ``(n, D)`` in ``[0, 1]`` (intensity scale)."""
    return ((images.reshape(images.shape[0], -1).to(torch.float64) + 1.0) / 2.0).numpy()


def pixel_rms(train: np.ndarray, query: np.ndarray) -> np.ndarray:
    """RMS pixel difference ``(n,)`` of ``train (n, D)`` to ``query (D,)``, both in ``[0, 1]``:
    0 identical, 1 black vs white everywhere."""
    return np.sqrt(((train - query) ** 2).mean(axis=1))


def cosine(train: np.ndarray, query: np.ndarray) -> np.ndarray:
    """Cosine similarity ``(n,)`` of the rows of ``train (n, D)`` with ``query (D,)``."""
    num = train @ query
    den = np.linalg.norm(train, axis=1) * np.linalg.norm(query)
    return num / np.maximum(den, 1e-12)


def sample_pairs(n: int, seed: int) -> tuple[np.ndarray, np.ndarray, bool]:
    """Index arrays ``(P,)`` of distinct training-image pairs: all of them up to
    :data:`MAX_PAIRS`, else that many drawn at random (seeded). Third value: sampled or not."""
    total = n * (n - 1) // 2
    if total <= MAX_PAIRS:
        i, j = np.triu_indices(n, k=1)
        return i, j, False
    rng = np.random.default_rng(seed)
    i = rng.integers(0, n, size=MAX_PAIRS)
    j = (i + rng.integers(1, n, size=MAX_PAIRS)) % n  # never i itself
    return i, j, True


def pair_values(fn: Any, a: np.ndarray, i: np.ndarray, j: np.ndarray) -> np.ndarray:
    """``fn(a[i], a[j])`` row-wise over pairs, in chunks (bounded memory for big images)."""
    out = [fn(a[i[s : s + 8192]], a[j[s : s + 8192]]) for s in range(0, len(i), 8192)]
    return np.concatenate(out) if out else np.zeros(0)


def _rms_rows(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    return np.sqrt(((x - y) ** 2).mean(axis=1))


def _cos_rows(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    den = np.linalg.norm(x, axis=1) * np.linalg.norm(y, axis=1)
    return (x * y).sum(axis=1) / np.maximum(den, 1e-12)


@dataclass
class Signal:
    """One similarity signal: per-training-image values for the query and the training pairs."""

    name: str
    label: str
    values: np.ndarray  # (n_train,) query vs each training image
    pairs: np.ndarray  # (P,) between training images
    lower_is_closer: bool

    def best(self) -> int:
        return int(np.argmin(self.values) if self.lower_is_closer else np.argmax(self.values))

    def summary(self, quantile: float, ids: np.ndarray) -> dict[str, Any]:
        """Closest value, its threshold (the pairs' ``quantile``), whether it fires, and the share
        of training pairs farther apart than the query and its closest training image."""
        b = self.best()
        value = float(self.values[b])
        # Strict comparisons, so a tie with the threshold (common for the integer pHash) does not
        # fire; an exact copy (distance 0, cosine 1) always does.
        if self.lower_is_closer:
            threshold = float(np.quantile(self.pairs, quantile))
            fires = value < threshold or value <= 0.0
            farther = float(np.mean(self.pairs > value))
        else:
            threshold = float(np.quantile(self.pairs, 1.0 - quantile))
            fires = value > threshold or value >= 1.0 - 1e-9
            farther = float(np.mean(self.pairs < value))
        return {
            "name": self.name,
            "label": self.label,
            "closest_id": int(ids[b]),
            "value": value,
            "threshold": threshold,
            "rule": ("<" if self.lower_is_closer else ">"),
            "flag": bool(fires),
            "closer_than_pairs": farther,
        }


def pixel_signals(train: torch.Tensor, query: torch.Tensor, seed: int) -> list[Signal]:
    """Pixel RMS, pixel cosine and pHash signals of ``query (C, H, W)`` vs ``train (n, C, H, W)``."""
    x, q = flat01(train), flat01(query[None])[0]
    xc, qc = x * 2.0 - 1.0, q * 2.0 - 1.0  # cosine on [-1, 1] pixels, as the pixel method
    bits, qbits = phash_bits(train), phash_bits(query[None])[0]
    i, j, _ = sample_pairs(len(x), seed)
    return [
        Signal("pixel_rms", "pixel RMS distance", pixel_rms(x, q), pair_values(_rms_rows, x, i, j), True),
        Signal("pixel_cosine", "pixel cosine", cosine(xc, qc), pair_values(_cos_rows, xc, i, j), False),
        Signal("phash", "pHash distance (bits of 64)", hamming(bits, qbits).astype(np.float64),
               hamming(bits[i], bits[j]).astype(np.float64), True),
    ]  # fmt: skip


def embedding_signal(
    method: str, train_feats: torch.Tensor, query_cos: np.ndarray, seed: int
) -> Signal:
    """Embedding cosine of ``method``: ``query_cos (n,)`` is its score vector (the method's score
    *is* the cosine), ``train_feats (n, d)`` its training embeddings for the pair distribution."""
    f = train_feats.reshape(train_feats.shape[0], -1).to(torch.float64).numpy()
    i, j, _ = sample_pairs(len(f), seed)
    return Signal(
        f"embedding_cosine:{method}",
        f"{method} embedding cosine",
        np.asarray(query_cos, dtype=np.float64),
        pair_values(_cos_rows, f, i, j),
        False,
    )


PIXEL_SIGNALS = ("pixel_rms", "pixel_cosine")


def verdict(summaries: list[dict[str, Any]]) -> tuple[str, bool]:
    """The one-line verdict. "Probable memorisation" needs the pixels themselves (RMS distance or
    cosine) to be unusually close, or two different signals pointing at the same training image;
    one perceptual-hash or embedding signal alone only says "possible": a 64-bit hash of a tiny,
    low-detail image (a 16x16 digit) collides often, and similar content is not a copy."""
    fired = [s for s in summaries if s["flag"]]
    pixel = [s for s in fired if s["name"] in PIXEL_SIGNALS]
    by_id: dict[int, set[str]] = {}
    for s in fired:
        by_id.setdefault(int(s["closest_id"]), set()).add(s["name"])
    agreeing = sorted(i for i, names in by_id.items() if len(names) >= 2)
    if pixel or agreeing:
        ids = sorted({int(s["closest_id"]) for s in pixel} | set(agreeing))
        return f"probable memorisation: near copy of training image(s) {ids}", True
    if fired:
        what = ", ".join(s["label"] for s in fired)
        ids = sorted(by_id)
        return (
            f"possible near copy of training image(s) {ids}: only {what} fired; the pixels "
            "themselves are not unusually close",
            True,
        )
    return "no near copy found: the query is not unusually close to any training image", False


def near_copy(
    train: torch.Tensor,
    ids: np.ndarray,
    query: torch.Tensor,
    embeddings: dict[str, tuple[torch.Tensor, np.ndarray]],
    quantile: float = DEFAULT_QUANTILE,
    n_closest: int = 5,
    seed: int = 0,
) -> dict[str, Any]:
    """The near-copy section (JSON-able).

    ``train``: ``(n, C, H, W)``, ``ids``: ``(n,)``, ``query``: ``(C, H, W)``, all in ``[-1, 1]``.
    ``embeddings``: method -> (training embeddings ``(n, d)``, the query's cosine scores ``(n,)``).
    ``closest``: the ``n_closest`` training images by pixel RMS with every signal's value.
    """
    signals = pixel_signals(train, query, seed)
    for method, (feats, cos) in embeddings.items():
        signals.append(embedding_signal(method, feats, cos, seed))
    summaries = [s.summary(quantile, ids) for s in signals]
    text, flagged = verdict(summaries)
    order = np.argsort(signals[0].values, kind="stable")[:n_closest]
    n_pairs = len(signals[0].pairs)
    return {
        "verdict": text,
        "flagged": flagged,
        "quantile": quantile,
        "n_pairs": n_pairs,
        "pairs_sampled": n_pairs < len(ids) * (len(ids) - 1) // 2,
        "rule": (
            f"a signal fires when the query is closer to a training image than "
            f"{(1 - quantile) * 100:g}% of training-image pairs are to each other"
        ),
        "signals": summaries,
        "closest": [
            {
                "rank": r + 1,
                "id": int(ids[k]),
                "values": {s.name: float(s.values[k]) for s in signals},
            }
            for r, k in enumerate(order)
        ],
    }
