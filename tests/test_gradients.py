"""Per-sample gradients (vmap vs a per-sample autograd loop) and the output functions."""

from __future__ import annotations

import fnmatch

import pytest
import torch
from diffusers import DDPMScheduler
from diffusers.models.attention_processor import Attention

from diffattr import testing
from diffattr.attribution.gradients import (
    per_sample_grads,
    per_sample_grads_loop,
    select_params,
    vmap_friendly_attention,
)
from diffattr.attribution.outputs import OUTPUTS, elbo_weight, get_output
from diffattr.diffusion.model import DiffusionModel
from diffattr.errors import OptionError


def tiny_model(
    dtype: torch.dtype = torch.float64, num_classes: int | None = None
) -> DiffusionModel:
    return testing.tiny_model(dtype=dtype, num_class_embeds=num_classes)


def _inputs(dtype: torch.dtype = torch.float64, b: int = 3):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(b, 1, 8, 8, generator=g, dtype=dtype)
    noise = torch.randn(b, 1, 8, 8, generator=g, dtype=dtype)
    t = torch.tensor([3, 470, 999][:b], dtype=torch.int64)
    return x, t, noise


def _assert_same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], atol: float) -> None:
    assert list(a) == list(b)
    for name in a:
        assert a[name].shape == b[name].shape, name
        torch.testing.assert_close(a[name], b[name], rtol=1e-6, atol=atol, msg=name)


@pytest.mark.parametrize("output", ["loss", "square", "elbo", "l2-norm"])
def test_vmap_matches_loop_all_params(output: str) -> None:
    model = tiny_model()
    x, t, noise = _inputs()
    params = select_params(model.unet, None)
    fast = per_sample_grads(model, x, t, noise, OUTPUTS[output], params)
    # Same attention processor as the vmap path: agreement to float64 round-off.
    with vmap_friendly_attention(model.unet):
        ref = per_sample_grads_loop(model, x, t, noise, OUTPUTS[output], params)
    _assert_same(fast, ref, atol=1e-10)
    # The model's default (SDPA) attention: diffusers' classic processor upcasts the softmax to
    # float32, so agreement is to float32 round-off of the attention weights.
    ref_sdpa = per_sample_grads_loop(model, x, t, noise, OUTPUTS[output], params)
    _assert_same(fast, ref_sdpa, atol=1e-7)
    # Gradients differ between samples (a batch-mean would make them equal).
    w = "conv_in.weight"
    assert not torch.allclose(fast[w][0], fast[w][1])


@pytest.mark.parametrize("patterns", [["*attentions*"], ["*to_q*", "conv_out.*"]])
def test_vmap_matches_loop_subset(patterns: list[str]) -> None:
    model = tiny_model()
    x, t, noise = _inputs()
    params = select_params(model.unet, patterns)
    names = list(dict(model.unet.named_parameters()))
    assert list(params) == [n for n in names if any(fnmatch.fnmatchcase(n, p) for p in patterns)]
    assert 0 < len(params) < len(names)
    for output in ("loss", "square"):
        fast = per_sample_grads(model, x, t, noise, OUTPUTS[output], params)
        with vmap_friendly_attention(model.unet):
            ref = per_sample_grads_loop(model, x, t, noise, OUTPUTS[output], params)
        _assert_same(fast, ref, atol=1e-10)


def test_vmap_float32_and_class_conditional() -> None:
    model = tiny_model(torch.float32, num_classes=3)
    x, t, noise = _inputs(torch.float32)
    y = torch.tensor([0, 2, 1])
    params = select_params(model.unet, ["*class_embedding*", "conv_in.*"])
    fast = per_sample_grads(model, x, t, noise, OUTPUTS["loss"], params, class_labels=y)
    ref = per_sample_grads_loop(model, x, t, noise, OUTPUTS["loss"], params, class_labels=y)
    _assert_same(fast, ref, atol=1e-5)
    # Only the embedding row of each sample's own class gets gradient.
    emb = fast["class_embedding.weight"]
    for i, c in enumerate(y.tolist()):
        others = [k for k in range(3) if k != c]
        assert emb[i, c].abs().sum() > 0 and emb[i, others].abs().sum() == 0


def test_attention_processors_restored_and_grads_not_leaked() -> None:
    model = tiny_model()
    attn = [m for m in model.unet.modules() if isinstance(m, Attention)]
    assert attn
    before = [m.processor for m in attn]
    x, t, noise = _inputs()
    per_sample_grads(model, x, t, noise, OUTPUTS["loss"], select_params(model.unet, ["*to_k*"]))
    assert [m.processor for m in attn] == before
    assert all(p.grad is None for p in model.unet.parameters())


