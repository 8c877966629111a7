"""LoRA fine-tuning of a text-to-image model, resumable bit-exactly (``diffattr train`` on a
``kind: text-to-image-lora`` config).

The base model is a local Stable-Diffusion-layout folder (:func:`load_text_to_image`); a fresh peft
LoRA (:func:`~diffattr.diffusion.lora.add_lora`, initialised from ``derive_seed(seed,
"lora-init")``) is the only thing that trains. Each step is the denoising loss on VAE latents
(:meth:`TextToImageModel.encode_images`: the posterior's mode times the scaling factor, as D-TRAK
computes its features) conditioned on each image's caption, against :meth:`TextToImageModel.target`
(the noise, or the velocity for a v-prediction base). AdamW over the LoRA weights, the config's
learning-rate schedule and gradient clipping, as in the pixel trainer.

Randomness and resume follow :mod:`diffattr.diffusion.trainer` exactly (its helpers are reused):
micro-step ``m``'s rows, flips, timesteps and (latent) noise come from ``derive_seed(seed, ...,
m)``, and the global RNG (LoRA dropout) is reseeded per micro-step and process, so a checkpoint
only holds the LoRA weights, the optimizer (and grad scaler) state and the loss history, and a
run killed and resumed ends with the same weights as one that never stopped. Multi-process
(``accelerate launch``): every process draws the same global batch and trains on its shard.

The output folder holds ``pytorch_lora_weights.safetensors`` (diffusers' ``save_lora_weights``
file, via :func:`~diffattr.diffusion.lora.save_lora`, and ``lora_config.json``),
``loss_history.csv`` and ``diffattr.json``: kind, config, seed, base model path and hash, data hash,
LoRA settings and hash, steps, loss, and the model hash of base + LoRA (which
``load_text_to_image(base, lora=folder)`` checks). Checkpoints live in ``checkpoints/step-XXXXXX``
(``unet.safetensors`` there holds the LoRA weights only) and are removed when the run finishes.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import shutil
import time
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from tqdm.auto import tqdm

from diffattr.config import (
    LORA_KIND,
    ConfigError,
    ExperimentConfig,
    LoraExperimentConfig,
    lora_identity_dict,
    resolve_train_length,
)
from diffattr.data.dataset import DataError, ImageDataset
from diffattr.diffusion.lora import (
    LORA_WEIGHT_NAME,
    add_lora,
    lora_parameter_names,
    lora_summary,
    save_lora,
)
from diffattr.diffusion.params import select_params
from diffattr.diffusion.text2image import TextToImageModel, load_text_to_image
from diffattr.diffusion.trainer import (
    CHECKPOINT_DIR,
    LOSS_FILE,
    NOT_IDENTITY,
    EpochOrder,
    TrainState,
    check_accelerator,
    draw_micro_batch,
    fetch_batch,
    finish_step,
    learning_rate_at,
    make_optimizer,
    open_out_dir,
    read_checkpoint,
    recent_mean,
    resume_state,
    save_checkpoint,
    write_loss_csv,
)
from diffattr.repro import (
    RECORD_NAME,
    derive_seed,
    read_record,
    write_json_atomic,
)

log = logging.getLogger(__name__)


def _schedule_view(cfg: LoraExperimentConfig) -> ExperimentConfig:
    """The pixel trainer's helpers (batches, noise, learning rate, optimizer, run length) read
    only ``seed`` and ``train``: an :class:`ExperimentConfig` holding this config's two."""
    return ExperimentConfig(seed=cfg.seed, train=cfg.train)


def lora_training_identity(
    cfg: LoraExperimentConfig, train_set: ImageDataset, base_hash: str
) -> dict[str, Any]:
    """What decides the trained LoRA: the config (less where the files live and logging), the
    base model's weights (by hash, not path) and the data (with its captions)."""
    config = lora_identity_dict(cfg)
    config.pop("base_model")
    for section, keys in NOT_IDENTITY.items():
        for key in keys:
            config[section].pop(key)
    return {"config": config, "base_hash": base_hash, "data_hash": train_set.data_hash()}


def _finished_record(out_dir: Path) -> dict[str, Any] | None:
    try:
        record = read_record(out_dir)
    except (FileNotFoundError, json.JSONDecodeError, ValueError):
        return None
    return record if record.get("kind") == LORA_KIND and record.get("finished") else None


def is_lora_trained(out_dir: str | os.PathLike) -> bool:
    """True when ``out_dir`` holds a finished LoRA written by :func:`train_lora`."""
    out_dir = Path(out_dir)
    return _finished_record(out_dir) is not None and (out_dir / LORA_WEIGHT_NAME).is_file()


