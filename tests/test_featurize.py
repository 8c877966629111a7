"""per_step_features against brute-force references; timestep policies; noise; NaN handling."""

from __future__ import annotations

import pytest
import torch

from diffattr import testing
from diffattr.attribution import featurize as fz
from diffattr.attribution.featurize import (
    FeaturizeArgs,
    NonFiniteGradientError,
    aggregate,
    build_projector,
    per_step_features,
)
from diffattr.attribution.gradients import (
    per_sample_grads_loop,
    select_params,
    vmap_friendly_attention,
)
from diffattr.attribution.outputs import OUTPUTS
from diffattr.attribution.projectors import DenseProjector, KroneckerProjector, ProjectorConfig
from diffattr.attribution.timesteps import TimestepPolicy, noise_for
from diffattr.diffusion.model import DiffusionModel


def tiny_model(double: bool = True) -> DiffusionModel:
    return testing.tiny_model(dtype=torch.float64 if double else torch.float32)


def _x0(b: int = 3, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    return torch.rand(b, 1, 8, 8, generator=torch.Generator().manual_seed(7), dtype=dtype) * 2 - 1


IDS = torch.tensor([10, 4, 27])


def _reference(model, x0, ids, timesteps, args, params) -> torch.Tensor:
    """(B, S, p): per (sample, t) the mean over draws of the (normalised) raw loop gradient."""
    out = torch.zeros(
        len(ids), len(timesteps), sum(p.numel() for p in params.values()), dtype=x0.dtype
    )
    for b, i in enumerate(ids.tolist()):
        for s, t in enumerate(timesteps):
            x = x0[b, s] if x0.ndim == 5 else x0[b]
            for d in range(args.num_noise):
                noise = noise_for(args.seed, i, t, d, tuple(x.shape), args.noise)
                noise = noise.to(x.dtype)[None]
                tt = torch.tensor([t])
                x_t = model.scheduler.add_noise(x[None], noise, tt)
                with vmap_friendly_attention(model.unet):
                    g = per_sample_grads_loop(model, x_t, tt, noise, OUTPUTS[args.output], params)
                flat = torch.cat([v.reshape(-1) for v in g.values()])
                if args.normalize:
                    flat = flat / flat.norm()
                out[b, s] += flat / args.num_noise
    return out


@pytest.mark.parametrize(
    ("output", "num_noise", "normalize", "noise"),
    [
        ("loss", 2, False, "shared"),
        ("square", 1, True, "per-sample"),
        ("loss", 2, False, "per-sample"),
    ],
)
def test_identity_features_equal_loop_reference(
    output: str, num_noise: int, normalize: bool, noise: str
) -> None:
    model = tiny_model()
    args = FeaturizeArgs(
        output=output,
        num_noise=num_noise,
        noise=noise,
        normalize=normalize,
        projector=ProjectorConfig(kind="identity", dtype="float64"),
        params=["*up_blocks.1.*", "conv_out.*"],
        batch_size=4,  # 3 samples x 2 steps x draws rows: chunks straddle samples
        seed=3,
    )
    ts = [5, 700]
    x0 = _x0()
    got = per_step_features(model, x0, IDS, ts, args)
    want = _reference(model, x0, IDS, ts, args, select_params(model.unet, args.params))
    assert got.shape == want.shape
    torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-12)
    if normalize:
        torch.testing.assert_close(got.norm(dim=-1), torch.ones(3, 2, dtype=torch.float64))


