"""diffattr.diffusion: model save/load, diffusers folder loading, sampling and trajectories."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler, DDPMPipeline, DDPMScheduler
from PIL import Image
from safetensors.torch import load_file, save_file

from diffattr.config import config_from_dict, load_config
from diffattr.diffusion import (
    DiffusionModel,
    ModelLoadError,
    SampleResult,
    build_model,
    count_parameters,
    diffusion_loss,
    load_model,
    sample,
    save_model,
)
from diffattr.diffusion.sampling import initial_noise_for, step_noise
from diffattr.testing import TINY_UNET

CONFIGS = Path(__file__).resolve().parents[1] / "configs"

TINY_MODEL = {**TINY_UNET, "attention_head_dim": 8}


def tiny_cfg(seed: int = 0, **model):
    return config_from_dict({"seed": seed, "model": {**TINY_MODEL, **model}})


@pytest.fixture(scope="module")
def model() -> DiffusionModel:
    return build_model(tiny_cfg(seed=1))


def assert_same_weights(a: torch.nn.Module, b: torch.nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sorted(sa) == sorted(sb)
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k


def scheduler_config(s) -> dict:
    return {k: v for k, v in dict(s.config).items() if not k.startswith("_")}


# ------------------------------------------------------------------------------------ building


def test_build_is_seeded_and_leaves_global_rng_alone():
    before = torch.random.get_rng_state()
    a, b, c = build_model(tiny_cfg(0)), build_model(tiny_cfg(0)), build_model(tiny_cfg(1))
    assert torch.equal(before, torch.random.get_rng_state())
    assert a.model_hash() == b.model_hash() != c.model_hash()
    assert a.image_shape == (1, 8, 8) and a.num_classes is None
    assert a.num_train_timesteps == 1000


def test_diffusion_loss_matches_closed_form(model):
    g = torch.Generator().manual_seed(0)
    x0 = torch.rand((3, 1, 8, 8), generator=g) * 2 - 1
    noise = torch.randn((3, 1, 8, 8), generator=g)
    t = torch.tensor([0, 500, 999])
    ab = model.scheduler.alphas_cumprod[t].view(-1, 1, 1, 1)
    x_t = ab.sqrt() * x0 + (1 - ab).sqrt() * noise
    with torch.no_grad():
        want = ((model.unet(x_t, t).sample - noise) ** 2).mean(dim=(1, 2, 3))
        got = diffusion_loss(model, x0, t, noise)
    assert got.shape == (3,)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_class_conditional_model_needs_and_uses_labels():
    m = build_model(tiny_cfg(0, num_class_embeds=2))
    assert m.num_classes == 2
    x, t = torch.randn(2, 1, 8, 8), torch.tensor([10, 10])
    with pytest.raises(ValueError, match="class_labels"):
        m.eps(x, t)
    with torch.no_grad():
        e0 = m.eps(x, t, torch.tensor([0, 0]))
        e1 = m.eps(x, t, torch.tensor([1, 1]))
    assert not torch.allclose(e0, e1)


# -------------------------------------------------------------------------------- save / load


def test_save_load_round_trip_is_bit_exact(model, tmp_path):
    path = save_model(model, tmp_path / "m", record={"steps": 7, "data_hash": "abc"})
    for rel in (
        "model_index.json",
        "unet/config.json",
        "unet/diffusion_pytorch_model.safetensors",
        "scheduler/scheduler_config.json",
        "diffattr.json",
    ):
        assert (path / rel).exists(), rel
    assert json.loads((path / "model_index.json").read_text())["_class_name"] == "DDPMPipeline"
    loaded = load_model(path)
    assert_same_weights(model.unet, loaded.unet)
    assert scheduler_config(model.scheduler) == scheduler_config(loaded.scheduler)
    assert torch.equal(model.scheduler.alphas_cumprod, loaded.scheduler.alphas_cumprod)
    x, t = torch.randn(2, 1, 8, 8), torch.tensor([3, 900])
    with torch.no_grad():
        # Weights are compared bit for bit above. The forward pass itself may round differently
        # with >1 CPU thread (oneDNN picks kernels by buffer alignment), hence a tolerance here.
        torch.testing.assert_close(model.eps(x, t), loaded.eps(x, t), rtol=1e-5, atol=1e-6)
    assert loaded.record["model_hash"] == model.model_hash() == loaded.model_hash()
    assert loaded.record["steps"] == 7 and loaded.record["data_hash"] == "abc"
    assert loaded.record["config"]["model"]["block_out_channels"] == [8, 16]
    # The folder is a standard diffusers pipeline.
    pipe = DDPMPipeline.from_pretrained(str(path), local_files_only=True)
    assert_same_weights(model.unet, pipe.unet)


def test_class_conditional_round_trip(tmp_path):
    m = build_model(tiny_cfg(2, num_class_embeds=3))
    loaded = load_model(save_model(m, tmp_path / "c"))
    assert loaded.num_classes == 3
    assert_same_weights(m.unet, loaded.unet)


def test_loads_flat_diffusers_folder_and_converts_other_schedulers(model, tmp_path):
    flat = tmp_path / "flat"
    model.unet.save_pretrained(str(flat), safe_serialization=True)
    ddim = DDIMScheduler(beta_schedule="linear", beta_start=2e-4, beta_end=0.03, clip_sample=False)
    ddim.save_config(str(flat))
    assert (flat / "config.json").exists() and (flat / "scheduler_config.json").exists()
    loaded = load_model(flat)
    assert_same_weights(model.unet, loaded.unet)
    assert isinstance(loaded.scheduler, DDPMScheduler)
    assert loaded.scheduler.config["beta_end"] == 0.03
    assert loaded.scheduler.config["clip_sample"] is False
    torch.testing.assert_close(loaded.scheduler.betas, ddim.betas, rtol=0, atol=0)
    assert loaded.record == {"source": str(flat)}


def test_old_style_scheduler_config_and_missing_scheduler(model, tmp_path):
    flat = tmp_path / "old"
    model.unet.save_pretrained(str(flat), safe_serialization=True)
    # Early diffusers configs (as once shipped with ddpm-cifar10-32) call the step count "timesteps".
    (flat / "scheduler_config.json").write_text(
        json.dumps({"_class_name": "GaussianDDPMScheduler", "timesteps": 500, "beta_end": 0.02})
    )
    assert load_model(flat).scheduler.config["num_train_timesteps"] == 500
    (flat / "scheduler_config.json").unlink()
    assert load_model(flat).scheduler.config["num_train_timesteps"] == 1000


def test_load_errors_name_the_problem(model, tmp_path):
    with pytest.raises(ModelLoadError, match="not found"):
        load_model(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelLoadError, match="config.json"):
        load_model(tmp_path / "empty")

    path = save_model(model, tmp_path / "m")
    weights = path / "unet" / "diffusion_pytorch_model.safetensors"
    good = weights.read_bytes()

    weights.write_bytes(good[: len(good) // 2])  # truncated download
    with pytest.raises(ModelLoadError, match="diffusion_pytorch_model.safetensors"):
        load_model(path)

    weights.unlink()
    with pytest.raises(ModelLoadError, match="no weights file"):
        load_model(path)

    # Valid file, altered values: caught by the recorded model hash.
    state = model.unet.state_dict()
    state = {k: v.clone() for k, v in state.items()}
    key = next(iter(state))
    state[key] += 1.0
    save_file(state, str(weights))
    with pytest.raises(ModelLoadError, match="model_hash"):
        load_model(path)

    weights.write_bytes(good)
    cfg_path = path / "unet" / "config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["_class_name"] = "UNet2DConditionModel"
    cfg_path.write_text(json.dumps(cfg))
    with pytest.raises(ModelLoadError, match=r"config\.json.*UNet2DConditionModel"):
        load_model(path)
    cfg_path.write_text("{not json")
    with pytest.raises(ModelLoadError, match="config.json"):
        load_model(path)


def test_saved_weights_are_plain_safetensors(model, tmp_path):
    path = save_model(model, tmp_path / "m")
    tensors = load_file(str(path / "unet" / "diffusion_pytorch_model.safetensors"))
    assert set(tensors) == set(model.unet.state_dict())


# ------------------------------------------------------------------------------------ sampling


class ElementwiseUNet(torch.nn.Module):
    """A stand-in UNet whose output for a sample never depends on the rest of its batch.

    Real conv kernels round differently for different batch sizes (~1e-7), so exact batch-size
    invariance of the *sampler's* randomness is checked with this model.
    """

    def __init__(self) -> None:
        super().__init__()
        self.w = torch.nn.Parameter(torch.tensor([0.3]))
        self.config = {"sample_size": 4, "in_channels": 2, "num_class_embeds": None}

    def forward(self, x, t, class_labels=None):
        return SimpleNamespace(sample=torch.tanh(self.w * x + t.view(-1, 1, 1, 1) / 1000.0))


def elementwise_model() -> DiffusionModel:
    return DiffusionModel(unet=ElementwiseUNet(), scheduler=DDPMScheduler())  # type: ignore[arg-type]


@pytest.mark.parametrize(("sampler", "eta"), [("ddpm", 0.0), ("ddim", 0.0), ("ddim", 0.7)])
def test_batch_size_does_not_change_results(sampler, eta):
    m = elementwise_model()
    runs = [
        sample(m, 7, seed=5, sampler=sampler, num_inference_steps=12, eta=eta, batch_size=bs)
        for bs in (1, 3, 7)
    ]
    for r in runs[1:]:
        assert torch.equal(r.images, runs[0].images)
        assert torch.equal(r.xt, runs[0].xt) and torch.equal(r.eps, runs[0].eps)
    # A prefix of the samples does not depend on how many were drawn either.
    few = sample(m, 3, seed=5, sampler=sampler, num_inference_steps=12, eta=eta, batch_size=2)
    assert torch.equal(few.images, runs[0].images[:3])


@pytest.mark.parametrize(("sampler", "eta"), [("ddpm", 0.0), ("ddim", 0.0), ("ddim", 1.0)])
def test_same_seed_same_images_real_unet(model, sampler, eta):
    a = sample(model, 5, seed=3, sampler=sampler, num_inference_steps=10, eta=eta, batch_size=5)
    b = sample(model, 5, seed=3, sampler=sampler, num_inference_steps=10, eta=eta, batch_size=5)
    c = sample(model, 5, seed=4, sampler=sampler, num_inference_steps=10, eta=eta, batch_size=5)
    d = sample(model, 5, seed=3, sampler=sampler, num_inference_steps=10, eta=eta, batch_size=2)
    assert torch.equal(a.images, b.images) and torch.equal(a.xt, b.xt)
    assert not torch.allclose(a.images, c.images)
    # Other batch size: the same random draws; only kernel rounding may differ.
    assert torch.equal(a.xt[0], d.xt[0])
    torch.testing.assert_close(a.images, d.images, rtol=0, atol=1e-4)
    assert a.images.shape == (5, 1, 8, 8) and a.images.abs().max() <= 1.0
    assert a.timesteps.shape == (10,) and a.xt.shape == a.eps.shape == (10, 5, 1, 8, 8)


def test_initial_noise_and_counterfactual_regeneration(model):
    res = sample(model, 4, seed=11, num_inference_steps=8)
    want = torch.randn((4, 1, 8, 8), generator=torch.Generator().manual_seed(11))
    assert torch.equal(res.xt[0], want) and torch.equal(initial_noise_for(11, 4, (1, 8, 8)), want)
    again = sample(model, 4, seed=999, num_inference_steps=8, initial_noise=res.xt[0])
    assert torch.equal(again.images, res.images)  # DDIM eta=0 is deterministic given the noise
    other = build_model(tiny_cfg(seed=2))
    cf = sample(other, 4, seed=11, num_inference_steps=8, initial_noise=res.xt[0])
    assert torch.equal(cf.xt[0], res.xt[0]) and not torch.allclose(cf.images, res.images)
    with pytest.raises(ValueError, match="initial_noise"):
        sample(model, 3, seed=0, initial_noise=res.xt[0])


def test_ddim_trajectory_matches_hand_written_update(model):
    res = sample(model, 3, seed=2, sampler="ddim", num_inference_steps=10, batch_size=3)
    ac = model.scheduler.alphas_cumprod.double()
    ts = res.timesteps.tolist()
    assert ts == list(range(900, -1, -100))
    x = res.xt[0].double()
    for s, t in enumerate(ts):
        torch.testing.assert_close(res.xt[s].double(), x, rtol=0, atol=1e-5)
        with torch.no_grad():
            eps = model.eps(res.xt[s], torch.full((3,), t)).double()
        # The recorded eps is the model's output there (to rounding: with >1 CPU thread the
        # kernels depend on the input buffer's alignment, and xt[s] is a view).
        torch.testing.assert_close(eps.float(), res.eps[s], rtol=1e-6, atol=1e-6)
        a_t = ac[t]
        a_prev = ac[t - 100] if t >= 100 else torch.tensor(1.0, dtype=torch.float64)
        x0 = ((x - (1 - a_t).sqrt() * eps) / a_t.sqrt()).clamp(-1, 1)
        # diffusers' DDIM keeps the unclipped eps for the direction term (eta = 0: no noise).
        x = a_prev.sqrt() * x0 + (1 - a_prev).sqrt() * eps
    torch.testing.assert_close(res.images.double(), x.clamp(-1, 1), rtol=0, atol=1e-5)
    # Re-running the diffusers scheduler on the recorded (xt, eps) reproduces the chain exactly.
    sched = DDIMScheduler.from_config(model.scheduler.config)
    sched.set_timesteps(10)
    for s, t in enumerate(ts[:-1]):
        nxt = sched.step(res.eps[s], t, res.xt[s]).prev_sample
        assert torch.equal(nxt, res.xt[s + 1])
    last = sched.step(res.eps[-1], ts[-1], res.xt[-1]).prev_sample
    assert torch.equal(last.clamp(-1, 1), res.images)


def test_ddpm_trajectory_matches_posterior_with_recorded_noise(model):
    n = 3
    res = sample(model, n, seed=8, sampler="ddpm", num_inference_steps=10, batch_size=2)
    ac = model.scheduler.alphas_cumprod.double()
    ts = res.timesteps.tolist()
    for s, t in enumerate(ts):
        x, eps = res.xt[s].double(), res.eps[s].double()
        a_t = ac[t]
        a_prev = ac[t - 100] if t >= 100 else torch.tensor(1.0, dtype=torch.float64)
        beta = 1 - a_t / a_prev
        x0 = ((x - (1 - a_t).sqrt() * eps) / a_t.sqrt()).clamp(-1, 1)
        mean = (
            a_prev.sqrt() * beta / (1 - a_t) * x0
            + (a_t / a_prev).sqrt() * (1 - a_prev) / (1 - a_t) * x
        )
        if t > 0:
            var = ((1 - a_prev) / (1 - a_t) * beta).clamp(min=1e-20)
            z = step_noise(8, range(n), s, (1, 8, 8)).double()
            mean = mean + var.sqrt() * z
        nxt = res.xt[s + 1].double() if s + 1 < len(ts) else res.images.double()
        if s + 1 == len(ts):
            mean = mean.clamp(-1, 1)
        torch.testing.assert_close(nxt, mean, rtol=0, atol=1e-5)


def test_trajectory_access_and_save_load(model, tmp_path):
    res = sample(model, 5, seed=1, sampler="ddim", num_inference_steps=6)
    tr = res.trajectory(2)
    assert torch.equal(tr.xt, res.xt[:, 2]) and torch.equal(tr.eps, res.eps[:, 2])
    assert torch.equal(tr.timesteps, res.timesteps)
    folder = res.save(tmp_path / "s")
    names = sorted(p.name for p in folder.glob("*.png"))
    assert names == ["0000.png", "0001.png", "0002.png", "0003.png", "0004.png", "grid.png"]
    back = SampleResult.load(folder)
    for k in ("images", "timesteps", "xt", "eps"):
        assert torch.equal(getattr(back, k), getattr(res, k)), k
    assert (back.seed, back.sampler, back.model_hash) == (1, "ddim", model.model_hash())
    meta = json.loads((folder / "sample.json").read_text())
    assert meta["num_inference_steps"] == 6 and meta["n"] == 5
    png = np.asarray(Image.open(folder / "0003.png"), dtype=np.float64)
    want = ((res.images[3, 0].double() + 1) * 127.5).numpy()
    assert np.abs(png - want).max() <= 0.5 + 1e-6
    with pytest.raises(FileNotFoundError, match="sample.json"):
        (folder / "sample.json").unlink()
        SampleResult.load(folder)


def test_no_trajectory_mode_and_class_conditional_sampling():
    m = build_model(tiny_cfg(0, num_class_embeds=2))
    with pytest.raises(ValueError, match="class_labels"):
        sample(m, 2, seed=0, num_inference_steps=3)
    full = sample(m, 4, seed=0, num_inference_steps=3, class_labels=torch.tensor([0, 1, 0, 1]))
    flat = sample(
        m, 4, seed=0, num_inference_steps=3, class_labels=[0, 1, 0, 1], record_trajectory=False
    )
    assert torch.equal(full.images, flat.images) and flat.xt.shape[0] == 0
    ones = sample(m, 4, seed=0, num_inference_steps=3, class_labels=1)
    assert torch.equal(ones.images[1], full.images[1])
    assert not torch.equal(ones.images[0], full.images[0])
    with pytest.raises(ValueError, match="record_trajectory"):
        flat.trajectory(0)


# ------------------------------------------------------------------------------------ configs


@pytest.mark.parametrize("name", ["cifar2", "cifar10", "artbench2", "artbench5"])
def test_paper_configs_build_the_ddpm_cifar10_unet(name):
    cfg = load_config(CONFIGS / f"{name}.yaml")
    m = build_model(cfg)
    # D-TRAK's CIFAR UNet: google/ddpm-cifar10-32's layout (35,746,307 parameters) with
    # scale_shift time conditioning, which adds 2,560,384 -> 38,306,691.
    assert count_parameters(m) == 38_306_691
    assert m.unet.config["resnet_time_scale_shift"] == "scale_shift"
    drops = [mod.p for mod in m.unet.modules() if isinstance(mod, torch.nn.Dropout)]
    assert drops and set(drops) == {0.1}  # every Dropout, attention included (D-TRAK)
    assert m.image_shape == (3, 32, 32) and cfg.data.size == 32
    assert cfg.train.batch_size == 128 and cfg.train.learning_rate == 1e-4
    assert m.scheduler.config["num_train_timesteps"] == 1000
    assert (m.scheduler.config["beta_start"], m.scheduler.config["beta_end"]) == (1e-4, 0.02)
    if name == "cifar2":
        assert cfg.data.limit == 5000 and cfg.data.classes == ["automobile", "horse"]


def test_cifar2_model_takes_an_optimisation_step():
    cfg = load_config(CONFIGS / "cifar2.yaml")
    m = build_model(cfg)
    opt = torch.optim.AdamW(m.unet.parameters(), lr=cfg.train.learning_rate)
    g = torch.Generator().manual_seed(0)
    x0 = torch.rand((2, 3, 32, 32), generator=g) * 2 - 1
    noise, t = torch.randn((2, 3, 32, 32), generator=g), torch.tensor([10, 700])
    before = m.unet.conv_in.weight.detach().clone()
    loss = diffusion_loss(m, x0, t, noise)
    assert loss.shape == (2,) and torch.isfinite(loss).all()
    loss.mean().backward()
    opt.step()
    assert not torch.equal(before, m.unet.conv_in.weight)


def test_digits2_config_is_small():
    cfg = load_config(CONFIGS / "digits2.yaml")
    m = build_model(cfg)
    assert 500_000 <= count_parameters(m) <= 2_000_000
    assert cfg.data.source == "digits-2" and cfg.data.size == cfg.model.sample_size == 16
    assert m.image_shape == (1, 16, 16)
