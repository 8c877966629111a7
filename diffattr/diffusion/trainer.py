"""Train a diffusion model with accelerate, resumable bit-exactly from its checkpoints.

Why resume is exact: nothing in the loop reads a running random state. For global micro-step ``m``
(``m = step * gradient_accumulation_steps + a``) the batch indices, the horizontal flips, the
timesteps and the noise all come from generators seeded with ``derive_seed(cfg.seed, ..., m)``, and
the global torch RNG (dropout) is reseeded per micro-step and process. A checkpoint therefore only
needs the weights, the EMA weights, the optimizer state and the loss history.

Multi-process (``accelerate launch`` / torchrun): every process derives the same global batch and
takes its shard ``batch[rank::world_size]``; DDP averages the gradients. ``batch_size`` is the global
batch per micro-step, so the number of processes does not change what is trained on.

Batches walk through epochs: position ``p = m * batch_size + j`` of the data stream is image
``perm_e[p % n]`` with ``e = p // n`` and ``perm_e`` a permutation seeded by ``(seed, e)``.
"""

from __future__ import annotations

import contextlib
import copy
import csv
import json
import logging
import math
import os
import re
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from diffattr.config import ConfigError, ExperimentConfig, identity_dict, resolve_train_length
from diffattr.data.dataset import DataError, ImageDataset
from diffattr.diffusion.model import (
    MODEL_KIND,
    DiffusionModel,
    build_model,
    denoising_loss,
    load_model,
    save_model,
)
from diffattr.repro import RECORD_NAME, derive_seed, open_result_dir, read_record

log = logging.getLogger(__name__)

CHECKPOINT_DIR = "checkpoints"
LOSS_FILE = "loss_history.csv"
_STEP_DIR = re.compile(r"^step-(\d{6,})$")


# ------------------------------------------------------------------------------ data and noise


class EpochOrder:
    """Maps data-stream positions to dataset rows via per-epoch permutations seeded by (seed, e)."""

    def __init__(self, seed: int, n: int) -> None:
        self.seed, self.n = seed, n
        self._cache: dict[int, torch.Tensor] = {}

    def perm(self, epoch: int) -> torch.Tensor:
        if epoch not in self._cache:
            if len(self._cache) > 2:
                self._cache.pop(min(self._cache))
            g = torch.Generator().manual_seed(derive_seed(self.seed, "epoch", epoch))
            self._cache[epoch] = torch.randperm(self.n, generator=g)
        return self._cache[epoch]

    def rows(self, micro_step: int, batch_size: int) -> torch.Tensor:
        """Dataset rows ``(batch_size,)`` of global micro-step ``micro_step``."""
        pos = torch.arange(micro_step * batch_size, (micro_step + 1) * batch_size)
        epochs, offsets = pos // self.n, pos % self.n
        return torch.stack(
            [
                self.perm(int(e))[int(o)]
                for e, o in zip(epochs.tolist(), offsets.tolist(), strict=True)
            ]
        )


@dataclass
class MicroBatch:
    """One micro-step's global batch (before sharding): rows, flips, timesteps, noise."""

    rows: torch.Tensor  # (B,) int64 dataset rows
    flip: torch.Tensor  # (B,) bool
    t: torch.Tensor  # (B,) int64
    noise: torch.Tensor  # (B, C, H, W)


def draw_micro_batch(
    cfg: ExperimentConfig,
    order: EpochOrder,
    micro_step: int,
    shape: tuple[int, int, int],
    num_train_timesteps: int,
) -> MicroBatch:
    """Everything random about micro-step ``micro_step``, from ``(seed, micro_step)`` only."""
    b = cfg.train.batch_size
    g = torch.Generator().manual_seed(derive_seed(cfg.seed, "micro-step", micro_step))
    flip = torch.rand(b, generator=g) < 0.5
    if not cfg.train.random_flip:
        flip = torch.zeros(b, dtype=torch.bool)
    t = torch.randint(0, num_train_timesteps, (b,), generator=g)
    noise = torch.randn((b, *shape), generator=g)
    return MicroBatch(rows=order.rows(micro_step, b), flip=flip, t=t, noise=noise)


