"""Gradient-similarity methods: Diffusion-TracIn, Diffusion-ReTrac, gradient dot and cosine.

All four use per-sample gradients of the denoising loss ``L(z, t)`` at the configured timesteps,
averaged over timesteps (and noise draws), randomly projected.

- ``tracin`` (TracIn, Pruthi et al. 2020, applied to diffusion as in Xie et al. 2024):
  ``score(q, i) = sum_c lr_c <g_q^c, g_i^c>`` over saved checkpoints ``c`` with learning rates
  ``lr_c`` (``g^c``: the projected, timestep-averaged loss gradient under checkpoint ``c``).
  Without ``checkpoints`` the given model is the single checkpoint with ``lr = 1``.
- ``diff-retrac`` (Diffusion-ReTrac, Xie et al. 2024, "Data Attribution for Diffusion Models:
  Timestep-induced Bias in Influence Estimation", TMLR; code txie1/diffusion-ReTrac): the same
  sum, but every per-timestep gradient is divided by its L2 norm before averaging, on both the
  training and the query side: ``g = (1/S) sum_t grad L(z,t) / |grad L(z,t)|``. This removes the
  "dominating norm" bias (gradient norms vary by orders of magnitude with ``t``, so without it a
  few training images with large-norm timesteps top every ranking). Deviations from the released
  code: the training gradient there is taken at the one timestep the image was trained at in that
  checkpoint's epoch (recorded during training), and the query gradient averages 16 noise draws
  before normalising; here both sides use the configured timesteps, and draws are normalised one
  by one (then averaged). Normalisation is on the exact gradient, before projection.
- ``grad-dot``: ``<g_q, g_i>`` under the one model. ``grad-cos``: ``<g_q, g_i> / (|g_q||g_i|)``.
"""

from __future__ import annotations

import functools
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
from torch import Tensor

from diffattr.attribution.base import Queries, Scores
from diffattr.attribution.featurize import FeaturizeArgs
from diffattr.attribution.methods.common import (
    FeatureAttributor,
    GradientAttributor,
    GradientOptions,
    Scorer,
    featurize_images,
    make_featurize_args,
    make_scores,
    query_condition,
    store_folder,
    train_features,
    train_parts,
)
from diffattr.attribution.onepass import StoreRequest
from diffattr.attribution.scoring import cosine_scores, dot_scores
from diffattr.data.dataset import ImageDataset
from diffattr.repro import to_jsonable


@dataclass
class TracInOptions(GradientOptions):
    """``checkpoints``: model folders (``diffattr.diffusion.model.load_model``), oldest first
    (in an evaluation config, ``training`` means the full model's training checkpoints);
    None uses the given model alone. ``learning_rates``: one per checkpoint (default 1.0 each)."""

    checkpoints: list[str] | None = None
    learning_rates: list[float] | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.checkpoints is not None:
            if isinstance(self.checkpoints, (str, Path)):
                self.checkpoints = [str(self.checkpoints)]
            self.checkpoints = [str(c) for c in self.checkpoints]
            if not self.checkpoints:
                raise ValueError("checkpoints: empty list; use None for the given model alone")
        n = 1 if self.checkpoints is None else len(self.checkpoints)
        if self.learning_rates is not None:
            self.learning_rates = [float(v) for v in self.learning_rates]
            if len(self.learning_rates) != n:
                raise ValueError(
                    f"learning_rates: {len(self.learning_rates)} values for {n} checkpoint(s)"
                )
            if not all(np.isfinite(v) for v in self.learning_rates):
                raise ValueError(f"learning_rates: non-finite value in {self.learning_rates}")

    def rates(self) -> list[float]:
        n = 1 if self.checkpoints is None else len(self.checkpoints)
        return list(self.learning_rates) if self.learning_rates is not None else [1.0] * n


@dataclass
class ReTracOptions(TracInOptions):
    """Same options as ``tracin``; gradients are unit-normalised per timestep."""


@dataclass
class GradDotOptions(GradientOptions):
    """Shared gradient options (one model)."""


@dataclass
class GradCosOptions(GradientOptions):
    """Shared gradient options (one model)."""


