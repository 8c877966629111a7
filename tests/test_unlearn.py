"""``unlearn``: Fisher, Newton step and loss differences against a brute-force reference; exact
copies ranked first; original weights restored bit for bit; cached Fisher and original losses."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from diffattr.attribution.base import Queries
from diffattr.attribution.gradients import per_sample_grads_loop, select_params
from diffattr.attribution.methods import unlearn as unlearn_mod
from diffattr.attribution.outputs import loss_output
from diffattr.attribution.registry import make_attributor, make_options
from diffattr.attribution.timesteps import noise_for
from diffattr.data.dataset import ImageDataset
from diffattr.diffusion.model import diffusion_loss
from diffattr.errors import OptionError
from diffattr.repro import derive_seed
from diffattr.testing import tiny_model


@pytest.fixture(scope="module")
def model():
    return tiny_model(num_train_timesteps=100)


@pytest.fixture(scope="module")
def train() -> ImageDataset:
    g = torch.Generator().manual_seed(5)
    images = torch.rand(8, 1, 8, 8, generator=g) * 2 - 1
    return ImageDataset("toy", images, torch.tensor([9, 3, 14, 0, 27, 6, 11, 20]))


def _reference_scores(model, train, query, seed, passes, alpha, damping, grid, q_draws):
    """Everything by hand: per-sample loop gradients, explicit Newton step on a deep copy."""
    T = int(model.scheduler.config.num_train_timesteps)
    params = select_params(model.unet)
    shape = tuple(train.images.shape[1:])
    fisher = {n: torch.zeros_like(p, dtype=torch.float64) for n, p in params.items()}
    for p in range(passes):
        for row, i in enumerate(train.ids.tolist()):
            t = derive_seed(seed, "fisher-t", i, p) % T
            noise = noise_for(seed, i, t, p, shape, "per-sample")[None]
            tt = torch.tensor([t])
            x_t = model.scheduler.add_noise(train.images[row : row + 1], noise, tt)
            g = per_sample_grads_loop(model, x_t, tt, noise, loss_output, params)
            for n in fisher:
                fisher[n] += g[n][0].double() ** 2
    n_items = passes * len(train)
    fisher = {n: f / n_items for n, f in fisher.items()}
    mean_f = torch.cat([f.flatten() for f in fisher.values()]).mean()

    unlearned = copy.deepcopy(model)
    uparams = dict(unlearned.unet.named_parameters())
    samples = [(t, d) for t in grid for d in range(q_draws)]
    with torch.enable_grad():
        losses = []
        for t, d in samples:
            noise = noise_for(seed, 0, t, d, shape, "shared")[None]
            losses.append(diffusion_loss(unlearned, query[None], torch.tensor([t]), noise))
        loss = torch.cat(losses).mean()
        grads = torch.autograd.grad(loss, list(uparams.values()))
    with torch.no_grad():
        for (n, p), g in zip(uparams.items(), grads, strict=True):
            p += (alpha / len(train)) * (g.double() / (fisher[n] + damping * mean_f)).float()

    def eval_losses(m):
        out = []
        with torch.no_grad():
            for t in grid:
                noise = noise_for(seed, 0, t, 0, shape, "shared").expand_as(train.images)
                tt = torch.full((len(train),), t)
                out.append(diffusion_loss(m, train.images, tt, noise).double())
        return torch.stack(out, 1).mean(1)

    return (eval_losses(unlearned) - eval_losses(model)).numpy()


def test_scores_match_brute_force_newton_step(model, train):
    opts = dict(
        params="all",
        timesteps=4,
        query_num_noise=2,
        stability=False,
        alpha=0.5,
        damping=0.1,
        fisher_passes=2,
        seed=3,
        batch_size=3,
        grad_batch_size=5,
    )
    a = make_attributor("unlearn", model, None, **opts)
    a.fit(train)
    query = train.images[2] * 0.5
    got = a.score(Queries(query[None], ["q"])).values[0]
    grid = make_options("unlearn", **opts).grid(100)
    assert grid == [0, 25, 50, 75]
    want = _reference_scores(model, train, query, 3, 2, 0.5, 0.1, grid, 2)
    assert np.abs(want).max() > 1e-4  # a step large enough to measure
    np.testing.assert_allclose(got, want, rtol=2e-3, atol=2e-3 * np.abs(want).max())


def test_exact_copy_ranked_first_and_weights_restored(model, train):
    before = {n: p.detach().clone() for n, p in model.unet.named_parameters()}
    a = make_attributor("unlearn", model, None, timesteps=20)
    a.fit(train)
    s = a.score(Queries(train.images.clone(), [f"copy{i}" for i in range(len(train))]))
    assert list(s.values.argmax(axis=1)) == list(range(len(train)))
    assert s.halves is not None and s.stability(3) is not None
    np.testing.assert_allclose(s.values, s.halves.mean(axis=0), rtol=1e-6)
    for n, p in model.unet.named_parameters():
        assert torch.equal(p, before[n]), n


def test_flip_finds_a_mirrored_copy(model, train):
    a = make_attributor("unlearn", model, None, timesteps=20, flip=True)
    a.fit(train)
    mirrored = train.images.flip(-1)
    s = a.score(Queries(mirrored, [f"m{i}" for i in range(len(train))]))
    assert list(s.values.argmax(axis=1)) == list(range(len(train)))


def test_weights_restored_when_scoring_fails(model, train, monkeypatch):
    before = {n: p.detach().clone() for n, p in model.unet.named_parameters()}
    a = make_attributor("unlearn", model, None, timesteps=4)
    a.fit(train)

    def boom(*args, **kwargs):
        raise RuntimeError("killed mid-query")

    monkeypatch.setattr(unlearn_mod, "image_losses", boom)
    with pytest.raises(RuntimeError, match="killed"):
        a.score(Queries(train.images[:1], ["q"]))
    for n, p in model.unet.named_parameters():
        assert torch.equal(p, before[n]), n


def test_fisher_and_original_losses_cached_on_disk(model, train, tmp_path, monkeypatch):
    a = make_attributor("unlearn", model, tmp_path, timesteps=4)
    a.fit(train)
    q = Queries(train.images[:2], ["a", "b"])
    first = a.score(q).values
    assert {p.name.split("-")[1] for p in tmp_path.iterdir()} == {"fisher", "losses"}

    def no_recompute(*args, **kwargs):
        raise AssertionError("recomputed")

    monkeypatch.setattr(unlearn_mod, "fisher_pass", no_recompute)
    calls = []
    real = unlearn_mod.image_losses
    monkeypatch.setattr(
        unlearn_mod, "image_losses", lambda *a, **k: calls.append(a[1].shape[0]) or real(*a, **k)
    )
    again = make_attributor("unlearn", model, tmp_path, timesteps=4)
    again.fit(train)  # both stores reused: no Fisher pass, no forward of the training set
    assert calls == []
    np.testing.assert_array_equal(again.score(q).values, first)
    # per query and half: one forward pass of the training set at that half's samples
    assert calls == [len(train)] * 4

    other = tiny_model(seed=1, num_train_timesteps=100)
    b = make_attributor("unlearn", other, tmp_path, timesteps=4)
    with pytest.raises(AssertionError, match="recomputed"):
        b.fit(train)  # another model gets its own Fisher, never the stored one


def test_parameter_subsets(model, train):
    a = make_attributor("unlearn", model, None, timesteps=4, params="up-blocks")
    a.fit(train)
    assert a.params and all(
        n.startswith(("up_blocks.", "conv_norm_out.", "conv_out.")) for n in a.params
    )
    before = {n: p.detach().clone() for n, p in model.unet.named_parameters()}
    a._unlearn(train.images[0], None, [(10, 0), (60, 0)])
    changed = {n for n, p in model.unet.named_parameters() if not torch.equal(p, before[n])}
    with torch.no_grad():
        for n, p in model.unet.named_parameters():
            p.copy_(before[n])
    assert changed and changed <= set(a.params)
    with pytest.raises(OptionError, match="not a preset"):
        make_options("unlearn", params="cross-attn")
    with pytest.raises(OptionError, match="matches no parameter") as exc:
        make_attributor("unlearn", model, None, params=["nosuch.*"]).fit(train)
    assert "'nosuch.*'" in str(exc.value) and "up-blocks" in str(exc.value)  # its named groups
    with pytest.raises(OptionError, match="query_num_noise"):
        make_options("unlearn", num_noise=3, query_num_noise=2)
