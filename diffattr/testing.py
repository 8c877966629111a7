"""Tiny seeded models for tests, workers and quick benchmarks (no download, milliseconds to build).

One definition, so the tests, the multi-process worker scripts and ``--quick`` benchmarks all
differentiate the same network and a single-process reference can be compared with a
multi-process run bit for bit.
"""

from __future__ import annotations

from typing import Any

import torch
from diffusers.models.unets.unet_2d import UNet2DModel
from diffusers.schedulers.scheduling_ddpm import DDPMScheduler

from diffattr.diffusion.model import DiffusionModel

#: UNet2DModel keyword arguments of the tiny test network: 1x8x8 images, one attention block,
#: about 26k parameters. Lists (not tuples) so the dict can also be dumped into a YAML config.
TINY_UNET: dict[str, Any] = {
    "sample_size": 8,
    "in_channels": 1,
    "out_channels": 1,
    "block_out_channels": [8, 16],
    "down_block_types": ["DownBlock2D", "AttnDownBlock2D"],
    "up_block_types": ["AttnUpBlock2D", "UpBlock2D"],
    "layers_per_block": 1,
    "norm_num_groups": 4,
}


def tiny_unet(seed: int = 0, **overrides: Any) -> UNet2DModel:
    """The tiny UNet with weights drawn from ``seed``; the global RNG state is left untouched."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        unet = UNet2DModel(**{**TINY_UNET, **overrides})
    return unet.eval()


def tiny_model(
    seed: int = 0,
    *,
    dtype: torch.dtype = torch.float32,
    num_train_timesteps: int = 1000,
    **overrides: Any,
) -> DiffusionModel:
    """:func:`tiny_unet` in ``dtype`` with a default DDPM scheduler of ``num_train_timesteps``."""
    unet = tiny_unet(seed, **overrides)
    # torch.nn.Module.to directly: diffusers' decorated ModelMixin.to confuses mypy
    torch.nn.Module.to(unet, dtype=dtype)
    return DiffusionModel(
        unet=unet, scheduler=DDPMScheduler(num_train_timesteps=num_train_timesteps)
    )
