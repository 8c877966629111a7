"""K-FAC and EK-FAC curvature of the diffusion loss, one Linear / Conv2d layer at a time.

Used by the influence-function methods (:mod:`diffattr.attribution.methods.ekfac`). Notation for
one layer with weight ``W`` ``(d_out, n_w)`` (conv: ``n_w = in_channels * kh * kw``) and, when
selected, bias ``b``: the layer's parameters are the matrix ``[W | b]`` ``(d_out, d_in)``, the
bias being the weight of an extra input that is always 1 (homogeneous coordinates), so a layer
and its bias share one Kronecker factorisation. For a sample ``n`` the layer sees inputs ``a_p``
``(d_in,)`` at positions ``p = 1..P`` (conv: the im2col patches of every output pixel; a Linear
inside attention: every token) and receives output gradients ``s_p`` ``(d_out,)``; its parameter
gradient is ``G_n = sum_p s_p a_p^T`` ``(d_out, d_in)``.

**GGN.** The training loss per sample is ``mean_pixels (eps - noise)^2``, whose Hessian with
respect to the network output is ``(2/D) I`` (``D`` pixels). Its GGN is ``E_n[J_n^T (2/D) J_n]``;
the methods estimate it with one Monte-Carlo sample per (image, timestep, noise) as in
Mlodozeniec et al. (2025): backpropagate ``v = sqrt(2/D) z``, ``z ~ N(0, I)``, through the output
(``E[v v^T] = (2/D) I``), which gives "pseudo-gradients" ``G_n`` with ``E[vec G_n vec G_n^T]``
equal to the layer's GGN block.

**K-FAC-expand** (Eschenhagen et al. 2023): positions are treated as extra samples, so
``GGN ~ S (x) A`` with ``A = 1/(N P) sum_{n,p} a a^T`` and ``S = 1/N sum_{n,p} s s^T``, acting on
the row-major ``vec([W | b])``: ``(S (x) A) vec(G) = vec(S G A)``.

**EK-FAC** (George et al. 2018): with ``A = Q_A diag(.) Q_A^T`` and ``S = Q_S diag(.) Q_S^T``, the
eigenvalues in the Kronecker eigenbasis are re-estimated from the pseudo-gradients,
``lambda_ij = 1/N sum_n (Q_S^T G_n Q_A)_ij^2`` (the diagonal of the estimated GGN in that basis:
the best approximation, in Frobenius norm, diagonal in it). K-FAC's own eigenvalues are the
products ``s_i a_j`` of the factors' eigenvalues.

**Damping** (fixed in advance, Grosse et al. 2023): per layer, ``damping * mean_ij lambda_ij``
(default ``damping = 0.1``). Per layer because the GGN's scale differs by orders of magnitude
between layers: one global value would leave the small-curvature layers nearly undamped (their
inverse dominated by noise in tiny eigenvalues) and over-damp the large ones to a plain
gradient dot product.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from diffattr.attribution.gradients import select_params
from diffattr.attribution.projectors import (
    KroneckerProjector,
    ProjectorConfig,
    layer_rows,
    output_gradients,
)

# A budget large enough that every layer keeps its full size; only the layer list is used.
_ALL_DIMS = 2**40


def curvature_layers(unet: nn.Module, params: list[str] | None) -> KroneckerProjector:
    """The Linear / Conv2d layers (weight selected by ``params`` fnmatch patterns, None: all; a
    selected bias joins as an input column of ones) in ``named_modules`` order, as a
    :class:`KroneckerProjector` whose ``capture()`` hooks and ``layers`` the curvature code uses.

    These are the same layers, in the same order, as the ``kronecker`` projector of the same
    ``params`` (norm scales and embeddings are not factored; they are skipped there too)."""
    names = list(select_params(unet, params))
    return KroneckerProjector(ProjectorConfig(kind="kronecker", dim=_ALL_DIMS), unet, names)


def factor_sums(cols: Tensor, grads: Tensor) -> tuple[Tensor, Tensor]:
    """Per-sample K-FAC-expand factors summed over the ``B`` samples of ``cols`` ``(B, P, d_in)``
    and ``grads`` ``(B, P, d_out)``: ``sum_b 1/P sum_p a a^T`` ``(d_in, d_in)`` and
    ``sum_b sum_p s s^T`` ``(d_out, d_out)`` (divide both by the sample count for A and S)."""
    P = cols.shape[1]
    a = cols.reshape(-1, cols.shape[-1])
    s = grads.reshape(-1, grads.shape[-1])
    return (a.T @ a) / P, s.T @ s


def sample_grads(cols: Tensor, grads: Tensor) -> Tensor:
    """Per-sample parameter gradients ``G_b = sum_p s_p a_p^T``: ``(B, d_out, d_in)``."""
    return torch.einsum("bpo,bpi->boi", grads, cols)


def eigen_sums(cols: Tensor, grads: Tensor, q_in: Tensor, q_out: Tensor) -> Tensor:
    """``sum_b (Q_S^T G_b Q_A)^2`` ``(d_out, d_in)``: EK-FAC's eigenvalue statistics.

    The rotation is applied to the per-position vectors before they are summed (same result,
    cheaper than forming ``G_b`` first when ``P`` is small)."""
    rot = torch.einsum("bpo,bpi->boi", grads @ q_out.to(grads.dtype), cols @ q_in.to(cols.dtype))
    return rot.pow(2).sum(dim=0)


def eigenbasis(A: Tensor, S: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """``(eig_A (d_in,), Q_A (d_in, d_in), eig_S (d_out,), Q_S (d_out, d_out))`` in float64.

    Tiny negative eigenvalues of these PSD matrices (round-off) are clipped to 0."""
    ea, qa = torch.linalg.eigh(A.to(torch.float64))
    es, qs = torch.linalg.eigh(S.to(torch.float64))
    return ea.clamp_min(0.0), qa, es.clamp_min(0.0), qs


@dataclass
class LayerCurvature:
    """One layer's (E)K-FAC GGN ``(Q_S (x) Q_A) diag(vec eigen) (Q_S (x) Q_A)^T`` on the row-major
    ``vec([W | b])``, plus its damping. ``q_in`` ``(d_in, d_in)``, ``q_out`` ``(d_out, d_out)``,
    ``eigen`` ``(d_out, d_in)`` (entry ``ij``: output eigenvector ``i`` x input eigenvector
    ``j``), float64."""

    q_in: Tensor
    q_out: Tensor
    eigen: Tensor
    damping: float

    @classmethod
    def build(
        cls, q_in: Tensor, q_out: Tensor, eigen: Tensor, damping_scale: float
    ) -> LayerCurvature:
        """With the damping rule of the module docstring: ``damping_scale * mean(eigen)`` (at
        least the smallest positive float64, so an all-zero layer divides 0 by it, not by 0)."""
        mean = float(eigen.mean())
        damping = max(damping_scale * mean, torch.finfo(torch.float64).tiny)
        return cls(q_in, q_out, eigen, damping)

    def precondition(self, g: Tensor) -> Tensor:
        """``(GGN + damping I)^-1 g`` for ``g`` ``(..., d_out, d_in)`` (float64 out):
        ``Q_S ((Q_S^T g Q_A) / (eigen + damping)) Q_A^T``."""
        g = g.to(torch.float64)
        rot = self.q_out.T @ g @ self.q_in
        return self.q_out @ (rot / (self.eigen + self.damping)) @ self.q_in.T

    def dense(self) -> Tensor:
        """The undamped GGN approximation as a dense ``(d_out d_in, d_out d_in)`` matrix (tests)."""
        q = torch.kron(self.q_out, self.q_in)
        return (q * self.eigen.flatten()) @ q.T


def kfac_eigen(eig_in: Tensor, eig_out: Tensor) -> Tensor:
    """K-FAC's eigenvalues in the Kronecker eigenbasis: ``eig_S[i] * eig_A[j]``, ``(d_out, d_in)``."""
    return torch.outer(eig_out, eig_in)


def output_grads(
    layers: KroneckerProjector,
    calls: dict[str, list[tuple[Tensor, Tensor]]],
    total: Tensor,
) -> dict[str, tuple[Tensor, Tensor]]:
    """Per layer, :func:`~diffattr.attribution.projectors.layer_rows` of the captured ``calls``
    (from ``layers.capture()``) with the gradient of the scalar ``total`` at every call's output
    (:func:`~diffattr.attribution.projectors.output_gradients`)."""
    pairs = output_gradients(layers, calls, total)
    return {ly.name: layer_rows(ly, pairs[ly.name]) for ly in layers.layers}