def is_fine_tuned(out_dir: str | os.PathLike) -> bool:
    """True when ``out_dir`` holds a finished run of :func:`train_lora`: a LoRA, or (``tune``
    other than ``lora``) a whole pipeline folder with the tuned UNet."""
    out_dir = Path(out_dir)
    if _finished_record(out_dir) is None:
        return False
    return (out_dir / LORA_WEIGHT_NAME).is_file() or (out_dir / "model_index.json").is_file()


def tunes_lora(cfg: LoraExperimentConfig) -> bool:
    return cfg.tune == "lora"


def load_fine_tuned(out_dir: str | os.PathLike, device: Any = "cpu") -> TextToImageModel:
    """The model a finished :func:`train_lora` run made: base + LoRA, or the tuned pipeline."""
    out_dir = Path(out_dir)
    if (out_dir / LORA_WEIGHT_NAME).is_file():
        return load_text_to_image(read_record(out_dir)["base_model"], lora=out_dir, device=device)
    return load_text_to_image(out_dir, device=device)


def check_lora_inputs(
    cfg: LoraExperimentConfig, train_set: ImageDataset, model: TextToImageModel, accelerator: Any
) -> None:
    """One-line errors for data the base model cannot be fine-tuned on."""
    if len(train_set) == 0:
        raise DataError(f"{train_set.name}: no training images")
    if train_set.captions is None:
        raise DataError(
            f"{train_set.name}: LoRA fine-tuning needs a caption per image: set "
            "data.prompt_template (e.g. 'a {class} painting') or put a metadata.jsonl "
            "(file_name, text) beside the images"
        )
    c, h, w = train_set.image_shape
    want_c, want_h, want_w = model.pixel_shape
    f = model.vae_scale_factor
    if c != want_c:
        raise DataError(
            f"{train_set.name}: images have {c} channel(s) but the VAE of {cfg.base_model} "
            f"takes {want_c}"
        )
    if h % f or w % f:
        raise DataError(
            f"{train_set.name}: images are {h}x{w}; the VAE needs sides divisible by {f} "
            "(set data.size)"
        )
    if (h, w) != (want_h, want_w):
        log.warning(
            "%s: training at %dx%d, but %s generates %dx%d images by default",
            train_set.name,
            h,
            w,
            cfg.base_model,
            want_h,
            want_w,
        )
    check_accelerator(cfg.train, accelerator)


def _trainable(cfg: LoraExperimentConfig, unet: torch.nn.Module) -> dict[str, torch.nn.Parameter]:
    """What trains, by ``named_parameters`` name in module order (every other weight of the UNet
    is frozen): a fresh LoRA's matrices, or the UNet weights ``cfg.tune`` names."""
    if not tunes_lora(cfg):
        try:
            names = set(select_params(unet, cfg.tune))
        except ValueError as exc:
            raise ConfigError(f"tune: {exc}") from exc
        return _only(unet, names)
    try:
        add_lora(
            unet,
            cfg.lora.rank,
            cfg.lora.alpha,
            cfg.lora.targets,
            cfg.lora.init,
            seed=derive_seed(cfg.seed, "lora-init"),
        )
    except ValueError as exc:  # peft: a target module the UNet does not have
        raise ConfigError(f"lora: {exc}".splitlines()[0]) from exc
    return _only(unet, set(lora_parameter_names(unet)))


def _only(unet: torch.nn.Module, names: set[str]) -> dict[str, torch.nn.Parameter]:
    params = {}
    for n, p in unet.named_parameters():
        p.requires_grad_(n in names)
        if n in names:
            params[n] = p
    return params


def _restore(
    ckpt: Path,
    params: dict[str, torch.nn.Parameter],
    optimizer: torch.optim.Optimizer,
    accelerator: Accelerator,
) -> TrainState:
    c = read_checkpoint(ckpt)
    try:
        if set(c.unet) != set(params):
            extra = sorted(set(c.unet) ^ set(params))
            raise ValueError(f"LoRA weights differ, e.g. {extra[0]}")
        with torch.no_grad():
            for n, p in params.items():
                p.copy_(c.unet[n])
        optimizer.load_state_dict(c.optimizer)
        if accelerator.scaler is not None and c.scaler is not None:
            accelerator.scaler.load_state_dict(c.scaler)
    except Exception as exc:
        raise RuntimeError(
            f"{ckpt}: checkpoint does not fit this LoRA ({exc}); delete this folder to resume "
            "from an earlier one"
        ) from exc
    return c.state


