"""TRAK for diffusion models (Park et al. 2023, as adapted by Zheng et al. 2024).

Features: ``phi(z) = P^T (1/S) sum_t grad_theta L(z, t)`` with ``L`` the denoising loss
``mean_pixels (eps_theta(x_t, t) - eps)^2`` at ``S`` timesteps (evenly spaced by default, averaged
over ``num_noise`` noise draws each) and ``P`` a random projection. Scores:
``phi_q^T (Phi^T Phi + lambda I)^{-1} phi_i`` (see :mod:`diffattr.attribution.scoring`).
A higher score means training on ``z_i`` lowers the query's loss (the package-wide sign).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import ClassVar

from torch import Tensor

from diffattr.attribution.base import Queries, Scores
from diffattr.attribution.featurize import FeaturizeArgs
from diffattr.attribution.methods.common import (
    FeatureAttributor,
    KernelOptions,
    kernel_device,
    make_featurize_args,
    make_scores,
)
from diffattr.attribution.scoring import TrakKernel, trak_scores_lambda_path
from diffattr.data.dataset import ImageDataset


@dataclass
class TrakOptions(KernelOptions):
    """TRAK options: the shared gradient options plus the kernel ridge (``lam``)."""


class TrakKernelAttributor(FeatureAttributor):
    """A :class:`FeatureAttributor` scored with the TRAK kernel; subclasses pick the output."""

    output: ClassVar[str] = "loss"
    normalize: ClassVar[bool] = False

    def output_name(self) -> str:
        return self.output

    def train_args(self) -> FeaturizeArgs:
        return make_featurize_args(
            self.options, self.model, self.output_name(), self.name, normalize=self.normalize
        )

    def prepare(self, train_feats: Tensor, train: ImageDataset) -> None:
        self.kernel = TrakKernel(
            train_feats,
            lam=self.options.lam,
            lambda_scale=self.options.lambda_scale,
            device=kernel_device(self.model),
        )
        self.info["lambda"] = self.kernel.lam
        self.info["timesteps"] = self.train_args().timesteps.timesteps()

    def kernel_scores(self, query_feats: Tensor) -> Tensor:
        return self.weight_scores(self.kernel.scores(query_feats))

    def weight_scores(self, base: Tensor) -> Tensor:
        """Method-specific reweighting of the kernel scores ``(m, n)`` (none for TRAK)."""
        return base

    def score_lambda_path(self, queries: Queries, lams: list[float]) -> list[Scores]:
        """Scores of ``queries`` under each ridge in ``lams`` (query features computed once).

        Each result's config records its ``lambda``; the fitted kernel's own lambda is unchanged.
        """
        train = self.require_fit()
        q = self.query_features(queries)
        t0 = time.perf_counter()
        path = trak_scores_lambda_path(
            self.kernel.phi, q, lams, block=self.kernel.block, device=self.kernel.device
        )
        out = []
        fitted = self.info.get("lambda")
        try:
            for lam, base in zip(lams, path, strict=True):
                self.info["lambda"] = float(lam)
                out.append(make_scores(self, train, queries, self.weight_scores(base)))
        finally:
            self.info["lambda"] = fitted
        self.timing["score_s"] = time.perf_counter() - t0
        return out


class Trak(TrakKernelAttributor):
    """``trak``: loss-gradient features, mean over timesteps, TRAK kernel."""

    name: str = "trak"
    output: ClassVar[str] = "loss"