def test_select_params_errors_and_order() -> None:
    model = tiny_model()
    names = list(dict(model.unet.named_parameters()))
    assert list(select_params(model.unet, None)) == names
    sel = list(select_params(model.unet, ["*.bias", "conv_in.weight"]))
    assert sel == [n for n in names if n.endswith(".bias") or n == "conv_in.weight"]
    with pytest.raises(ValueError, match="empty"):
        select_params(model.unet, [])


def test_patterns_that_match_nothing_are_one_clear_option_error() -> None:
    """Every bad pattern is named, with example names, the top-level groups and the calling
    method's named groups; an OptionError, so the CLI prints one line (and a ValueError)."""
    model = tiny_model()
    with pytest.raises(OptionError) as exc:
        select_params(model.unet, ["*to_q*", "*nonexistent*", "nosuch.*"], presets=["up-blocks"])
    text = str(exc.value)
    assert isinstance(exc.value, ValueError) and "\n" not in text
    assert text.startswith("params: patterns '*nonexistent*', 'nosuch.*' match no parameter")
    assert "'*to_q*'" not in text
    assert "conv_in.weight" in text and "time_embedding.linear_1.weight" in text
    assert "top-level groups: conv_in.*, time_embedding.*, down_blocks.*, up_blocks.*" in text
    assert text.endswith(
        "named group instead of a list (params=NAME): up-blocks, all, lora, cross-attn-kv"
    )
    with pytest.raises(OptionError, match="pattern 'x' matches no parameter") as exc:
        select_params(model.unet, ["x"])
    assert str(exc.value).endswith("(params=NAME): all, lora, cross-attn-kv")


def test_named_groups_select_their_parameters() -> None:
    """``all`` is every parameter; a group is refused by name where the model has none of its
    parameters (the pixel UNet has no cross-attention and no LoRA); elsewhere it selects exactly
    the names its patterns match (tests/test_t2i_attribution.py: on a text-to-image model)."""
    model = tiny_model()
    names = list(dict(model.unet.named_parameters()))
    assert list(select_params(model.unet, ["all"])) == names
    assert list(select_params(model.unet, "all")) == names
    for group in ("lora", "cross-attn-kv"):
        with pytest.raises(OptionError, match=f"pattern '{group}' matches no parameter"):
            select_params(model.unet, [group])


# ---------------------------------------------------------------------------------- outputs


def _tiny_eps():
    eps = torch.tensor([[[[1.0, -2.0], [0.5, 3.0]]], [[[0.0, 0.0], [-1.0, 1.0]]]])
    noise = torch.tensor([[[[0.0, -1.0], [0.5, 1.0]]], [[[1.0, 0.0], [0.0, 0.0]]]])
    return eps, noise


def test_output_functions_by_hand() -> None:
    eps, noise = _tiny_eps()
    sched = DDPMScheduler(num_train_timesteps=10, beta_start=0.1, beta_end=0.5)
    ac, betas = sched.alphas_cumprod, sched.betas
    t = torch.tensor([0, 4])
    want = {
        "loss": [(1 + 1 + 0 + 4) / 4, (1 + 0 + 1 + 1) / 4],
        "square": [(1 + 4 + 0.25 + 9) / 4, (0 + 0 + 1 + 1) / 4],
        "average": [(1 - 2 + 0.5 + 3) / 4, 0.0],
        "l1-norm": [6.5, 2.0],
        "l2-norm": [14.25**0.5, 2**0.5],
        "linf-norm": [3.0, 1.0],
    }
    for name, vals in want.items():
        got = OUTPUTS[name](eps, noise, t, ac, betas)
        torch.testing.assert_close(got, torch.tensor(vals), msg=name)
    # elbo weight beta_t / (2 alpha_t (1 - alphabar_t)), alpha_t = 1 - beta_t, by hand.
    b = [0.1 + (0.5 - 0.1) * i / 9 for i in range(10)]
    abar4 = 1.0
    for i in range(5):
        abar4 *= 1 - b[i]
    w0 = b[0] / (2 * (1 - b[0]) * (1 - (1 - b[0])))
    w4 = b[4] / (2 * (1 - b[4]) * (1 - abar4))
    torch.testing.assert_close(elbo_weight(t, ac, betas), torch.tensor([w0, w4]))
    torch.testing.assert_close(
        OUTPUTS["elbo"](eps, noise, t, ac, betas), torch.tensor([w0 * 6 / 4, w4 * 3 / 4])
    )
    assert set(OUTPUTS) == {"loss", "square", "average", "l1-norm", "l2-norm", "linf-norm", "elbo"}
    with pytest.raises(ValueError, match="unknown"):
        get_output("squared")