def train_lora(
    cfg: LoraExperimentConfig,
    train_set: ImageDataset,
    out_dir: str | os.PathLike,
    progress: bool = True,
    accelerator: Accelerator | None = None,
    stop_after: int | None = None,
    keep_checkpoints: bool = False,
) -> TextToImageModel:
    """Fine-tune (or resume, or just load) the LoRA ``cfg`` describes on the captioned
    ``train_set``; returns the base model with the trained LoRA (eval mode).

    A finished ``out_dir`` made by the same config, base weights and data is loaded, not
    retrained; one made otherwise raises :class:`diffattr.repro.MismatchError`. ``stop_after``:
    stop once this many steps are done (checkpointing there, not marking the run finished); a
    later call resumes. ``keep_checkpoints``: keep every checkpoint after the run (by default the
    last two are kept while training and all are removed at the end).
    """
    out_dir = Path(out_dir)
    if accelerator is None:
        accelerator = Accelerator(
            mixed_precision=cfg.train.mixed_precision,
            gradient_accumulation_steps=cfg.train.gradient_accumulation_steps,
        )
    model = load_text_to_image(cfg.base_model, device=accelerator.device)
    check_lora_inputs(cfg, train_set, model, accelerator)
    base_hash = model.base_hash()
    identity = lora_training_identity(cfg, train_set, base_hash)
    open_out_dir(out_dir, identity, accelerator, LORA_KIND)
    view = resolve_train_length(_schedule_view(cfg), len(train_set))
    cfg = dataclasses.replace(cfg, train=view.train)
    if is_fine_tuned(out_dir):
        log.info("%s: already trained with this config, base model and data; loading", out_dir)
        return load_fine_tuned(out_dir, device=accelerator.device)

    unet = model.unet
    params = _trainable(cfg, unet)
    unet.train()
    optimizer = make_optimizer(view, list(params.values()))
    state = resume_state(
        out_dir, accelerator, lambda ckpt: _restore(ckpt, params, optimizer, accelerator)
    )
    wrapped, optimizer = accelerator.prepare(unet, optimizer)
    target = cfg.train.steps if stop_after is None else min(cfg.train.steps, stop_after)

    started = time.time()
    _train_loop(
        cfg,
        view,
        train_set,
        out_dir,
        accelerator,
        wrapped,
        model,
        optimizer,
        state,
        target,
        progress,
        keep_checkpoints,
    )
    accelerator.wait_for_everyone()
    model.unet = accelerator.unwrap_model(wrapped, keep_fp32_wrapper=False)
    model.unet.eval()
    model.refresh_hash()
    model.record = {**model.record, "steps": state.step}
    if state.step >= cfg.train.steps and accelerator.is_main_process:
        _finish(model, cfg, train_set, out_dir, state, started, accelerator, keep_checkpoints)
    accelerator.wait_for_everyone()
    if state.step >= cfg.train.steps and not accelerator.is_main_process:
        model.record = read_record(out_dir)
        if tunes_lora(cfg):
            model.lora_path = out_dir / LORA_WEIGHT_NAME
    return model


def _finish(
    model: TextToImageModel,
    cfg: LoraExperimentConfig,
    train_set: ImageDataset,
    out_dir: Path,
    state: TrainState,
    started: float,
    accelerator: Accelerator,
    keep_checkpoints: bool,
) -> None:
    """Save a finished run: the LoRA file (or the tuned pipeline), the loss CSV, the completed
    record (last, so a folder with ``finished`` is complete); drop the checkpoints."""
    record = read_record(out_dir)
    if tunes_lora(cfg):
        lora_file = save_lora(model, out_dir)
        model.lora_path = lora_file
        record.update(
            base_hash=model.base_hash(),
            lora_hash=model.lora_hash(),
            lora=lora_summary(model.unet),
            lora_file=lora_file.name,
        )
    else:
        parent_hash = record.get("identity", {}).get("base_hash")
        save_tuned_pipeline(model, out_dir)
        model.base_path = out_dir
        # The folder is a pipeline of its own: its base is itself, and it came from parent_hash.
        record.update(base_hash=model.base_hash(), parent_hash=parent_hash, tune=cfg.tune)
    write_loss_csv(out_dir / LOSS_FILE, state.loss_history)
    record.update(
        config=cfg.to_dict(),
        seed=cfg.seed,
        base_model=str(cfg.base_model),
        model_hash=model.model_hash(),
        prediction_type=model.prediction_type,
        data_hash=train_set.data_hash(),
        train_ids=train_set.ids.tolist(),
        n_train=len(train_set),
        steps=state.step,
        loss_history_file=LOSS_FILE,
        final_loss=recent_mean(state.loss_history),
        train_seconds_last_run=round(time.time() - started, 2),
        num_processes=accelerator.num_processes,
        finished=True,
    )
    write_json_atomic(out_dir / RECORD_NAME, record)
    model.record = record
    if not keep_checkpoints:
        shutil.rmtree(out_dir / CHECKPOINT_DIR, ignore_errors=True)


