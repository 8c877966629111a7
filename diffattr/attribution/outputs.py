"""Output functions: the per-sample scalar whose parameter gradient a TRAK-family method uses.

Every function has the signature ``fn(eps_pred, noise, t, alphas_cumprod, betas) -> (B,)`` with
``eps_pred`` and ``noise`` ``(B, C, H, W)``, ``t`` int64 ``(B,)``, and the scheduler's
``alphas_cumprod`` and ``betas`` ``(T,)``. They are written with plain tensor ops only so they also
run under ``torch.func.vmap`` (where ``B`` is 1 inside the mapped function).

- ``loss``: mean over pixels of ``(eps_pred - noise)^2`` (the DDPM training loss; TRAK).
- ``square``: mean over pixels of ``eps_pred^2`` (D-TRAK's best output function).
- ``average``: mean over pixels of ``eps_pred``.
- ``l1-norm`` / ``l2-norm`` / ``linf-norm``: the 1-, 2- and max-norm of ``eps_pred`` over pixels.
- ``elbo``: ``loss`` weighted by the DDPM variational-bound weight
  ``beta_t / (2 alpha_t (1 - alphabar_t))`` with ``alpha_t = 1 - beta_t``.
"""

from __future__ import annotations

from collections.abc import Callable

from torch import Tensor

OutputFn = Callable[[Tensor, Tensor, Tensor, Tensor, Tensor], Tensor]


def _flat(x: Tensor) -> Tensor:
    """``(B, ...)`` -> ``(B, n)``: one row of pixels per sample."""
    return x.reshape(x.shape[0], -1)


def loss_output(
    eps_pred: Tensor, noise: Tensor, t: Tensor, alphas_cumprod: Tensor, betas: Tensor
) -> Tensor:
    return _flat((eps_pred - noise) ** 2).mean(dim=1)


def square_output(
    eps_pred: Tensor, noise: Tensor, t: Tensor, alphas_cumprod: Tensor, betas: Tensor
) -> Tensor:
    return _flat(eps_pred**2).mean(dim=1)


def average_output(
    eps_pred: Tensor, noise: Tensor, t: Tensor, alphas_cumprod: Tensor, betas: Tensor
) -> Tensor:
    return _flat(eps_pred).mean(dim=1)


def l1_norm_output(
    eps_pred: Tensor, noise: Tensor, t: Tensor, alphas_cumprod: Tensor, betas: Tensor
) -> Tensor:
    return _flat(eps_pred).abs().sum(dim=1)


def l2_norm_output(
    eps_pred: Tensor, noise: Tensor, t: Tensor, alphas_cumprod: Tensor, betas: Tensor
) -> Tensor:
    return _flat(eps_pred).pow(2).sum(dim=1).sqrt()


def linf_norm_output(
    eps_pred: Tensor, noise: Tensor, t: Tensor, alphas_cumprod: Tensor, betas: Tensor
) -> Tensor:
    return _flat(eps_pred).abs().amax(dim=1)


def elbo_weight(t: Tensor, alphas_cumprod: Tensor, betas: Tensor) -> Tensor:
    """``beta_t / (2 alpha_t (1 - alphabar_t))`` per entry of ``t`` ``(B,)`` -> ``(B,)``.

    At ``t = 0`` the denominator is ``2 alpha_0 beta_0`` (alphabar_0 = alpha_0), so it stays finite.
    """
    beta = betas[t].to(alphas_cumprod.dtype)
    abar = alphas_cumprod[t]
    return beta / (2.0 * (1.0 - beta) * (1.0 - abar))


def elbo_output(
    eps_pred: Tensor, noise: Tensor, t: Tensor, alphas_cumprod: Tensor, betas: Tensor
) -> Tensor:
    w = elbo_weight(t, alphas_cumprod, betas).to(eps_pred.dtype)
    return w * loss_output(eps_pred, noise, t, alphas_cumprod, betas)


OUTPUTS: dict[str, OutputFn] = {
    "loss": loss_output,
    "square": square_output,
    "average": average_output,
    "l1-norm": l1_norm_output,
    "l2-norm": l2_norm_output,
    "linf-norm": linf_norm_output,
    "elbo": elbo_output,
}


def get_output(name: str) -> OutputFn:
    """The output function called ``name`` (clear error listing the known names)."""
    try:
        return OUTPUTS[name]
    except KeyError:
        raise ValueError(
            f"output function {name!r} is unknown; expected one of {sorted(OUTPUTS)}"
        ) from None
