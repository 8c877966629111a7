"""Do the methods agree? Pairwise top-k overlap and rank correlation, and the likely sources.

One method's ranking can be an artefact of its approximation; a training image that most methods
put in their top-k is a much stronger lead than any single method's first place.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from diffattr.stats import spearman, top_k_overlap


def pairwise(values: dict[str, np.ndarray], k: int) -> list[dict[str, Any]]:
    """Every unordered pair of methods: top-``k`` overlap (fraction of ``k``) and Spearman
    correlation of the full score vectors. ``values``: method -> scores ``(n_train,)``."""
    names = list(values)
    out = []
    for a in range(len(names)):
        for b in range(a + 1, len(names)):
            va, vb = values[names[a]], values[names[b]]
            rho = spearman(va, vb) if len(va) >= 2 else float("nan")
            out.append(
                {
                    "a": names[a],
                    "b": names[b],
                    "overlap": float(top_k_overlap(va[None], vb[None], k)[0]),
                    "spearman": None if math.isnan(rho) else float(rho),
                }
            )
    return out


def likely_sources(
    tops: dict[str, list[int]], min_methods: int | None = None
) -> tuple[list[dict[str, Any]], int]:
    """Training ids in the top-k of at least ``min_methods`` methods (default: half of them,
    rounded up), most votes first, ties by best mean rank. ``tops``: method -> top-k ids, best
    first. Returns the rows and the vote threshold used."""
    need = min_methods or max(1, math.ceil(len(tops) / 2))
    votes: dict[int, list[tuple[str, int]]] = {}
    for method, ids in tops.items():
        for rank, tid in enumerate(ids, 1):
            votes.setdefault(tid, []).append((method, rank))
    rows: list[dict[str, Any]] = [
        {
            "id": tid,
            "n_methods": len(v),
            "methods": [m for m, _ in v],
            "mean_rank": float(np.mean([r for _, r in v])),
        }
        for tid, v in votes.items()
        if len(v) >= need
    ]
    rows.sort(key=lambda r: (-r["n_methods"], r["mean_rank"], r["id"]))
    return rows, need


def agreement(values: dict[str, np.ndarray], tops: dict[str, list[int]], k: int) -> dict[str, Any]:
    """The agreement section (JSON-able)."""
    rows, need = likely_sources(tops)
    return {
        "top_k": k,
        "pairs": pairwise(values, k),
        "min_methods": need,
        "n_methods": len(tops),
        "likely_sources": rows,
    }
