"""Every attribution method on a text-to-image latent model with a LoRA (the tiny Stable Diffusion
pipeline the tests build and save, loaded back through the user's path), against brute force
where it applies: LoRA-only gradients against autograd on the whole model, the v-prediction and
epsilon losses against their formulas, projected LoRA features against the dense formula, and
the conformance rules (same image + same prompt: bit-identical scores; another prompt: other
scores) for every registered method."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from diffattr.attribution.base import Queries
from diffattr.attribution.conditioning import ConditioningError, dataset_inputs, model_inputs
from diffattr.attribution.featurize import FeaturizeArgs, per_step_features
from diffattr.attribution.gradients import per_sample_grads, select_params
from diffattr.attribution.outputs import loss_output
from diffattr.attribution.projectors import KroneckerProjector, ProjectorConfig
from diffattr.attribution.registry import ATTRIBUTORS, make_attributor
from diffattr.attribution.timesteps import TimestepPolicy, noise_for
from diffattr.data.dataset import ImageDataset
from diffattr.diffusion.model import load_model
from diffattr.diffusion.t2i_sampling import sample_text_to_image
from diffattr.testing import tiny_clip_folder, tiny_dino_folder, tiny_lora_file, tiny_t2i_folder

T = 1000
FAST = {
    "timesteps": 2,
    "num_noise": 1,
    "proj_dim": 64,
    "batch_size": 8,
    "query_draws": 2,
    "step_stride": 2,
    "seed": 1,
    "t_min": 100,
}
# Methods whose scores do not depend on the prompt: they compare images, not the model's view.
IMAGE_ONLY = {"pixel", "clip", "dino"}
CAPTIONS = ["a zero digit", "a one digit", "a thick zero", "a thin one", "a zero digit", "a one"]


def fast_options(name: str) -> dict[str, Any]:
    fields = {f.name for f in dataclasses.fields(ATTRIBUTORS[name].options)}
    return {k: v for k, v in FAST.items() if k in fields}


@pytest.fixture(scope="module")
def folders(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("t2i")
    base = tiny_t2i_folder(root / "base")
    lora = tiny_lora_file(load_model(base), root / "lora", rank=2, seed=3)
    return {
        "base": base,
        "lora": lora,
        "v": tiny_t2i_folder(root / "v", prediction_type="v_prediction"),
        "clip": tiny_clip_folder(root / "clip"),
        "dino": tiny_dino_folder(root / "dino"),
    }


@pytest.fixture(scope="module")
def model(folders):
    return load_model(folders["base"], lora=folders["lora"])


@pytest.fixture(scope="module")
def train(model) -> ImageDataset:
    g = torch.Generator().manual_seed(5)
    images = torch.rand(6, *model.pixel_shape, generator=g) * 2 - 1
    return ImageDataset(
        "captioned", images, torch.tensor([14, 3, 27, 8, 30, 1]), captions=list(CAPTIONS)
    )


@pytest.fixture(scope="module")
def queries(model) -> Queries:
    prompts = ["a zero digit", "a thin one", "a one digit"]
    res = sample_text_to_image(model, prompts, seed=2, num_inference_steps=4, guidance_scale=3.0)
    return Queries(
        images=res.images,
        names=["g0", "g1", "g2"],
        trajectories=[res.trajectory(i) for i in range(3)],
        prompts=list(prompts),
    )


@pytest.fixture(scope="module")
def required(folders) -> dict[str, dict[str, Any]]:
    return {
        "clip": {"model": str(folders["clip"])},
        "dino": {"model": str(folders["dino"])},
        "ggda": {"groups": "caption"},
    }


@pytest.mark.parametrize("name", list(ATTRIBUTORS))
def test_every_method_on_a_text_to_image_lora_model(name, model, train, queries, required):
    opts = {**fast_options(name), **required.get(name, {})}
    attr = make_attributor(name, model, None, **opts)
    attr.fit(train)
    s = attr.score(queries)
    assert s.values.shape == (3, 6) and np.all(np.isfinite(s.values))
    np.testing.assert_array_equal(s.train_ids, train.ids.numpy())
    assert np.ptp(s.values) > 0

    # Same image, same prompt: bit-identical, whatever its name, position or batch-mates.
    assert queries.trajectories is not None and queries.prompts is not None
    order = [2, 0, 1]
    moved = Queries(
        images=queries.images[order],
        names=["x", "y", "z"],
        trajectories=[queries.trajectories[i] for i in order],
        prompts=[queries.prompts[i] for i in order],
    )
    ms = attr.score(moved)
    for row, i in enumerate(order):
        np.testing.assert_array_equal(ms.values[row], s.values[i])

    # Another prompt for the same image: other scores (the model's answer depends on the text),
    # except for the methods that only compare images.
    other = dataclasses.replace(queries, prompts=["a thick zero"] * 3, names=["o0", "o1", "o2"])
    os_ = attr.score(other)
    if name in IMAGE_ONLY:
        np.testing.assert_array_equal(os_.values, s.values)
    else:
        assert not np.array_equal(os_.values, s.values)

    # No prompt for a text-conditional model: a clear error, unless the method ignores text.
    bare = Queries(images=queries.images, names=["a", "b", "c"], trajectories=queries.trajectories)
    if name in IMAGE_ONLY:
        attr.score(bare)
    else:
        with pytest.raises(ConditioningError, match="text-conditional"):
            attr.score(bare)


def test_gradient_methods_differentiate_only_the_lora_by_default(model, train, folders) -> None:
    a = make_attributor("d-trak", model, None, **fast_options("d-trak"))
    args = a.train_args()  # type: ignore[attr-defined]
    assert args.params == ["lora"]
    names = list(select_params(model.unet, args.params))
    assert names and all(".lora_A." in n or ".lora_B." in n for n in names)
    kv = list(select_params(model.unet, ["cross-attn-kv"]))
    assert kv and all(
        n.endswith(("attn2.to_k.base_layer.weight", "attn2.to_v.base_layer.weight")) for n in kv
    )
    # Unlearning, by default, undoes the fine-tune where it happened: the LoRA here; the keys
    # and values of a model that is no fine-tune; what a tuned pipeline's record says it tuned.
    un = make_attributor("unlearn", model, None, **fast_options("unlearn"))
    assert un.options.patterns(model) == ["lora"]  # type: ignore[attr-defined]
    base = load_model(folders["base"])
    assert un.options.patterns(base) == ["cross-attn-kv"]  # type: ignore[attr-defined]
    record = {"kind": "text-to-image-lora", "tune": "all"}
    (folders["base"] / "diffattr.json").write_text(json.dumps(record))
    try:
        assert un.options.patterns(load_model(folders["base"])) is None  # every weight
        record["tune"] = ["up_blocks.*"]
        (folders["base"] / "diffattr.json").write_text(json.dumps(record))
        assert un.options.patterns(load_model(folders["base"])) == ["up_blocks.*"]
    finally:
        (folders["base"] / "diffattr.json").unlink()


def _rows(model, train: ImageDataset, t: int):
    x0 = dataset_inputs(model, train)
    noise = torch.stack(
        [noise_for(0, int(i), t, 0, tuple(x0.shape[1:]), "shared") for i in train.ids]
    )
    tt = torch.full((len(train),), t, dtype=torch.int64)
    return x0, noise, tt, model.tokenize(train.captions)


def test_lora_gradients_equal_autograd_of_the_whole_model(model, train) -> None:
    x0, noise, tt, ids = _rows(model, train, 300)
    params = select_params(model.unet, ["lora"])
    x_t = model.scheduler.add_noise(x0, noise, tt)
    target = model.target(x0, noise, tt)
    got = per_sample_grads(model, x_t, tt, target, loss_output, params, ids)
    everything = dict(model.unet.named_parameters())
    frozen = [p for p in everything.values() if not p.requires_grad]
    for p in frozen:
        p.requires_grad_(True)
    try:
        for i in range(len(train)):
            pred = model.eps(x_t[i : i + 1], tt[i : i + 1], ids[i : i + 1])
            loss = (pred - target[i : i + 1]).pow(2).mean()
            full = dict(
                zip(everything, torch.autograd.grad(loss, list(everything.values())), strict=True)
            )
            for n in params:
                torch.testing.assert_close(got[n][i], full[n], rtol=1e-4, atol=1e-7)
    finally:
        for p in frozen:
            p.requires_grad_(False)
    assert any(float(g.abs().max()) > 0 for n, g in got.items() if ".lora_A." in n)


def test_projected_lora_features_equal_the_dense_formula(model, train) -> None:
    """Kronecker features of the LoRA layers = kron(P_out, P_in) applied to each LoRA matrix's
    per-sample gradient (peft's lora_A / lora_B are Linear layers)."""
    args = FeaturizeArgs(
        output="square",
        timesteps=TimestepPolicy(kind="list", values=[300], num_train_timesteps=T),
        projector=ProjectorConfig(kind="kronecker", dim=256, seed=4),
        params=["lora"],
        batch_size=4,
    )
    x0, noise, tt, ids = _rows(model, train, 300)
    feats = per_step_features(model, x0, train.ids, [300], args, ids)[:, 0]
    from diffattr.attribution.featurize import build_projector
    from diffattr.attribution.outputs import square_output

    proj, params = build_projector(model, args)
    assert isinstance(proj, KroneckerProjector)
    assert {ly.weight_name for ly in proj.layers} == {n for n in params if n.endswith("weight")}
    grads = per_sample_grads(
        model, model.scheduler.add_noise(x0, noise, tt), tt, noise, square_output, params, ids
    )
    want = torch.cat(
        [
            grads[ly.weight_name].reshape(len(train), -1) @ proj.dense_equivalent(ly)
            for ly in proj.layers
        ],
        dim=1,
    )
    torch.testing.assert_close(feats, want, rtol=1e-4, atol=1e-6 * float(want.abs().max()))


@pytest.mark.parametrize("kind", ["base", "v"])
def test_loss_is_the_models_training_loss(folders, train, kind) -> None:
    """TRAK's "loss" output for epsilon and v-prediction: mean((prediction - target)^2), the
    target being the noise or sqrt(abar) noise - sqrt(1 - abar) x0 (computed here by hand)."""
    model = load_model(folders[kind])
    assert model.prediction_type == ("epsilon" if kind == "base" else "v_prediction")
    x0, noise, tt, ids = _rows(model, train, 500)
    abar = model.scheduler.alphas_cumprod[500].to(torch.float32)
    by_hand = noise if kind == "base" else abar.sqrt() * noise - (1 - abar).sqrt() * x0
    torch.testing.assert_close(model.target(x0, noise, tt), by_hand, rtol=1e-5, atol=1e-6)
    name = next(iter(select_params(model.unet, ["*attn2.to_v.weight"])))  # one cross-attn V
    args = FeaturizeArgs(
        output="loss",
        timesteps=TimestepPolicy(kind="list", values=[500], num_train_timesteps=T),
        projector=ProjectorConfig(kind="identity"),
        params=[name],
        batch_size=8,
    )
    feats = per_step_features(model, x0, train.ids, [500], args, ids)[:, 0]
    w = dict(model.unet.named_parameters())[name]
    w.requires_grad_(True)
    try:
        x_t = model.scheduler.add_noise(x0, noise, tt)
        for i in range(len(train)):
            pred = model.unet(
                x_t[i : i + 1], tt[i : i + 1], model.text_embeddings(ids[i : i + 1])
            ).sample
            loss = (pred - by_hand[i : i + 1]).pow(2).mean()
            (g,) = torch.autograd.grad(loss, [w])
            torch.testing.assert_close(feats[i], g.flatten(), rtol=1e-4, atol=1e-8)
    finally:
        w.requires_grad_(False)


def test_queries_and_training_images_are_encoded_as_d_trak_does(model, train) -> None:
    want = model.vae.encode(train.images).latent_dist.mode() * model.vae.config.scaling_factor
    torch.testing.assert_close(dataset_inputs(model, train), want, rtol=1e-5, atol=1e-6)
    assert dataset_inputs(model, train) is dataset_inputs(model, train)  # encoded once
    q = model_inputs(model, train.images[:2])
    torch.testing.assert_close(q, want[:2], rtol=1e-5, atol=1e-6)
