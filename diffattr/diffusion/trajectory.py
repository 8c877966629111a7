"""A generation's sampling trajectory: made by the sampler, read by Journey-TRAK."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class Trajectory:
    """One generation's sampling trajectory (what Journey-TRAK differentiates along).

    ``timesteps``: int64 ``(S,)`` scheduler timesteps in sampling order.
    ``xt``: ``(S, C, H, W)`` the noisy image fed to the model at each step.
    ``eps``: ``(S, C, H, W)`` the model's predicted noise at each step.
    """

    timesteps: torch.Tensor
    xt: torch.Tensor
    eps: torch.Tensor
