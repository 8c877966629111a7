"""Random training subsets for the linear datamodeling score (LDS).

Subset ``m`` keeps exactly ``round(alpha * n)`` training images chosen by a generator seeded with
``derive_seed(seed, "subset", m)``, so any subset can be rebuilt from the seed alone, independently
of how many others exist. Masks are saved beside the run as ``subsets.safetensors`` (uint8 masks
``(M, n)`` + training ids ``(n,)``) and ``subsets.json`` (the settings and per-subset id lists).
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from safetensors.numpy import load_file, save_file

from diffattr.repro import derive_seed, write_json_atomic

log = logging.getLogger(__name__)


class SubsetError(ValueError):
    """Bad subset settings, or a saved subset file that does not match its seed."""


@dataclass
class SubsetMasks:
    """``masks``: bool ``(M, n)``, row m true where training id ``train_ids[j]`` is in subset m."""

    masks: np.ndarray
    train_ids: np.ndarray
    alpha: float
    seed: int

    def __post_init__(self) -> None:
        self.masks = np.ascontiguousarray(self.masks, dtype=bool)
        self.train_ids = np.asarray(self.train_ids, dtype=np.int64)
        if self.masks.ndim != 2 or self.masks.shape[1] != self.train_ids.shape[0]:
            raise SubsetError(
                f"subset masks have shape {self.masks.shape}; want (M, {self.train_ids.shape[0]})"
            )
        empty = np.flatnonzero(~self.masks.any(axis=1))
        if empty.size:
            raise SubsetError(f"subset(s) {empty.tolist()} are empty")

    def __len__(self) -> int:
        return int(self.masks.shape[0])

    def ids(self, m: int) -> np.ndarray:
        """Training ids in subset ``m``, ascending by position."""
        return self.train_ids[self.masks[m]]

    def aligned(self, train_ids: np.ndarray) -> np.ndarray:
        """Masks ``(M, len(train_ids))`` with columns reordered to ``train_ids`` (same id set)."""
        train_ids = np.asarray(train_ids, dtype=np.int64)
        if train_ids.shape == self.train_ids.shape and np.array_equal(train_ids, self.train_ids):
            return self.masks
        pos = {int(i): j for j, i in enumerate(self.train_ids)}
        missing = [int(i) for i in train_ids if int(i) not in pos]
        if missing or len(train_ids) != len(self.train_ids):
            raise SubsetError(
                f"training ids do not match the subsets' ids ({len(train_ids)} vs "
                f"{len(self.train_ids)}; unknown: {missing[:5]})"
            )
        return self.masks[:, [pos[int(i)] for i in train_ids]]


def subset_size(n: int, alpha: float) -> int:
    if not 0.0 < alpha <= 1.0:
        raise SubsetError(f"alpha must be in (0, 1], got {alpha}")
    k = int(round(alpha * n))
    if k < 1:
        raise SubsetError(f"alpha={alpha} of {n} training images gives an empty subset")
    return k


def make_subsets(
    train_ids: np.ndarray,
    num_subsets: int,
    alpha: float,
    seed: int,
    labels: np.ndarray | None = None,
) -> SubsetMasks:
    """``num_subsets`` subsets of exactly ``round(alpha * n)`` images each (seeded, per subset).

    With ``labels`` (aligned with ``train_ids``) every subset is class-stratified, as D-TRAK
    draws them (scikit-learn's stratified split, seeded per subset).
    """
    train_ids = np.asarray(train_ids, dtype=np.int64)
    n = int(train_ids.shape[0])
    if n == 0:
        raise SubsetError("no training images to draw subsets from")
    if num_subsets < 1:
        raise SubsetError(f"num_subsets must be >= 1, got {num_subsets}")
    k = subset_size(n, alpha)
    masks = np.zeros((num_subsets, n), dtype=bool)
    if labels is not None and len(labels) != n:
        raise SubsetError(f"{len(labels)} labels for {n} training images")
    for m in range(num_subsets):
        if labels is None:
            rng = np.random.default_rng(derive_seed(seed, "subset", m))
            masks[m, rng.permutation(n)[:k]] = True
        else:
            from diffattr.data.selection import stratified_rows

            rows = stratified_rows(labels, k, derive_seed(seed, "subset", m) % 2**32)
            masks[m, rows] = True
    return SubsetMasks(masks=masks, train_ids=train_ids, alpha=alpha, seed=seed)


def save_subsets(subsets: SubsetMasks, folder: str | Path) -> Path:
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tmp = folder / ".subsets.safetensors.tmp"
    # safetensors writes the raw buffer: a non-C-contiguous array (e.g. made by fancy indexing
    # along axis 1) would be saved scrambled, so make both C-contiguous first.
    tensors = {
        "masks": np.ascontiguousarray(subsets.masks, dtype=np.uint8),
        "train_ids": np.ascontiguousarray(subsets.train_ids),
    }
    save_file(tensors, str(tmp))
    tmp.replace(folder / "subsets.safetensors")
    write_json_atomic(
        folder / "subsets.json",
        {
            "num_subsets": len(subsets),
            "alpha": subsets.alpha,
            "seed": subsets.seed,
            "n_train": int(subsets.train_ids.shape[0]),
            "subset_ids": [subsets.ids(m).tolist() for m in range(len(subsets))],
        },
    )
    return folder


def load_subsets(folder: str | Path) -> SubsetMasks:
    folder = Path(folder)
    for name in ("subsets.safetensors", "subsets.json"):
        if not (folder / name).exists():
            raise FileNotFoundError(f"{folder / name}: missing; no saved subsets here")
    t = load_file(str(folder / "subsets.safetensors"))
    meta = json.loads((folder / "subsets.json").read_text())
    return SubsetMasks(
        masks=t["masks"].astype(bool),
        train_ids=t["train_ids"],
        alpha=float(meta["alpha"]),
        seed=int(meta["seed"]),
    )


def ensure_subsets(
    folder: str | Path,
    train_ids: np.ndarray,
    num_subsets: int,
    alpha: float,
    seed: int,
    labels: np.ndarray | None = None,
) -> SubsetMasks:
    """Load the subsets saved in ``folder``, or make and save them; a saved set must match its seed."""
    want = make_subsets(train_ids, num_subsets, alpha, seed, labels)
    folder = Path(folder)
    if (folder / "subsets.safetensors").exists():
        have = load_subsets(folder)
        if (
            have.masks.shape != want.masks.shape
            or not np.array_equal(have.masks, want.masks)
            or not np.array_equal(have.train_ids, want.train_ids)
        ):
            raise SubsetError(
                f"{folder}: saved subsets differ from those made by seed={seed}, alpha={alpha}, "
                f"num_subsets={num_subsets}; use another output folder"
            )
        return have
    save_subsets(want, folder)
    log.info(
        "made %d subsets of %d/%d images", num_subsets, int(want.masks[0].sum()), len(train_ids)
    )
    return want
