"""Linear datamodeling score (LDS): does a method's score predict what retraining measures?

For query q and subset m, the method predicts ``g[m, q] = sum_{j in subset m} score[q, j]``; the
retrained model on subset m gives the measured loss ``L[m, q]``. Because a higher score means a
training image *lowered* the query's loss (see ``diffattr.attribution.base``), LDS correlates the
predictions with the **negative** loss: ``LDS_q = spearman_m(g[m, q], -L[m, q])``, then averages
over queries, with a bootstrap confidence interval over queries.

Spearman (:mod:`diffattr.stats`) uses average ranks for ties, so it matches ``scipy.stats.spearmanr``.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from diffattr.attribution.base import Scores
from diffattr.evaluation.subsets import SubsetMasks
from diffattr.stats import bootstrap_ci, spearman, spearman_columns

__all__ = ["LDSResult", "bootstrap_ci", "lds", "spearman", "spearman_columns", "subset_score_sums"]

log = logging.getLogger(__name__)


def subset_score_sums(scores: Scores, subsets: SubsetMasks) -> np.ndarray:
    """``(M, Q)``: for each subset, the sum of each query's scores over the subset's ids."""
    masks = subsets.aligned(scores.train_ids).astype(np.float64)
    return masks @ scores.values.astype(np.float64).T


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


@dataclass
class SeedCeiling:
    """How well one retrained seed's losses predict another's: the noise ceiling of LDS.

    ``seed_corr``: per query, the Spearman correlation across subsets between the losses of two
    retraining seeds (averaged over seed pairs), with its mean and bootstrap CI. If a model's loss
    is ``f(subset) + noise`` with the noise independent across seeds, the best possible predictor
    ``f`` reaches a correlation of ``sqrt(S r / (1 + (S - 1) r))`` with the mean of ``S`` seeds
    (``r`` = ``mean`` seed correlation): ``ceiling`` for the evaluation's own target (the mean of
    its ``seeds`` seeds) and ``ceiling_one_seed`` (``sqrt(r)``) for a single seed. A method's LDS
    reads as a fraction of ``ceiling``.
    """

    per_query: np.ndarray
    query_names: list[str]
    mean: float
    ci_low: float
    ci_high: float
    seeds: int
    ceiling: float
    ceiling_one_seed: float

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["per_query"] = [float(v) for v in self.per_query]
        return d


def ceiling_from_seed_corr(r: float, seeds: int) -> float:
    """``sqrt(S r / (1 + (S - 1) r))`` (0 for ``r <= 0``): see :class:`SeedCeiling`."""
    if not np.isfinite(r) or r <= 0:
        return 0.0
    return float(np.sqrt(seeds * r / (1.0 + (seeds - 1) * r)))


def seed_ceiling(
    losses_per_seed: np.ndarray,
    query_names: list[str],
    n_boot: int = 1000,
    seed: int = 0,
    level: float = 0.95,
) -> SeedCeiling:
    """:class:`SeedCeiling` of ``losses_per_seed`` ``(M, S, Q)`` (needs ``S >= 2`` seeds)."""
    losses = np.asarray(losses_per_seed, dtype=np.float64)
    if losses.ndim != 3 or losses.shape[2] != len(query_names):
        raise ValueError(
            f"seed ceiling: losses have shape {losses.shape}; want (M, S, {len(query_names)})"
        )
    S = losses.shape[1]
    if S < 2:
        raise ValueError("seed ceiling: needs at least 2 retraining seeds per subset")
    pairs = [(a, b) for a in range(S) for b in range(a + 1, S)]
    per_pair = np.stack([spearman_columns(losses[:, a], losses[:, b]) for a, b in pairs])
    per_query = np.nan_to_num(per_pair, nan=0.0).mean(axis=0)
    lo, hi = bootstrap_ci(per_query, n_boot=n_boot, seed=seed, level=level)
    r = float(per_query.mean())
    return SeedCeiling(
        per_query=per_query,
        query_names=list(query_names),
        mean=r,
        ci_low=lo,
        ci_high=hi,
        seeds=S,
        ceiling=ceiling_from_seed_corr(r, S),
        ceiling_one_seed=ceiling_from_seed_corr(r, 1),
    )
