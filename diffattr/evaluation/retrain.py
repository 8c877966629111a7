"""Retraining ensembles: one model per (subset, seed), and counterfactual removal retrains.

Every model is a :class:`TrainJob` (config, the training ids to keep, an output folder) trained
with the project trainer (:func:`diffattr.diffusion.trainer.train_model`). Jobs are:

* **resumable**: a job whose folder already holds a finished model is skipped, and the trainer
  resumes a half-trained folder from its checkpoints, so a kill loses at most the models in flight;
* **distributed**: with ``W`` processes (torchrun / ``accelerate``'s ``PartialState``), process ``r``
  takes jobs ``r, r + W, r + 2W, ...`` and trains each *whole* model by itself (no data parallelism
  across the group: each gets a :class:`LocalAccelerator`). Callers then wait for every job.

* **stacked** (``stack > 1``): a process trains up to ``stack`` of its models at once with
  :func:`diffattr.diffusion.stacked.train_stacked` (stacked parameters under ``torch.func.vmap``),
  which keeps a GPU busy with small models; each model is still trained exactly as alone (up to
  float rounding) and checkpointed in its own folder. Jobs that cannot share a stack (dropout,
  different configs, checkpoints at different steps) are trained one by one.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from diffattr.config import ExperimentConfig, LoraExperimentConfig, resolve_train_length
from diffattr.data.dataset import ImageDataset
from diffattr.evaluation.subsets import SubsetMasks
from diffattr.repro import derive_seed

log = logging.getLogger(__name__)

Trainer = Callable[..., Any]


@dataclass
class TrainJob:
    """One model to train: ``cfg`` on the training images whose ids are ``keep_ids``."""

    name: str
    cfg: Any  # ExperimentConfig, or LoraExperimentConfig for a LoRA retrained on a fixed base
    keep_ids: np.ndarray
    out_dir: Path


@dataclass
class ProcessInfo:
    """Which share of the jobs this process takes."""

    index: int = 0
    count: int = 1

    @classmethod
    def from_state(cls, state: Any | None) -> ProcessInfo:
        """From an accelerate ``PartialState``/``Accelerator`` (or ``None``: a single process)."""
        if state is None:
            return cls()
        return cls(index=int(state.process_index), count=int(state.num_processes))


class LocalAccelerator:
    """A single-process stand-in for ``accelerate.Accelerator`` (the subset the trainer uses).

    Inside a torchrun group, ``Accelerator()`` would join the group and make training data-parallel
    (sharding every batch and averaging gradients across processes). Ensemble members must instead
    be trained whole, one per process, so each process hands the trainer this object: no
    collectives, no wrapping, its own device (``cuda:LOCAL_RANK`` when CUDA is present).
    Supports ``mixed_precision`` "no" and "bf16" (autocast); "fp16" needs a gradient scaler and is
    refused.
    """

    num_processes = 1
    process_index = 0
    local_process_index = 0
    is_main_process = True
    is_local_main_process = True
    scaler = None

    def __init__(
        self,
        mixed_precision: str = "no",
        gradient_accumulation_steps: int = 1,
        device: str | torch.device | None = None,
    ) -> None:
        if mixed_precision not in ("no", "bf16"):
            raise ValueError(
                f"mixed_precision={mixed_precision!r}: the single-process ensemble trainer supports "
                "'no' and 'bf16'"
            )
        if device is None:
            local = int(os.environ.get("LOCAL_RANK", "0"))
            device = f"cuda:{local}" if torch.cuda.is_available() else "cpu"
        self.device = torch.device(device)
        self.mixed_precision = mixed_precision
        self.gradient_accumulation_steps = gradient_accumulation_steps

    def prepare(self, *objs: Any, **_: Any) -> Any:
        return objs[0] if len(objs) == 1 else objs

    def wait_for_everyone(self) -> None:
        return None

    def unwrap_model(self, model: Any, **_: Any) -> Any:
        return model

    def no_sync(self, model: Any, **_: Any) -> contextlib.AbstractContextManager:
        return contextlib.nullcontext()

    def autocast(self, *_: Any, **__: Any) -> contextlib.AbstractContextManager:
        if self.mixed_precision == "bf16":
            return torch.autocast(self.device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def backward(self, loss: torch.Tensor, **_: Any) -> None:
        # As Accelerator.backward: micro-step losses are averaged over the accumulation window.
        (loss / self.gradient_accumulation_steps).backward()

    def clip_grad_norm_(self, params: Any, max_norm: float, norm_type: float = 2.0) -> torch.Tensor:
        return torch.nn.utils.clip_grad_norm_(params, max_norm, norm_type=norm_type)

    def reduce(self, tensor: torch.Tensor, reduction: str = "mean", **_: Any) -> Any:
        return tensor


def local_accelerator(cfg: ExperimentConfig | LoraExperimentConfig) -> LocalAccelerator:
    return LocalAccelerator(cfg.train.mixed_precision, cfg.train.gradient_accumulation_steps)


def subset_seed(base_seed: int, subset: int, seed_index: int) -> int:
    """Training seed of model (subset, seed_index): distinct per model, stable across runs."""
    return derive_seed(base_seed, "retrain", subset, seed_index) % (2**31)


def job_name(subset: int, seed_index: int) -> str:
    return f"subset-{subset:03d}-seed-{seed_index}"


def subset_jobs(
    base: ExperimentConfig | LoraExperimentConfig,
    subsets: SubsetMasks,
    seeds_per_subset: int,
    models_dir: Path,
) -> list[TrainJob]:
    """The ensemble: ``len(subsets) * seeds_per_subset`` jobs, subset-major order."""
    jobs = []
    for m in range(len(subsets)):
        for s in range(seeds_per_subset):
            cfg = dataclasses.replace(base, seed=subset_seed(base.seed, m, s))
            name = job_name(m, s)
            jobs.append(TrainJob(name, cfg, subsets.ids(m), Path(models_dir) / name))
    return jobs


def default_trainer() -> Trainer:
    from diffattr.diffusion.trainer import train_model

    return train_model


def default_is_done() -> Callable[[Path], bool]:
    from diffattr.diffusion.trainer import is_trained

    return is_trained


def my_jobs(jobs: Sequence[TrainJob], proc: ProcessInfo) -> list[TrainJob]:
    return list(jobs[proc.index :: proc.count])


def stack_groups(jobs: Sequence[TrainJob], stack: int) -> list[list[TrainJob]]:
    """Split ``jobs`` (in order) into groups of at most ``stack`` that can train together.

    Jobs group with others of the same config (but seed) whose checkpoints are at the same step;
    a job that cannot be stacked at all (see ``why_not_stackable``) is a group of its own.
    """
    from diffattr.diffusion.stacked import stack_key, why_not_stackable
    from diffattr.diffusion.trainer import checkpoint_dirs

    open_groups: dict[tuple[str, int], list[TrainJob]] = {}
    groups: list[list[TrainJob]] = []
    for job in jobs:
        if stack <= 1 or why_not_stackable([job.cfg]) is not None:
            groups.append([job])
            continue
        found = checkpoint_dirs(job.out_dir)
        length = resolve_train_length(job.cfg, len(job.keep_ids))  # epochs -> steps per subset
        key = (stack_key(length), found[-1][0] if found else 0)
        group = open_groups.get(key)
        if group is None or len(group) >= stack:
            group = open_groups[key] = []
            groups.append(group)
        group.append(job)
    return groups


def run_jobs(
    jobs: Sequence[TrainJob],
    train_set: ImageDataset,
    proc: ProcessInfo | None = None,
    trainer: Trainer | None = None,
    is_done: Callable[[Path], bool] | None = None,
    progress: bool = True,
    stack: int = 1,
) -> list[str]:
    """Train this process's share of ``jobs`` (skipping finished ones); names of those trained.

    ``stack``: train up to this many models at once (see the module docstring); a custom
    ``trainer`` always trains one model at a time.
    """
    proc = proc or ProcessInfo()
    if trainer is not None:
        stack = 1
    trainer = trainer or default_trainer()
    is_done = is_done or default_is_done()
    mine = my_jobs(jobs, proc)
    if proc.count > 1 and not torch.cuda.is_available():
        # Several CPU workers share the cores: one thread each avoids oversubscription (3-10x).
        torch.set_num_threads(1)
    trained = []
    todo = [j for j in mine if not is_done(j.out_dir)]
    log.info(
        "process %d/%d: %d of its %d models to train", proc.index, proc.count, len(todo), len(mine)
    )
    bar = tqdm(total=len(todo), disable=not progress, desc=f"retrain[{proc.index}]")
    for group in stack_groups(todo, stack):
        names = [j.name for j in group]
        bar.set_postfix_str(names[0] if len(names) == 1 else f"{names[0]} +{len(names) - 1}")
        t0 = time.perf_counter()
        if len(group) == 1:
            job = group[0]
            trainer(
                job.cfg,
                job_subset(train_set, job),
                job.out_dir,
                accelerator=local_accelerator(job.cfg),
                progress=False,
            )
        else:
            from diffattr.diffusion.stacked import StackJob, train_stacked

            stacked = [StackJob(j.cfg, job_subset(train_set, j), j.out_dir) for j in group]
            train_stacked(stacked, device=local_accelerator(group[0].cfg).device, progress=False)
        log.info("trained %s in %.1fs", ", ".join(names), time.perf_counter() - t0)
        trained.extend(names)
        bar.update(len(group))
    bar.close()
    return trained


def job_subset(train_set: ImageDataset, job: TrainJob) -> ImageDataset:
    """The training images of ``job`` (its kept ids, in id order)."""
    return train_set.select_ids(np.sort(job.keep_ids), name=f"{train_set.name}[{job.name}]")


def wait_until(
    predicate: Callable[[], bool], what: str, poll_s: float = 0.5, timeout_s: float | None = None
) -> None:
    """Block until ``predicate()`` holds (other processes finishing their share of a stage).

    Polling files (rather than a collective barrier) has no timeout for long, unbalanced stages;
    if another process dies, torchrun stops this one too.
    """
    start = last = time.monotonic()
    while not predicate():
        now = time.monotonic()
        if timeout_s is not None and now - start > timeout_s:
            raise TimeoutError(f"waited {timeout_s:.0f}s for {what}")
        if now - last > 60:
            log.info("still waiting for %s (%.0fs)", what, now - start)
            last = now
        time.sleep(poll_s)


def wait_for_jobs(
    jobs: Sequence[TrainJob],
    is_done: Callable[[Path], bool] | None = None,
    poll_s: float = 0.5,
    timeout_s: float | None = None,
) -> None:
    is_done = is_done or default_is_done()
    wait_until(
        lambda: all(is_done(j.out_dir) for j in jobs),
        f"{len(jobs)} models to finish training",
        poll_s=poll_s,
        timeout_s=timeout_s,
    )


def train_ensemble(
    jobs: Sequence[TrainJob],
    train_set: ImageDataset,
    proc: ProcessInfo | None = None,
    trainer: Trainer | None = None,
    is_done: Callable[[Path], bool] | None = None,
    progress: bool = True,
    stack: int = 1,
) -> list[str]:
    """Train this process's share, then wait until every job (all processes) is finished."""
    trained = run_jobs(jobs, train_set, proc, trainer, is_done, progress, stack)
    wait_for_jobs(jobs, is_done)
    return trained
