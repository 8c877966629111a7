"""Our K-FAC / EK-FAC curvature against curvlinops' operators (a dev dependency), where the two
definitions agree: K-FAC-expand of the GGN of a mean squared error, weight and bias as one block,
the exact output Hessian (curvlinops' ``type-2``; ours: the Monte-Carlo output vector replaced by
each scaled basis vector in turn, the expectation the one-sample estimate targets).

This guards the factors' normalisation, the conv patches, the bias column and the eigenvalue
correction; the diffusion-specific part (draws, timesteps) is tested against brute force in
``tests/test_ekfac.py``."""

from __future__ import annotations

import math
from collections.abc import Iterator

import pytest
import torch
from torch import Tensor, nn

from diffattr.attribution import curvature as cv

curvlinops = pytest.importorskip("curvlinops", reason="make test installs curvlinops (dev)")

F64 = torch.float64


def small_net() -> tuple[nn.Sequential, Tensor, Tensor]:
    """Conv2d (9 positions a sample) -> tanh -> flatten -> Linear: ``(5, 4)`` outputs."""
    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Conv2d(2, 3, 3, stride=2, padding=1), nn.Tanh(), nn.Flatten(), nn.Linear(27, 4)
    ).to(F64)
    x = torch.randn(5, 2, 5, 5, dtype=F64)
    y = torch.randn(5, 4, dtype=F64)
    return net, x, y


def basis_rows(net: nn.Module, x: Tensor) -> Iterator[dict[str, tuple[Tensor, Tensor]]]:
    """Per output dimension ``c``, every layer's (inputs, output gradients) of ``sum(net(x) *
    v)`` with ``v = sqrt(2/D) e_c``: summed over ``c``, their outer products are the
    mean-squared-error GGN's ``E[v v^T] = (2/D) I`` taken exactly."""
    layers = cv.curvature_layers(net, None)
    N, D = x.shape[0], 4
    for c in range(D):
        v = torch.zeros(N, D, dtype=F64)
        v[:, c] = math.sqrt(2.0 / D)
        with layers.capture() as calls, torch.enable_grad():
            yield cv.output_grads(layers, calls, (net(x) * v).sum())


def our_factors(net: nn.Module, x: Tensor) -> dict[str, tuple[Tensor, Tensor]]:
    """Per layer ``(A, S)`` of the mean-squared-error GGN (S summed over the basis vectors)."""
    N = x.shape[0]
    out: dict[str, tuple[Tensor, Tensor]] = {}
    for rows in basis_rows(net, x):
        for name, (cols, grads) in rows.items():
            a, s = cv.factor_sums(cols, grads)
            old = out.get(name)
            out[name] = (a / N, s / N) if old is None else (old[0], old[1] + s / N)
    return out


def our_eigen(net: nn.Module, x: Tensor, bases: dict[str, tuple[Tensor, Tensor]]) -> dict:
    """EK-FAC's corrected eigenvalues, the exact expectation over the output vectors."""
    N = x.shape[0]
    out: dict[str, Tensor] = {}
    for rows in basis_rows(net, x):
        for name, (cols, grads) in rows.items():
            lam = cv.eigen_sums(cols, grads, *bases[name]) / N
            out[name] = lam if name not in out else out[name] + lam
    return out


def to_param_order(dense: dict[str, Tensor], net: nn.Module) -> Tensor:
    """Our per-layer matrices on row-major ``vec([W | b])`` as one block-diagonal matrix in
    curvlinops' parameter order (each layer: ``W`` flattened, then ``b``)."""
    blocks = []
    for name, m in net.named_modules():
        if name not in dense:
            continue
        d_out = m.weight.shape[0]
        n_w = m.weight[0].numel()
        ours = torch.arange(d_out * (n_w + 1)).reshape(d_out, n_w + 1)
        perm = torch.cat([ours[:, :n_w].flatten(), ours[:, n_w]])
        blocks.append(dense[name][perm][:, perm])
    return torch.block_diag(*blocks)


def their_dense(operator_cls, net: nn.Module, x: Tensor, y: Tensor) -> Tensor:
    params = [p for p in net.parameters()]
    op = operator_cls(
        net,
        nn.MSELoss(reduction="mean"),
        params,
        [(x, y)],
        fisher_type="type-2",
        kfac_approx="expand",
        separate_weight_and_bias=False,
        check_deterministic=False,
    )
    dim = sum(p.numel() for p in params)
    dense = op @ torch.eye(dim, dtype=F64)
    # a comparison worth making: no layer block is zero or diagonal
    assert float((dense - torch.diag(torch.diagonal(dense))).abs().max()) > 1e-3
    return dense


def test_kfac_matches_curvlinops() -> None:
    net, x, y = small_net()
    factors = our_factors(net, x)
    dense = {}
    for name, (A, S) in factors.items():
        ea, qa, es, qs = cv.eigenbasis(A, S)
        dense[name] = cv.LayerCurvature(qa, qs, cv.kfac_eigen(ea, es), 0.0).dense()
        # the factors themselves, before any eigendecomposition
        torch.testing.assert_close(torch.kron(S, A), dense[name], rtol=1e-9, atol=1e-12)
    want = their_dense(curvlinops.KFACLinearOperator, net, x, y)
    got = to_param_order(dense, net)
    torch.testing.assert_close(got, want, rtol=1e-8, atol=1e-10 * float(want.abs().max()))


def test_ekfac_matches_curvlinops() -> None:
    net, x, y = small_net()
    factors = our_factors(net, x)
    bases, dense = {}, {}
    for name, (A, S) in factors.items():
        _, qa, _, qs = cv.eigenbasis(A, S)
        bases[name] = (qa, qs)
    lam = our_eigen(net, x, bases)
    for name, (qa, qs) in bases.items():
        dense[name] = cv.LayerCurvature(qa, qs, lam[name], 0.0).dense()
    want = their_dense(curvlinops.EKFACLinearOperator, net, x, y)
    got = to_param_order(dense, net)
    torch.testing.assert_close(got, want, rtol=1e-7, atol=1e-9 * float(want.abs().max()))
