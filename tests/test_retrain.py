"""Retraining ensemble (resume after a kill, job split across processes) and ground-truth losses."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from diffattr.attribution.base import Queries
from diffattr.config import config_from_dict
from diffattr.data import load_dataset
from diffattr.diffusion.model import build_model, diffusion_loss, load_model
from diffattr.diffusion.trainer import is_trained, train_model
from diffattr.evaluation.ground_truth import (
    GroundTruth,
    GroundTruthSpec,
    assemble,
    compute_shards,
    evenly_spaced_timesteps,
    gt_noise,
    query_losses,
    shard_path,
)
from diffattr.evaluation.retrain import (
    LocalAccelerator,
    ProcessInfo,
    run_jobs,
    subset_jobs,
)
from diffattr.evaluation.subsets import make_subsets
from diffattr.repro import state_dict_hash

TINY = {
    "seed": 1,
    "data": {"source": "digits-2", "size": 8, "limit": 24},
    "model": {
        "sample_size": 8,
        "block_out_channels": [8, 16],
        "down_block_types": ["DownBlock2D", "DownBlock2D"],
        "up_block_types": ["UpBlock2D", "UpBlock2D"],
        "norm_num_groups": 4,
        "attention_head_dim": None,
    },
    "train": {
        "steps": 6,
        "batch_size": 8,
        "lr_warmup_steps": 2,
        "checkpoint_every": 100,
        "log_every": 0,
    },
}


@pytest.fixture(scope="module")
def setup():
    cfg = config_from_dict(TINY)
    return cfg, load_dataset(cfg.data)


@pytest.mark.parametrize("accum", [1, 2])
def test_local_accelerator_trains_like_the_default_one(setup, tmp_path, accum):
    cfg, data = setup
    cfg = dataclasses.replace(
        cfg, train=dataclasses.replace(cfg.train, gradient_accumulation_steps=accum)
    )
    a = train_model(cfg, data, tmp_path / "a", accelerator=None, progress=False)
    local = LocalAccelerator(gradient_accumulation_steps=accum)
    b = train_model(cfg, data, tmp_path / "b", accelerator=local, progress=False)
    # accelerate divides each micro-step loss by the accumulation steps; so must the stand-in.
    assert state_dict_hash(a.unet) == state_dict_hash(b.unet)
    with pytest.raises(ValueError, match="fp16"):
        LocalAccelerator("fp16")


def test_jobs_are_split_across_processes_without_overlap(setup, tmp_path):
    cfg, data = setup
    subsets = make_subsets(data.ids.numpy(), 5, 0.5, seed=0)
    jobs = subset_jobs(cfg, subsets, 2, tmp_path)
    assert [j.name for j in jobs[:3]] == [
        "subset-000-seed-0",
        "subset-000-seed-1",
        "subset-001-seed-0",
    ]
    assert len({j.cfg.seed for j in jobs}) == 10  # every model its own training seed
    np.testing.assert_array_equal(jobs[3].keep_ids, subsets.ids(1))
    seen: dict[int, list[str]] = {0: [], 1: []}
    for r in (0, 1):
        run_jobs(
            jobs,
            data,
            ProcessInfo(r, 2),
            trainer=lambda c, d, out, **kw: seen[r].append(out.name),  # noqa: B023
            is_done=lambda p: False,
            progress=False,
        )
    assert set(seen[0]).isdisjoint(seen[1])
    assert sorted(seen[0] + seen[1]) == sorted(j.name for j in jobs)
    assert seen[0] == [j.name for j in jobs[0::2]]


def test_killed_retraining_resumes_and_ground_truth(setup, tmp_path):
    cfg, data = setup
    subsets = make_subsets(data.ids.numpy(), 4, 0.5, seed=0)
    jobs = subset_jobs(cfg, subsets, 1, tmp_path / "models")
    calls: list[str] = []

    def killed_on_third(c, d, out, **kw):
        calls.append(out.name)
        if len(calls) == 3:  # the third model dies halfway (after a checkpoint at step 3)
            train_model(c, d, out, stop_after=3, **kw)
            raise KeyboardInterrupt("killed")
        return train_model(c, d, out, **kw)

    with pytest.raises(KeyboardInterrupt):
        run_jobs(jobs, data, trainer=killed_on_third, progress=False)
    assert [is_trained(j.out_dir) for j in jobs] == [True, True, False, False]
    weights = [j.out_dir / "unet" / "diffusion_pytorch_model.safetensors" for j in jobs[:2]]
    mtimes = [w.stat().st_mtime_ns for w in weights]

    calls.clear()
    trained = run_jobs(
        jobs,
        data,
        trainer=lambda *a, **kw: (calls.append(a[2].name), train_model(*a, **kw)),
        progress=False,
    )
    assert calls == trained == [jobs[2].name, jobs[3].name]  # finished ones are not retrained
    assert [w.stat().st_mtime_ns for w in weights] == mtimes
    # The resumed model equals one trained without interruption (the trainer resumes exactly).
    fresh = train_model(
        jobs[2].cfg, data.select_ids(jobs[2].keep_ids), tmp_path / "fresh", progress=False
    )
    resumed = load_model(jobs[2].out_dir)
    assert state_dict_hash(fresh.unet) == state_dict_hash(resumed.unet)
    # The subset model saw exactly its subset.
    from diffattr.repro import read_record

    assert sorted(read_record(jobs[1].out_dir)["train_ids"]) == sorted(subsets.ids(1).tolist())

    # Ground truth: shards from two "processes", assembled, equal to direct per-model losses.
    queries = Queries(images=data.images[:5], names=[f"q{i}" for i in range(5)])
    spec = GroundTruthSpec(timesteps=evenly_spaced_timesteps(7, 1000), noise_draws=2, seed=3)
    gt_dir = tmp_path / "gt"
    for r in (1, 0):
        compute_shards(jobs, queries, spec, gt_dir, ProcessInfo(r, 2), device="cpu", progress=False)
    gt = assemble(jobs, 4, 1, queries.names, spec, gt_dir)
    assert gt.losses.shape == (4, 5) and gt.losses_per_seed.shape == (4, 1, 5)
    for k, job in enumerate(jobs):
        direct = query_losses(load_model(job.out_dir), queries, spec)
        np.testing.assert_allclose(gt.losses[k], direct, rtol=1e-12)
    back = GroundTruth.load(gt_dir)
    np.testing.assert_array_equal(back.losses, gt.losses)
    assert back.spec == spec
    # A lost shard is recomputed alone.
    keep = shard_path(gt_dir, jobs[0]).stat().st_mtime_ns
    shard_path(gt_dir, jobs[3]).unlink()
    written = compute_shards(jobs, queries, spec, gt_dir, device="cpu", progress=False)
    assert written == [jobs[3].name]
    assert shard_path(gt_dir, jobs[0]).stat().st_mtime_ns == keep


def test_query_losses_match_brute_force(setup):
    cfg, data = setup
    model = build_model(cfg)
    queries = Queries(images=data.images[:3], names=["a", "b", "c"])
    spec = GroundTruthSpec(timesteps=[0, 250, 999], noise_draws=2, seed=5, batch_size=4)
    got = query_losses(model, queries, spec)
    want = np.zeros(3)
    with torch.no_grad():
        for t in spec.timesteps:
            for d in range(2):
                noise = gt_noise(5, ["a", "b", "c"], t, d, (1, 8, 8))
                for q in range(3):
                    loss = diffusion_loss(
                        model, data.images[q : q + 1], torch.tensor([t]), noise[q : q + 1]
                    )
                    want[q] += float(loss[0]) / 6
    np.testing.assert_allclose(got, want, rtol=1e-5)
    # Batching does not change the result, and the noise is shared (same losses on a re-run).
    np.testing.assert_allclose(
        query_losses(model, queries, GroundTruthSpec([0, 250, 999], 2, 5, batch_size=1000)),
        got,
        rtol=1e-6,
    )


def test_evenly_spaced_timesteps():
    assert evenly_spaced_timesteps(1000, 1000) == list(range(1000))
    ts = evenly_spaced_timesteps(10, 1000)
    assert ts[0] == 0 and ts[-1] == 999 and len(ts) == 10
    with pytest.raises(ValueError):
        evenly_spaced_timesteps(0, 1000)
