"""Group attribution (after GGDA, "generalized group data attribution"): which *group* of
training images (a class, an artist, a cluster) the attribution mass falls on, against the group's
share of the training set, so over-attribution is visible at a glance ("4.0x its share").

Share of group g for one method = (sum of the positive scores of g's images) / (sum of all positive
scores); negative scores (images that *hurt* the query) are left out, since they are not a source.
Interval: percentile bootstrap over training images (resampled with replacement within the score
vector, 1000 draws, fixed seed). When the method has two half-sample score tables (its stability
halves), the share under each half is reported too, so sampling noise of the scores themselves is
visible beside the resampling interval.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from diffattr.data.dataset import DataError, ImageDataset
from diffattr.data.groups import assign_groups, kmeans_groups
from diffattr.errors import UserError

BOOTSTRAP_DRAWS = 1000
MAX_KMEANS = 100


class GroupError(UserError, ValueError):
    """A --groups spec that cannot be applied to this training set."""


@dataclass
class Groups:
    """``names``: the group names; ``index``: int ``(n_train,)`` each training image's group."""

    spec: str
    how: str
    names: list[str]
    index: np.ndarray
    label: str = "group"  # the word shown before a group name ("class 3")

    def of(self, row: int) -> str:
        return self.names[int(self.index[row])]


def _from_assignment(
    spec: str, how: str, label: str, spec_value: Any, train: ImageDataset
) -> Groups:
    """The data layer's groups (:func:`~diffattr.data.groups.assign_groups`), in report form."""
    try:
        g = assign_groups(train, spec_value)
    except DataError as exc:
        raise GroupError(f"--groups {spec}: {exc}") from None
    return Groups(spec, how, g.names, g.aligned(train.ids.numpy()), label)


def embedding_kmeans(
    spec: str, k: int, train: ImageDataset, vectors: np.ndarray, what: str, seed: int
) -> Groups:
    """The data layer's k-means (stable cluster numbers) on ``vectors (n, d)``, an embedding
    method's training features in ``train`` order."""
    g = kmeans_groups(train, k, seed, vectors=vectors)
    return Groups(spec, f"k-means, K={k}, on {what} (seed {seed})", g.names, g.index, "")


def make_groups(
    spec: str, train: ImageDataset, embedding: tuple[str, np.ndarray] | None, seed: int = 0
) -> Groups:
    """Groups from ``spec``: ``class``, ``csv:PATH``, ``kmeans:K`` or the name of one of the data
    set's own groupings. ``embedding``: (method, training features ``(n, d)``) used by k-means
    instead of pixels when given."""
    if spec.startswith("csv:"):
        path = spec[4:]
        return _from_assignment(
            spec, f"groups from {Path(path).name}", "group", {"csv": path}, train
        )
    if spec.startswith("kmeans:"):
        try:
            k = int(spec[7:])
        except ValueError:
            raise GroupError(f"--groups {spec}: K must be an integer, e.g. kmeans:8") from None
        if not 2 <= k <= min(MAX_KMEANS, len(train)):
            raise GroupError(
                f"--groups {spec}: K must be between 2 and {min(MAX_KMEANS, len(train))}"
            )
        if embedding is not None:
            what = f"{embedding[0]} training features"
            return embedding_kmeans(spec, k, train, embedding[1], what, seed)
        how = f"k-means, K={k}, on pixels (seed {seed})"
        return _from_assignment(spec, how, "", {"kmeans": k, "seed": seed}, train)
    if spec in ("class", "caption") or spec in train.groups:
        how = {"class": "the data set's classes", "caption": "the images' captions"}.get(
            spec, f"the data set's {spec!r} grouping"
        )
        return _from_assignment(spec, how, spec, spec, train)
    raise GroupError(
        f"--groups {spec!r}: expected class, caption, csv:PATH, kmeans:K"
        + (f" or one of {sorted(train.groups)}" if train.groups else "")
    )


def shares(values: np.ndarray, index: np.ndarray, n_groups: int) -> np.ndarray | None:
    """Each group's share ``(G,)`` of the positive score mass (None when no score is > 0)."""
    pos = np.clip(values.astype(np.float64), 0.0, None)
    total = pos.sum()
    if total <= 0:
        return None
    return np.bincount(index, weights=pos, minlength=n_groups) / total


def bootstrap_shares(
    values: np.ndarray, index: np.ndarray, n_groups: int, draws: int, seed: int
) -> np.ndarray:
    """Bootstrap shares ``(draws, G)``: training images resampled with replacement (multinomial
    counts, chunked so a 50k-image set stays within memory). NaN rows where a draw has no mass."""
    rng = np.random.default_rng(seed)
    n = len(values)
    pos = np.clip(values.astype(np.float64), 0.0, None)
    weights = np.zeros((n, n_groups))
    weights[np.arange(n), index] = pos
    out = []
    chunk = max(1, 2_000_000 // max(n, 1))
    for start in range(0, draws, chunk):
        counts = rng.multinomial(n, np.full(n, 1.0 / n), size=min(chunk, draws - start))
        mass = counts @ weights
        total = mass.sum(axis=1, keepdims=True)
        with np.errstate(invalid="ignore", divide="ignore"):
            out.append(np.where(total > 0, mass / total, np.nan))
    return np.concatenate(out)


def method_groups(
    values: np.ndarray,
    halves: np.ndarray | None,
    groups: Groups,
    draws: int = BOOTSTRAP_DRAWS,
    seed: int = 0,
) -> dict[str, Any]:
    """One method's group table (JSON-able). ``values``: scores ``(n_train,)``; ``halves``:
    ``(2, n_train)`` half-sample scores or None. Rows sorted by share, largest first."""
    g = len(groups.names)
    train_share = np.bincount(groups.index, minlength=g) / len(groups.index)
    share = shares(values, groups.index, g)
    if share is None:
        return {"positive_mass": 0.0, "rows": [], "note": "no positive score: no mass to share"}
    boot = bootstrap_shares(values, groups.index, g, draws, seed)
    lo, hi = np.nanquantile(boot, [0.025, 0.975], axis=0)
    half = [shares(h, groups.index, g) for h in halves] if halves is not None else None
    rows: list[dict[str, Any]] = [
        {
            "group": groups.names[i],
            "n_train": int(np.sum(groups.index == i)),
            "train_share": float(train_share[i]),
            "share": float(share[i]),
            "ci": [float(lo[i]), float(hi[i])],
            "ratio": float(share[i] / train_share[i]),
            "half_shares": (
                None
                if half is None or any(h is None for h in half)
                else [float(h[i]) for h in half if h is not None]
            ),
        }
        for i in range(g)
        if train_share[i] > 0
    ]
    rows.sort(key=lambda r: -r["share"])
    return {"positive_mass": float(np.clip(values, 0, None).sum()), "rows": rows, "note": None}