class TracIn(GradientAttributor):
    """``tracin``: ``sum_c lr_c <g_q^c, g_i^c>`` over checkpoints."""

    name: str = "tracin"
    normalize: ClassVar[bool] = False
    options: TracInOptions

    def __init__(
        self, model: Any, work_dir: Path | None, options: TracInOptions, progress: bool = False
    ) -> None:
        super().__init__(model, work_dir, options, progress)
        self._train_feats: list[list[Tensor]] = []

    def args(self, query: bool = False) -> FeaturizeArgs:
        return make_featurize_args(
            self.options, self.model, "loss", self.name, normalize=self.normalize, query=query
        )

    def checkpoint_model(self, c: int) -> Any:
        """Checkpoint ``c`` loaded on the given model's device (or the given model)."""
        if self.options.checkpoints is None:
            return self.model
        from diffattr.diffusion.model import load_model

        return load_model(self.options.checkpoints[c], device=self.model.device)

    def store_requests(self, train: ImageDataset) -> list[StoreRequest]:
        """The given model's store (checkpoints are other models: featurized by :meth:`fit`)."""
        if self.options.checkpoints is not None:
            return []
        args = self.args()
        return [StoreRequest(args, store_folder(self.work, args, self.model, train))]

    def fit(self, train: ImageDataset) -> None:
        self.check_train(train)
        args = self.args()
        t0 = time.perf_counter()
        # per checkpoint: [all samples, half 0, half 1] (the halves only with the stability figure)
        self._train_feats = []
        for c in range(len(self.options.rates())):
            model = self.checkpoint_model(c)
            folder = store_folder(self.work, args, model, train)
            full, halves = train_parts(
                train_features(model, train, args, folder, self.progress), args
            )
            self._train_feats.append([full, *(halves or [])])
        self.timing["featurize_train_s"] = time.perf_counter() - t0
        self.train = train

    def score(self, queries: Queries) -> Scores:
        train = self.require_fit()
        args = self.args(query=True)
        # Full-budget scores and the two half-budget ones (the stability figure).
        totals = [torch.zeros(len(queries), len(train), dtype=torch.float64) for _ in range(3)]
        split = True
        t_feat = t_score = 0.0
        for c, lr in enumerate(self.options.rates()):
            model = self.checkpoint_model(c)
            t0 = time.perf_counter()
            labels = query_condition(model, queries)
            q = featurize_images(
                model,
                queries.images,
                labels,
                args.timesteps.timesteps(),
                args,
                "mean",
                progress=self.progress,
            )
            t1 = time.perf_counter()
            parts = self._train_feats[c]
            split = split and q.halves is not None and len(parts) == 3
            queries_parts = [q.full, *(q.halves or ())]
            for total, train_part, feats in zip(totals, parts, queries_parts, strict=False):
                total += lr * dot_scores(train_part, feats).to(torch.float64)
            t_feat += t1 - t0
            t_score += time.perf_counter() - t1
        self.timing["featurize_queries_s"] = t_feat
        self.timing["score_s"] = t_score
        return make_scores(self, train, queries, totals[0], halves=totals[1:] if split else None)

    def config(self) -> dict[str, Any]:
        return {
            "options": to_jsonable(self.options),
            "learning_rates": self.options.rates(),
            "timesteps": self.args().timesteps.timesteps(),
            "query_timesteps": self.args(query=True).timesteps.timesteps(),
            "timing": dict(self.timing),
        }


class DiffReTrac(TracIn):
    """``diff-retrac``: TracIn on per-timestep unit-normalised gradients."""

    name: str = "diff-retrac"
    normalize: ClassVar[bool] = True


class _OneModelGrad(FeatureAttributor):
    def similarity(self, train_feats: Tensor, query_feats: Tensor) -> Tensor:
        raise NotImplementedError

    def train_args(self) -> FeaturizeArgs:
        return make_featurize_args(self.options, self.model, "loss", self.name)

    def build(self, train_feats: Tensor, train: ImageDataset, part: int | None) -> Scorer:
        if part is None:
            self.info["timesteps"] = self.train_args().timesteps.timesteps()
        return functools.partial(self.similarity, train_feats)


class GradDot(_OneModelGrad):
    """``grad-dot``: ``<g_q, g_i>``."""

    name: str = "grad-dot"

    def similarity(self, train_feats: Tensor, query_feats: Tensor) -> Tensor:
        return dot_scores(train_feats, query_feats)


class GradCos(_OneModelGrad):
    """``grad-cos``: cosine of ``g_q`` and ``g_i``."""

    name: str = "grad-cos"

    def similarity(self, train_feats: Tensor, query_feats: Tensor) -> Tensor:
        return cosine_scores(train_feats, query_feats)
