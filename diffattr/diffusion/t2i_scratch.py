"""A small text-to-image latent diffusion model trained here from scratch (no download).

The embedded text-to-image benchmark needs a base model that a LoRA fine-tunes, as Stable
Diffusion is for ArtBench. :func:`train_scratch` makes one in a few CPU minutes, in the
``StableDiffusionPipeline.save_pretrained`` layout, so everything downstream (LoRA training,
generation, attribution, evaluation) opens it through the same loader as a real checkpoint:

1. ``out/init``: a ``CLIPTokenizer`` whose vocabulary is the captions' words (every word one
   token; letters stay tokens so other words still tokenize), a seeded random 2-layer CLIP text
   encoder that stays frozen (as Stable Diffusion's does; the UNet learns to read it), an
   ``AutoencoderKL`` trained on the images (reconstruction plus a small KL term; its
   ``scaling_factor`` is set to one over the standard deviation of the latents' posterior mode,
   as Stable Diffusion's 0.18215 was chosen), a random ``UNet2DConditionModel`` and Stable
   Diffusion's scheduler config. Written to a temporary folder and renamed: it exists whole or
   not at all.
2. ``out/model``: the UNet trained on the captioned images by
   :func:`~diffattr.diffusion.lora_trainer.train_lora` with ``tune: all`` (every UNet weight,
   from the random init): resumable from its checkpoints like any fine-tune, with its record.

The config is a :class:`~diffattr.config.ScratchConfig` (YAML ``kind: text-to-image-scratch``).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import shutil
import time
from pathlib import Path
from typing import Any, cast

import torch
from tqdm.auto import tqdm

from diffattr.config import LORA_KIND, ConfigError, DataConfig, LoraExperimentConfig, ScratchConfig
from diffattr.data.dataset import DataError, ImageDataset
from diffattr.repro import RECORD_NAME, derive_seed, read_record, write_json_atomic

log = logging.getLogger(__name__)

INIT_DIR = "init"
MODEL_DIR = "model"
#: Stable Diffusion 1.x's noise schedule (scaled-linear betas 0.00085..0.012, 1000 steps).
SD_BETAS = {"beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear"}


def clip_vocab(words: tuple[str, ...]) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """A CLIP BPE vocabulary and merge list in which every word of ``words`` is one token (and
    every lowercase letter of them is a token, so other words still tokenize)."""
    vocab: dict[str, int] = {"<|startoftext|>": 0, "<|endoftext|>": 1}

    def add(token: str) -> None:
        vocab.setdefault(token, len(vocab))

    for c in sorted(set("".join(words))):
        add(c)
        add(c + "</w>")
    merges: list[tuple[str, str]] = []
    for w in words:
        parts = [*w[:-1], w[-1] + "</w>"]
        cur = parts[0]
        for p in parts[1:]:
            if (cur, p) not in merges:
                merges.append((cur, p))
            cur += p
            add(cur)
    return vocab, merges


def write_tokenizer(folder: Path, words: tuple[str, ...], max_length: int) -> Any:
    """Write ``vocab.json`` / ``merges.txt`` for ``words`` into ``folder`` and return the
    ``CLIPTokenizer`` read back from them (what ``from_pretrained`` will see)."""
    from transformers import CLIPTokenizer

    folder.mkdir(parents=True, exist_ok=True)
    vocab, merges = clip_vocab(words)
    (folder / "vocab.json").write_text(json.dumps(vocab, indent=1) + "\n")
    (folder / "merges.txt").write_text("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges))
    read_merges = [
        tuple(line.split()) for line in (folder / "merges.txt").read_text().splitlines()[1:]
    ]
    return CLIPTokenizer(
        vocab=json.loads((folder / "vocab.json").read_text()),
        merges=cast(Any, read_merges),  # (a, b) pairs: what the tokenizers BPE takes
        model_max_length=max_length,
    )


def caption_vocabulary(train_set: ImageDataset, extra: list[str]) -> tuple[str, ...]:
    """Every word of the captions and ``extra`` (tokens reserved for later fine-tunes), sorted."""
    if train_set.captions is None:
        raise DataError(f"{train_set.name}: a text-to-image model needs a caption per image")
    words = {w for c in train_set.captions for w in c.lower().split()}
    return tuple(sorted(words | {w.lower() for w in extra}))


def _components(cfg: ScratchConfig, vocab_size: int, image_shape: tuple[int, int, int]) -> tuple:
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    c, h, _ = image_shape
    v, t, u = cfg.vae, cfg.text, cfg.unet
    downs = len(v.block_out_channels) - 1
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(derive_seed(cfg.seed, "scratch-init") % (2**31))
        vae = AutoencoderKL(
            in_channels=c,
            out_channels=c,
            block_out_channels=tuple(v.block_out_channels),
            down_block_types=("DownEncoderBlock2D",) * len(v.block_out_channels),
            up_block_types=("UpDecoderBlock2D",) * len(v.block_out_channels),
            latent_channels=v.latent_channels,
            norm_num_groups=v.norm_num_groups,
            sample_size=h,
        )
        text_encoder = CLIPTextModel(
            CLIPTextConfig(
                vocab_size=vocab_size,
                hidden_size=t.hidden_size,
                intermediate_size=2 * t.hidden_size,
                projection_dim=t.hidden_size,
                num_hidden_layers=t.layers,
                num_attention_heads=t.heads,
                max_position_embeddings=t.max_length,
                bos_token_id=0,
                eos_token_id=1,
                pad_token_id=1,
            )
        )
        n = len(u.block_out_channels)
        unet = UNet2DConditionModel(
            sample_size=h // 2**downs,
            in_channels=v.latent_channels,
            out_channels=v.latent_channels,
            block_out_channels=tuple(u.block_out_channels),
            layers_per_block=u.layers_per_block,
            down_block_types=("CrossAttnDownBlock2D",) * (n - 1) + ("DownBlock2D",),
            up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * (n - 1),
            cross_attention_dim=t.hidden_size,
            attention_head_dim=u.attention_head_dim,
            norm_num_groups=u.norm_num_groups,
        )
    return vae, text_encoder, unet


def train_vae(vae: Any, images: torch.Tensor, cfg: ScratchConfig, progress: bool) -> list[float]:
    """Fit ``vae`` to ``images`` ``(n, C, H, W)`` in [-1, 1]: mean squared reconstruction error of
    a posterior sample plus ``kl_weight`` times the KL to the unit Gaussian; seeded batches.
    Sets ``scaling_factor``; returns the loss per step."""
    v = cfg.vae
    g = torch.Generator().manual_seed(derive_seed(cfg.seed, "vae-batches") % (2**31))
    opt = torch.optim.AdamW(vae.parameters(), lr=v.learning_rate)
    vae.train()
    losses = []
    for _ in tqdm(range(v.steps), disable=not progress, desc="train VAE"):
        rows = torch.randint(len(images), (min(v.batch_size, len(images)),), generator=g)
        x = images[rows]
        post = vae.encode(x).latent_dist
        z = post.mean + post.std * torch.randn(post.mean.shape, generator=g)
        recon = vae.decode(z).sample
        loss = (recon - x).pow(2).mean() + v.kl_weight * post.kl().mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    vae.eval().requires_grad_(False)
    with torch.no_grad():
        modes = torch.cat(
            [vae.encode(images[i : i + 256]).latent_dist.mode() for i in range(0, len(images), 256)]
        )
    vae.register_to_config(scaling_factor=float(1.0 / modes.std()))
    return losses


def vae_images(cfg: ScratchConfig, train_set: ImageDataset) -> torch.Tensor:
    """The VAE's training images ``(n, C, H, W)``: the model's data with ``vae.data`` applied."""
    if not cfg.vae.data:
        return train_set.images
    from diffattr.data import load_dataset

    unknown = sorted(set(cfg.vae.data) - {f.name for f in dataclasses.fields(DataConfig)})
    if unknown:
        raise ConfigError(f"vae.data: unknown key(s) {unknown}")
    data = load_dataset(dataclasses.replace(cfg.data, **cfg.vae.data))
    if data.image_shape != train_set.image_shape:
        raise DataError(
            f"vae.data: images {data.image_shape} differ from the model's {train_set.image_shape}"
        )
    return data.images


def build_init(cfg: ScratchConfig, train_set: ImageDataset, folder: Path, progress: bool) -> Path:
    """Step 1 of the module docstring: ``folder`` as a pipeline with a trained VAE."""
    from diffusers import DDIMScheduler

    if (folder / "model_index.json").is_file():
        return folder
    tmp = folder.with_name(f".{folder.name}.tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    words = caption_vocabulary(train_set, cfg.text.extra_words)
    tokenizer = write_tokenizer(tmp / "tokenizer", words, cfg.text.max_length)
    vae, text_encoder, unet = _components(cfg, len(tokenizer.get_vocab()), train_set.image_shape)
    t0 = time.perf_counter()
    losses = train_vae(vae, vae_images(cfg, train_set), cfg, progress)
    log.info("VAE trained in %.0fs, final loss %.4f", time.perf_counter() - t0, losses[-1])
    scheduler = DDIMScheduler(
        **SD_BETAS,
        num_train_timesteps=cfg.num_train_timesteps,
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
        prediction_type=cfg.prediction_type,
    )
    save_pipeline(tmp, unet, vae, text_encoder, tokenizer, scheduler)
    write_json_atomic(
        tmp / "vae_training.json",
        {"steps": len(losses), "final_loss": sum(losses[-50:]) / len(losses[-50:]), "words": words},
    )
    shutil.rmtree(folder, ignore_errors=True)
    os.replace(tmp, folder)
    return folder


def save_pipeline(
    folder: Path, unet: Any, vae: Any, text_encoder: Any, tokenizer: Any, scheduler: Any
) -> None:
    """Write the parts as a ``StableDiffusionPipeline.save_pretrained`` folder (safetensors, no
    safety checker), without transformers' progress bars."""
    from diffusers import StableDiffusionPipeline
    from transformers.utils import logging as tlog

    pipe = StableDiffusionPipeline(
        unet=unet,
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        scheduler=scheduler,
        safety_checker=None,  # type: ignore[arg-type]
        feature_extractor=None,  # type: ignore[arg-type]
        requires_safety_checker=False,
    )
    bars = tlog.is_progress_bar_enabled()
    tlog.disable_progress_bar()
    try:
        cast(Any, pipe).save_pretrained(str(folder), safe_serialization=True)
    finally:
        if bars:
            tlog.enable_progress_bar()


