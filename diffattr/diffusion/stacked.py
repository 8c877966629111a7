"""Train several small diffusion models at once in one process (stacked parameters, torch.func).

A retraining ensemble is many copies of one small UNet, each on its own data subset. Trained one
after the other, a small model leaves a GPU mostly idle (kernel launches, not arithmetic, bound
each step). Here ``M`` models share every step: their parameters are stacked along a new leading
axis (``torch.func.stack_module_state``) and one ``vmap(functional_call(...))`` runs all ``M``
forward and backward passes as batched kernels.

Each model is trained exactly as :func:`diffattr.diffusion.trainer.train_model` would train it
alone: its own initialisation (``cfg.seed``), its own batches, flips, timesteps and noise drawn
from ``(cfg.seed, micro_step)``, its own gradient-norm clipping, AdamW and EMA (both elementwise,
so stacking does not change them). Results agree with one-by-one training up to float rounding
(batched kernels sum in another order). Checkpoints are written per model in the one-model
trainer's format, at the same steps, so a killed stacked run resumes stacked or one by one, and
a finished folder is indistinguishable from one trained alone (its record adds ``stacked_with``).

Limits: the models must share every setting but the seed (architecture, optimiser, schedule);
``dropout`` must be 0 (vmap draws one dropout stream for the stack, which would break the
per-model reproducibility); ``mixed_precision`` "no" or "bf16"; a single process (each stack is
one process's work; run several processes for several stacks).
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import functools
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from torch.func import functional_call, stack_module_state, vmap
from tqdm.auto import tqdm

from diffattr.config import ExperimentConfig, resolve_train_length
from diffattr.data.dataset import ImageDataset
from diffattr.diffusion.model import (
    DiffusionModel,
    build_model,
    denoising_loss,
    load_model,
    vmap_friendly_attention,
)
from diffattr.diffusion.trainer import (
    EpochOrder,
    TrainState,
    check_inputs,
    checkpoint_dirs,
    draw_micro_batch,
    ema_decay_at,
    fetch_batch,
    finish_run,
    is_trained,
    learning_rate_at,
    make_optimizer,
    open_out_dir,
    read_checkpoint,
    recent_mean,
    remove_partial_checkpoints,
    save_checkpoint,
    training_identity,
)

log = logging.getLogger(__name__)


@dataclass
class StackJob:
    """One model of a stack: ``cfg`` trained on ``train_set`` into ``out_dir``."""

    cfg: ExperimentConfig
    train_set: ImageDataset
    out_dir: Path


def stack_key(cfg: ExperimentConfig) -> str:
    """Configs with equal keys can be trained in one stack (everything but the seed)."""
    return repr(dataclasses.replace(cfg, seed=0).to_dict())


def why_not_stackable(cfgs: Sequence[ExperimentConfig]) -> str | None:
    """None when these configs can share a stack, else the reason in words."""
    if not cfgs:
        return "no models"
    if len({stack_key(c) for c in cfgs}) > 1:
        return "the configs differ in more than the seed"
    c = cfgs[0]
    if c.model.dropout or c.model.attention_dropout:
        return "model.dropout / attention_dropout > 0 (stacking needs 0)"
    if c.train.mixed_precision not in ("no", "bf16"):
        return f"train.mixed_precision={c.train.mixed_precision!r} (stacking supports no, bf16)"
    return None


class _Device:
    """What :func:`check_inputs` / :func:`open_out_dir` read of an accelerator."""

    num_processes = 1
    is_main_process = True

    def __init__(self, accum: int) -> None:
        self.gradient_accumulation_steps = accum

    def wait_for_everyone(self) -> None:
        return None


@dataclass
class _Member:
    job: StackJob
    order: EpochOrder
    state: TrainState


def train_stacked(
    jobs: Sequence[StackJob],
    device: str | torch.device = "cpu",
    progress: bool = True,
    stop_after: int | None = None,
) -> list[DiffusionModel]:
    """Train every job's model together; returns the models (EMA weights when configured).

    Jobs whose folder already holds a finished model are loaded, not retrained. The others must be
    at the same step (fresh, or resumed from checkpoints a stack wrote together); ``stop_after``
    stops once that many steps are done (checkpointing there), like the one-model trainer.
    """
    if not jobs:
        return []
    # train.epochs / lr_warmup_fraction made concrete per model (subsets differ in size).
    resolved = [
        dataclasses.replace(j, cfg=resolve_train_length(j.cfg, len(j.train_set))) for j in jobs
    ]
    reason = why_not_stackable([j.cfg for j in resolved])
    if reason is not None:
        raise ValueError(f"cannot train these {len(jobs)} models together: {reason}")
    device = torch.device(device)
    acc = _Device(resolved[0].cfg.train.gradient_accumulation_steps)
    results: dict[int, DiffusionModel] = {}
    todo: list[int] = []
    for i, job in enumerate(jobs):
        check_inputs(job.cfg, job.train_set, acc)
        open_out_dir(job.out_dir, training_identity(job.cfg, job.train_set), acc)
        if is_trained(job.out_dir):
            results[i] = load_model(job.out_dir, device=device)
        else:
            todo.append(i)
    if todo:
        trained = _train_together([resolved[i] for i in todo], device, progress, stop_after)
        results.update(zip(todo, trained, strict=True))
    return [results[i] for i in range(len(jobs))]


def _train_together(
    jobs: list[StackJob], device: torch.device, progress: bool, stop_after: int | None
) -> list[DiffusionModel]:
    cfg0 = jobs[0].cfg
    tc = cfg0.train
    built = [build_model(j.cfg) for j in jobs]
    names = [n for n, _ in built[0].unet.named_parameters()]
    members = []
    ckpts = []
    for job, model in zip(jobs, built, strict=True):
        remove_partial_checkpoints(job.out_dir)
        found = checkpoint_dirs(job.out_dir)
        ckpt = read_checkpoint(found[-1][1]) if found else None
        if ckpt is not None:
            model.unet.load_state_dict(ckpt.unet)
        ckpts.append(ckpt)
        state = ckpt.state if ckpt is not None else TrainState()
        members.append(_Member(job, EpochOrder(job.cfg.seed, len(job.train_set)), state))
    steps = {m.state.step for m in members}
    if len(steps) > 1:
        detail = ", ".join(f"{m.job.out_dir.name}: {m.state.step}" for m in members)
        raise ValueError(
            f"cannot resume these models together: their checkpoints are at different steps "
            f"({detail}); train them one by one or in groups at equal steps"
        )
    start = steps.pop()
    if start:
        log.info("stack of %d: resuming from step %d", len(jobs), start)

    unets = [torch.nn.Module.to(m.unet, device).train() for m in built]
    params, buffers = stack_module_state(unets)  # name -> (M, *shape), leaves with grad
    plist = [params[n] for n in names]
    optimizer = make_optimizer(cfg0, plist)
    if start:
        optimizer.load_state_dict(_stack_optimizer_states([c.optimizer for c in ckpts if c]))
    ema: dict[str, Tensor] | None = None
    if tc.ema_decay:
        if start:
            ema = {n: torch.stack([c.ema[n] for c in ckpts if c and c.ema]) for n in names}
            if any(v.shape[0] != len(jobs) for v in ema.values()):
                raise ValueError("a checkpoint has no ema.safetensors but the config has ema_decay")
            ema = {n: v.to(device) for n, v in ema.items()}
        else:
            ema = {n: params[n].detach().float().clone() for n in names}

    base = torch.nn.Module.to(copy.deepcopy(unets[0]), "meta")  # structure only
    _contiguous_group_norm_inputs(base)
    conditional = cfg0.model.num_class_embeds is not None
    scheduler = built[0].scheduler
    num_t = built[0].num_train_timesteps

    def one_loss(
        p: dict, b: dict, x0: Tensor, t: Tensor, noise: Tensor, y: Tensor | None
    ) -> Tensor:
        def predict(x_t: Tensor, tt: Tensor, labels: Tensor | None) -> Tensor:
            kwargs = {"class_labels": labels if conditional else None}
            return functional_call(base, (p, b), (x_t, tt), kwargs).sample

        return denoising_loss(predict, scheduler, x0, t, noise, y).mean()

    y_dim = 0 if conditional else None
    batched_loss = vmap(one_loss, in_dims=(0, 0, 0, 0, 0, y_dim))
    autocast = (
        torch.autocast(device.type, dtype=torch.bfloat16)
        if tc.mixed_precision == "bf16"
        else contextlib.nullcontext()
    )
    target = tc.steps if stop_after is None else min(tc.steps, stop_after)
    accum = tc.gradient_accumulation_steps
    shape = jobs[0].train_set.image_shape
    started = time.time()
    bar = tqdm(total=target, initial=start, disable=not progress, desc=f"train x{len(jobs)}")
    step = start
    with vmap_friendly_attention(base):
        while step < target:
            for g in optimizer.param_groups:
                g["lr"] = learning_rate_at(cfg0, step)
            step_loss = torch.zeros(len(jobs), device=device)
            for a in range(accum):
                micro = step * accum + a
                x0, t, noise, y = _stack_batches(members, micro, shape, num_t, device)
                with autocast:
                    losses = batched_loss(params, buffers, x0, t, noise, y)  # (M,)
                # Each model's gradient is d(its own loss): the sum separates them.
                (losses.sum() / accum).backward()
                step_loss += losses.detach().float() / accum
            if tc.grad_clip is not None:
                _clip_per_model(plist, tc.grad_clip)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            if ema is not None and tc.ema_decay is not None:
                d = ema_decay_at(tc.ema_decay, step - 1)
                with torch.no_grad():
                    for n in names:
                        ema[n].mul_(d).add_(params[n].detach().float(), alpha=1 - d)
            for m, v in zip(members, step_loss.tolist(), strict=True):
                m.state.step = step
                m.state.loss_history.append((step, float(v)))
            bar.update(1)
            if tc.log_every and step % tc.log_every == 0:
                mean = [recent_mean(m.state.loss_history, tc.log_every) or 0.0 for m in members]
                log.info("stack step %d/%d mean loss %.5f", step, tc.steps, sum(mean) / len(mean))
            at_checkpoint = tc.checkpoint_every and step % tc.checkpoint_every == 0
            if at_checkpoint or (step == target and target < tc.steps):
                _checkpoint_all(members, names, params, buffers, ema, optimizer)
    bar.close()

    out = []
    for i, (m, model) in enumerate(zip(members, built, strict=True)):
        final = copy.deepcopy(unets[i])
        src = ema if ema is not None else {n: params[n].detach() for n in names}
        with torch.no_grad():
            for n, p in final.named_parameters():
                p.copy_(src[n][i].to(p.dtype))
        result = DiffusionModel(
            unet=final.float().eval(),
            scheduler=model.scheduler,
            record={**model.record, "steps": step},
        )
        if step >= tc.steps:
            finish_run(
                result,
                m.job.cfg,
                m.job.train_set,
                m.job.out_dir,
                m.state,
                started,
                1,
                keep_checkpoints=False,
                stacked_with=len(jobs),
            )
        out.append(result)
    return out


def _contiguous_group_norm_inputs(module: torch.nn.Module) -> None:
    """Feed every GroupNorm a contiguous input (in place, on our private structural copy).

    With stacked weights, attention outputs reach GroupNorm as strided views, and group_norm's
    memory-format query is not implemented under vmap ("NYI: querying is_contiguous inside of
    vmap").
    """
    for m in module.modules():
        if isinstance(m, torch.nn.GroupNorm):
            m.forward = functools.partial(_group_norm_contiguous, m)  # type: ignore[method-assign]


def _group_norm_contiguous(m: torch.nn.GroupNorm, x: Tensor) -> Tensor:
    return torch.nn.functional.group_norm(x.contiguous(), m.num_groups, m.weight, m.bias, m.eps)


def _stack_batches(
    members: list[_Member],
    micro: int,
    shape: tuple[int, int, int],
    num_t: int,
    device: torch.device,
) -> tuple[Tensor, Tensor, Tensor, Tensor | None]:
    """Every model's micro-batch, stacked: x0/noise ``(M, B, C, H, W)``, t/labels ``(M, B)``."""
    xs, ts, ns, ys = [], [], [], []
    for m in members:
        mb = draw_micro_batch(m.job.cfg, m.order, micro, shape, num_t)
        x0, labels, _ = fetch_batch(m.job.train_set, mb.rows)
        xs.append(torch.where(mb.flip[:, None, None, None], x0.flip(-1), x0))
        ts.append(mb.t)
        ns.append(mb.noise)
        ys.append(labels)
    y = None if ys[0] is None else torch.stack([v for v in ys if v is not None]).to(device)
    return (
        torch.stack(xs).to(device),
        torch.stack(ts).to(device),
        torch.stack(ns).to(device),
        y,
    )


@torch.no_grad()
def _clip_per_model(params: list[Tensor], max_norm: float) -> None:
    """``torch.nn.utils.clip_grad_norm_`` applied to each model (row of the stack) separately."""
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return
    per_tensor = torch.stack([g.flatten(1).norm(dim=1) for g in grads])  # (P, M)
    total = per_tensor.norm(dim=0)  # (M,)
    coef = (max_norm / (total + 1e-6)).clamp(max=1.0)
    for g in grads:
        g.mul_(coef.view(-1, *([1] * (g.ndim - 1))).to(g.dtype))


def _stack_optimizer_states(states: list[dict[str, Any]]) -> dict[str, Any]:
    """One-model AdamW state dicts -> the state dict of the stacked optimizer."""
    first = states[0]
    stacked: dict[int, dict[str, Tensor]] = {}
    for idx, st in first["state"].items():
        entry = {}
        for key, value in st.items():
            if key == "step":
                steps = {float(s["state"][idx]["step"]) for s in states}
                if len(steps) > 1:
                    raise ValueError(f"optimizer steps differ across the stack: {sorted(steps)}")
                entry[key] = value
            else:
                entry[key] = torch.stack([s["state"][idx][key] for s in states])
        stacked[idx] = entry
    return {"state": stacked, "param_groups": first["param_groups"]}


def _checkpoint_all(
    members: list[_Member],
    names: list[str],
    params: dict[str, Tensor],
    buffers: dict[str, Tensor],
    ema: dict[str, Tensor] | None,
    optimizer: torch.optim.Optimizer,
) -> None:
    """Write each model's checkpoint in the one-model trainer's format."""
    full = optimizer.state_dict()
    for i, m in enumerate(members):
        opt_state = {
            "state": {
                idx: {k: (v if k == "step" else v[i].clone()) for k, v in st.items()}
                for idx, st in full["state"].items()
            },
            "param_groups": full["param_groups"],
        }
        save_checkpoint(
            m.job.out_dir,
            {
                **{n: params[n][i].detach() for n in names},
                **{n: b[i] for n, b in buffers.items()},
            },
            None if ema is None else {n: ema[n][i] for n in names},
            opt_state,
            None,
            m.state,
            keep=2,
        )
