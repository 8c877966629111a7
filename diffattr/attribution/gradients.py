"""Per-sample gradients of an output function with respect to (a subset of) UNet parameters.

The fast path uses ``torch.func``: ``vmap(grad(f))`` over samples, where ``f`` runs the model on a
batch of one through ``functional_call``. Parameters that are not selected are left in the module
and act as constants, so no gradient work is done for them.

diffusers' ``UNet2DModel`` works under ``vmap`` (timesteps arrive as a ``(1,)`` tensor per sample;
GroupNorm and attention are per-sample). The one problem is speed: PyTorch has no batching rule for
the fused ``scaled_dot_product_attention`` kernels, so vmap falls back to a Python loop for them.
While vmapping we therefore switch the attention layers to diffusers' classic ``AttnProcessor``
(explicit ``baddbmm`` + softmax, which vmap batches), and restore the original processors after.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor, nn
from torch.func import functional_call, grad, vmap

from diffattr.attribution.outputs import OutputFn
from diffattr.diffusion.model import vmap_friendly_attention

# Re-exported: the groups live in the diffusion layer, which the trainers share.
from diffattr.diffusion.params import PARAM_GROUPS as PARAM_GROUPS
from diffattr.diffusion.params import select_params as select_params

log = logging.getLogger(__name__)


def default_params(model: Any) -> list[str] | None:
    """What a gradient method differentiates when its ``params`` option is unset: the LoRA
    matrices of a model with a LoRA loaded (D-TRAK's setting), else every parameter."""
    names = (n for n, _ in model.unet.named_parameters())
    return ["lora"] if any(".lora_A." in n or ".lora_B." in n for n in names) else None


class _EpsCall(nn.Module):
    """Wraps ``model.eps`` as a module so ``functional_call`` can swap the UNet's parameters.

    ``model.unet`` is registered as submodule ``unet``; parameter names get the ``unet.`` prefix.
    """

    def __init__(self, model: Any) -> None:
        super().__init__()
        self.unet = model.unet
        self._model = model

    def forward(self, x: Tensor, t: Tensor, class_labels: Tensor | None) -> Tensor:
        return self._model.eps(x, t, class_labels)


def scheduler_tables(model: Any, device: torch.device, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """``(alphas_cumprod, betas)`` of the model's scheduler, each ``(T,)`` on ``device``."""
    sched = model.scheduler
    return (
        sched.alphas_cumprod.to(device=device, dtype=dtype),
        sched.betas.to(device=device, dtype=dtype),
    )


def per_sample_grads(
    model: Any,
    x_t: Tensor,
    t: Tensor,
    noise: Tensor,
    output_fn: OutputFn,
    params: Mapping[str, Tensor],
    class_labels: Tensor | None = None,
) -> dict[str, Tensor]:
    """Gradient of ``output_fn`` for each sample separately, via ``vmap(grad(...))``.

    ``x_t``, ``noise``: ``(B, C, H, W)``; ``t``: int64 ``(B,)``; ``class_labels``: ``(B,)`` or None;
    ``params``: name -> parameter (from :func:`select_params`). Returns name -> ``(B, *shape)``.
    """
    wrapper = _EpsCall(model)
    names = list(params)
    primals = {f"unet.{n}": params[n].detach() for n in names}
    ac, betas = scheduler_tables(model, x_t.device, x_t.dtype)

    def one(p: dict[str, Tensor], x: Tensor, tt: Tensor, n: Tensor, y: Tensor | None) -> Tensor:
        yb = None if y is None else y[None]
        eps = functional_call(wrapper, p, (x[None], tt[None], yb))
        return output_fn(eps, n[None], tt[None], ac, betas).sum()

    in_dims = (None, 0, 0, 0, None if class_labels is None else 0)
    with (
        torch.no_grad(),
        vmap_friendly_attention(model.unet),
        warnings.catch_warnings(),
    ):
        # The no_grad keeps the non-selected (constant) parameters out of any autograd graph;
        # torch.func.grad ignores the outer no_grad for its own inputs.
        warnings.filterwarnings("ignore", message=".*batching rule.*")
        g = vmap(grad(one), in_dims=in_dims)(primals, x_t, t, noise, class_labels)
    return {n: g[f"unet.{n}"] for n in names}


def per_sample_grads_loop(
    model: Any,
    x_t: Tensor,
    t: Tensor,
    noise: Tensor,
    output_fn: OutputFn,
    params: Mapping[str, nn.Parameter],
    class_labels: Tensor | None = None,
) -> dict[str, Tensor]:
    """Reference implementation of :func:`per_sample_grads`: one ``torch.autograd.grad`` per sample.

    Slow; used by tests to check the vmap path.
    """
    names = list(params)
    ac, betas = scheduler_tables(model, x_t.device, x_t.dtype)
    saved = {n: p.requires_grad for n, p in params.items()}
    out: dict[str, list[Tensor]] = {n: [] for n in names}
    try:
        for p in params.values():
            p.requires_grad_(True)
        for i in range(x_t.shape[0]):
            y = None if class_labels is None else class_labels[i : i + 1]
            with torch.enable_grad():
                eps = model.eps(x_t[i : i + 1], t[i : i + 1], y)
                val = output_fn(eps, noise[i : i + 1], t[i : i + 1], ac, betas).sum()
                gs = torch.autograd.grad(val, [params[n] for n in names], allow_unused=True)
            for n, gi, p in zip(names, gs, params.values(), strict=True):
                out[n].append(torch.zeros_like(p) if gi is None else gi.detach())
    finally:
        for n, p in params.items():
            p.requires_grad_(saved[n])
    return {n: torch.stack(v) for n, v in out.items()}


def flatten_grads(grads: Mapping[str, Tensor]) -> Tensor:
    """name -> ``(B, *shape)`` to one ``(B, p)`` matrix, in the mapping's order."""
    return torch.cat([g.reshape(g.shape[0], -1) for g in grads.values()], dim=1)


def grad_sq_norms(grads: Mapping[str, Tensor]) -> Tensor:
    """Per-sample squared gradient norm over all parameters: ``(B,)`` float."""
    total: Tensor | None = None
    for g in grads.values():
        s = g.reshape(g.shape[0], -1).pow(2).sum(dim=1)
        total = s if total is None else total + s
    if total is None:
        raise ValueError("grad_sq_norms: no gradients given")
    return total
