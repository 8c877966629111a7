"""LoRA fine-tuning of a text-to-image model: learning, frozen base, exact resume, the saved
LoRA, v-prediction, the record and one-line config errors (on the tiny pipeline)."""

from __future__ import annotations

import csv
import json
import pathlib

import pytest
import torch
import yaml

from diffattr.config import (
    LORA_KIND,
    ConfigError,
    DataConfig,
    LoraExperimentConfig,
    load_config,
    load_train_config,
    lora_config_from_dict,
)
from diffattr.data import load_dataset
from diffattr.data.dataset import DataError, ImageDataset
from diffattr.diffusion import lora_trainer
from diffattr.diffusion.lora import lora_state_dict
from diffattr.diffusion.lora_trainer import is_lora_trained, train_lora
from diffattr.diffusion.model import load_model
from diffattr.diffusion.text2image import TextToImageLoadError, load_text_to_image
from diffattr.diffusion.trainer import checkpoint_dirs, draw_micro_batch
from diffattr.errors import UserError
from diffattr.repro import MismatchError
from diffattr.testing import tiny_t2i_folder

ROOT = pathlib.Path(__file__).resolve().parents[1]
CAPTIONS = ["a ukiyo e painting", "a post impressionism painting"]


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> pathlib.Path:
    return tiny_t2i_folder(tmp_path_factory.mktemp("t2i") / "base", seed=0)


@pytest.fixture(scope="module")
def vbase(tmp_path_factory) -> pathlib.Path:
    return tiny_t2i_folder(tmp_path_factory.mktemp("t2i-v") / "base", "v_prediction", seed=1)


def captioned(n: int = 8, seed: int = 0) -> ImageDataset:
    """``n`` smooth random 16x16 RGB images (the tiny VAE's size), two captions alternating."""
    g = torch.Generator().manual_seed(seed)
    coarse = torch.rand((n, 3, 4, 4), generator=g) * 2 - 1
    images = torch.nn.functional.interpolate(coarse, size=(16, 16), mode="bilinear")
    return ImageDataset(
        "captioned",
        images.clamp(-1, 1).contiguous(),
        torch.arange(n) + 100,
        captions=[CAPTIONS[i % 2] for i in range(n)],
    )


def cfg_for(base: pathlib.Path, seed: int = 0, lora: dict | None = None, **train):
    values = {
        "steps": 12,
        "batch_size": 4,
        "learning_rate": 1e-2,
        "lr_warmup_steps": 2,
        "lr_schedule": "cosine",
        "checkpoint_every": 4,
        "log_every": 0,
    }
    return lora_config_from_dict(
        {
            "seed": seed,
            "base_model": str(base),
            "lora": {"rank": 4, **(lora or {})},
            "train": {**values, **train},
        }
    )