def unet_config(cfg: ScratchConfig, init: Path) -> LoraExperimentConfig:
    """The UNet's training run: every UNet weight of ``init`` tuned on the captioned data."""
    return LoraExperimentConfig(
        kind=LORA_KIND,
        seed=cfg.seed,
        base_model=str(init),
        tune="all",
        data=cfg.data,
        train=cfg.train,
    )


def train_scratch(
    cfg: ScratchConfig,
    train_set: ImageDataset,
    out: str | os.PathLike,
    progress: bool = True,
    accelerator: Any | None = None,
) -> Path:
    """Make (or reuse, or resume) the model ``cfg`` describes in ``out``; returns the pipeline
    folder ``out/model``."""
    from diffattr.diffusion.lora_trainer import train_lora

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    main = accelerator is None or accelerator.is_main_process
    if main:
        build_init(cfg, train_set, out / INIT_DIR, progress)
    if accelerator is not None:
        accelerator.wait_for_everyone()
    train_lora(
        unet_config(cfg, out / INIT_DIR),
        train_set,
        out / MODEL_DIR,
        progress=progress,
        accelerator=accelerator,
    )
    if main:
        annotate(out / MODEL_DIR, cfg, out / INIT_DIR)
    return out / MODEL_DIR


def annotate(model_dir: Path, cfg: ScratchConfig, init: Path) -> None:
    """Record the whole recipe in the model's ``diffattr.json``: the scratch config (VAE, text
    encoder, UNet settings) and the VAE's training, besides the UNet run's own record."""
    record = read_record(model_dir)
    vae = json.loads((init / "vae_training.json").read_text())
    if record.get("scratch_config") != cfg.to_dict() or record.get("vae_training") != vae:
        record.update(scratch_config=cfg.to_dict(), vae_training=vae)
        write_json_atomic(model_dir / RECORD_NAME, record)