def test_features_independent_of_batch_and_5d_x0() -> None:
    model = tiny_model()
    args = FeaturizeArgs(
        projector=ProjectorConfig(kind="gaussian", dim=32, dtype="float64"), batch_size=5
    )
    ts = [100, 900]
    x0 = _x0()
    full = per_step_features(model, x0, IDS, ts, args)
    alone = torch.cat(
        [per_step_features(model, x0[i : i + 1], IDS[i : i + 1], ts, args) for i in range(3)]
    )
    torch.testing.assert_close(full, alone, rtol=1e-10, atol=1e-12)
    # A different clean image per step (Journey-TRAK) == one call per step with that image.
    x5 = torch.stack([x0, x0.flip(-1)], dim=1)  # (B, S, C, H, W)
    per5 = per_step_features(model, x5, IDS, ts, args)
    for s, t in enumerate(ts):
        one = per_step_features(model, x5[:, s], IDS, [t], args)[:, 0]
        torch.testing.assert_close(per5[:, s], one, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(per5[:, 0], full[:, 0], rtol=1e-10, atol=1e-12)
    assert not torch.allclose(per5[:, 1], full[:, 1])


def test_dense_features_are_identity_features_times_matrix(monkeypatch: pytest.MonkeyPatch) -> None:
    model = tiny_model()
    base = {"params": ["*mid_block.attentions*"], "batch_size": 4}
    ident = FeaturizeArgs(projector=ProjectorConfig(kind="identity", dtype="float64"), **base)
    dense = FeaturizeArgs(
        projector=ProjectorConfig(kind="rademacher", dim=16, block_size=100, dtype="float64"),
        **base,
    )
    ts = [50, 500]
    g = per_step_features(model, _x0(), IDS, ts, ident)
    f = per_step_features(model, _x0(), IDS, ts, dense)
    proj = build_projector(model, dense)[0]
    assert isinstance(proj, DenseProjector)
    torch.testing.assert_close(f, g @ proj.materialize(), rtol=1e-9, atol=1e-12)
    # Pooling raw gradients of several chunks into one projection call changes nothing.
    monkeypatch.setattr(fz, "PROJECT_BUFFER_BYTES", 0)
    unpooled = per_step_features(model, _x0(), IDS, ts, dense)
    torch.testing.assert_close(unpooled, f, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("normalize", [False, True])
def test_kronecker_on_unet_equals_dense_kron_of_explicit_grads(normalize: bool) -> None:
    model = tiny_model()
    kron = FeaturizeArgs(
        output="square",
        normalize=normalize,
        projector=ProjectorConfig(kind="kronecker", dim=300, seed=2, dtype="float64"),
        batch_size=6,
    )
    ts = [10, 600]
    with vmap_friendly_attention(model.unet):  # same attention kernels as the vmap reference
        feats = per_step_features(model, _x0(), IDS, ts, kron)
    proj = build_projector(model, kron)[0]
    assert isinstance(proj, KroneckerProjector)
    assert feats.shape == (3, 2, proj.dim) and proj.dim <= 300
    # Norm-layer parameters and embeddings are skipped; every Linear/Conv2d weight is covered.
    assert any("norm" in n for n in proj.skipped)
    assert all(n.endswith((".weight", ".bias")) for n in proj.covered)
    ident = FeaturizeArgs(
        output="square",
        normalize=normalize,
        projector=ProjectorConfig(kind="identity", dtype="float64"),
        params=proj.covered,
        batch_size=6,
    )
    raw = per_step_features(model, _x0(), IDS, ts, ident)  # (B, S, p) in selection order
    shapes = {n: p.shape for n, p in select_params(model.unet, proj.covered).items()}
    offsets, o = {}, 0
    for n, shp in shapes.items():
        offsets[n] = (o, o + shp.numel())
        o += shp.numel()
    blocks = []
    for ly in proj.layers:
        a, b = offsets[ly.weight_name]
        w = raw[..., a:b].reshape(3, 2, ly.d_out, -1)
        if ly.bias_name is not None:
            a, b = offsets[ly.bias_name]
            w = torch.cat([w, raw[..., a:b, None]], dim=-1)
        blocks.append(w.reshape(3, 2, -1) @ proj.dense_equivalent(ly))
    torch.testing.assert_close(feats, torch.cat(blocks, dim=-1), rtol=1e-8, atol=1e-10)


def test_frozen_unet_gives_same_features() -> None:
    model = tiny_model()
    args = FeaturizeArgs(projector=ProjectorConfig(kind="kronecker", dim=200), batch_size=6)
    want = per_step_features(model, _x0(), IDS, [20, 400], args)
    model.unet.requires_grad_(False)
    for kind in ("kronecker", "gaussian"):
        args.projector = ProjectorConfig(kind=kind, dim=200)
        got = per_step_features(model, _x0(), IDS, [20, 400], args)
        if kind == "kronecker":
            torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
        assert got.abs().sum() > 0
    assert not any(p.requires_grad for p in model.unet.parameters())


def test_noise_for_is_deterministic() -> None:
    a = noise_for(0, 5, 100, 0, (1, 4, 4), "per-sample")
    assert torch.equal(a, noise_for(0, 5, 100, 0, (1, 4, 4), "per-sample"))
    for other in [
        noise_for(1, 5, 100, 0, (1, 4, 4), "per-sample"),
        noise_for(0, 6, 100, 0, (1, 4, 4), "per-sample"),
        noise_for(0, 5, 101, 0, (1, 4, 4), "per-sample"),
        noise_for(0, 5, 100, 1, (1, 4, 4), "per-sample"),
        noise_for(0, 5, 100, 0, (1, 4, 4), "shared"),
    ]:
        assert not torch.allclose(a, other)
    assert a.dtype == torch.float32 and a.shape == (1, 4, 4)
    # Shared noise: one noise per (seed, t, draw) whatever the sample.
    s = noise_for(0, 5, 100, 0, (1, 4, 4), "shared")
    assert torch.equal(s, noise_for(0, 123, 100, 0, (1, 4, 4), "shared"))
    for other in [
        noise_for(1, 5, 100, 0, (1, 4, 4), "shared"),
        noise_for(0, 5, 101, 0, (1, 4, 4), "shared"),
        noise_for(0, 5, 100, 1, (1, 4, 4), "shared"),
    ]:
        assert not torch.allclose(s, other)
    with pytest.raises(ValueError, match="noise.*'shared', 'per-sample'"):
        noise_for(0, 5, 100, 0, (1, 4, 4), "same")
    with pytest.raises(ValueError, match="featurize.noise"):
        FeaturizeArgs(noise="same")


def test_timestep_policies() -> None:
    assert TimestepPolicy(kind="uniform", count=4, num_train_timesteps=1000).timesteps() == [
        0,
        250,
        500,
        750,
    ]
    assert TimestepPolicy(kind="uniform", count=3, num_train_timesteps=10).timesteps() == [0, 3, 6]
    lo = TimestepPolicy(kind="uniform", count=3, num_train_timesteps=10, t_min=4)
    assert lo.timesteps() == [4, 6, 8]
    r_lo = TimestepPolicy(kind="random", count=5, seed=3, t_min=900).timesteps()
    assert len(set(r_lo)) == 5 and all(900 <= t < 1000 for t in r_lo)
    with pytest.raises(ValueError, match="t_min"):
        TimestepPolicy(kind="uniform", count=3, num_train_timesteps=10, t_min=10)
    with pytest.raises(ValueError, match=r"count: 7 is more than the 6"):
        TimestepPolicy(kind="uniform", count=7, num_train_timesteps=10, t_min=4)
    assert TimestepPolicy(kind="list", values=[999, 0, 5]).timesteps() == [999, 0, 5]
    r = TimestepPolicy(kind="random", count=6, seed=3).timesteps()
    assert r == TimestepPolicy(kind="random", count=6, seed=3).timesteps()
    assert r == sorted(set(r)) and len(r) == 6 and all(0 <= t < 1000 for t in r)
    assert r != TimestepPolicy(kind="random", count=6, seed=4).timesteps()
    with pytest.raises(ValueError, match=r"\[0, 1000\)"):
        TimestepPolicy(kind="list", values=[3, 1000])
    with pytest.raises(ValueError, match="count"):
        TimestepPolicy(kind="uniform", count=0)
    with pytest.raises(ValueError, match="duplicate"):
        TimestepPolicy(kind="list", values=[3, 3])
    with pytest.raises(ValueError, match="kind"):
        TimestepPolicy(kind="linear")
    with pytest.raises(ValueError, match=r"\[0, 1000\)"):
        per_step_features(tiny_model(False), _x0(dtype=torch.float32), IDS, [-1], FeaturizeArgs())


def test_aggregate_and_args_validation() -> None:
    f = torch.arange(24.0).reshape(2, 3, 4)
    torch.testing.assert_close(aggregate(f, "mean"), f.mean(dim=1))
    assert aggregate(f, "per-step") is f
    with pytest.raises(ValueError, match="aggregate"):
        aggregate(f, "sum")
    with pytest.raises(ValueError, match="output"):
        FeaturizeArgs(output="squares")
    with pytest.raises(ValueError, match="num_noise"):
        FeaturizeArgs(num_noise=0)
    args = FeaturizeArgs(
        timesteps={"kind": "list", "values": [1]}, projector={"kind": "identity", "dim": 1}
    )
    assert args.timesteps.timesteps() == [1] and args.projector.kind == "identity"


@pytest.mark.parametrize("kind", ["gaussian", "kronecker"])
def test_nan_parameter_names_the_sample(kind: str) -> None:
    model = tiny_model(False)
    with torch.no_grad():
        model.unet.conv_out.bias.fill_(float("nan"))
    args = FeaturizeArgs(projector=ProjectorConfig(kind=kind, dim=64), batch_size=4)
    with pytest.raises(NonFiniteGradientError, match="sample id 10 at timestep 3"):
        per_step_features(model, _x0(dtype=torch.float32), IDS, [3, 30], args)


@pytest.mark.parametrize("kind", ["identity", "kronecker"])
def test_nan_output_names_the_sample(kind: str, monkeypatch: pytest.MonkeyPatch) -> None:
    def nan_for_big_t(eps, noise, t, ac, betas):
        # Infinite (gradient inf/NaN) only at t >= 500: the later timestep is named, not row 0.
        # (torch.where would leak NaN into every row's gradient.)
        v = eps.reshape(eps.shape[0], -1).pow(2).mean(dim=1)
        return v / (t < 500).to(v.dtype)

    monkeypatch.setitem(fz.OUTPUTS, "nan-test", nan_for_big_t)
    model = tiny_model(False)
    args = FeaturizeArgs(
        output="nan-test", projector=ProjectorConfig(kind=kind, dim=64), batch_size=8
    )
    with pytest.raises(NonFiniteGradientError, match="sample id 10 at timestep 800"):
        per_step_features(model, _x0(dtype=torch.float32), IDS, [100, 800], args)


def test_method_default_timesteps_follow_the_schedule() -> None:
    """d-trak's defaults (225 timesteps from T // 10) on a 1000-step and a 100-step schedule."""
    from diffattr.attribution.methods.das import DASOptions
    from diffattr.attribution.methods.dtrak import DTrakOptions

    full = DTrakOptions().timestep_policy(1000).timesteps()
    assert len(full) == 225 and full[0] == 100 and full[-1] < 1000
    assert DTrakOptions().timestep_policy(100).timesteps() == list(range(10, 100))
    assert len(DASOptions().timestep_policy(1000).timesteps()) == 125
    assert DASOptions().timestep_policy(1000).timesteps()[0] == 0
    # An explicit t_min is kept, and one past the schedule is still an error.
    assert DTrakOptions(t_min=0, timesteps=4).timestep_policy(1000).timesteps() == [
        0,
        250,
        500,
        750,
    ]
    with pytest.raises(ValueError, match="t_min"):
        DTrakOptions(t_min=100).timestep_policy(100)
    with pytest.raises(ValueError, match="t_min"):
        DTrakOptions(t_min=-1)
