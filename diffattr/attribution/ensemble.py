"""Model ensembles: one method's scores from M models of the same training set, combined.

A gradient method's scores are a function of one trained model; models trained with other seeds,
on other subsets of the data, or the last checkpoints of one run disagree in ways that are
mostly noise for attribution, so averaging their scores lowers the variance (TRAK's and D-TRAK's
``ensemble`` protocol). Which models make the ensemble is decided elsewhere (the evaluation
harness trains them; a user names their folders); this module only combines.

How scores are combined (``norm``):

* ``"z"`` (default): each member's scores are standardised per query over the training images
  (mean 0, standard deviation 1) before averaging. Members' raw scales differ (each kernel's
  ridge is set from its own features' trace, gradient norms differ between models), and a plain
  sum lets the member with the largest scale decide the ranking; after standardising, every
  member has one vote.
* ``"none"``: the plain mean of the raw scores (what TRAK's and D-TRAK's code do: they sum the
  per-model scores).

Every member is a complete attributor with its own feature stores (named by its model's hash, so
an ensemble of 2 reuses the stores of an ensemble of 8 with the same first members).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import numpy as np

from diffattr.attribution.base import Queries, Scores
from diffattr.data.dataset import ImageDataset

log = logging.getLogger(__name__)

NORMS = ("z", "none")


def standardise(values: np.ndarray) -> np.ndarray:
    """Scores ``(..., n_train)`` with every row at mean 0, sd 1 (float64); a constant row -> 0."""
    v = np.asarray(values, dtype=np.float64)
    centred = v - v.mean(axis=-1, keepdims=True)
    sd = centred.std(axis=-1, keepdims=True)
    return np.divide(centred, sd, out=np.zeros_like(centred), where=sd > 0)


def combine_scores(members: Sequence[Scores], norm: str = "z", method: str | None = None) -> Scores:
    """The ensemble's scores ``(n_queries, n_train)`` from its members' (same queries, same
    training ids, in the same order). Halves (the stability figure) are combined likewise when
    every member has them."""
    if norm not in NORMS:
        raise ValueError(f"ensemble norm: {norm!r} is not one of {NORMS}")
    if not members:
        raise ValueError("ensemble: no member scores to combine")
    first = members[0]
    for i, s in enumerate(members[1:], start=1):
        if s.query_names != first.query_names or not np.array_equal(s.train_ids, first.train_ids):
            raise ValueError(
                f"ensemble: member {i} scored other queries or training ids than member 0"
            )

    def mean(arrays: list[np.ndarray]) -> np.ndarray:
        parts = [standardise(a) if norm == "z" else a.astype(np.float64) for a in arrays]
        return np.mean(parts, axis=0)

    halves = None
    if all(s.halves is not None for s in members):
        halves = mean([s.halves for s in members if s.halves is not None])
    config = dict(first.config)
    config["ensemble"] = {
        "size": len(members),
        "norm": norm,
        "members": [s.config.get("model_hash") for s in members],
    }
    return Scores(
        values=mean([s.values for s in members]),
        train_ids=first.train_ids,
        query_names=list(first.query_names),
        method=method or first.method,
        config=config,
        halves=halves,
    )


class Ensemble:
    """An attributor made of ``members`` (one per model, same method and options): ``fit`` fits
    each, ``score`` combines their scores with :func:`combine_scores`.

    ``members``: the member attributors, the first being the reference model's (its scores'
    config is the ensemble's). Featurization passes (:func:`~diffattr.attribution.onepass
    .featurize_for`) see the members through :attr:`members`.
    """

    def __init__(self, name: str, members: Sequence[Any], norm: str = "z") -> None:
        if not members:
            raise ValueError(f"{name}: an ensemble needs at least one model")
        if norm not in NORMS:
            raise ValueError(f"{name}: ensemble norm {norm!r} is not one of {NORMS}")
        self.name = name
        self.members = list(members)
        self.norm = norm

    def fit(self, train: ImageDataset) -> None:
        for i, m in enumerate(self.members):
            log.info("%s: fitting member %d/%d", self.name, i + 1, len(self.members))
            m.fit(train)

    def score(self, queries: Queries) -> Scores:
        return combine_scores([m.score(queries) for m in self.members], self.norm, self.name)


def make_ensemble(
    method: str,
    models: Sequence[Any],
    work_dir: Any = None,
    progress: bool = False,
    norm: str = "z",
    **options: Any,
) -> Ensemble:
    """Method ``method`` with ``options`` on each of ``models`` (loaded models, the reference
    first), combined into one :class:`Ensemble`. Every member shares ``work_dir`` (stores are
    named by model hash)."""
    from diffattr.attribution.registry import make_attributor

    members = [
        make_attributor(method, m, work_dir=work_dir, progress=progress, **options) for m in models
    ]
    return Ensemble(method, members, norm)