def fixed_loss(model, data: ImageDataset, seed: int = 7) -> float:
    """Mean denoising loss over fixed (timestep, noise) draws: comparable across models."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        x0 = model.encode_images(data.images)
        losses = []
        for _ in range(4):
            t = torch.randint(0, model.num_train_timesteps, (len(data),), generator=g)
            noise = torch.randn(x0.shape, generator=g)
            x_t = model.scheduler.add_noise(x0, noise, t)
            pred = model.eps(x_t, t, model.tokenize(data.captions))
            losses.append((pred - model.target(x0, noise, t)).pow(2).mean())
    return float(torch.stack(losses).mean())


def base_weights(model) -> dict[str, torch.Tensor]:
    """Every non-LoRA weight, under the base model's names (peft's ``base_layer`` undone)."""
    out = {
        "unet." + k.replace(".base_layer.", "."): v.clone()
        for k, v in model.unet.state_dict().items()
        if ".lora_" not in k
    }
    for part in ("vae", "text_encoder"):
        out.update({f"{part}.{k}": v.clone() for k, v in getattr(model, part).state_dict().items()})
    return out


@pytest.fixture(scope="module")
def trained(base, tmp_path_factory):
    """A 30-step run (the shared trained LoRA) and its folder."""
    out = tmp_path_factory.mktemp("lora") / "run"
    cfg = cfg_for(base, steps=30, checkpoint_every=10, learning_rate=3e-2)
    model = train_lora(cfg, captioned(), out, progress=False)
    return cfg, model, out


def test_training_lowers_the_loss_and_changes_only_the_lora(base, trained):
    _, model, _ = trained
    data = captioned()
    fresh = load_text_to_image(base)
    assert fixed_loss(model, data) < 0.95 * fixed_loss(fresh, data)  # about 0.92 here
    before, after = base_weights(fresh), base_weights(model)
    assert before.keys() == after.keys()
    changed = [k for k in before if not torch.equal(before[k], after[k])]
    assert changed == []  # base UNet, VAE and text encoder bit-identical
    assert model.base_hash() == fresh.base_hash()
    lora = lora_state_dict(model.unet)
    assert lora and all(v.abs().sum() > 0 for k, v in lora.items() if "lora_B" in k)
    assert not fresh.has_lora


def test_killed_run_resumes_to_bit_identical_lora_weights(base, tmp_path, monkeypatch):
    data = captioned()
    cfg = cfg_for(base, seed=3, steps=10, checkpoint_every=4)
    whole = train_lora(cfg, data, tmp_path / "whole", progress=False)

    # Kill the second run during step 7 (its last checkpoint is step 4), then resume it.
    real = lora_trainer.fetch_batch
    calls = {"n": 0}

    def dying(train_set, rows):
        calls["n"] += 1
        if calls["n"] == 7:
            raise KeyboardInterrupt("killed")
        return real(train_set, rows)

    monkeypatch.setattr(lora_trainer, "fetch_batch", dying)
    with pytest.raises(KeyboardInterrupt):
        train_lora(cfg, data, tmp_path / "killed", progress=False)
    assert [s for s, _ in checkpoint_dirs(tmp_path / "killed")] == [4]
    assert not is_lora_trained(tmp_path / "killed")
    monkeypatch.setattr(lora_trainer, "fetch_batch", real)
    resumed = train_lora(cfg, data, tmp_path / "killed", progress=False)

    a, b = lora_state_dict(whole.unet), lora_state_dict(resumed.unet)
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert whole.model_hash() == resumed.model_hash()
    rec_a = json.loads((tmp_path / "whole" / "diffattr.json").read_text())
    rec_b = json.loads((tmp_path / "killed" / "diffattr.json").read_text())
    assert rec_a["model_hash"] == rec_b["model_hash"] and rec_b["steps"] == 10
    assert not (tmp_path / "killed" / "checkpoints").exists()

    # stop_after: checkpoint there, not finished; the next call finishes to the same weights.
    partial = train_lora(cfg, data, tmp_path / "stopped", progress=False, stop_after=6)
    assert partial.record["steps"] == 6 and not is_lora_trained(tmp_path / "stopped")
    done = train_lora(cfg, data, tmp_path / "stopped", progress=False)
    assert done.model_hash() == whole.model_hash()


def test_saved_lora_reloads_and_reproduces_the_trained_model(base, trained):
    _, model, out = trained
    assert (out / "pytorch_lora_weights.safetensors").is_file()
    assert not (out / "checkpoints").exists()
    loaded = load_text_to_image(base, lora=out)
    also = load_model(base, lora=out / "pytorch_lora_weights.safetensors")
    run_alone = load_model(out)  # the LoRA run opens as its recorded base + the LoRA
    assert run_alone.lora_path is not None and run_alone.base_hash() == loaded.base_hash()
    g = torch.Generator().manual_seed(0)
    x_t = torch.randn((3, *model.image_shape), generator=g)
    t = torch.tensor([5, 500, 990])
    cond = model.tokenize(CAPTIONS + ["a photo"])
    with torch.no_grad():
        want = model.eps(x_t, t, cond)
        for other in (loaded, also, run_alone):
            torch.testing.assert_close(other.eps(x_t, t, cond), want, rtol=0, atol=0)
    assert loaded.model_hash() == model.model_hash() == model.record["model_hash"]
    # Training again into the finished folder loads it instead.
    cfg, _, _ = trained
    again = train_lora(cfg, captioned(), out, progress=False)
    assert again.model_hash() == model.model_hash()


@pytest.mark.parametrize("kind", ["epsilon", "v_prediction"])
def test_first_loss_is_the_formula_for_the_prediction_type(base, vbase, kind, tmp_path):
    folder = base if kind == "epsilon" else vbase
    data = captioned()
    cfg = cfg_for(
        folder, seed=5, steps=25, learning_rate=3e-2, lr_schedule="constant", lr_warmup_steps=0
    )
    model = train_lora(cfg, data, tmp_path / "run", progress=False)
    assert model.prediction_type == kind
    with open(tmp_path / "run" / "loss_history.csv") as fh:
        history = [float(r["loss"]) for r in csv.DictReader(fh)]
    assert len(history) == 25

    # Step 1 by hand: the gaussian-initialised LoRA is a no-op, so it is the base model's loss
    # on micro-step 0's rows, timesteps and noise, against noise or velocity.
    fresh = load_text_to_image(folder)
    from diffattr.config import ExperimentConfig
    from diffattr.diffusion.trainer import EpochOrder

    view = ExperimentConfig(seed=cfg.seed, train=cfg.train)
    mb = draw_micro_batch(view, EpochOrder(cfg.seed, len(data)), 0, (4, 8, 8), 1000)
    with torch.no_grad():
        x0 = fresh.encode_images(data.images[mb.rows])
        x_t = fresh.scheduler.add_noise(x0, mb.noise, mb.t)
        pred = fresh.eps(x_t, mb.t, fresh.tokenize([data.captions[i] for i in mb.rows]))
        ac = fresh.scheduler.alphas_cumprod[mb.t].reshape(-1, 1, 1, 1)
        goal = mb.noise if kind == "epsilon" else ac.sqrt() * mb.noise - (1 - ac).sqrt() * x0
        want = float((pred - goal).pow(2).mean())
    assert history[0] == pytest.approx(want, rel=1e-5)
    assert fixed_loss(model, data) < 0.95 * fixed_loss(fresh, data)


def test_record_holds_base_data_lora_and_refuses_other_runs(base, trained, tmp_path):
    cfg, model, out = trained
    rec = json.loads((out / "diffattr.json").read_text())
    fresh = load_text_to_image(base)
    data = captioned()
    assert rec["kind"] == LORA_KIND and rec["finished"] is True
    assert rec["base_hash"] == fresh.base_hash() == rec["identity"]["base_hash"]
    assert rec["data_hash"] == data.data_hash() == rec["identity"]["data_hash"]
    assert rec["lora"]["rank"] == 4 and rec["lora"]["alpha"] == 4.0
    assert sorted(rec["lora"]["targets"]) == sorted(["to_q", "to_k", "to_v", "to_out.0"])
    assert rec["config"]["lora"] == {
        "rank": 4,
        "alpha": None,
        "targets": ["to_q", "to_k", "to_v", "to_out.0"],
        "init": "gaussian",
    }
    assert rec["base_model"] == str(base) and rec["seed"] == 0 and rec["steps"] == 30
    assert rec["train_ids"] == data.ids.tolist()
    assert rec["lora_hash"] == model.lora_hash() and rec["model_hash"] == model.model_hash()
    assert rec["prediction_type"] == "epsilon"
    assert "base_model" not in rec["identity"]["config"]  # the hash, not the path, identifies it
    with open(out / "loss_history.csv") as fh:
        rows = list(csv.DictReader(fh))
    assert len(rows) == 30 and rows[-1]["step"] == "30"

    # Same folder, other settings / other captions: refused, naming what differs.
    with pytest.raises(MismatchError, match="lora.rank"):
        train_lora(cfg_for(base, lora={"rank": 2}, steps=30, learning_rate=3e-2), data, out)
    other = captioned()
    other.captions[0] = "a photo"
    with pytest.raises(MismatchError, match="data_hash"):
        train_lora(cfg, other, out, progress=False)


def test_bad_configs_and_data_fail_in_one_line(base, tmp_path):
    good = {"base_model": str(base), "train": {"steps": 2}}
    bad_values = [
        ({"kind": LORA_KIND, "train": {"steps": 2}}, "base_model"),
        ({**good, "lora": {"rank": 0}}, "lora.rank"),
        ({**good, "lora": {"targets": []}}, "lora.targets"),
        ({**good, "lora": {"targets": "to_q"}}, "lora.targets"),
        ({**good, "lora": {"alpha": -1}}, "lora.alpha"),
        ({**good, "lora": {"init": "zeros"}}, "lora.init"),
        ({**good, "lora": {"rnak": 4}}, r"unknown key\(s\) \['rnak'\]"),
        ({**good, "model": {}}, r"unknown key\(s\) \['model'\]"),
        ({**good, "train": {"ema_decay": 0.999}}, "ema_decay"),
        ({**good, "train": {"batch_size": 0}}, "batch_size"),
        ({**good, "data": {"prompt_template": "a painting"}}, "prompt_template"),
        ({**good, "kind": "text-to-video"}, "unknown config kind"),
    ]
    for i, (values, pattern) in enumerate(bad_values):
        path = tmp_path / f"bad{i}.yaml"
        path.write_text(yaml.safe_dump(values))
        with pytest.raises(ConfigError, match=pattern) as err:
            load_train_config(path)
        assert "\n" not in str(err.value), str(err.value)
    # The pixel-config reader refuses a LoRA config with a pointer to what reads it.
    path = tmp_path / "lora.yaml"
    path.write_text(yaml.safe_dump({"kind": LORA_KIND, **good}))
    with pytest.raises(ConfigError, match="diffattr train"):
        load_config(path)
    assert isinstance(load_train_config(path), LoraExperimentConfig)

    data = captioned()
    errors = [
        (cfg_for(base, lora={"targets": ["to_nowhere"]}), data, ConfigError, "lora"),
        (cfg_for(tmp_path / "missing"), data, TextToImageLoadError, "not found"),
        (
            cfg_for(base),
            ImageDataset("plain", data.images, data.ids),
            DataError,
            "needs a caption per image",
        ),
        (
            cfg_for(base),
            ImageDataset("grey", data.images[:, :1], data.ids, captions=data.captions),
            DataError,
            "1 channel",
        ),
        (
            cfg_for(base),
            ImageDataset("odd", data.images[..., :15], data.ids, captions=data.captions),
            DataError,
            "divisible by 2",
        ),
    ]
    for k, (cfg, ds, exc, pattern) in enumerate(errors):
        with pytest.raises(exc, match=pattern) as err:
            train_lora(cfg, ds, tmp_path / f"out{k}", progress=False)
        assert isinstance(err.value, UserError) and "\n" not in str(err.value), str(err.value)


def test_example_config_is_d_traks_artbench2_setting():
    cfg = load_train_config(ROOT / "configs" / "t2i-lora-example.yaml")
    assert isinstance(cfg, LoraExperimentConfig)
    assert cfg.lora.rank == 128 and cfg.lora.targets == ["to_q", "to_k", "to_v", "to_out.0"]
    assert cfg.data.prompt_template == "a {class} painting" and cfg.data.size == 256
    assert (cfg.train.batch_size, cfg.train.epochs, cfg.train.learning_rate) == (64, 100, 3e-4)
    assert cfg.train.lr_schedule == "cosine"


def test_cli_train_dispatches_on_the_config_kind(base, tmp_path):
    from diffattr.cli import main
    from diffattr.data import export_dataset

    folder = export_dataset(captioned(6), tmp_path / "images", progress=False)
    assert (folder / "metadata.jsonl").is_file()
    config = {
        "kind": LORA_KIND,
        "seed": 1,
        "base_model": str(base),
        "lora": {"rank": 2, "targets": ["to_k", "to_v"]},
        "data": {"source": "imagefolder", "root": str(folder)},
        "train": {"steps": 3, "batch_size": 2, "checkpoint_every": 0, "log_every": 0},
    }
    path = tmp_path / "lora.yaml"
    path.write_text(yaml.safe_dump(config))
    assert main(["-q", "train", "--config", str(path), "--out", str(tmp_path / "out")]) == 0
    rec = json.loads((tmp_path / "out" / "diffattr.json").read_text())
    assert rec["steps"] == 3 and rec["config"]["lora"]["targets"] == ["to_k", "to_v"]
    read = load_dataset(DataConfig(source="imagefolder", root=str(folder)))
    assert read.captions == captioned(6).captions  # exported with their captions, re-read
    assert rec["data_hash"] == read.data_hash()
    loaded = load_text_to_image(base, lora=tmp_path / "out")
    adapted = {k.split(".lora_")[0].rsplit(".", 1)[-1] for k in lora_state_dict(loaded.unet)}
    assert adapted == {"to_k", "to_v"}


WORKER = """
import sys
import torch
from accelerate import Accelerator
from diffattr.config import lora_config_from_dict
from diffattr.data.dataset import ImageDataset
from diffattr.diffusion.lora_trainer import train_lora

