"""Tiny seeded models for tests, workers and quick benchmarks (no download, milliseconds to build).

One definition, so the tests, the multi-process worker scripts and ``--quick`` benchmarks all
differentiate the same network and a single-process reference can be compared with a
multi-process run bit for bit.
"""

from __future__ import annotations

import json
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


#: Words of the tiny text-to-image tokenizer: each is one token (the BPE merges build them).
TINY_T2I_WORDS: tuple[str, ...] = (
    "a",
    "an",
    "the",
    "of",
    "in",
    "and",
    "with",
    "painting",
    "photo",
    "picture",
    "drawing",
    "digit",
    "zero",
    "one",
    "thick",
    "thin",
    "outlined",
    "inverted",
    "style",
    "ukiyo",
    "e",
    "post",
    "impressionism",
)
#: token positions of the tiny text encoder (the tokenizer pads and truncates to this)
TINY_T2I_MAX_LENGTH = 16


def tiny_clip_vocab(
    words: tuple[str, ...] = TINY_T2I_WORDS,
) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """A CLIP BPE vocabulary and merge list in which every word of ``words`` is one token (and
    every lowercase letter of them is a token, so other words still tokenize)."""
    from diffattr.diffusion.t2i_scratch import clip_vocab

    return clip_vocab(words)


def tiny_t2i_folder(path: str | Path, prediction_type: str = "epsilon", seed: int = 0) -> Path:
    """A tiny random ``StableDiffusionPipeline`` saved with ``save_pretrained`` into ``path``:
    8x8x4 latents of 16x16 RGB images, a ``UNet2DConditionModel`` (8/16 channels, cross-attention
    blocks, ~52k parameters), an ``AutoencoderKL`` (4/8 channels), a 2-layer CLIP text encoder
    (hidden 16) and a ``CLIPTokenizer`` built from :data:`TINY_T2I_WORDS` (its ``vocab.json`` and
    ``merges.txt`` are written here, never fetched). The scheduler is Stable Diffusion's: SD 1.x's
    PNDM config for ``"epsilon"``, SD 2.x's DDIM config for ``"v_prediction"`` (1000 steps,
    scaled-linear betas 0.00085..0.012, ``clip_sample`` off). No download; well under a second.
    """
    from diffusers import (
        AutoencoderKL,
        DDIMScheduler,
        PNDMScheduler,
        UNet2DConditionModel,
    )
    from transformers import CLIPTextConfig, CLIPTextModel

    from diffattr.diffusion.t2i_scratch import save_pipeline, write_tokenizer

    path = Path(path)
    tokenizer = write_tokenizer(path / "tokenizer", TINY_T2I_WORDS, TINY_T2I_MAX_LENGTH)
    vocab = tokenizer.get_vocab()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        unet = UNet2DConditionModel(
            sample_size=8,
            in_channels=4,
            out_channels=4,
            block_out_channels=(8, 16),
            layers_per_block=1,
            down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
            cross_attention_dim=16,
            attention_head_dim=4,
            norm_num_groups=4,
        )
        vae = AutoencoderKL(
            in_channels=3,
            out_channels=3,
            block_out_channels=(4, 8),
            down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
            up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
            latent_channels=4,
            norm_num_groups=2,
            sample_size=16,
        )
        text_encoder = CLIPTextModel(
            CLIPTextConfig(
                vocab_size=len(vocab),
                hidden_size=16,
                intermediate_size=32,
                projection_dim=16,
                num_hidden_layers=2,
                num_attention_heads=2,
                max_position_embeddings=TINY_T2I_MAX_LENGTH,
                bos_token_id=0,
                eos_token_id=1,
                pad_token_id=1,
            )
        )
    sd = {"beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear"}
    scheduler: Any
    if prediction_type == "epsilon":  # runwayml/stable-diffusion-v1-5's scheduler
        scheduler = PNDMScheduler(**sd, skip_prk_steps=True, set_alpha_to_one=False, steps_offset=1)
    else:  # stabilityai/stable-diffusion-2's scheduler (prediction_type is checked on load)
        scheduler = DDIMScheduler(
            **sd,
            clip_sample=False,
            set_alpha_to_one=False,
            steps_offset=1,
            prediction_type=prediction_type,
        )
    save_pipeline(path, unet, vae, text_encoder, tokenizer, scheduler)
    if prediction_type == "epsilon":  # SD 1.5's config says so too (PNDM never clips)
        cfg_path = path / "scheduler" / "scheduler_config.json"
        cfg = json.loads(cfg_path.read_text())
        cfg["clip_sample"] = False
        cfg_path.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
    return path


def tiny_lora_file(
    model: Any, path: str | Path, rank: int = 2, seed: int = 0, trained: bool = True
) -> Path:
    """Add a rank-``rank`` LoRA drawn from ``seed`` to ``model.unet`` (or a UNet) and save it
    with :func:`~diffattr.diffusion.lora.save_lora` into folder ``path``; returns the file.

    ``trained=True``: A and B both random and non-zero (as after some training: the LoRA changes
    the outputs and every LoRA gradient is non-zero); ``False``: the gaussian init (B = 0).
    """
    from diffattr.diffusion.lora import add_lora, save_lora

    unet = getattr(model, "unet", model)
    add_lora(unet, rank, init="random" if trained else "gaussian", seed=seed)
    if trained:  # peft's "random" init draws B small; make the LoRA's effect clearly visible
        with torch.no_grad(), torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed + 1)
            for name, p in unet.named_parameters():
                if ".lora_B." in name:
                    p.normal_(0.0, 0.5)
    if hasattr(model, "refresh_hash"):
        model.refresh_hash()
    return save_lora(unet, path)
