"""The text-to-image model kind on a tiny Stable Diffusion pipeline built offline.

Checked against brute force: diffusers' own ``StableDiffusionPipeline`` (components, LoRA loading,
whole sampling runs), the UNet called by hand, the v-prediction formula, the VAE called by hand.
"""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from diffusers import DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
from diffusers.schedulers.scheduling_ddpm import DDPMScheduler
from PIL import Image
from safetensors.torch import load_file, save_file

from diffattr.diffusion.lora import (
    LORA_CONFIG_NAME,
    LORA_WEIGHT_NAME,
    LoraLoadError,
    add_lora,
    lora_parameter_names,
    save_lora,
)
from diffattr.diffusion.model import DiffusionModel, ModelLoadError, load_model
from diffattr.diffusion.sampling import SampleResult
from diffattr.diffusion.t2i_sampling import sample_text_to_image
from diffattr.diffusion.text2image import (
    TextToImageLoadError,
    TextToImageModel,
    load_text_to_image,
)
from diffattr.errors import UserError
from diffattr.repro import RECORD_NAME
from diffattr.testing import (
    TINY_T2I_MAX_LENGTH,
    TINY_T2I_WORDS,
    tiny_lora_file,
    tiny_model,
    tiny_t2i_folder,
)

PROMPTS = ["a painting of digit zero", "a thick photo of digit one"]


@pytest.fixture(scope="module")
def eps_folder(tmp_path_factory):
    return tiny_t2i_folder(tmp_path_factory.mktemp("sd1") / "model", "epsilon", seed=0)


@pytest.fixture(scope="module")
def v_folder(tmp_path_factory):
    return tiny_t2i_folder(tmp_path_factory.mktemp("sd2") / "model", "v_prediction", seed=1)


@pytest.fixture(scope="module")
def lora_file(eps_folder, tmp_path_factory):
    """A trained-looking LoRA (A and B non-zero) on the epsilon model, saved with save_lora."""
    model = load_text_to_image(eps_folder)
    return tiny_lora_file(model, tmp_path_factory.mktemp("lora") / "lora", rank=2, seed=3)


