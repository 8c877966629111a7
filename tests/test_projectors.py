"""Projectors: dense block-wise JL matrices, identity, and the Kronecker (LoGra-style) projector."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from diffattr.attribution.projectors import (
    DenseProjector,
    IdentityProjector,
    KroneckerProjector,
    ProjectorConfig,
    make_projector,
    split_dims,
)

SHAPES = {"a.weight": (3, 4), "b.bias": (5,), "c.weight": (2, 3, 2)}


def _grads(b: int = 4, dtype: torch.dtype = torch.float64) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(3)
    return {n: torch.randn(b, *s, generator=g, dtype=dtype) for n, s in SHAPES.items()}


def _flat(grads: dict[str, torch.Tensor]) -> torch.Tensor:
    return torch.cat([g.reshape(g.shape[0], -1) for g in grads.values()], dim=1)


# ------------------------------------------------------------------------------------- dense


@pytest.mark.parametrize("kind", ["gaussian", "rademacher"])
def test_dense_blockwise_equals_materialised(kind: str) -> None:
    cfg = ProjectorConfig(kind=kind, dim=7, seed=5, block_size=5, dtype="float64")
    proj = DenseProjector(cfg, SHAPES)
    m = proj.materialize()
    p = sum(math.prod(s) for s in SHAPES.values())
    assert m.shape == (p, 7)
    # Blocks really are several per parameter (12 rows of a.weight -> 3 blocks of <= 5).
    assert [b[0] for b in proj.blocks("a.weight")] == [0, 1, 2]
    grads = _grads()
    torch.testing.assert_close(proj.project(grads), _flat(grads) @ m, rtol=1e-12, atol=1e-12)
    if kind == "rademacher":
        assert set(torch.unique(m * math.sqrt(7)).tolist()) == {-1.0, 1.0}


def test_dense_independent_of_batch_order_selection_and_cache() -> None:
    cfg = ProjectorConfig(kind="gaussian", dim=6, seed=1, block_size=4, dtype="float64")
    grads = _grads(5)
    full = DenseProjector(cfg, SHAPES).project(grads)
    # One sample at a time.
    one = torch.cat(
        [
            DenseProjector(cfg, SHAPES).project({n: g[i : i + 1] for n, g in grads.items()})
            for i in range(5)
        ]
    )
    torch.testing.assert_close(one, full, rtol=1e-12, atol=1e-12)
    # Parameters (and so blocks) visited in reverse order.
    rev = {n: SHAPES[n] for n in reversed(SHAPES)}
    torch.testing.assert_close(
        DenseProjector(cfg, rev).project(grads), full, rtol=1e-12, atol=1e-12
    )
    # A parameter's slice does not depend on which other parameters are selected.
    only_b = DenseProjector(cfg, {"b.bias": SHAPES["b.bias"]}).materialize()
    both = DenseProjector(cfg, SHAPES).materialize()
    assert torch.equal(only_b, both[12:17])
    # Without a block cache (regenerated every time) the result is identical.
    torch.testing.assert_close(
        DenseProjector(cfg, SHAPES, cache_bytes=0).project(grads), full, rtol=0, atol=0
    )
    # Another seed is another matrix.
    other = ProjectorConfig(kind="gaussian", dim=6, seed=2, block_size=4, dtype="float64")
    assert not torch.allclose(DenseProjector(other, SHAPES).materialize(), both)


def test_dense_rebuilt_from_saved_config(tmp_path) -> None:
    cfg = ProjectorConfig(kind="rademacher", dim=9, seed=11, block_size=3)
    cfg.save(tmp_path / "projector.json")
    again = ProjectorConfig.load(tmp_path / "projector.json")
    assert again == cfg
    assert torch.equal(
        make_projector(again, SHAPES).materialize(), make_projector(cfg, SHAPES).materialize()
    )


def test_dense_preserves_norms_on_average() -> None:
    # JL: E ||P^T g||^2 = ||g||^2 with entries N(0, 1/k).
    cfg = ProjectorConfig(kind="gaussian", dim=512, seed=0, block_size=1000)
    g = {"w": torch.randn(8, 4000, generator=torch.Generator().manual_seed(0))}
    out = DenseProjector(cfg, {"w": (4000,)}).project(g)
    ratio = out.norm(dim=1) / g["w"].norm(dim=1)
    assert torch.all((ratio > 0.85) & (ratio < 1.15)), ratio


def test_identity_is_raw_gradient() -> None:
    grads = _grads(3)
    proj = make_projector(ProjectorConfig(kind="identity", dim=1, dtype="float64"), SHAPES)
    assert isinstance(proj, IdentityProjector) and proj.dim == 12 + 5 + 12
    assert torch.equal(proj.project(grads), _flat(grads))


def test_config_validation() -> None:
    with pytest.raises(ValueError, match="projector.kind"):
        ProjectorConfig(kind="sparse")
    with pytest.raises(ValueError, match="projector.dim"):
        ProjectorConfig(dim=0)
    with pytest.raises(ValueError, match="unknown fields"):
        ProjectorConfig.from_dict({"kind": "gaussian", "k": 3})
    with pytest.raises(ValueError, match="needs the model"):
        make_projector(ProjectorConfig(kind="kronecker"), SHAPES)
    proj = DenseProjector(ProjectorConfig(kind="gaussian", dim=4), SHAPES)
    with pytest.raises(ValueError, match="shape"):
        proj.project({**_grads(2, torch.float32), "b.bias": torch.zeros(2, 6)})
    with pytest.raises(KeyError, match="no gradient"):
        proj.project({"a.weight": torch.zeros(2, 3, 4)})


# --------------------------------------------------------------------------------- kronecker


def test_split_dims_rule() -> None:
    # Visited by capacity: (3,3) gets 100//3=33 -> 3x3; (10,2) gets 91//2=45 -> k_in 10, k_out 2;
    # the big layer gets the remaining 71 -> 8x8.
    assert split_dims(100, [(10, 2), (1000, 1000), (3, 3)]) == [(10, 2), (8, 8), (3, 3)]
    dims = split_dims(4096, [(577, 64), (64, 64), (1153, 128), (9, 8)])
    assert sum(a * b for a, b in dims) <= 4096
    assert sum(a * b for a, b in dims) >= 4000
    assert dims[3] == (9, 8)
    with pytest.raises(ValueError, match="number of layers"):
        split_dims(2, [(4, 4)] * 3)


class Toy(nn.Module):
    """Conv (strided, padded, bias) -> 1x1 conv (no bias) -> Linear over positions (bias)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(2, 3, 3, stride=2, padding=1)
        self.conv2 = nn.Conv2d(3, 4, 1, bias=False)
        self.norm = nn.GroupNorm(2, 4)
        self.lin = nn.Linear(4, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.norm(self.conv2(torch.tanh(self.conv(x))))
        h = h.flatten(2).transpose(1, 2)  # (B, P, 4): several positions per sample
        return torch.tanh(self.lin(h)).pow(2).sum(dim=(1, 2))  # (B,)


def _toy_setup():
    torch.manual_seed(0)
    model = Toy().double()
    x = torch.randn(3, 2, 6, 5, dtype=torch.float64)
    return model, x


def _kron_capture(proj: KroneckerProjector, model: nn.Module, x: torch.Tensor):
    with proj.capture() as calls:
        total = model(x).sum()
        outs = [o for ly in proj.layers for (_, o) in calls[ly.name]]
        gs = torch.autograd.grad(total, outs)
    it = iter(gs)
    acts = {ly.name: [a for a, _ in calls[ly.name]] for ly in proj.layers}
    gouts = {ly.name: [next(it) for _ in calls[ly.name]] for ly in proj.layers}
    return acts, gouts


def _loop_grads(model: nn.Module, x: torch.Tensor) -> list[dict[str, torch.Tensor]]:
    out = []
    for i in range(x.shape[0]):
        names, ps = zip(*model.named_parameters(), strict=True)
        gs = torch.autograd.grad(model(x[i : i + 1]).sum(), ps)
        out.append(dict(zip(names, gs, strict=True)))
    return out


def test_kronecker_equals_dense_kron_projection_of_explicit_grad() -> None:
    model, x = _toy_setup()
    names = [n for n, _ in model.named_parameters()]
    cfg = ProjectorConfig(kind="kronecker", dim=40, seed=4, dtype="float64")
    proj = make_projector(cfg, {n: p.shape for n, p in model.named_parameters()}, model=model)
    assert isinstance(proj, KroneckerProjector)
    assert [ly.name for ly in proj.layers] == ["conv", "conv2", "lin"]
    assert proj.skipped == ["norm.weight", "norm.bias"]
    assert [ly.d_in for ly in proj.layers] == [2 * 9 + 1, 3, 4 + 1]
    assert proj.dim == sum(ly.k_in * ly.k_out for ly in proj.layers) <= 40
    acts, gouts = _kron_capture(proj, model, x)
    feats, sq = proj.features(acts, gouts, with_norms=True)
    per_sample = _loop_grads(model, x)
    assert names  # the per-sample reference covers every parameter
    want_blocks, want_sq = [], torch.zeros(3, dtype=torch.float64)
    for ly in proj.layers:
        rows = []
        for i in range(3):
            w = per_sample[i][ly.weight_name].reshape(ly.d_out, -1)  # conv: (out, in*kh*kw)
            if ly.bias_name is not None:
                w = torch.cat([w, per_sample[i][ly.bias_name][:, None]], dim=1)  # [W | b]
            rows.append(w.reshape(-1))  # row-major vec
        flat = torch.stack(rows)
        want_sq += flat.pow(2).sum(dim=1)
        want_blocks.append(flat @ proj.dense_equivalent(ly))
        # The explicit per-sample gradient rebuilt from the captured factors is the true one.
        torch.testing.assert_close(
            proj.layer_grad(ly, list(zip(acts[ly.name], gouts[ly.name], strict=True))).reshape(
                3, -1
            ),
            flat,
            rtol=1e-10,
            atol=1e-12,
        )
    torch.testing.assert_close(feats, torch.cat(want_blocks, dim=1), rtol=1e-10, atol=1e-12)
    assert sq is not None
    torch.testing.assert_close(sq, want_sq, rtol=1e-10, atol=1e-12)


def test_kronecker_subset_bias_and_rebuild() -> None:
    model, x = _toy_setup()
    shapes = {"conv.weight": (3, 2, 3, 3), "lin.weight": (5, 4)}  # biases not selected
    cfg = ProjectorConfig(kind="kronecker", dim=30, seed=4, dtype="float64")
    proj = make_projector(cfg, shapes, model=model)
    assert isinstance(proj, KroneckerProjector)
    assert [(ly.name, ly.bias_name, ly.d_in) for ly in proj.layers] == [
        ("conv", None, 18),
        ("lin", None, 4),
    ]
    again = make_projector(ProjectorConfig.from_dict(cfg.to_dict()), shapes, model=model)
    assert isinstance(again, KroneckerProjector)
    acts, gouts = _kron_capture(proj, model, x)
    a = proj.features(acts, gouts)[0]
    b = again.features(acts, gouts)[0]
    assert torch.equal(a, b)
    per_sample = _loop_grads(model, x)
    want = torch.cat(
        [
            torch.stack([per_sample[i][ly.weight_name].reshape(-1) for i in range(3)])
            @ proj.dense_equivalent(ly)
            for ly in proj.layers
        ],
        dim=1,
    )
    torch.testing.assert_close(a, want, rtol=1e-10, atol=1e-12)
    with pytest.raises(ValueError, match="no selected nn.Linear/nn.Conv2d"):
        make_projector(cfg, {"norm.weight": (4,)}, model=model)


class Wide(nn.Module):
    """Few positions, wide layers: the exact norm takes the Gram route (P^2 (d_in+d_out) smaller)."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(40, 30)
        self.out = nn.Linear(30, 2, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(torch.tanh(self.lin(x))).pow(2).sum(dim=(1, 2))


def test_kronecker_exact_norm_gram_route() -> None:
    torch.manual_seed(1)
    model = Wide().double()
    x = torch.randn(4, 2, 40, dtype=torch.float64)
    proj = make_projector(
        ProjectorConfig(kind="kronecker", dim=64, dtype="float64"),
        {n: p.shape for n, p in model.named_parameters()},
        model=model,
    )
    assert isinstance(proj, KroneckerProjector)
    lin = proj.layers[0]
    assert 2 * (lin.d_in + lin.d_out) < lin.d_in * lin.d_out  # the Gram branch is the one used
    acts, gouts = _kron_capture(proj, model, x)
    _, sq = proj.features(acts, gouts, with_norms=True)
    want = torch.stack([sum(g.pow(2).sum() for g in d.values()) for d in _loop_grads(model, x)])
    assert sq is not None
    torch.testing.assert_close(sq, want, rtol=1e-10, atol=1e-12)