g = torch.Generator().manual_seed(0)
coarse = torch.rand((8, 3, 4, 4), generator=g) * 2 - 1
images = torch.nn.functional.interpolate(coarse, size=(16, 16), mode="bilinear").clamp(-1, 1)
data = ImageDataset(
    "captioned", images.contiguous(), torch.arange(8) + 100,
    captions=[{captions!r}[i % 2] for i in range(8)],
)
cfg = lora_config_from_dict({cfg!r})
train_lora(cfg, data, sys.argv[1], accelerator=Accelerator(cpu=True), progress=False)
"""


def test_two_process_data_parallel_run_matches_single_process(base, tmp_path):
    """torchrun with 2 CPU processes: each trains on half of every batch; DDP averages the LoRA
    gradients, so the run matches one process up to float summation order."""
    import os
    import shutil
    import subprocess
    import sys

    torchrun = shutil.which("torchrun", path=os.path.dirname(sys.executable))
    if torchrun is None:
        pytest.skip("torchrun not installed")
    cfg = cfg_for(base, seed=2, steps=6, checkpoint_every=3, random_flip=True)
    script = tmp_path / "worker.py"
    script.write_text(WORKER.format(cfg=cfg.to_dict(), captions=CAPTIONS))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [torchrun, "--standalone", "--nproc_per_node", "2", str(script), str(tmp_path / "ddp")]
    proc = subprocess.run(cmd, env=env, timeout=300, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    data = captioned()
    single = train_lora(cfg, data, tmp_path / "one", progress=False)
    record = json.loads((tmp_path / "ddp" / "diffattr.json").read_text())
    assert record["num_processes"] == 2 and record["data_hash"] == data.data_hash()

    def losses(folder: pathlib.Path) -> list[float]:
        with open(folder / "loss_history.csv") as fh:
            return [float(r["loss"]) for r in csv.DictReader(fh)]

    assert losses(tmp_path / "ddp") == pytest.approx(losses(tmp_path / "one"), abs=1e-5)
    ddp = lora_state_dict(load_text_to_image(base, lora=tmp_path / "ddp").unet)
    for k, v in lora_state_dict(single.unet).items():
        torch.testing.assert_close(ddp[k], v, rtol=0, atol=1e-4)
