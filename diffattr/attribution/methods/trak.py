"""TRAK for diffusion models (Park et al. 2023, as adapted by Zheng et al. 2024).

Features: ``phi(z) = P^T (1/S) sum_t grad_theta L(z, t)`` with ``L`` the denoising loss
``mean_pixels (eps_theta(x_t, t) - eps)^2`` at ``S`` timesteps (evenly spaced by default, averaged
over ``num_noise`` noise draws each) and ``P`` a random projection. Scores:
``phi_q^T (Phi^T Phi + lambda I)^{-1} phi_i`` (see :mod:`diffattr.attribution.scoring`).
A higher score means training on ``z_i`` lowers the query's loss (the package-wide sign).
"""

from __future__ import annotations

import functools
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import Tensor

from diffattr.attribution.base import Queries, Scores
from diffattr.attribution.featurize import FeaturizeArgs
from diffattr.attribution.methods.common import (
    FeatureAttributor,
    KernelOptions,
    Scorer,
    kernel_device,
    make_featurize_args,
    make_scores,
)
from diffattr.attribution.scoring import TrakKernel, trak_scores_lambda_path
from diffattr.data.dataset import ImageDataset


@dataclass
class TrakOptions(KernelOptions):
    """TRAK options: the shared gradient options plus the kernel ridge (``lam``) and
    ``normalize``: unit-normalise every per-sample, per-timestep gradient before averaging over the
    samples (DAS's released code does; no ablation of it was published). None: the method's own
    choice (off for trak and d-trak, on for das)."""

    normalize: bool | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.normalize is not None and not isinstance(self.normalize, bool):
            raise ValueError(f"normalize: expected true, false or null, got {self.normalize!r}")


class TrakKernelAttributor(FeatureAttributor):
    """A :class:`FeatureAttributor` scored with the TRAK kernel; subclasses pick the output."""

    output: ClassVar[str] = "loss"
    normalize: ClassVar[bool] = False

    def __init__(self, model: Any, work_dir: Path | None, options: Any, progress: bool = False):
        super().__init__(model, work_dir, options, progress)
        # part (None: all samples, 0 / 1: a half) -> (kernel, per-training-image weights)
        self.kernels: dict[int | None, tuple[TrakKernel, Tensor | None]] = {}

    def output_name(self) -> str:
        return self.output

    def normalized(self) -> bool:
        """Are per-sample gradients unit-normalised (the option, else the method's choice)?"""
        chosen = getattr(self.options, "normalize", None)
        return self.normalize if chosen is None else bool(chosen)

    def train_args(self) -> FeaturizeArgs:
        return make_featurize_args(
            self.options, self.model, self.output_name(), self.name, normalize=self.normalized()
        )

    def build(self, train_feats: Tensor, train: ImageDataset, part: int | None) -> Scorer:
        kernel = TrakKernel(
            train_feats,
            lam=self.options.lam,
            lambda_scale=self.options.lambda_scale,
            device=kernel_device(self.model),
        )
        weights = self.train_weights(train, part)
        self.kernels[part] = (kernel, weights)
        if part is None:
            self.info["lambda"] = kernel.lam
            self.info["timesteps"] = self.train_args().timesteps.timesteps()
            self.info["query_timesteps"] = self.query_args().timesteps.timesteps()
        return functools.partial(self._scores, kernel, weights)

    @staticmethod
    def _scores(kernel: TrakKernel, weights: Tensor | None, query_feats: Tensor) -> Tensor:
        return weighted(kernel.scores(query_feats), weights)

    def train_weights(self, train: ImageDataset, part: int | None) -> Tensor | None:
        """Per-training-image weights ``(n,)`` of the kernel scores (none for TRAK; DAS: the
        residuals of the same samples)."""
        return None

    def score_lambda_path(self, queries: Queries, lams: list[float]) -> list[Scores]:
        """Scores of ``queries`` under each ridge in ``lams`` (query features computed once).

        Each result's config records its ``lambda``; the fitted kernel's own lambda is unchanged.
        With the stability figure, the two halves are swept with their own half kernels.
        """
        train = self.require_fit()
        q = self.query_features(queries)
        t0 = time.perf_counter()

        def sweep(part: int | None, feats: Tensor) -> list[Tensor]:
            kernel, weights = self.kernels[part]
            path = trak_scores_lambda_path(
                kernel.phi, feats, lams, block=kernel.block, device=kernel.device
            )
            return [weighted(p, weights) for p in path]

        full = sweep(None, q.full)
        halves = None
        if q.halves is not None and 0 in self.kernels:
            halves = [sweep(h, q.halves[h]) for h in (0, 1)]
        out = []
        fitted = self.info.get("lambda")
        try:
            for i, lam in enumerate(lams):
                self.info["lambda"] = float(lam)
                pair = None if halves is None else [halves[0][i], halves[1][i]]
                out.append(make_scores(self, train, queries, full[i], halves=pair))
        finally:
            self.info["lambda"] = fitted
        self.timing["score_s"] = time.perf_counter() - t0
        return out


def weighted(scores: Tensor, weights: Tensor | None) -> Tensor:
    """Kernel scores ``(m, n)`` times per-training-image weights ``(n,)`` (float64 product)."""
    if weights is None:
        return scores
    return (scores.to(torch.float64) * weights[None, :]).to(torch.float32)


class Trak(TrakKernelAttributor):
    """``trak``: loss-gradient features, mean over timesteps, TRAK kernel."""

    name: str = "trak"
    output: ClassVar[str] = "loss"