def save_tuned_pipeline(model: TextToImageModel, out_dir: Path) -> None:
    """Write ``out_dir`` as a ``StableDiffusionPipeline`` folder: the tuned UNet, and the base
    folder's other parts (VAE, text encoder, tokenizer, scheduler, ``model_index.json``) copied."""
    base = Path(model.base_path)
    for part in ("vae", "text_encoder", "tokenizer", "scheduler"):
        shutil.copytree(base / part, out_dir / part, dirs_exist_ok=True)
    model.unet.save_pretrained(str(out_dir / "unet"), safe_serialization=True)
    # Last: model_index.json is what makes the folder a pipeline.
    shutil.copyfile(base / "model_index.json", out_dir / "model_index.json")


def _train_loop(
    cfg: LoraExperimentConfig,
    view: ExperimentConfig,
    train_set: ImageDataset,
    out_dir: Path,
    accelerator: Accelerator,
    wrapped: Any,
    model: TextToImageModel,
    optimizer: Any,
    state: TrainState,
    target: int,
    progress: bool,
    keep_checkpoints: bool,
) -> None:
    tc = cfg.train
    accum = tc.gradient_accumulation_steps
    rank, world = accelerator.process_index, accelerator.num_processes
    order = EpochOrder(cfg.seed, len(train_set))
    _, h, w = train_set.image_shape
    f = model.vae_scale_factor
    shape = (model.image_shape[0], h // f, w // f)  # latents of the training images
    assert train_set.captions is not None
    tokens = model.tokenize(train_set.captions)  # (n, L), once
    dev = accelerator.device

    bar = tqdm(
        total=target,
        initial=state.step,
        disable=not progress or not accelerator.is_local_main_process,
        desc="train LoRA" if tunes_lora(cfg) else "fine-tune",
    )
    while state.step < target:
        for g in optimizer.param_groups:
            g["lr"] = learning_rate_at(view, state.step)
        step_loss = torch.zeros((), device=dev)
        for a in range(accum):
            micro = state.step * accum + a
            mb = draw_micro_batch(view, order, micro, shape, model.num_train_timesteps)
            shard = slice(rank, None, world)
            rows = mb.rows[shard]
            x0, _, _ = fetch_batch(train_set, rows)
            x0 = torch.where(mb.flip[shard, None, None, None], x0.flip(-1), x0)
            with torch.no_grad():  # the frozen VAE and text encoder, in float32
                latents = model.encode_images(x0.to(dev), batch_size=max(1, x0.shape[0]))
                hidden = model.text_embeddings(tokens[rows].to(dev))
            t, noise = mb.t[shard].to(dev), mb.noise[shard].to(dev)
            torch.manual_seed(derive_seed(cfg.seed, "dropout", micro, rank))
            sync = contextlib.nullcontext() if a == accum - 1 else accelerator.no_sync(wrapped)
            with sync:
                with accelerator.autocast():
                    x_t = model.scheduler.add_noise(latents, noise, t)  # type: ignore[arg-type]
                    pred = wrapped(x_t, t, encoder_hidden_states=hidden).sample
                    goal = model.target(latents, noise, t)
                    loss = (pred.float() - goal.float()).pow(2).flatten(1).mean(dim=1).mean()
                accelerator.backward(loss)
            step_loss += loss.detach() / accum
        if tc.grad_clip is not None:
            accelerator.clip_grad_norm_(
                [p for p in wrapped.parameters() if p.requires_grad], tc.grad_clip
            )
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        lr = learning_rate_at(view, state.step)
        if finish_step(state, step_loss, accelerator, bar, tc, lr, target):
            _checkpoint(out_dir, accelerator, wrapped, optimizer, state, keep_checkpoints)
    bar.close()


def _checkpoint(
    out_dir: Path,
    accelerator: Accelerator,
    wrapped: Any,
    optimizer: Any,
    state: TrainState,
    keep_checkpoints: bool,
) -> None:
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        unet = accelerator.unwrap_model(wrapped)
        lora = {n: p.detach() for n, p in unet.named_parameters() if p.requires_grad}
        scaler = accelerator.scaler.state_dict() if accelerator.scaler is not None else None
        save_checkpoint(
            out_dir,
            lora,
            None,
            optimizer.state_dict(),
            scaler,
            state,
            None if keep_checkpoints else 2,
        )
    accelerator.wait_for_everyone()
