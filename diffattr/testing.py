"""Tiny seeded models for tests, workers and quick benchmarks (no download, milliseconds to build).

One definition, so the tests, the multi-process worker scripts and ``--quick`` benchmarks all
differentiate the same network and a single-process reference can be compared with a
multi-process run bit for bit.
"""

from __future__ import annotations

from pathlib import Path
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


def tiny_clip_folder(path: str | Path, seed: int = 0, size: int = 32) -> Path:
    """A random tiny transformers CLIP vision checkpoint (hidden 32, 2 layers, image ``size``,
    projection 16) and its ``CLIPImageProcessor`` saved into ``path`` (no download)."""
    from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModelWithProjection

    config = CLIPVisionConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        image_size=size,
        patch_size=8,
        projection_dim=16,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        net = CLIPVisionModelWithProjection(config)
    return _save_checkpoint(net, CLIPImageProcessor(size=size, crop_size=size), path)


def tiny_dino_folder(path: str | Path, seed: int = 0, size: int = 32) -> Path:
    """A random tiny transformers DINOv2 checkpoint (hidden 32, 2 layers, patch 8) and its
    ``BitImageProcessor`` (resize + crop to ``size``) saved into ``path`` (no download)."""
    from transformers import BitImageProcessor, Dinov2Config, Dinov2Model

    config = Dinov2Config(
        hidden_size=32,
        mlp_ratio=2,
        num_hidden_layers=2,
        num_attention_heads=2,
        image_size=size,
        patch_size=8,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        net = Dinov2Model(config)
    processor = BitImageProcessor(
        size={"shortest_edge": size}, crop_size={"height": size, "width": size}
    )
    return _save_checkpoint(net, processor, path)


def _save_checkpoint(net: Any, processor: Any, path: str | Path) -> Path:
    from transformers.utils import logging as tlog

    path = Path(path)
    bars = tlog.is_progress_bar_enabled()
    tlog.disable_progress_bar()
    try:
        net.eval().save_pretrained(path)
        processor.save_pretrained(path)
    finally:
        if bars:
            tlog.enable_progress_bar()
    return path
