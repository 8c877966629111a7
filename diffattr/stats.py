"""Rank statistics shared by the attribution layer (stability figures) and the evaluation (LDS).

Spearman is implemented with average ranks for ties, so it matches ``scipy.stats.spearmanr``.
"""

from __future__ import annotations

import numpy as np


def rankdata(x: np.ndarray, axis: int = 0) -> np.ndarray:
    """Ranks 1..n along ``axis`` with ties given the average of the ranks they span (float64)."""
    x = np.moveaxis(np.asarray(x, dtype=np.float64), axis, -1)
    n = x.shape[-1]
    flat = x.reshape(-1, n)
    out = np.empty_like(flat)
    for r in range(flat.shape[0]):
        row = flat[r]
        order = np.argsort(row, kind="mergesort")
        sorted_row = row[order]
        # Start index of each run of equal values; a run spanning ranks a+1..b gets (a+1+b)/2.
        starts = np.flatnonzero(np.r_[True, sorted_row[1:] != sorted_row[:-1]])
        ends = np.r_[starts[1:], n]
        avg = (starts + ends + 1) / 2.0
        ranks_sorted = np.repeat(avg, ends - starts)
        out[r, order] = ranks_sorted
    return np.moveaxis(out.reshape(x.shape), -1, axis)


def pearson_columns(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Pearson correlation of matching columns of ``a`` and ``b`` ``(n, Q)`` -> ``(Q,)``.

    NaN where a column is constant (the correlation is undefined).
    """
    a = a - a.mean(axis=0, keepdims=True)
    b = b - b.mean(axis=0, keepdims=True)
    num = (a * b).sum(axis=0)
    den = np.sqrt((a * a).sum(axis=0) * (b * b).sum(axis=0))
    with np.errstate(invalid="ignore", divide="ignore"):
        r = num / den
    r[den <= 1e-300] = np.nan
    return np.clip(r, -1.0, 1.0)


def spearman_columns(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Spearman rank correlation of matching columns of ``a`` and ``b`` ``(n, Q)`` -> ``(Q,)``."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if a.shape != b.shape or a.ndim != 2:
        raise ValueError(
            f"spearman: want two (n, Q) arrays of equal shape, got {a.shape}, {b.shape}"
        )
    if a.shape[0] < 2:
        raise ValueError("spearman: need at least 2 observations")
    return pearson_columns(rankdata(a, axis=0), rankdata(b, axis=0))


def spearman(a: np.ndarray, b: np.ndarray) -> float:
    """Spearman rank correlation of two 1-D arrays (NaN when either is constant)."""
    return float(spearman_columns(np.asarray(a)[:, None], np.asarray(b)[:, None])[0])


def bootstrap_ci(
    values: np.ndarray, n_boot: int = 1000, seed: int = 0, level: float = 0.95
) -> tuple[float, float]:
    """Percentile bootstrap CI of the mean of ``values`` (resampling entries with replacement)."""
    values = np.asarray(values, dtype=np.float64)
    if values.size == 0:
        return float("nan"), float("nan")
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, values.size, size=(n_boot, values.size))
    means = values[idx].mean(axis=1)
    lo, hi = np.quantile(means, [(1 - level) / 2, (1 + level) / 2])
    return float(lo), float(hi)


def top_k_overlap(a: np.ndarray, b: np.ndarray, k: int) -> np.ndarray:
    """Fraction of shared entries among the ``k`` highest of each row of ``a`` and ``b`` ``(m, n)``.

    Ties are broken by position (stable sort), as everywhere rankings are printed.
    """
    a, b = np.atleast_2d(a), np.atleast_2d(b)
    k = min(k, a.shape[1])
    ta = np.argsort(-a, axis=1, kind="stable")[:, :k]
    tb = np.argsort(-b, axis=1, kind="stable")[:, :k]
    return np.array(
        [len(set(x.tolist()) & set(y.tolist())) / k for x, y in zip(ta, tb, strict=True)]
    )
