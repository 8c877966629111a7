"""Benchmark retraining throughput: models one by one vs several stacked in one process.

For each model config this trains ``--steps`` steps of one model with the one-model trainer
(``train_model``, the ensemble's ``LocalAccelerator``) and of ``M`` models at once with
``train_stacked`` (``--stacks``, e.g. 2,4,8), each on its own random half of the data, and prints
seconds per optimizer step, per-model steps per second, the speed-up over one by one, and the
implied full-ensemble throughput in models per hour (the config's full ``train.steps``).

    .venv/bin/python scripts/bench_retrain.py                      # digits-2 eval model, CPU
    .venv/bin/python scripts/bench_retrain.py --models cifar2 --stacks 2,4 --device cuda

Models: ``tiny`` (the test UNet, for a smoke run), ``digits2-eval`` (configs/eval/digits2.yaml's experiment: 651k params, 8x8, batch 64),
``digits2`` (configs/digits2.yaml: 1.1M params, 16x16 with attention) and ``cifar2``
(configs/cifar2.yaml: 35.7M params, 32x32, batch 128; random images of that shape, so no data set
is needed). The first ``--warmup`` steps of every run are excluded from the timing.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

from diffattr.config import ExperimentConfig, config_from_dict, load_config
from diffattr.data.dataset import ImageDataset
from diffattr.diffusion.stacked import StackJob, train_stacked, why_not_stackable
from diffattr.diffusion.trainer import train_model
from diffattr.evaluation.config import load_eval_config
from diffattr.evaluation.retrain import LocalAccelerator
from diffattr.testing import TINY_UNET

ROOT = Path(__file__).resolve().parents[1]

MODELS = {
    "tiny": lambda: config_from_dict(
        {"model": {**TINY_UNET, "attention_head_dim": 8}, "train": {"batch_size": 8}}
    ),
    "digits2-eval": lambda: load_eval_config(ROOT / "configs/eval/digits2.yaml").experiment,
    "digits2": lambda: load_config(ROOT / "configs/digits2.yaml"),
    "cifar2": lambda: load_config(ROOT / "configs/cifar2.yaml"),
}


def _data(cfg: ExperimentConfig, n: int) -> ImageDataset:
    m = cfg.model
    g = torch.Generator().manual_seed(0)
    images = torch.rand(n, m.in_channels, m.sample_size, m.sample_size, generator=g) * 2 - 1
    labels = None if m.num_class_embeds is None else torch.randint(0, m.num_class_embeds, (n,))
    return ImageDataset("bench", images, torch.arange(n), labels=labels)


def _timed_cfg(cfg: ExperimentConfig, steps: int, seed: int) -> ExperimentConfig:
    train = dataclasses.replace(
        cfg.train,
        steps=steps,
        epochs=None,  # a fixed, short run whatever the config's length rule
        lr_warmup_fraction=None,
        checkpoint_every=0,
        log_every=0,
    )
    return dataclasses.replace(cfg, seed=seed, train=train)


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def seconds_per_step(
    cfg: ExperimentConfig, data: ImageDataset, stack: int, a: argparse.Namespace
) -> float:
    """Seconds per optimizer step of ``stack`` models (0: the one-model trainer)."""
    g = torch.Generator().manual_seed(0)
    halves = [
        data.select_ids(
            torch.randperm(len(data), generator=g)[: len(data) // 2].sort().values.numpy()
        )
        for _ in range(max(stack, 1))
    ]
    times = []
    for steps in (a.warmup, a.warmup + a.steps):
        with tempfile.TemporaryDirectory() as tmp:
            _sync(a.device)
            t0 = time.perf_counter()
            if stack == 0:
                train_model(
                    _timed_cfg(cfg, steps, 1),
                    halves[0],
                    Path(tmp) / "one",
                    accelerator=LocalAccelerator(
                        cfg.train.mixed_precision,
                        cfg.train.gradient_accumulation_steps,
                        device=a.device,
                    ),
                    progress=False,
                )
            else:
                jobs = [
                    StackJob(_timed_cfg(cfg, steps, 1 + i), halves[i], Path(tmp) / f"m{i}")
                    for i in range(stack)
                ]
                train_stacked(jobs, device=a.device, progress=False)
            _sync(a.device)
            times.append(time.perf_counter() - t0)
    return (times[1] - times[0]) / a.steps


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="digits2-eval")
    ap.add_argument("--stacks", default="2,4,8")
    ap.add_argument("--steps", type=int, default=20, help="timed steps per run")
    ap.add_argument("--warmup", type=int, default=3, help="untimed steps (setup, first kernels)")
    ap.add_argument("--n", type=int, default=512, help="random training images (halves per model)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    a = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)
    threads = os.environ.get("OMP_NUM_THREADS", "default")
    print(f"device {a.device}; torch threads {threads}; {a.steps} timed steps after {a.warmup}")
    head = f"{'model':13} {'how':14} {'s/step':>8} {'model-steps/s':>13} {'speed-up':>8} {'models/h':>9}"
    print(head)
    print("-" * len(head))
    for name in a.models.split(","):
        cfg = MODELS[name]()
        data = _data(cfg, a.n)
        base = None
        reason = why_not_stackable([cfg])
        for stack in [0, *[int(s) for s in a.stacks.split(",")]]:
            if stack and reason:
                print(f"{name:13} {'stack x' + str(stack):14} cannot stack: {reason}")
                continue
            try:
                s = seconds_per_step(cfg, data, stack, a)
            except torch.OutOfMemoryError:
                print(f"{name:13} {'stack x' + str(stack):14} out of memory")
                continue
            per_model = s / max(stack, 1)
            base = base or per_model
            label = "one by one" if stack == 0 else f"stack x{stack}"
            print(
                f"{name:13} {label:14} {s:8.4f} {1 / per_model:13.2f} {base / per_model:8.2f} "
                f"{3600 / (per_model * cfg.train.steps):9.3g}"
            )
            sys.stdout.flush()
    print(
        "models/h: models of the config's train.steps (the full model's length; subset models "
        "of an `epochs` config are shorter) finished per hour by one process."
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
