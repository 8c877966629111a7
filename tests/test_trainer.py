"""diffattr.diffusion.trainer: learning, subset isolation, exact resume, result-folder identity."""

from __future__ import annotations

import csv
import json
import math
import shutil

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from diffattr.config import ConfigError, config_from_dict, identity_dict, resolve_train_length
from diffattr.data.dataset import DataError, ImageDataset
from diffattr.diffusion import is_trained, load_model, train_model
from diffattr.diffusion import trainer as trainer_mod
from diffattr.diffusion.trainer import (
    checkpoint_dirs,
    draw_micro_batch,
    learning_rate_at,
    make_optimizer,
)
from diffattr.repro import MismatchError
from diffattr.testing import TINY_UNET

TINY_MODEL = {**TINY_UNET, "attention_head_dim": 8}


def tiny_cfg(seed: int = 0, model: dict | None = None, **train):
    base = {
        "steps": 10,
        "batch_size": 8,
        "learning_rate": 2e-3,
        "lr_warmup_steps": 5,
        "checkpoint_every": 5,
        "log_every": 5,
    }
    return config_from_dict(
        {"seed": seed, "model": {**TINY_MODEL, **(model or {})}, "train": {**base, **train}}
    )


def digits01() -> ImageDataset:
    """sklearn's 8x8 zeros and ones, scaled to [-1, 1] (digits-2-like data, built directly)."""
    from sklearn.datasets import load_digits

    bunch = load_digits(n_class=2)
    images = torch.from_numpy(bunch.images / 8.0 - 1.0).float().unsqueeze(1)
    return ImageDataset(
        name="digits01",
        images=images,
        ids=torch.arange(len(images), dtype=torch.int64) + 1000,
        labels=torch.from_numpy(bunch.target).long(),
        class_names=["0", "1"],
    )


def random_set(n: int = 24, seed: int = 0, first_id: int = 0) -> ImageDataset:
    g = torch.Generator().manual_seed(seed)
    return ImageDataset(
        name="rand",
        images=torch.rand((n, 1, 8, 8), generator=g) * 2 - 1,
        ids=torch.arange(first_id, first_id + n, dtype=torch.int64),
        labels=torch.randint(0, 2, (n,), generator=g),
    )


def loss_csv(path) -> list[tuple[int, float]]:
    with (path / "loss_history.csv").open() as f:
        rows = list(csv.DictReader(f))
    return [(int(r["step"]), float(r["loss"])) for r in rows]