def _pipe(folder) -> StableDiffusionPipeline:
    pipe = StableDiffusionPipeline.from_pretrained(str(folder), local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _inputs(model: TextToImageModel, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn((2, *model.image_shape), generator=g)
    t = torch.tensor([7, 811])
    return x, t, model.tokenize(PROMPTS)


def _one_line(exc: pytest.ExceptionInfo) -> str:
    msg = str(exc.value)
    assert isinstance(exc.value, UserError), type(exc.value)
    assert "\n" not in msg, msg
    return msg


# ------------------------------------------------------------------------------- the folder


def test_tiny_folder_round_trips_through_diffusers(eps_folder):
    model = load_text_to_image(eps_folder)
    pipe = _pipe(eps_folder)
    for name in ("unet", "vae", "text_encoder"):
        ours, theirs = getattr(model, name).state_dict(), getattr(pipe, name).state_dict()
        assert ours.keys() == theirs.keys()
        assert all(torch.equal(ours[k], theirs[k]) for k in ours), name
    assert (model.image_shape, model.pixel_shape) == ((4, 8, 8), (3, 16, 16))
    assert model.num_classes is None and model.conditional
    assert (model.prediction_type, model.num_train_timesteps) == ("epsilon", 1000)
    assert isinstance(model.scheduler, DDPMScheduler)
    assert torch.equal(model.scheduler.betas, pipe.scheduler.betas)
    assert model.base_path == eps_folder and model.lora_path is None
    # Same token ids as the pipeline's own encode_prompt, and one token per vocabulary word.
    ids = model.tokenize(PROMPTS)
    want = pipe.tokenizer(
        PROMPTS, padding="max_length", max_length=TINY_T2I_MAX_LENGTH, truncation=True
    ).input_ids
    assert ids.dtype == torch.int64 and ids.tolist() == want
    assert model.tokenize([" ".join(TINY_T2I_WORDS[:5])])[0, :7].tolist()[-1] == 1  # eos
    assert len(set(model.tokenize(list(TINY_T2I_WORDS))[:, 1].tolist())) == len(TINY_T2I_WORDS)
    assert (eps_folder / "tokenizer" / "vocab.json").is_file()
    assert (eps_folder / "tokenizer" / "merges.txt").is_file()
    # Same UNet output as the pipeline's components called by hand.
    x, t, ids = _inputs(model)
    with torch.no_grad():
        want_eps = pipe.unet(x, t, encoder_hidden_states=pipe.text_encoder(ids)[0]).sample
        got = model.eps(x, t, ids)
    assert got.shape == x.shape and torch.equal(got, want_eps)


def test_tokenizer_loads_from_vocab_and_merges_alone(eps_folder, tmp_path):
    """Stable Diffusion 1.x folders ship vocab.json + merges.txt without tokenizer.json."""
    folder = shutil.copytree(eps_folder, tmp_path / "model")
    (folder / "tokenizer" / "tokenizer.json").unlink()
    prompts = [*PROMPTS, "an unknown xyz word", " ".join(TINY_T2I_WORDS)]  # last one truncated
    ids = load_text_to_image(folder).tokenize(prompts)
    assert ids.tolist() == load_text_to_image(eps_folder).tokenize(prompts).tolist()
    assert ids.shape == (4, TINY_T2I_MAX_LENGTH) and ids[3, -1] == 1


def test_load_model_dispatches_to_text_to_image(eps_folder, lora_file, tmp_path):
    model = load_model(eps_folder)
    assert isinstance(model, TextToImageModel) and model.lora_path is None
    with_lora = load_model(eps_folder, lora=lora_file)
    assert isinstance(with_lora, TextToImageModel) and with_lora.lora_path == lora_file
    # A pixel model refuses a LoRA with one line.
    from diffattr.diffusion.model import save_model

    pixel = save_model(tiny_model(0), tmp_path / "pixel")
    assert isinstance(load_model(pixel), DiffusionModel)
    with pytest.raises(ModelLoadError) as exc:
        load_model(pixel, lora=lora_file)
    assert "pixel-space" in _one_line(exc)


def _break(folder, how: str) -> None:
    if how == "no-unet":
        shutil.rmtree(folder / "unet")
    elif how == "flux":
        index = json.loads((folder / "model_index.json").read_text())
        index["_class_name"] = "FluxPipeline"
        (folder / "model_index.json").write_text(json.dumps(index))
    elif how == "sample-prediction":
        cfg_path = folder / "scheduler" / "scheduler_config.json"
        cfg = json.loads(cfg_path.read_text())
        cfg["prediction_type"] = "sample"
        cfg_path.write_text(json.dumps(cfg))
    elif how == "no-index":
        (folder / "model_index.json").unlink()
    elif how == "no-vae-weights":
        (folder / "vae" / "diffusion_pytorch_model.safetensors").unlink()
    elif how == "corrupt-unet":
        (folder / "unet" / "diffusion_pytorch_model.safetensors").write_bytes(b"\x00" * 64)
    elif how == "pixel-unet":
        cfg_path = folder / "unet" / "config.json"
        cfg = json.loads(cfg_path.read_text())
        cfg["_class_name"] = "UNet2DModel"
        cfg_path.write_text(json.dumps(cfg))


@pytest.mark.parametrize(
    ("how", "says"),
    [
        ("no-unet", "no unet/ folder"),
        ("flux", "model_index.json says FluxPipeline: only StableDiffusionPipeline"),
        ("sample-prediction", "scheduler prediction_type 'sample' is not supported"),
        ("no-index", "no model_index.json"),
        ("no-vae-weights", "vae: no weights file"),
        ("corrupt-unet", "could not load the UNet"),
        ("pixel-unet", "expected UNet2DConditionModel"),
    ],
)
def test_bad_folders_get_one_line_errors(eps_folder, tmp_path, how, says):
    folder = shutil.copytree(eps_folder, tmp_path / "model")
    _break(folder, how)
    with pytest.raises(TextToImageLoadError) as exc:
        load_text_to_image(folder)
    assert says in _one_line(exc)
    if how != "no-index":  # load_model routes pipeline folders to the text-to-image loader
        with pytest.raises(ModelLoadError) as exc2:
            load_model(folder)
        assert says in _one_line(exc2)


# ------------------------------------------------------------------------------- predictions


def test_epsilon_target_is_the_noise_and_eps_is_the_unet_by_hand(eps_folder):
    model = load_text_to_image(eps_folder)
    x0, t, ids = _inputs(model)
    noise = torch.randn_like(x0)
    assert torch.equal(model.target(x0, noise, t), noise)
    x_t = model.scheduler.add_noise(x0, noise, t)
    with torch.no_grad():
        hand = model.unet(x_t, t, model.text_encoder(ids)[0]).sample
        assert torch.equal(model.eps(x_t, t, ids), hand)
        # precomputed embeddings are taken as they are
        assert torch.equal(model.eps(x_t, t, model.text_embeddings(ids)), hand)
    with pytest.raises(ValueError, match="text-conditional: pass prompts"):
        model.eps(x_t, t, None)
    with pytest.raises(ValueError, match="rows"):
        model.eps(x_t, t, ids[:1])
    # The pixel model's target is the noise too.
    pixel = tiny_model(0)
    assert torch.equal(pixel.target(x0[:, :1], noise[:, :1], t), noise[:, :1])


def test_v_prediction_target_matches_the_formula(v_folder):
    model = load_text_to_image(v_folder)
    assert model.prediction_type == "v_prediction"
    x0, t, _ = _inputs(model, seed=4)
    noise = torch.randn_like(x0)
    abar = model.scheduler.alphas_cumprod.double()[t].reshape(-1, 1, 1, 1)
    want = abar.sqrt() * noise.double() - (1 - abar).sqrt() * x0.double()
    torch.testing.assert_close(model.target(x0, noise, t).double(), want, rtol=0, atol=1e-6)
    # The noise implied by the true velocity at x_t is the noise.
    x_t = model.scheduler.add_noise(x0, noise, t)
    back = model.predicted_noise(model.target(x0, noise, t), x_t, t)
    torch.testing.assert_close(back, noise, rtol=0, atol=1e-5)


# ------------------------------------------------------------------------------- LoRA


def test_saved_lora_loads_back_with_the_same_outputs(eps_folder, tmp_path):
    model = load_text_to_image(eps_folder)
    base_hash = model.model_hash()
    assert model.base_hash() == base_hash and model.lora_hash() is None
    file = tiny_lora_file(model, tmp_path / "lora", rank=2, seed=5)
    assert file == tmp_path / "lora" / LORA_WEIGHT_NAME
    assert json.loads((tmp_path / "lora" / LORA_CONFIG_NAME).read_text())["rank"] == 2
    x, t, ids = _inputs(model)
    with torch.no_grad():
        want = model.eps(x, t, ids)
        base_out = load_text_to_image(eps_folder).eps(x, t, ids)
    assert not torch.allclose(want, base_out)  # the LoRA changes the outputs
    for where in (file, file.parent):  # the file, or the folder holding it
        loaded = load_text_to_image(eps_folder, lora=where)
        assert loaded.lora_path == file
        with torch.no_grad():
            assert torch.equal(loaded.eps(x, t, ids), want)
        assert loaded.model_hash() == model.model_hash() != base_hash
        assert loaded.base_hash() == base_hash
        assert loaded.lora_hash() == model.lora_hash() is not None
    # diffusers' own loader reads our file and gives the same outputs.
    pipe = _pipe(eps_folder)
    pipe.load_lora_weights(str(file.parent))
    with torch.no_grad():
        theirs = pipe.unet(x, t, encoder_hidden_states=pipe.text_encoder(ids)[0]).sample
    assert torch.equal(theirs, want)


def test_lora_alpha_survives_the_round_trip(eps_folder, tmp_path):
    model = load_text_to_image(eps_folder)
    add_lora(model.unet, rank=2, alpha=8.0, init="random", seed=1)
    model.refresh_hash()
    file = save_lora(model, tmp_path / "lora")
    loaded = load_text_to_image(eps_folder, lora=file)
    assert loaded.unet.peft_config["default"].lora_alpha == 8.0
    x, t, ids = _inputs(model)
    with torch.no_grad():
        assert torch.equal(loaded.eps(x, t, ids), model.eps(x, t, ids))
    assert loaded.lora_hash() == model.lora_hash()


def test_a_lora_written_by_diffusers_loads(eps_folder, tmp_path):
    from peft.utils import get_peft_model_state_dict

    pipe = _pipe(eps_folder)
    add_lora(pipe.unet, rank=3, init="random", seed=2)  # peft LoraConfig + unet.add_adapter
    StableDiffusionPipeline.save_lora_weights(
        str(tmp_path / "theirs"), unet_lora_layers=get_peft_model_state_dict(pipe.unet)
    )
    model = load_text_to_image(eps_folder, lora=tmp_path / "theirs")
    assert model.lora_path == tmp_path / "theirs" / LORA_WEIGHT_NAME
    x, t, ids = _inputs(model)
    with torch.no_grad():
        want = pipe.unet(x, t, encoder_hidden_states=pipe.text_encoder(ids)[0]).sample
        assert torch.equal(model.eps(x, t, ids), want)


def test_lora_parameter_names_are_exactly_the_peft_lora_weights(eps_folder, lora_file):
    from peft.tuners.lora import LoraLayer

    model = load_text_to_image(eps_folder, lora=lora_file)
    layers = [n for n, m in model.unet.named_modules() if isinstance(m, LoraLayer)]
    want = {f"{n}.lora_{ab}.default.weight" for n in layers for ab in "AB"}
    names = lora_parameter_names(model.unet)
    assert len(names) == len(set(names)) and set(names) == want
    # every attention projection (to_q, to_k, to_v, to_out.0) of every attention layer
    from diffusers.models.attention_processor import Attention

    n_attn = sum(isinstance(m, Attention) for m in model.unet.modules())
    assert len(layers) == 4 * n_attn and n_attn > 0
    # peft leaves only the LoRA weights trainable
    trainable = [n for n, p in model.unet.named_parameters() if p.requires_grad]
    assert trainable == names
    assert lora_parameter_names(load_text_to_image(eps_folder).unet) == []
    # A trained LoRA gives every LoRA weight a gradient.
    x, t, ids = _inputs(model)
    loss = (model.eps(x, t, ids) - torch.randn_like(x)).pow(2).mean()
    params = dict(model.unet.named_parameters())
    grads = torch.autograd.grad(loss, [params[n] for n in names])
    assert all(g.abs().sum() > 0 for g in grads)


def test_model_hash_is_remembered_and_follows_weight_changes(eps_folder, lora_file):
    model = load_text_to_image(eps_folder, lora=lora_file)
    h, base, lora = model.model_hash(), model.base_hash(), model.lora_hash()
    assert model._hash_memo  # remembered
    p = dict(model.unet.named_parameters())[lora_parameter_names(model.unet)[0]]
    old = p.detach().clone()
    with torch.no_grad():
        p.add_(1.0)  # an optimizer step: seen without refresh
    assert model.model_hash() != h and model.base_hash() == base and model.lora_hash() != lora
    with torch.no_grad():
        p.copy_(old)
    assert model.model_hash() == h
    w = next(model.vae.parameters())
    w.data.copy_(w.data + 1.0)  # through .data: the version counter does not see it
    assert model.model_hash() == h
    model.refresh_hash()
    assert model.model_hash() != h and model.base_hash() != base and model.lora_hash() == lora


@pytest.mark.parametrize("how", ["corrupt", "other-unet", "no-layers", "missing", "text-encoder"])
def test_bad_loras_get_one_line_errors_naming_the_file(eps_folder, lora_file, tmp_path, how):
    if how == "corrupt":
        file = tmp_path / "bad.safetensors"
        file.write_bytes(b"not a safetensors file at all")
    elif how == "missing":
        file = tmp_path / "nowhere.safetensors"
    elif how == "text-encoder":
        from peft import LoraConfig
        from peft.utils import get_peft_model_state_dict

        pipe = _pipe(eps_folder)
        pipe.text_encoder.add_adapter(LoraConfig(r=2, target_modules=["q_proj", "v_proj"]))
        StableDiffusionPipeline.save_lora_weights(
            str(tmp_path / "te"),
            text_encoder_lora_layers=get_peft_model_state_dict(pipe.text_encoder),
        )
        file = tmp_path / "te" / LORA_WEIGHT_NAME
    else:
        kwargs = {
            "sample_size": 8,
            "block_out_channels": (8, 16),
            "layers_per_block": 1,
            "attention_head_dim": 4,
            "norm_num_groups": 4,
        }
        if how == "other-unet":  # same layer names, other shapes (cross-attention width 32)
            other = UNet2DConditionModel(
                down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
                cross_attention_dim=32,
                **kwargs,
            )
            add_lora(other, rank=2, targets=("to_k", "to_v"), init="random", seed=0)
            file = save_lora(other, tmp_path / "other")
        else:  # some of its layers are not in this UNet (peft itself would only warn)
            state = load_file(str(lora_file))
            state = {
                k.replace("unet.down_blocks.0.", "unet.down_blocks.7."): v for k, v in state.items()
            }
            file = tmp_path / "partial.safetensors"
            save_file(state, str(file))
    with pytest.raises(LoraLoadError) as exc:
        load_text_to_image(eps_folder, lora=file)
    msg = _one_line(exc)
    assert str(file) in msg
    if how in ("other-unet", "no-layers"):
        assert "does not fit the base model's UNet" in msg
    if how == "text-encoder":
        assert "text-encoder" in msg


def test_a_lora_recorded_for_another_base_model_is_refused(eps_folder, lora_file, tmp_path):
    folder = shutil.copytree(lora_file.parent, tmp_path / "lora")
    record = {"base_hash": "0" * 64, "seed": 0}
    (folder / RECORD_NAME).write_text(json.dumps(record))
    with pytest.raises(TextToImageLoadError) as exc:
        load_text_to_image(eps_folder, lora=folder)
    assert "base_hash" in _one_line(exc)
    model = load_text_to_image(eps_folder, lora=lora_file)
    record = {"base_hash": model.base_hash(), "lora_hash": model.lora_hash(), "seed": 7}
    (folder / RECORD_NAME).write_text(json.dumps(record))
    assert load_text_to_image(eps_folder, lora=folder).record == record


# ------------------------------------------------------------------------------- latents


def test_encode_images_is_the_vae_posterior_mode_times_the_scaling_factor(eps_folder):
    model = load_text_to_image(eps_folder)
    x = torch.rand((3, *model.pixel_shape), generator=torch.Generator().manual_seed(0)) * 2 - 1
    with torch.no_grad():
        hand = model.vae.encode(x).latent_dist.mode() * model.vae.config.scaling_factor
    lat = model.encode_images(x)
    assert lat.shape == (3, *model.image_shape) and torch.equal(lat, hand)
    torch.testing.assert_close(model.encode_images(x, batch_size=1), hand, rtol=0, atol=1e-5)
    back = model.decode_latents(lat)
    assert back.shape == x.shape and back.abs().max() <= 1.0
    with torch.no_grad():
        by_hand = model.vae.decode(lat / model.vae.config.scaling_factor).sample.clamp(-1, 1)
    assert torch.equal(back, by_hand)
    with pytest.raises(ValueError, match="expected"):
        model.encode_images(x[:, :1])


# ------------------------------------------------------------------------------- sampling


@pytest.mark.parametrize("folder_name", ["eps_folder", "v_folder"])
def test_sampling_equals_stable_diffusion_pipeline(request, folder_name):
    folder = request.getfixturevalue(folder_name)
    model = load_text_to_image(folder)
    res = sample_text_to_image(model, PROMPTS, seed=3, num_inference_steps=4, guidance_scale=7.5)
    pipe = _pipe(folder)
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    out = pipe(
        PROMPTS,
        latents=res.xt[0].clone(),
        num_inference_steps=4,
        guidance_scale=7.5,
        eta=0.0,
        output_type="pt",
    ).images
    torch.testing.assert_close((res.images + 1) / 2, out, rtol=0, atol=1e-5)
    assert res.xt.shape == (4, 2, *model.image_shape) == res.eps.shape
    assert res.images.shape == (2, *model.pixel_shape)
    # The recorded eps is the noise prediction: x0_hat from (x_t, eps) is the scheduler's.
    sched = DDIMScheduler.from_config(model.scheduler.config)
    sched.set_timesteps(4)
    t = int(res.timesteps[0])
    abar = model.scheduler.alphas_cumprod[t].double()
    x0_hat = (res.xt[0].double() - (1 - abar).sqrt() * res.eps[0].double()) / abar.sqrt()
    native = model.eps(res.xt[0], torch.full((2,), t), model.tokenize(PROMPTS)).detach()
    uncond = model.eps(res.xt[0], torch.full((2,), t), model.tokenize(["", ""])).detach()
    guided = uncond + 7.5 * (native - uncond)
    want = sched.step(guided, t, res.xt[0]).pred_original_sample.double()
    torch.testing.assert_close(x0_hat, want, rtol=0, atol=1e-4)


def test_same_prompts_and_seed_give_identical_images(eps_folder):
    model = load_text_to_image(eps_folder)
    prompts = ["a painting of digit zero"] * 2 + ["a photo of digit one"]
    kw = {"num_inference_steps": 3, "guidance_scale": 5.0}
    a = sample_text_to_image(model, prompts, seed=1, **kw)
    b = sample_text_to_image(model, prompts, seed=1, **kw)
    assert torch.equal(a.images, b.images) and torch.equal(a.xt, b.xt)
    small = sample_text_to_image(model, prompts, seed=1, batch_size=1, **kw)
    torch.testing.assert_close(small.images, a.images, rtol=0, atol=1e-5)
    assert not torch.equal(a.images[0], a.images[1])  # same prompt, other noise row
    other = sample_text_to_image(model, ["a thin outlined drawing"] * 3, seed=1, **kw)
    assert torch.equal(other.xt[0], a.xt[0])  # same starting latents ...
    assert (other.images - a.images).abs().amax(dim=(1, 2, 3)).min() > 1e-4  # ... other images
    seed2 = sample_text_to_image(model, prompts, seed=2, **kw)
    assert not torch.equal(seed2.images, a.images)
    ddpm = sample_text_to_image(model, prompts, seed=1, sampler="ddpm", **kw)
    again = sample_text_to_image(model, prompts, seed=1, sampler="ddpm", **kw)
    assert torch.equal(ddpm.images, again.images) and not torch.equal(ddpm.images, a.images)


def test_guidance_scale_one_is_the_conditional_sampler_by_hand(eps_folder, lora_file):
    model = load_text_to_image(eps_folder, lora=lora_file)
    res = sample_text_to_image(model, PROMPTS, seed=4, num_inference_steps=5, guidance_scale=1.0)
    sched = DDIMScheduler.from_config(model.scheduler.config)
    sched.set_timesteps(5)
    ids = model.tokenize(PROMPTS)
    x = res.xt[0]
    for s in range(2):
        t = int(sched.timesteps[s])
        with torch.no_grad():
            e = model.eps(x, torch.full((2,), t), ids)
        torch.testing.assert_close(res.eps[s], e, rtol=0, atol=1e-6)
        x = sched.step(e, t, x).prev_sample
        torch.testing.assert_close(res.xt[s + 1], x, rtol=0, atol=1e-6)
    assert res.lora_hash == model.lora_hash() is not None
    assert res.base_hash == model.base_hash() and res.model_hash == model.model_hash()


def test_saved_sample_folder_reloads_with_prompts_and_latent_trajectory(eps_folder, tmp_path):
    model = load_text_to_image(eps_folder)
    prompts = ["a painting of digit zero", "a photo of digit one", "inverted style"]
    res = sample_text_to_image(
        model, prompts, seed=9, num_inference_steps=3, guidance_scale=3.0, negative_prompt="thin"
    )
    folder = res.save(tmp_path / "gen")
    names = sorted(p.name for p in folder.glob("*.png"))
    assert names == ["0000.png", "0001.png", "0002.png", "grid.png"]
    assert Image.open(folder / "0001.png").size == (16, 16)
    assert Image.open(folder / "0001.png").mode == "RGB"
    back = SampleResult.load(folder)
    assert back.prompts == prompts and back.guidance_scale == 3.0
    assert back.negative_prompt == "thin" and back.base_hash == model.base_hash()
    assert back.lora_hash is None and back.model_hash == model.model_hash()
    for k in ("images", "timesteps", "xt", "eps", "latents"):
        assert torch.equal(getattr(back, k), getattr(res, k)), k
    assert back.xt.shape == (3, 3, *model.image_shape)
    traj = back.trajectory(1)
    assert traj.xt.shape == (3, *model.image_shape) == traj.eps.shape
    meta = json.loads((folder / "sample.json").read_text())
    assert meta["kind"] == "text-to-image" and meta["latent_shape"] == [4, 8, 8]
    assert [im["prompt"] for im in meta["images"]] == prompts
    assert meta["images"][2] == {
        "name": "0002",
        "prompt": "inverted style",
        "seed": 9,
        "index": 2,
        "guidance_scale": 3.0,
        "num_inference_steps": 3,
    }
    # The final latents decode to the saved images.
    assert torch.equal(model.decode_latents(back.latents), back.images)
    # A folder written before prompts existed still loads.
    for key in ("prompts", "guidance_scale", "negative_prompt", "base_hash", "lora_hash"):
        meta.pop(key)
    (folder / "sample.json").write_text(json.dumps(meta))
    old = SampleResult.load(folder)
    assert old.prompts is None and old.guidance_scale is None


def test_sampling_argument_errors(eps_folder):
    model = load_text_to_image(eps_folder)
    with pytest.raises(UserError, match="list of prompts"):
        sample_text_to_image(model, "a photo", seed=0)  # type: ignore[arg-type]
    with pytest.raises(UserError, match="at least one"):
        sample_text_to_image(model, [], seed=0)
    with pytest.raises(ValueError, match="initial_noise"):
        sample_text_to_image(model, PROMPTS, seed=0, initial_noise=torch.zeros(1, 4, 8, 8))


def test_tiny_lora_file_is_trained_and_untrained_is_a_no_op(eps_folder, tmp_path):
    model = load_text_to_image(eps_folder)
    x, t, ids = _inputs(model)
    with torch.no_grad():
        base = model.eps(x, t, ids)
    tiny_lora_file(model, tmp_path / "untrained", trained=False)
    names = lora_parameter_names(model.unet)
    params = dict(model.unet.named_parameters())
    assert all(params[n].abs().sum() == 0 for n in names if ".lora_B." in n)
    with torch.no_grad():
        assert torch.equal(
            load_text_to_image(eps_folder, lora=tmp_path / "untrained").eps(x, t, ids), base
        )
    trained = load_text_to_image(eps_folder)
    tiny_lora_file(trained, tmp_path / "trained", trained=True)
    params = dict(trained.unet.named_parameters())
    assert all(params[n].abs().min() > 0 for n in lora_parameter_names(trained.unet))