def fetch_batch(
    train_set: ImageDataset, rows: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
    """Images ``(B, C, H, W)``, labels ``(B,)`` or None, ids ``(B,)`` of these dataset rows.

    The only place the trainer reads training images (tests instrument it).
    """
    labels = None if train_set.labels is None else train_set.labels[rows]
    return train_set.images[rows], labels, train_set.ids[rows]


# ------------------------------------------------------------------------------------------ EMA


class EMA:
    """Exponential moving average of the parameters, in float32.

    The decay warms up as ``min(decay, (1 + k) / (10 + k))`` after ``k`` updates so that short runs
    are not dominated by the random initialisation.
    """

    def __init__(self, module: torch.nn.Module, decay: float) -> None:
        self.decay = decay
        self.shadow = {n: p.detach().float().clone() for n, p in module.named_parameters()}

    @torch.no_grad()
    def update(self, module: torch.nn.Module, num_updates: int) -> None:
        d = ema_decay_at(self.decay, num_updates)
        for n, p in module.named_parameters():
            self.shadow[n].mul_(d).add_(p.detach().float(), alpha=1 - d)

    def copy_to(self, module: torch.nn.Module) -> None:
        with torch.no_grad():
            for n, p in module.named_parameters():
                p.copy_(self.shadow[n].to(p.dtype))


def ema_decay_at(decay: float, num_updates: int) -> float:
    """The EMA decay used for update number ``num_updates`` (0-based), with warmup."""
    return min(decay, (1 + num_updates) / (10 + num_updates))


# ---------------------------------------------------------------------------------- checkpoints


@dataclass
class TrainState:
    """What a checkpoint restores besides weights and optimizer state."""

    step: int = 0
    loss_history: list[tuple[int, float]] = field(default_factory=list)


def checkpoint_dirs(out_dir: Path) -> list[tuple[int, Path]]:
    """Complete checkpoints ``[(step, folder)]`` in step order (partial ones are never renamed in)."""
    root = out_dir / CHECKPOINT_DIR
    if not root.is_dir():
        return []
    found = []
    for d in root.iterdir():
        m = _STEP_DIR.match(d.name)
        if m and (d / "state.json").exists():
            found.append((int(m.group(1)), d))
    return sorted(found)


def save_checkpoint(
    out_dir: Path,
    unet_state: dict[str, torch.Tensor],
    ema_shadow: dict[str, torch.Tensor] | None,
    optimizer_state: dict[str, Any],
    scaler_state: dict | None,
    state: TrainState,
    keep: int | None = 2,
) -> Path:
    """Write ``checkpoints/step-XXXXXX`` atomically (a temporary folder renamed into place).

    The optimizer state is a ``torch.optim.AdamW.state_dict()`` over the UNet's parameters in
    ``named_parameters`` order, so the one-model and the stacked trainer resume each other's runs.
    """
    root = out_dir / CHECKPOINT_DIR
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step-{state.step:06d}"
    tmp = root / f".tmp-step-{state.step:06d}-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    save_file(_cpu_state(unet_state), str(tmp / "unet.safetensors"))
    if ema_shadow is not None:
        save_file(_cpu_state(ema_shadow), str(tmp / "ema.safetensors"))
    torch.save(optimizer_state, tmp / "optimizer.pt")
    if scaler_state is not None:
        torch.save(scaler_state, tmp / "scaler.pt")
    (tmp / "state.json").write_text(
        json.dumps({"step": state.step, "loss_history": state.loss_history})
    )
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    if keep is not None:
        for _, old in checkpoint_dirs(out_dir)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    return final


def remove_partial_checkpoints(out_dir: Path) -> None:
    """Delete temporary folders of checkpoints that a kill interrupted mid-write."""
    root = out_dir / CHECKPOINT_DIR
    if root.is_dir():
        for d in root.glob(".tmp-step-*"):
            shutil.rmtree(d, ignore_errors=True)


def _cpu_state(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.detach().to("cpu").contiguous() for k, v in state.items()}


@dataclass
class Checkpoint:
    """The contents of one ``checkpoints/step-XXXXXX`` folder, on the CPU."""

    unet: dict[str, torch.Tensor]
    ema: dict[str, torch.Tensor] | None
    optimizer: dict[str, Any]
    scaler: dict[str, Any] | None
    state: TrainState


def read_checkpoint(ckpt: Path) -> Checkpoint:
    """Read a checkpoint folder (``weights_only`` for the optimizer/scaler pickles)."""
    try:
        ema = (
            load_file(str(ckpt / "ema.safetensors"))
            if (ckpt / "ema.safetensors").exists()
            else None
        )
        scaler = (
            torch.load(ckpt / "scaler.pt", weights_only=True)
            if (ckpt / "scaler.pt").exists()
            else None
        )
        meta = json.loads((ckpt / "state.json").read_text())
        return Checkpoint(
            unet=load_file(str(ckpt / "unet.safetensors")),
            ema=ema,
            optimizer=torch.load(ckpt / "optimizer.pt", map_location="cpu", weights_only=True),
            scaler=scaler,
            state=TrainState(
                step=int(meta["step"]),
                loss_history=[(int(st), float(v)) for st, v in meta["loss_history"]],
            ),
        )
    except Exception as exc:
        raise RuntimeError(
            f"{ckpt}: unreadable checkpoint ({exc}); delete this folder to resume from an earlier one"
        ) from exc


def _load_checkpoint(
    ckpt: Path,
    unet: torch.nn.Module,
    ema: EMA | None,
    optimizer: torch.optim.Optimizer,
    accelerator: Accelerator,
) -> TrainState:
    c = read_checkpoint(ckpt)
    try:
        unet.load_state_dict(c.unet)
        if ema is not None:
            if c.ema is None:
                raise ValueError("no ema.safetensors but the config has ema_decay")
            ema.shadow = {k: v.to(accelerator.device) for k, v in c.ema.items()}
        optimizer.load_state_dict(c.optimizer)
        if accelerator.scaler is not None and c.scaler is not None:
            accelerator.scaler.load_state_dict(c.scaler)
    except Exception as exc:
        raise RuntimeError(
            f"{ckpt}: checkpoint does not fit this model ({exc}); delete this folder to resume "
            "from an earlier one"
        ) from exc
    return c.state


# ---------------------------------------------------------------------------------------- train


def resume_state(
    out_dir: Path, accelerator: Any, restore: Callable[[Path], TrainState]
) -> TrainState:
    """The state to train from: a fresh one, or ``restore`` of the newest complete checkpoint
    (partial ones, left by a kill while writing, are removed first by the main process)."""
    if accelerator.is_main_process:
        remove_partial_checkpoints(out_dir)
    ckpts = checkpoint_dirs(out_dir)
    if not ckpts:
        return TrainState()
    state = restore(ckpts[-1][1])
    log.info("%s: resuming from step %d", out_dir, state.step)
    return state


def learning_rate_at(cfg: ExperimentConfig, step: int) -> float:
    """Learning rate of optimizer step ``step`` (0-based).

    Linear warmup over ``lr_warmup_steps`` steps (``lr * (step + 1) / warmup``), then constant, or
    for ``lr_schedule: cosine`` half a cosine from ``lr`` down to 0 at ``steps``.
    """
    t = cfg.train
    warm = t.lr_warmup_steps
    if warm > 0 and step < warm:
        return t.learning_rate * (step + 1) / warm
    if t.lr_schedule == "cosine":
        progress = (step - warm) / max(1, t.steps - warm)
        return t.learning_rate * max(0.0, 0.5 * (1.0 + math.cos(math.pi * progress)))
    return t.learning_rate


def make_optimizer(cfg: ExperimentConfig, params: Any) -> torch.optim.AdamW:
    """The AdamW every trainer here uses (one model or a stack)."""
    t = cfg.train
    return torch.optim.AdamW(
        params,
        lr=learning_rate_at(cfg, 0),
        betas=(t.adam_beta1, t.adam_beta2),
        weight_decay=t.weight_decay,
    )


# Settings that cannot change the trained weights: a run reopened with other values is the same run.
NOT_IDENTITY = {
    "data": ("root",),  # where the files live; the data hash says what they hold
    "train": ("log_every", "checkpoint_every", "num_workers"),
}


def training_identity(cfg: ExperimentConfig, train_set: ImageDataset) -> dict[str, Any]:
    """What decides a trained model: the config (less sampling/logging settings) and the data."""
    config = identity_dict(cfg)
    config.pop("sample")
    for section, keys in NOT_IDENTITY.items():
        for key in keys:
            config[section].pop(key)
    return {"config": config, "data_hash": train_set.data_hash()}


def is_trained(out_dir: str | os.PathLike) -> bool:
    """True when ``out_dir`` holds a finished model written by :func:`train_model`."""
    out_dir = Path(out_dir)
    try:
        record = read_record(out_dir)
    except (FileNotFoundError, json.JSONDecodeError):
        return False
    return bool(record.get("finished")) and (out_dir / "unet" / "config.json").exists()


def check_inputs(cfg: ExperimentConfig, train_set: ImageDataset, accelerator: Any) -> None:
    m = cfg.model
    want = (m.in_channels, m.sample_size, m.sample_size)
    if train_set.image_shape != want:
        raise DataError(
            f"{train_set.name}: images are {train_set.image_shape} but the model config expects "
            f"(in_channels, sample_size, sample_size) = {want}"
        )
    if m.num_class_embeds is not None and train_set.labels is None:
        raise DataError(f"{train_set.name}: a class-conditional model needs labels")
    if len(train_set) == 0:
        raise DataError(f"{train_set.name}: no training images")
    check_accelerator(cfg.train, accelerator)


def check_accelerator(train: Any, accelerator: Any) -> None:
    """Refuse an accelerator made for another gradient accumulation than the config's ``train``
    section; warn when the batch does not split evenly between the processes."""
    if accelerator.gradient_accumulation_steps != train.gradient_accumulation_steps:
        raise ConfigError(
            f"train.gradient_accumulation_steps={train.gradient_accumulation_steps} but the "
            f"accelerator was made with {accelerator.gradient_accumulation_steps}"
        )
    if train.batch_size % accelerator.num_processes:
        log.warning(
            "batch_size %d is not divisible by %d processes: shards differ in size",
            train.batch_size,
            accelerator.num_processes,
        )


def open_out_dir(out_dir: Path, identity: dict, accelerator: Any, kind: str = MODEL_KIND) -> None:
    """Every process compares an existing record (so all raise MismatchError alike); only the
    main process creates a new one. Every process looks before any creates (the first barrier):
    otherwise a process that looks late finds the new record and skips the barrier the others
    wait at."""
    existed = (out_dir / RECORD_NAME).exists()
    accelerator.wait_for_everyone()
    if existed:
        open_result_dir(out_dir, kind, identity)
        return
    if accelerator.is_main_process:
        open_result_dir(out_dir, kind, identity)
    accelerator.wait_for_everyone()


def train_model(
    cfg: ExperimentConfig,
    train_set: ImageDataset,
    out_dir: str | os.PathLike,
    accelerator: Accelerator | None = None,
    progress: bool = True,
    stop_after: int | None = None,
    keep_checkpoints: bool = False,
) -> DiffusionModel:
    """Train (or resume, or just load) the model that ``cfg`` describes on ``train_set``.

    ``out_dir`` gets ``diffattr.json`` (config, seed, data hash, train ids, model hash, steps),
    ``checkpoints/step-XXXXXX`` every ``checkpoint_every`` steps, ``loss_history.csv`` and, when
    done, the model in diffusers pipeline layout (the EMA weights when ``ema_decay`` is set).
    A finished ``out_dir`` made by the same config and data is loaded, not retrained; one made
    otherwise raises :class:`diffattr.repro.MismatchError`.
    ``stop_after``: stop once this many steps are done (checkpointing there, not marking the run
    finished); a later call resumes. ``keep_checkpoints``: keep every checkpoint, also after the run
    has finished (for TracIn over training checkpoints: ``load_model(out_dir /
    "checkpoints/step-XXXXXX")``); by default only the last two are kept while training and all
    are deleted once the final model is saved, since many retrained models would fill the disk.
    Returns the model with the current (EMA) weights.
    """
    out_dir = Path(out_dir)
    if accelerator is None:
        accelerator = Accelerator(
            mixed_precision=cfg.train.mixed_precision,
            gradient_accumulation_steps=cfg.train.gradient_accumulation_steps,
        )
    check_inputs(cfg, train_set, accelerator)
    identity = training_identity(cfg, train_set)
    open_out_dir(out_dir, identity, accelerator)
    cfg = resolve_train_length(cfg, len(train_set))
    if is_trained(out_dir):
        log.info("%s: already trained with this config and data; loading", out_dir)
        return load_model(out_dir, device=accelerator.device)

    model = build_model(cfg)
    unet = model.unet.to(accelerator.device)
    unet.train()
    ema = EMA(unet, cfg.train.ema_decay) if cfg.train.ema_decay else None
    optimizer = make_optimizer(cfg, unet.parameters())
    state = resume_state(
        out_dir, accelerator, lambda ckpt: _load_checkpoint(ckpt, unet, ema, optimizer, accelerator)
    )
    wrapped, optimizer = accelerator.prepare(unet, optimizer)
    target = cfg.train.steps if stop_after is None else min(cfg.train.steps, stop_after)

    started = time.time()
    _train_loop(
        cfg,
        train_set,
        out_dir,
        accelerator,
        wrapped,
        model,
        ema,
        optimizer,
        state,
        target,
        progress,
        keep_checkpoints,
    )
    accelerator.wait_for_everyone()

    final = copy.deepcopy(accelerator.unwrap_model(wrapped, keep_fp32_wrapper=False)).float()
    if ema is not None:
        ema.copy_to(final)
    result = DiffusionModel(
        unet=final.eval(), scheduler=model.scheduler, record={**model.record, "steps": state.step}
    )
    if state.step >= cfg.train.steps and accelerator.is_main_process:
        finish_run(
            result,
            cfg,
            train_set,
            out_dir,
            state,
            started,
            accelerator.num_processes,
            keep_checkpoints,
        )
    accelerator.wait_for_everyone()
    if state.step >= cfg.train.steps and not accelerator.is_main_process:
        result.record = read_record(out_dir)
    return result


def finish_run(
    result: DiffusionModel,
    cfg: ExperimentConfig,
    train_set: ImageDataset,
    out_dir: Path,
    state: TrainState,
    started: float,
    num_processes: int,
    keep_checkpoints: bool,
    **extra: Any,
) -> None:
    """Save a finished run: loss CSV, the completed record, the model; drop its checkpoints.

    ``extra`` goes into the record (e.g. how many models were trained together).
    """
    write_loss_csv(out_dir / LOSS_FILE, state.loss_history)
    record = read_record(out_dir)
    record.update(
        config=cfg.to_dict(),
        seed=cfg.seed,
        data_hash=train_set.data_hash(),
        train_ids=train_set.ids.tolist(),
        n_train=len(train_set),
        steps=state.step,
        ema=cfg.train.ema_decay is not None,
        loss_history_file=LOSS_FILE,
        final_loss=recent_mean(state.loss_history),
        train_seconds_last_run=round(time.time() - started, 2),
        num_processes=num_processes,
        **extra,
        finished=True,
    )
    result.record = record
    save_model(result, out_dir)
    if not keep_checkpoints:
        shutil.rmtree(out_dir / CHECKPOINT_DIR, ignore_errors=True)


def recent_mean(history: list[tuple[int, float]], k: int = 50) -> float | None:
    tail = [v for _, v in history[-k:]]
    return sum(tail) / len(tail) if tail else None


def write_loss_csv(path: Path, history: list[tuple[int, float]]) -> None:
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    with tmp.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["step", "loss"])
        w.writerows([s, repr(v)] for s, v in history)
    os.replace(tmp, path)


