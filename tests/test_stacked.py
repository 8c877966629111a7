"""diffattr.diffusion.stacked: several models trained at once equal the same models trained alone."""

from __future__ import annotations

import dataclasses
import shutil

import numpy as np
import pytest
import torch

from diffattr.config import config_from_dict
from diffattr.data.dataset import ImageDataset
from diffattr.diffusion import is_trained, load_model, train_model
from diffattr.diffusion.stacked import (
    StackJob,
    _clip_per_model,
    train_stacked,
    why_not_stackable,
)
from diffattr.diffusion.trainer import checkpoint_dirs
from diffattr.evaluation.retrain import LocalAccelerator, ProcessInfo, TrainJob, run_jobs
from diffattr.testing import TINY_UNET


def cfg(seed: int = 0, model: dict | None = None, **train):
    base = {
        "steps": 6,
        "batch_size": 8,
        "learning_rate": 2e-3,
        "lr_warmup_steps": 2,
        "checkpoint_every": 3,
        "ema_decay": 0.9,
        "grad_clip": 0.05,
        "gradient_accumulation_steps": 2,
        "random_flip": True,
        "log_every": 0,
    }
    return config_from_dict(
        {
            "seed": seed,
            "model": {**TINY_UNET, "attention_head_dim": 8, **(model or {})},
            "train": {**base, **train},
        }
    )


@pytest.fixture(scope="module")
def data() -> ImageDataset:
    g = torch.Generator().manual_seed(0)
    images = torch.rand(24, 1, 8, 8, generator=g) * 2 - 1
    return ImageDataset("rand", images, torch.arange(100, 124))


def subsets(data: ImageDataset) -> list[ImageDataset]:
    """Three different subsets (sizes 12, 8, 6)."""
    return [data.select_ids(data.ids[i :: 2 + i].numpy()) for i in range(3)]


def max_diff(a: torch.nn.Module, b: torch.nn.Module) -> float:
    sa, sb = a.state_dict(), b.state_dict()
    assert sorted(sa) == sorted(sb)
    return max(float((sa[k] - sb[k]).abs().max()) for k in sa)


def test_stacked_models_equal_models_trained_one_by_one(data, tmp_path):
    subs = subsets(data)
    jobs = [StackJob(cfg(s), subs[s], tmp_path / f"stack-{s}") for s in range(3)]
    stacked = train_stacked(jobs, progress=False)
    for s in range(3):
        alone = train_model(
            cfg(s),
            subs[s],
            tmp_path / f"alone-{s}",
            accelerator=LocalAccelerator("no", 2),
            progress=False,
        )
        # Same init, batches, noise, clipping, AdamW and EMA; only kernel summation order differs.
        assert max_diff(stacked[s].unet, alone.unet) < 5e-5
        assert stacked[s].record["final_loss"] == pytest.approx(
            alone.record["final_loss"], rel=1e-5
        )
        assert is_trained(jobs[s].out_dir)
        rec = load_model(jobs[s].out_dir).record
        assert rec["train_ids"] == subs[s].ids.tolist() and rec["stacked_with"] == 3
        assert not checkpoint_dirs(jobs[s].out_dir)  # dropped once finished, as alone
    # The three really are different models (own seed and data).
    assert max_diff(stacked[0].unet, stacked[1].unet) > 1e-2
    # Clipping was active and per model: without it the result moves.
    free = train_stacked(
        [StackJob(cfg(0, grad_clip=None), subs[0], tmp_path / "noclip")], progress=False
    )
    assert max_diff(free[0].unet, stacked[0].unet) > 1e-4


def test_class_conditional_models_stack(tmp_path):
    g = torch.Generator().manual_seed(1)
    images = torch.rand(16, 1, 8, 8, generator=g) * 2 - 1
    labelled = ImageDataset("lab", images, torch.arange(16), labels=torch.arange(16) % 2)
    cond = {"num_class_embeds": 2}
    jobs = [
        StackJob(cfg(s, model=cond, lr_schedule="cosine"), labelled, tmp_path / f"s{s}")
        for s in range(2)
    ]
    stacked = train_stacked(jobs, progress=False)
    for s, job in enumerate(jobs):
        alone = train_model(
            job.cfg, labelled, tmp_path / f"a{s}", accelerator=LocalAccelerator("no", 2)
        )
        assert max_diff(stacked[s].unet, alone.unet) < 2e-4  # labels reach each model's batch


