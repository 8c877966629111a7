"""Linear datamodeling score (LDS): does a method's score predict what retraining measures?

For query q and subset m, the method predicts ``g[m, q] = sum_{j in subset m} score[q, j]``; the
retrained model on subset m gives the measured loss ``L[m, q]``. Because a higher score means a
training image *lowered* the query's loss (see ``diffattr.attribution.base``), LDS correlates the
predictions with the **negative** loss: ``LDS_q = spearman_m(g[m, q], -L[m, q])``, then averages
over queries, with a bootstrap confidence interval over queries.

Spearman is implemented here with average ranks for ties (so it matches ``scipy.stats.spearmanr``).
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from diffattr.attribution.base import Scores
from diffattr.evaluation.subsets import SubsetMasks

log = logging.getLogger(__name__)


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


def subset_score_sums(scores: Scores, subsets: SubsetMasks) -> np.ndarray:
    """``(M, Q)``: for each subset, the sum of each query's scores over the subset's ids."""
    masks = subsets.aligned(scores.train_ids).astype(np.float64)
    return masks @ scores.values.astype(np.float64).T


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


@dataclass
class LDSResult:
    """``per_query``: ``(Q,)`` Spearman per query; ``mean`` and its bootstrap ``ci``."""

    per_query: np.ndarray
    query_names: list[str]
    mean: float
    ci_low: float
    ci_high: float
    n_subsets: int
    n_undefined: int  # queries whose predictions were constant across subsets (counted as 0)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["per_query"] = [float(v) for v in self.per_query]
        return d


def lds(
    scores: Scores,
    subsets: SubsetMasks,
    losses: np.ndarray,
    query_names: list[str],
    n_boot: int = 1000,
    seed: int = 0,
    level: float = 0.95,
) -> LDSResult:
    """LDS of ``scores`` against measured ``losses`` ``(M, Q)`` (columns named by ``query_names``).

    Score rows are matched to loss columns by query name. A query whose predicted subset sums are
    constant has an undefined rank correlation; it counts as 0 (no predictive power) rather than
    being dropped, so a method cannot gain by abstaining on hard queries.
    """
    losses = np.asarray(losses, dtype=np.float64)
    if losses.shape != (len(subsets), len(query_names)):
        raise ValueError(
            f"lds: losses have shape {losses.shape}; want ({len(subsets)}, {len(query_names)})"
        )
    col = {n: i for i, n in enumerate(query_names)}
    missing = [n for n in scores.query_names if n not in col]
    if missing:
        raise ValueError(f"lds: no ground truth for queries {missing[:5]}")
    measured = -losses[:, [col[n] for n in scores.query_names]]
    pred = subset_score_sums(scores, subsets)
    per_query = spearman_columns(pred, measured)
    undefined = np.isnan(per_query)
    if undefined.any():
        log.warning(
            "%s: %d queries have constant subset score sums; their LDS counts as 0",
            scores.method,
            int(undefined.sum()),
        )
        per_query = np.where(undefined, 0.0, per_query)
    lo, hi = bootstrap_ci(per_query, n_boot=n_boot, seed=seed, level=level)
    return LDSResult(
        per_query=per_query,
        query_names=list(scores.query_names),
        mean=float(per_query.mean()),
        ci_low=lo,
        ci_high=hi,
        n_subsets=len(subsets),
        n_undefined=int(undefined.sum()),
    )