def _train_loop(
    cfg: ExperimentConfig,
    train_set: ImageDataset,
    out_dir: Path,
    accelerator: Accelerator,
    wrapped: Any,
    model: DiffusionModel,
    ema: EMA | None,
    optimizer: Any,
    state: TrainState,
    target: int,
    progress: bool,
    keep_checkpoints: bool = False,
) -> None:
    tc = cfg.train
    accum = tc.gradient_accumulation_steps
    rank, world = accelerator.process_index, accelerator.num_processes
    order = EpochOrder(cfg.seed, len(train_set))
    shape = train_set.image_shape
    conditional = cfg.model.num_class_embeds is not None

    def predict(x_t: torch.Tensor, t: torch.Tensor, labels: torch.Tensor | None) -> torch.Tensor:
        # Through the prepared (possibly DDP-wrapped) module, so gradients are synchronised.
        return wrapped(x_t, t, class_labels=labels if conditional else None).sample

    bar = tqdm(
        total=target,
        initial=state.step,
        disable=not progress or not accelerator.is_local_main_process,
        desc="train",
    )
    while state.step < target:
        for g in optimizer.param_groups:
            g["lr"] = learning_rate_at(cfg, state.step)
        step_loss = torch.zeros((), device=accelerator.device)
        for a in range(accum):
            micro = state.step * accum + a
            mb = draw_micro_batch(cfg, order, micro, shape, model.num_train_timesteps)
            shard = slice(rank, None, world)
            x0, labels, _ = fetch_batch(train_set, mb.rows[shard])
            x0 = torch.where(mb.flip[shard, None, None, None], x0.flip(-1), x0)
            dev = accelerator.device
            torch.manual_seed(derive_seed(cfg.seed, "dropout", micro, rank))
            sync = contextlib.nullcontext() if a == accum - 1 else accelerator.no_sync(wrapped)
            with sync:
                with accelerator.autocast():
                    loss = denoising_loss(
                        predict,
                        model.scheduler,
                        x0.to(dev),
                        mb.t[shard].to(dev),
                        mb.noise[shard].to(dev),
                        None if labels is None else labels.to(dev),
                    ).mean()
                accelerator.backward(loss)
            step_loss += loss.detach() / accum
        if tc.grad_clip is not None:
            accelerator.clip_grad_norm_(wrapped.parameters(), tc.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if ema is not None:
            ema.update(accelerator.unwrap_model(wrapped), state.step)
        lr = learning_rate_at(cfg, state.step)
        if finish_step(state, step_loss, accelerator, bar, tc, lr, target):
            keep = None if keep_checkpoints else 2
            _checkpoint(out_dir, accelerator, wrapped, ema, optimizer, state, keep)
    bar.close()


def finish_step(
    state: TrainState,
    step_loss: torch.Tensor,
    accelerator: Any,
    bar: Any,
    tc: Any,
    lr: float,
    target: int,
) -> bool:
    """After an optimizer step: count it, record its loss (the mean over processes), advance the
    progress bar, log every ``tc.log_every`` steps (``lr``: the step's learning rate); True when
    a checkpoint is due (every ``tc.checkpoint_every`` steps, or at a ``stop_after`` target)."""
    state.step += 1
    mean_loss = float(accelerator.reduce(step_loss, reduction="mean"))
    state.loss_history.append((state.step, mean_loss))
    bar.update(1)
    if tc.log_every and state.step % tc.log_every == 0:
        log.info(
            "step %d/%d loss %.5f lr %.2e",
            state.step,
            tc.steps,
            recent_mean(state.loss_history, tc.log_every),
            lr,
        )
    at_checkpoint = tc.checkpoint_every and state.step % tc.checkpoint_every == 0
    return bool(at_checkpoint or (state.step == target and target < tc.steps))


def _checkpoint(
    out_dir: Path,
    accelerator: Accelerator,
    wrapped: Any,
    ema: EMA | None,
    optimizer: Any,
    state: TrainState,
    keep: int | None,
) -> None:
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        scaler = accelerator.scaler.state_dict() if accelerator.scaler is not None else None
        save_checkpoint(
            out_dir,
            accelerator.unwrap_model(wrapped).state_dict(),
            None if ema is None else ema.shadow,
            optimizer.state_dict(),
            scaler,
            state,
            keep,
        )
    accelerator.wait_for_everyone()