def test_killed_stack_resumes_exactly_and_one_by_one(data, tmp_path):
    subs = subsets(data)[:2]

    def jobs(prefix: str) -> list[StackJob]:
        return [StackJob(cfg(s), subs[s], tmp_path / f"{prefix}-{s}") for s in range(2)]

    straight = train_stacked(jobs("a"), progress=False)
    partial = train_stacked(jobs("b"), progress=False, stop_after=4)
    assert [s for s, _ in checkpoint_dirs(tmp_path / "b-0")] == [3, 4]
    assert not is_trained(tmp_path / "b-0")
    assert partial[0].record["steps"] == 4
    shutil.copytree(tmp_path / "b-1", tmp_path / "c-1")  # the same kill, resumed alone below
    resumed = train_stacked(jobs("b"), progress=False)
    for s in range(2):
        assert max_diff(resumed[s].unet, straight[s].unet) == 0.0  # bit-exact resume
    # Checkpoints are in the one-model format: the one-model trainer resumes a stacked run.
    alone = train_model(
        cfg(1), subs[1], tmp_path / "c-1", accelerator=LocalAccelerator("no", 2), progress=False
    )
    assert max_diff(alone.unet, straight[1].unet) < 5e-5
    # Finished models are loaded, not retrained.
    again = train_stacked(jobs("a"), progress=False)
    assert max_diff(again[0].unet, straight[0].unet) == 0.0


def test_clip_per_model_equals_torch_clip_on_each_model():
    g = torch.Generator().manual_seed(0)
    params = [torch.zeros(3, 4, 5, requires_grad=True), torch.zeros(3, 7, requires_grad=True)]
    for p, scale in zip(params, (1.0, 3.0), strict=True):
        p.grad = torch.randn(p.shape, generator=g) * scale
    p.grad[2] *= 1e-3  # model 2 is under the limit: left alone
    want = []
    for m in range(3):
        singles = [p.detach()[m].clone().requires_grad_(True) for p in params]
        for s, p in zip(singles, params, strict=True):
            s.grad = p.grad[m].clone()
        torch.nn.utils.clip_grad_norm_(singles, 2.0)
        want.append([s.grad for s in singles])
    _clip_per_model(params, 2.0)
    for m in range(3):
        for j, p in enumerate(params):
            torch.testing.assert_close(p.grad[m], want[m][j], rtol=1e-6, atol=0)


def test_what_cannot_be_stacked(data, tmp_path):
    assert why_not_stackable([cfg(0), cfg(1)]) is None
    assert "differ" in why_not_stackable([cfg(0), cfg(1, steps=7)])
    assert "dropout" in why_not_stackable([cfg(0, model={"dropout": 0.1})])
    assert "mixed_precision" in why_not_stackable([cfg(0, mixed_precision="fp16")])
    with pytest.raises(ValueError, match="differ in more than the seed"):
        train_stacked(
            [
                StackJob(cfg(0), data, tmp_path / "x"),
                StackJob(cfg(1, learning_rate=1e-3), data, tmp_path / "y"),
            ],
            progress=False,
        )
    # Models at different steps are refused with both folders named.
    train_stacked([StackJob(cfg(0), data, tmp_path / "p")], progress=False, stop_after=3)
    with pytest.raises(ValueError, match="different steps.*p: 3.*q: 0"):
        train_stacked(
            [StackJob(cfg(0), data, tmp_path / "p"), StackJob(cfg(1), data, tmp_path / "q")],
            progress=False,
        )


def test_run_jobs_stacks_per_process_and_falls_back(data, tmp_path):
    ids = data.ids.numpy()
    jobs = [
        TrainJob(f"m{i}", cfg(10 + i, steps=3), ids[i::2], tmp_path / f"m{i}") for i in range(5)
    ]
    trained = run_jobs(jobs, data, ProcessInfo(0, 1), progress=False, stack=2)
    assert trained == [j.name for j in jobs]
    stacked_with = [load_model(j.out_dir).record.get("stacked_with", 1) for j in jobs]
    assert stacked_with == [2, 2, 2, 2, 1]  # the fifth trains alone
    alone = train_model(
        jobs[3].cfg,
        data.select_ids(np.sort(jobs[3].keep_ids)),
        tmp_path / "alone",
        accelerator=LocalAccelerator("no", 2),
        progress=False,
    )
    assert max_diff(load_model(jobs[3].out_dir).unet, alone.unet) < 5e-5
    assert run_jobs(jobs, data, progress=False, stack=2) == []  # all finished
    # Configs that cannot be stacked train one by one.
    drop = [
        dataclasses.replace(j, cfg=cfg(j.cfg.seed, steps=2, model={"dropout": 0.1}))
        for j in jobs[:2]
    ]
    drop = [dataclasses.replace(j, out_dir=tmp_path / f"d{i}") for i, j in enumerate(drop)]
    assert run_jobs(drop, data, progress=False, stack=2) == ["m0", "m1"]
    assert all("stacked_with" not in load_model(j.out_dir).record for j in drop)
