"""DAS, the Diffusion Attribution Score (Lin, Tao, Dong, Xu; ICLR 2025; arXiv 2410.18639;
code: github.com/Jinxu-Lin/DAS).

What the paper defines. DAS measures a training sample's influence by the change of the *predicted
noise* when the sample is removed, not by the change of the loss: its definition (Eq. 9 of the
ICLR/OpenReview version, as numbered by the public reviews; the full text was not available to us,
so equation numbers are second-hand while the formulas below were checked against the released
code) is ``DAS(x, z_i) = E_{t, eps} || eps_theta(x_t, t) - eps_theta_{-i}(x_t, t) ||^2``
(the KL divergence between the two models' Gaussian reverse steps, up to a constant). It then
linearises the noise predictor in ``theta``, estimates ``theta_{-i} - theta`` with one Newton step on
the noise-prediction objective (Gauss-Newton Hessian ``Phi^T Phi`` of the output Jacobians, plus
the Sherman-Morrison leave-one-out factor), which gives a TRAK-like form in which the training
sample enters through ``(Phi^T Phi)^{-1} phi_i`` times its *residual* ``eps_theta(x^i_t, t) - eps``;
Section 3.3 makes it computable by moving the timestep expectation inside the norm, projecting
gradients to ``k`` dimensions and using few timesteps.

What is implemented here (the form of the authors' released scoring code, ``method='DAS1'`` in
``CIFAR*/07_score.py`` with features from ``03_grad.py``):

    g(z, t)  = grad_theta f(eps_theta(x_t, t))            f = output (default: mean over pixels
                                                          of eps_theta, the code's "mean" output)
    phi(z)   = P^T (1/S) sum_t g(z, t) / |g(z, t)|        unit-normalised per timestep, averaged
    r_i      = mean_{t, draw} sqrt(mean_pixels (eps_theta(x^i_t, t) - eps)^2)   residual size
    DAS(q, i) = phi_q^T (Phi^T Phi + lambda I)^{-1} phi_i * r_i

Approximations, stated plainly:

- The vector-valued output ``eps_theta`` (``C*H*W`` values) is reduced to a scalar before taking
  gradients: the default ``average`` output is its projection onto the normalised all-ones
  direction, as in the released code. ``output`` may name any other output function.
- The squared norm of the paper's definition is not taken: the signed linear score keeps this
  package's sign convention (higher = the training image lowers the query's loss) and is what the
  released code evaluates with LDS. The Sherman-Morrison leverage factor ``1/(1 - h_ii)`` is
  dropped (as in ``DAS1``).
- The residual ``r_i`` is the root-mean-square denoising error at the same timesteps and noise
  used for the features (``residual="rms"``). The released code additionally rescales the
  per-timestep errors by their norm over all 1000 timesteps; we do not. ``residual="none"`` gives
  the unweighted kernel (then DAS equals D-TRAK on normalised ``average``-output gradients).
- Candidate filtering with CLIP (Section 4.3) is not implemented; every training image is scored.
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import Tensor

from diffattr.attribution.conditioning import data_condition, dataset_inputs, prediction_target
from diffattr.attribution.featurize import FeaturizeArgs, row_noise
from diffattr.attribution.methods.common import store_folder, store_rows
from diffattr.attribution.methods.trak import TrakKernelAttributor, TrakOptions
from diffattr.attribution.onepass import StoreRequest, featurize_many
from diffattr.attribution.outputs import OUTPUTS
from diffattr.data.dataset import ImageDataset

RESIDUALS = ("rms", "none")
log = logging.getLogger(__name__)


@dataclass
class DASOptions(TrakOptions):
    """``output``: scalar reduction of the predicted noise (default ``average``).
    ``residual``: training-sample weight, ``rms`` (denoising error) or ``none``.

    125 timesteps by default (the others' 100): on the demo model two noise seeds then share 9.4 of
    the top-10 (8.3 at 50 timesteps; README, "Stability").
    """

    output: str = "average"
    residual: str = "rms"
    timesteps: int = 125

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.output not in OUTPUTS:
            raise ValueError(
                f"output: {self.output!r} is unknown; expected one of {sorted(OUTPUTS)}"
            )
        if self.residual not in RESIDUALS:
            raise ValueError(f"residual: {self.residual!r} is unknown; expected one of {RESIDUALS}")


@torch.no_grad()
def residual_errors(
    model: Any, data: ImageDataset, timesteps: list[int], args: FeaturizeArgs
) -> Tensor:
    """RMS denoising error per (image, timestep, draw): ``(n, S, D)`` float64.

    Uses the featurizer's noise (:func:`~diffattr.attribution.featurize.row_noise`) so the errors
    are measured at exactly the noisy inputs the features were taken at. The attributor reads
    them from the featurization pass instead (one forward for both); this loop is the reference
    (tests, ``scripts/stability.py``).
    """
    inputs = dataset_inputs(model, data)  # a latent model's VAE latents
    shape = tuple(inputs.shape[1:])
    labels_all = data_condition(model, data, slice(None))
    S, D = len(timesteps), args.num_noise
    rows = [(j, s, d) for j in range(len(data)) for s in range(S) for d in range(D)]
    out = torch.zeros(len(data), S, D, dtype=torch.float64)
    for r0 in range(0, len(rows), args.batch_size):
        chunk = rows[r0 : r0 + args.batch_size]
        idx = torch.tensor([j for j, _, _ in chunk])
        si = torch.tensor([s for _, s, _ in chunk])
        di = torch.tensor([d for _, _, d in chunk], dtype=torch.int64)
        tt = torch.tensor([timesteps[s] for _, s, _ in chunk], dtype=torch.int64)
        noise = row_noise(data.ids[idx], tt, di, shape, args.seed, args.noise).to(model.device)
        x0 = inputs[idx].to(model.device)
        t_dev = tt.to(model.device)
        x_t = model.scheduler.add_noise(x0, noise, t_dev)
        y = None if labels_all is None else labels_all[idx].to(model.device)
        target = prediction_target(model, x0, noise, t_dev)
        err = (model.eps(x_t, t_dev, y).float() - target.float()).pow(2).flatten(1).mean(1)
        out[idx, si, di] = err.sqrt().to("cpu", torch.float64)
    return out


def residual_norms(
    model: Any, data: ImageDataset, timesteps: list[int], args: FeaturizeArgs
) -> Tensor:
    """``r_i`` ``(n,)`` float64: mean over timesteps and draws of the RMS denoising error."""
    return residual_errors(model, data, timesteps, args).mean(dim=(1, 2))


class DAS(TrakKernelAttributor):
    """``das``: TRAK kernel on unit-normalised output gradients, times the training residual.

    The residuals of every (image, timestep, draw) sample come from the same forwards as the
    features, in the same featurization pass, into a store of their own (``residuals-*`` beside the
    features), so reopening a fitted folder forwards nothing."""

    name: str = "das"
    normalize: ClassVar[bool] = True

    def __init__(self, model: Any, work_dir: Path | None, options: Any, progress: bool = False):
        super().__init__(model, work_dir, options, progress)
        self._errors: Tensor | None = None  # (n, S, D) in training-set order

    def output_name(self) -> str:
        return str(self.options.output)

    def store_requests(self, train: ImageDataset) -> list[StoreRequest]:
        """The features and, unless ``residual="none"``, the residuals of the same samples."""
        requests = super().store_requests(train)
        if self.options.residual == "none":
            return requests
        args = dataclasses.replace(self.train_args(), label="residuals")
        folder = store_folder(self.work, args, self.model, train)
        return [*requests, StoreRequest(args, folder, what="residuals")]

    def training_features(
        self, train: ImageDataset, args: FeaturizeArgs
    ) -> tuple[Tensor, Path, int | None]:
        requests = self.store_requests(train)
        stores = featurize_many(self.model, train, requests, progress=self.progress)
        self._errors = (
            None if len(stores) == 1 else store_rows(stores[1], train, requests[1].out).double()
        )
        return store_rows(stores[0], train, requests[0].out), requests[0].out, None

    def train_weights(self, train: ImageDataset, part: int | None) -> Tensor | None:
        """``r_i`` over the same samples as the features (all of them, or half ``part``)."""
        if self.options.residual == "none":
            return None
        if self._errors is None:
            raise RuntimeError("das: residuals are read when the training features are")
        rows = self._errors.reshape(self._errors.shape[0], -1)  # (n, S * D), timestep-major
        return rows.mean(dim=1) if part is None else rows[:, part::2].mean(dim=1)