def all_weights_equal(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sorted(sa) == sorted(sb) and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_loss_falls_on_digits(tmp_path):
    data = digits01()
    cfg = tiny_cfg(steps=100, batch_size=16, lr_warmup_steps=10, checkpoint_every=0)
    model = train_model(cfg, data, tmp_path / "run", progress=False)
    hist = loss_csv(tmp_path / "run")
    assert [s for s, _ in hist] == list(range(1, 101))
    first = np.mean([v for _, v in hist[:20]])
    last = np.mean([v for _, v in hist[-20:]])
    assert last < 0.6 * first, (first, last)
    # Held-out check with fixed noise: the trained model beats the untrained one clearly.
    record = json.loads((tmp_path / "run" / "diffattr.json").read_text())
    assert record["finished"] and record["steps"] == 100
    assert record["data_hash"] == data.data_hash() and record["train_ids"] == data.ids.tolist()
    assert record["config"] == cfg.to_dict() and record["seed"] == cfg.seed
    assert record["model_hash"] == model.model_hash()
    assert not (tmp_path / "run" / "checkpoints").exists()
    assert is_trained(tmp_path / "run")
    assert load_model(tmp_path / "run").model_hash() == model.model_hash()


def test_epoch_order_visits_every_image_once_per_epoch():
    cfg = tiny_cfg(batch_size=7)
    order = trainer_mod.EpochOrder(cfg.seed, 20)
    rows = torch.cat([draw_micro_batch(cfg, order, m, (1, 8, 8), 1000).rows for m in range(6)])
    assert sorted(rows[:20].tolist()) == list(range(20))
    assert sorted(rows[20:40].tolist()) == list(range(20))
    assert not torch.equal(rows[:20], rows[20:40])  # a fresh permutation each epoch
    again = draw_micro_batch(cfg, trainer_mod.EpochOrder(cfg.seed, 20), 4, (1, 8, 8), 1000)
    ref = draw_micro_batch(cfg, order, 4, (1, 8, 8), 1000)
    assert torch.equal(again.rows, ref.rows) and torch.equal(again.noise, ref.noise)
    assert torch.equal(again.t, ref.t) and not again.flip.any()  # random_flip off


def test_subset_training_only_touches_the_subset(tmp_path, monkeypatch):
    full = random_set(40, first_id=500)
    mask = torch.zeros(40, dtype=torch.bool)
    mask[::3] = True
    sub = full.subset(mask)
    seen: list[int] = []
    real_fetch = trainer_mod.fetch_batch

    def spy(train_set, rows):
        x, labels, ids = real_fetch(train_set, rows)
        seen.extend(ids.tolist())
        return x, labels, ids

    monkeypatch.setattr(trainer_mod, "fetch_batch", spy)
    cfg = tiny_cfg(steps=6, batch_size=8, random_flip=True)
    train_model(cfg, sub, tmp_path / "sub", progress=False)
    allowed = set(full.ids[mask].tolist())
    assert set(seen) <= allowed
    assert set(seen) == allowed  # 48 draws over 14 images: every one was used
    record = json.loads((tmp_path / "sub" / "diffattr.json").read_text())
    assert record["train_ids"] == sorted(allowed) and record["n_train"] == 14


@pytest.mark.parametrize("accum", [1, 2])
def test_resumed_run_equals_uninterrupted_run(tmp_path, accum):
    data = random_set(24)
    cfg = tiny_cfg(
        steps=8,
        checkpoint_every=4,
        ema_decay=0.9,
        random_flip=True,
        gradient_accumulation_steps=accum,
        model={"dropout": 0.1},
    )
    straight = train_model(cfg, data, tmp_path / "a", progress=False, keep_checkpoints=True)

    # Killed after step 6: the step-4 checkpoint exists, steps 5-6 were lost.
    partial = train_model(cfg, data, tmp_path / "b", progress=False, stop_after=6)
    assert not is_trained(tmp_path / "b")
    assert [s for s, _ in checkpoint_dirs(tmp_path / "b")] == [4, 6]
    assert not all_weights_equal(partial.unet, straight.unet)
    assert partial.record["steps"] == 6

    shutil.rmtree(tmp_path / "b" / "checkpoints" / "step-000006")
    # ... and died while writing the next checkpoint: a temporary folder that must be ignored.
    half = tmp_path / "b" / "checkpoints" / ".tmp-step-000008-999"
    half.mkdir()
    (half / "unet.safetensors").write_bytes(b"garbage")
    resumed = train_model(cfg, data, tmp_path / "b", progress=False, keep_checkpoints=True)

    assert all_weights_equal(resumed.unet, straight.unet)
    assert not half.exists()
    assert resumed.model_hash() == straight.model_hash()
    assert loss_csv(tmp_path / "b") == loss_csv(tmp_path / "a")
    # The raw (non-EMA) weights and optimizer state in the last checkpoints match too.
    ca, cb = tmp_path / "a/checkpoints/step-000008", tmp_path / "b/checkpoints/step-000008"
    for name in ("unet.safetensors", "ema.safetensors"):
        ta, tb = load_file(str(ca / name)), load_file(str(cb / name))
        assert all(torch.equal(ta[k], tb[k]) for k in ta), name
    oa = torch.load(ca / "optimizer.pt", weights_only=True)
    ob = torch.load(cb / "optimizer.pt", weights_only=True)
    for k, st in oa["state"].items():
        assert all(torch.equal(st[f], ob["state"][k][f]) for f in st)
    # EMA is what was saved: it differs from the raw weights.
    raw = load_file(str(ca / "unet.safetensors"))
    assert any(not torch.equal(raw[k], v) for k, v in resumed.unet.state_dict().items())


def test_finished_run_is_loaded_not_retrained(tmp_path, monkeypatch):
    data = random_set(16)
    cfg = tiny_cfg(steps=3, checkpoint_every=0)
    first = train_model(cfg, data, tmp_path / "r", progress=False)

    def fail(*args, **kwargs):
        raise AssertionError("training data touched although the run is finished")

    monkeypatch.setattr(trainer_mod, "fetch_batch", fail)
    again = train_model(cfg, data, tmp_path / "r", progress=False)
    assert again.model_hash() == first.model_hash()


def test_reopening_with_other_config_or_data_raises(tmp_path):
    data = random_set(16)
    cfg = tiny_cfg(steps=2, checkpoint_every=0)
    train_model(cfg, data, tmp_path / "r", progress=False)
    with pytest.raises(MismatchError, match="learning_rate"):
        train_model(tiny_cfg(steps=2, checkpoint_every=0, learning_rate=1e-4), data, tmp_path / "r")
    with pytest.raises(MismatchError, match="data_hash"):
        train_model(cfg, random_set(16, seed=1), tmp_path / "r", progress=False)
    # Logging, checkpoint spacing and sampling settings do not change the weights: same run.
    relaxed = tiny_cfg(steps=2, checkpoint_every=7, log_every=1)
    relaxed.sample.num_inference_steps = 5
    assert is_trained(tmp_path / "r")
    train_model(relaxed, data, tmp_path / "r", progress=False)


def test_bad_inputs_are_refused(tmp_path):
    wrong = ImageDataset("big", torch.zeros(4, 1, 16, 16), torch.arange(4))
    with pytest.raises(DataError, match="expects"):
        train_model(tiny_cfg(), wrong, tmp_path / "x", progress=False)
    unlabeled = ImageDataset("nolabels", torch.zeros(4, 1, 8, 8), torch.arange(4))
    with pytest.raises(DataError, match="labels"):
        train_model(tiny_cfg(model={"num_class_embeds": 2}), unlabeled, tmp_path / "y")


def test_class_conditional_training_uses_labels(tmp_path):
    data = random_set(16)
    cfg = tiny_cfg(steps=3, checkpoint_every=0, model={"num_class_embeds": 2})
    model = train_model(cfg, data, tmp_path / "c", progress=False)
    assert model.num_classes == 2
    # The class embedding received gradient updates (it started at its seeded init).
    from diffattr.diffusion import build_model

    init = build_model(cfg).unet.class_embedding.weight
    assert not torch.equal(init, model.unet.class_embedding.weight)


WORKER = """
import sys
import torch
from accelerate import Accelerator
from diffattr.config import ConfigError, config_from_dict, identity_dict, resolve_train_length
from diffattr.data.dataset import ImageDataset
from diffattr.diffusion import train_model

cfg = config_from_dict({cfg!r})
g = torch.Generator().manual_seed(0)
data = ImageDataset("rand", torch.rand((24, 1, 8, 8), generator=g) * 2 - 1, torch.arange(24))
train_model(cfg, data, sys.argv[1], accelerator=Accelerator(cpu=True), progress=False)
"""


def test_two_process_data_parallel_run_matches_single_process(tmp_path):
    """torchrun with 2 CPU processes: each takes half of every batch; DDP averages gradients."""
    import os
    import shutil
    import subprocess
    import sys

    torchrun = shutil.which("torchrun", path=os.path.dirname(sys.executable))
    if torchrun is None:
        pytest.skip("torchrun not installed")
    cfg = tiny_cfg(steps=6, checkpoint_every=3, ema_decay=0.9, random_flip=True)
    script = tmp_path / "worker.py"
    script.write_text(WORKER.format(cfg=cfg.to_dict()))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    # --standalone: torchrun picks its own free port (no race with a port chosen here).
    cmd = [torchrun, "--standalone", "--nproc_per_node", "2", str(script), str(tmp_path / "ddp")]
    proc = subprocess.run(cmd, env=env, timeout=300, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    g = torch.Generator().manual_seed(0)
    data = ImageDataset("rand", torch.rand((24, 1, 8, 8), generator=g) * 2 - 1, torch.arange(24))
    single = train_model(cfg, data, tmp_path / "one", progress=False)
    record = json.loads((tmp_path / "ddp" / "diffattr.json").read_text())
    assert record["num_processes"] == 2 and record["data_hash"] == data.data_hash()
    # Same batches, noise and timesteps: losses agree up to float summation order.
    la, lb = loss_csv(tmp_path / "ddp"), loss_csv(tmp_path / "one")
    assert [s for s, _ in la] == [s for s, _ in lb]
    np.testing.assert_allclose([v for _, v in la], [v for _, v in lb], rtol=0, atol=1e-5)
    ddp = load_model(tmp_path / "ddp")
    for k, v in single.unet.state_dict().items():
        torch.testing.assert_close(ddp.unet.state_dict()[k], v, rtol=0, atol=1e-3)


def test_checkpoints_pruned_or_kept_and_loadable(tmp_path):
    data = random_set(16)
    cfg = tiny_cfg(steps=8, checkpoint_every=2, ema_decay=0.9)
    train_model(cfg, data, tmp_path / "p", progress=False, stop_after=7)
    assert [s for s, _ in checkpoint_dirs(tmp_path / "p")] == [6, 7]  # last two only

    final = train_model(cfg, data, tmp_path / "k", progress=False, keep_checkpoints=True)
    ckpts = checkpoint_dirs(tmp_path / "k")
    assert [s for s, _ in ckpts] == [2, 4, 6, 8]
    mid = load_model(ckpts[1][1])  # TracIn-style: a training checkpoint as a model
    raw = load_file(str(ckpts[1][1] / "unet.safetensors"))
    assert all(torch.equal(v, raw[k]) for k, v in mid.unet.state_dict().items())
    assert mid.record["steps"] == 4 and mid.record["config"] == cfg.to_dict()
    last = load_file(str(ckpts[-1][1] / "unet.safetensors"))
    assert any(not torch.equal(v, last[k]) for k, v in final.unet.state_dict().items())  # EMA


def test_learning_rate_schedules_by_hand():
    const = tiny_cfg(learning_rate=1.0, lr_warmup_steps=2, steps=10)
    cos = tiny_cfg(learning_rate=1.0, lr_warmup_steps=2, steps=10, lr_schedule="cosine")
    assert [learning_rate_at(const, s) for s in range(4)] == [0.5, 1.0, 1.0, 1.0]
    want = [0.5, 1.0, 1.0, 0.5 * (1 + math.cos(math.pi / 8)), 0.5 * (1 + math.cos(math.pi / 4))]
    assert [learning_rate_at(cos, s) for s in range(5)] == pytest.approx(want)
    assert learning_rate_at(cos, 6) == pytest.approx(0.5)  # halfway through the decay
    assert learning_rate_at(cos, 10) == pytest.approx(0.0)
    with pytest.raises(ConfigError, match="lr_schedule"):
        tiny_cfg(lr_schedule="linear")
    opt = make_optimizer(tiny_cfg(adam_beta1=0.95, adam_beta2=0.99), [torch.zeros(2)])
    assert opt.param_groups[0]["betas"] == (0.95, 0.99)


def test_epochs_set_the_length_per_training_set(tmp_path):
    cfg = tiny_cfg(epochs=2, lr_warmup_fraction=0.25, batch_size=8, checkpoint_every=0)
    # 24 images at batch 8: 3 steps per epoch -> 6 steps, warmup ceil(1.5) = 2; 10 images: 2 -> 4.
    full = resolve_train_length(cfg, 24).train
    assert (full.steps, full.lr_warmup_steps, full.epochs) == (6, 2, None)
    half = resolve_train_length(cfg, 10).train
    assert (half.steps, half.lr_warmup_steps) == (4, 1)
    assert resolve_train_length(tiny_cfg(), 24) == tiny_cfg()  # nothing to resolve
    model = train_model(cfg, random_set(10), tmp_path / "run", progress=False)
    assert model.record["steps"] == 4
    assert len(loss_csv(tmp_path / "run")) == 4
    assert model.record["config"]["train"]["steps"] == 4  # the record holds the concrete length
    # Reopening with the same (unresolved) config loads it; its identity is the config as given.
    again = train_model(cfg, random_set(10), tmp_path / "run", progress=False)
    assert again.model_hash() == model.model_hash()


def test_identity_leaves_out_later_keys_at_their_defaults():
    plain = identity_dict(tiny_cfg())
    assert "lr_schedule" not in plain["train"] and "norm_eps" not in plain["model"]
    assert "block_out_channels" in plain["model"]  # original keys always stay
    cos = identity_dict(tiny_cfg(lr_schedule="cosine"))
    assert cos["train"]["lr_schedule"] == "cosine"
