"""TRAK for diffusion models (Park et al. 2023, as adapted by Zheng et al. 2024).

Features: ``phi(z) = P^T (1/S) sum_t grad_theta L(z, t)`` with ``L`` the denoising loss
``mean_pixels (eps_theta(x_t, t) - eps)^2`` at ``S`` timesteps (evenly spaced by default, averaged
over ``num_noise`` noise draws each) and ``P`` a random projection. Scores:
``phi_q^T (Phi^T Phi + lambda I)^{-1} phi_i`` (see :mod:`diffattr.attribution.scoring`).
A higher score means training on ``z_i`` lowers the query's loss (the package-wide sign).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from torch import Tensor

from diffattr.attribution.featurize import FeaturizeArgs
from diffattr.attribution.methods.common import (
    FeatureAttributor,
    KernelOptions,
    kernel_device,
    make_featurize_args,
)
from diffattr.attribution.scoring import TrakKernel
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
        return self.kernel.scores(query_feats)


class Trak(TrakKernelAttributor):
    """``trak``: loss-gradient features, mean over timesteps, TRAK kernel."""

    name: str = "trak"
    output: ClassVar[str] = "loss"
