"""EK-FAC / K-FAC influence functions (``ekfac``, ``kfac``) against brute force, in float64."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import Tensor, nn

from diffattr.attribution import curvature as cv
from diffattr.attribution.base import Queries
from diffattr.attribution.featurize import row_noise
from diffattr.attribution.gradients import per_sample_grads_loop, scheduler_tables
from diffattr.attribution.methods import ekfac as ek
from diffattr.attribution.methods.common import featurize_images
from diffattr.attribution.outputs import OUTPUTS
from diffattr.attribution.registry import make_attributor
from diffattr.attribution.store import StoreMismatchError
from diffattr.data.dataset import ImageDataset
from diffattr.errors import OptionError
from diffattr.testing import tiny_model

F64 = torch.float64
# One conv (im2col positions) and one attention projection (token positions) of the tiny UNet.
SUBSET = ["conv_out.*", "mid_block.attentions.0.to_v.*"]


class ConvTokens(nn.Module):
    """Conv2d (stride 2, padding 1) -> tanh -> tokens ``(B, H'W', C)`` -> Linear -> output."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(2, 3, 3, stride=2, padding=1)
        self.lin = nn.Linear(3, 4)

    def forward(self, x: Tensor) -> Tensor:
        h = torch.tanh(self.conv(x))
        return self.lin(h.flatten(2).transpose(1, 2))


def small_net() -> tuple[ConvTokens, Tensor]:
    torch.manual_seed(0)
    net = ConvTokens().to(F64)
    return net, torch.randn(5, 2, 5, 5, dtype=F64)


def captured_rows(
    net: nn.Module, x: Tensor, vecs: Tensor
) -> tuple[cv.KroneckerProjector, dict[str, tuple[Tensor, Tensor]]]:
    """Per layer (inputs, output gradients) of ``sum(net(x) * vecs)``."""
    layers = cv.curvature_layers(net, None)
    with layers.capture() as calls, torch.enable_grad():
        rows = cv.output_grads(layers, calls, (net(x) * vecs).sum())
    return layers, rows


def layer_grad(net: nn.Module, name: str, value: Tensor) -> Tensor:
    """``[dW | db]`` ``(d_out, d_in)`` of a scalar ``value``."""
    m = net.get_submodule(name)
    gw, gb = torch.autograd.grad(value, [m.weight, m.bias], retain_graph=True)
    return torch.cat([gw.reshape(gw.shape[0], -1), gb[:, None]], dim=1)


def test_factors_match_loops() -> None:
    net, x = small_net()
    vecs = torch.randn(5, 9, 4, dtype=F64)
    _, rows = captured_rows(net, x, vecs)
    N = x.shape[0]
    # conv: im2col patches built by hand from the padded input, output gradients per position
    with torch.enable_grad():
        pre = net.conv(x)
        g_out = torch.autograd.grad(
            (net.lin(torch.tanh(pre).flatten(2).transpose(1, 2)) * vecs).sum(), pre
        )[0]
    xp = nn.functional.pad(x, (1, 1, 1, 1))
    A = torch.zeros(19, 19, dtype=F64)
    S = torch.zeros(3, 3, dtype=F64)
    for b in range(N):
        for i in range(3):
            for j in range(3):
                a = torch.cat(
                    [
                        xp[b, :, 2 * i : 2 * i + 3, 2 * j : 2 * j + 3].flatten(),
                        torch.ones(1, dtype=F64),
                    ]
                )
                A += torch.outer(a, a) / 9
                S += torch.outer(g_out[b, :, i, j], g_out[b, :, i, j])
    got_a, got_s = cv.factor_sums(*rows["conv"])
    torch.testing.assert_close(got_a / N, A / N, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(got_s / N, S / N, rtol=1e-12, atol=1e-12)
    # linear: every token is a position
    h = torch.tanh(net.conv(x)).flatten(2).transpose(1, 2).detach()
    A = sum(
        torch.outer(
            torch.cat([h[b, p], torch.ones(1, dtype=F64)]),
            torch.cat([h[b, p], torch.ones(1, dtype=F64)]),
        )
        / 9
        for b in range(N)
        for p in range(9)
    )
    S = sum(torch.outer(vecs[b, p], vecs[b, p]) for b in range(N) for p in range(9))
    got_a, got_s = cv.factor_sums(*rows["lin"])
    torch.testing.assert_close(got_a, A, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(got_s, S, rtol=1e-12, atol=1e-12)


def per_sample_layer_grads(net: nn.Module, x: Tensor, vecs: Tensor, name: str) -> Tensor:
    """``(N, d_out, d_in)`` pseudo-gradients, one autograd call per sample."""
    out = []
    for b in range(x.shape[0]):
        with torch.enable_grad():
            out.append(layer_grad(net, name, (net(x[b : b + 1]) * vecs[b : b + 1]).sum()))
    return torch.stack(out)


def test_ekfac_eigenvalues_from_per_sample_gradients() -> None:
    net, x = small_net()
    vecs = torch.randn(5, 9, 4, dtype=F64)
    _, rows = captured_rows(net, x, vecs)
    for name in ("conv", "lin"):
        A, S = (f / x.shape[0] for f in cv.factor_sums(*rows[name]))
        _, qa, _, qs = cv.eigenbasis(A, S)
        grads = per_sample_layer_grads(net, x, vecs, name)
        torch.testing.assert_close(cv.sample_grads(*rows[name]), grads, rtol=1e-10, atol=1e-12)
        want = torch.stack([(qs.T @ g @ qa) ** 2 for g in grads]).mean(dim=0)
        got = cv.eigen_sums(*rows[name], qa, qs) / x.shape[0]
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-14)


def test_precondition_equals_dense_solve() -> None:
    g = torch.Generator().manual_seed(1)
    d_out, d_in = 3, 4
    ma, ms = (
        torch.randn(d_in, 9, generator=g, dtype=F64),
        torch.randn(d_out, 7, generator=g, dtype=F64),
    )
    A, S = ma @ ma.T / 9, ms @ ms.T / 7
    grad = torch.randn(d_out, d_in, generator=g, dtype=F64)
    ea, qa, es, qs = cv.eigenbasis(A, S)
    kfac = cv.LayerCurvature.build(qa, qs, cv.kfac_eigen(ea, es), 0.1)
    # damping = 0.1 x the mean eigenvalue of kron(S, A)
    assert kfac.damping == pytest.approx(
        0.1 * float(torch.trace(S) * torch.trace(A)) / (d_in * d_out)
    )
    eye = torch.eye(d_in * d_out, dtype=F64)
    want = torch.linalg.solve(torch.kron(S, A) + kfac.damping * eye, grad.flatten())
    torch.testing.assert_close(kfac.precondition(grad).flatten(), want, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(kfac.dense(), torch.kron(S, A), rtol=1e-10, atol=1e-12)
    eigen = torch.rand(d_out, d_in, generator=g, dtype=F64)
    ekfac = cv.LayerCurvature.build(qa, qs, eigen, 0.1)
    q = torch.kron(qs, qa)
    dense = q @ torch.diag(eigen.flatten()) @ q.T
    want = torch.linalg.solve(dense + ekfac.damping * eye, grad.flatten())
    torch.testing.assert_close(ekfac.precondition(grad).flatten(), want, rtol=1e-10, atol=1e-12)
    # batched: (..., d_out, d_in)
    both = ekfac.precondition(torch.stack([grad, 2 * grad]))
    torch.testing.assert_close(both[1], 2 * ekfac.precondition(grad))


def exact_ggn_and_approximations(
    net: nn.Module, x: Tensor, name: str
) -> tuple[Tensor, Tensor, Tensor]:
    """The layer's exact GGN ``1/N sum_n J_n^T (2/D) J_n`` (Jacobians by jacrev) and its K-FAC /
    EK-FAC approximations from the exact pseudo-gradients (every output direction ``e_k``)."""
    m = net.get_submodule(name)
    N = x.shape[0]
    D = math.prod(net(x[:1]).shape[1:])

    def out(w: Tensor, b: Tensor, xb: Tensor) -> Tensor:
        params = {f"{name}.weight": w, f"{name}.bias": b}
        return torch.func.functional_call(net, params, (xb[None],)).flatten()

    ggn = 0
    for b in range(N):
        jw, jb = torch.func.jacrev(out, argnums=(0, 1))(m.weight, m.bias, x[b])
        J = torch.cat([jw.reshape(D, m.weight.shape[0], -1), jb[:, :, None]], dim=2).reshape(D, -1)
        ggn = ggn + J.T @ J * (2 / D) / N
    # exact pseudo-gradients: each (sample, output direction) is a row; A sees each input D times
    xs = x.repeat_interleave(D, dim=0)
    vecs = (
        (torch.eye(D, dtype=F64) * math.sqrt(2 / D))
        .repeat(N, 1)
        .reshape(N * D, *net(x[:1]).shape[1:])
    )
    _, rows = captured_rows(net, xs, vecs)
    A_sum, S_sum = cv.factor_sums(*rows[name])
    A, S = A_sum / (N * D), S_sum / N
    ea, qa, es, qs = cv.eigenbasis(A, S)
    lam = cv.eigen_sums(*rows[name], qa, qs) / N
    kfac = cv.LayerCurvature.build(qa, qs, cv.kfac_eigen(ea, es), 0.1).dense()
    ekfac = cv.LayerCurvature.build(qa, qs, lam, 0.1).dense()
    return ggn.detach(), kfac, ekfac


def test_ekfac_is_closer_to_the_exact_ggn_than_kfac(capsys: pytest.CaptureFixture[str]) -> None:
    net, x = small_net()
    for name in ("conv", "lin"):
        ggn, kfac, ekfac = exact_ggn_and_approximations(net, x, name)
        err_k = float(torch.linalg.norm(ggn - kfac) / torch.linalg.norm(ggn))
        err_e = float(torch.linalg.norm(ggn - ekfac) / torch.linalg.norm(ggn))
        with capsys.disabled():
            print(f"\n{name}: relative Frobenius error K-FAC {err_k:.4f}, EK-FAC {err_e:.4f}")
        assert err_e <= err_k + 1e-12
        assert 0 < err_e < 1
    # one Linear on one position with MSE: GGN = (2/D) I (x) E[a a^T] is exactly Kronecker
    torch.manual_seed(2)
    lin = nn.Linear(3, 4).to(F64)
    ggn, kfac, ekfac = exact_ggn_and_approximations(
        nn.Sequential(lin), torch.randn(6, 3, dtype=F64), "0"
    )
    torch.testing.assert_close(kfac, ggn, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(ekfac, ggn, rtol=1e-10, atol=1e-12)


# ------------------------------------------------------------------------------ tiny UNet


@pytest.fixture(scope="module")
def model64():
    return tiny_model(num_train_timesteps=100, dtype=F64)


@pytest.fixture(scope="module")
def train() -> ImageDataset:
    g = torch.Generator().manual_seed(3)
    images = torch.rand(7, 1, 8, 8, generator=g) * 2 - 1
    return ImageDataset("toy", images, torch.tensor([40, 2, 17, 8, 33, 5, 21]))


def as_layer(grads: dict[str, Tensor], ly: cv.KroneckerLayer) -> Tensor:
    """Per-sample gradients name -> ``(n, *shape)`` as ``[dW | db]`` ``(n, d_out, d_in)``."""
    w, b = grads[ly.weight_name], grads[ly.bias_name or ""]
    return torch.cat([w.reshape(w.shape[0], w.shape[1], -1), b[:, :, None]], dim=2)


def test_unet_pass_matches_per_sample_gradients(model64, train) -> None:
    """Batched pass statistics == per-image brute force with the true parameter gradients."""
    train = ImageDataset("toy64", train.images.to(F64), train.ids)
    layers = cv.curvature_layers(model64.unet, SUBSET)
    stats = ek.ggn_pass(model64, layers, train, 1, 5, batch_size=3)
    one_by_one = ek.ggn_pass(model64, layers, train, 1, 5, batch_size=1)
    for name in stats:
        for got, want in zip(stats[name], one_by_one[name], strict=True):
            torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-14)
    bases = {n: cv.eigenbasis(*stats[n])[1::2] for n in stats}
    lam = ek.ggn_pass(model64, layers, train, 1, 5, batch_size=3, bases=bases)
    # brute force: per-sample gradients of sum(eps * v) w.r.t. the real parameters (vmap)
    t, noise, vecs = ek.pass_draws(5, train.ids.tolist(), 1, (1, 8, 8), 100)
    x_t = model64.scheduler.add_noise(train.images, noise.to(F64), t)
    params = dict(model64.unet.named_parameters())
    sel = {n: params[n] for ly in layers.layers for n in (ly.weight_name, ly.bias_name) if n}
    grads = per_sample_grads_loop(
        model64, x_t, t, vecs.to(F64), lambda e, v, *_: (e * v).flatten(1).sum(1), sel
    )
    for ly in layers.layers:
        G = as_layer(grads, ly)
        qa, qs = bases[ly.name]
        want = ((qs.T @ G @ qa) ** 2).mean(dim=0)
        torch.testing.assert_close(lam[ly.name][0], want, rtol=1e-8, atol=1e-16)


def brute_force_grads(model, images, ids, timesteps, output, seed, names) -> dict[str, Tensor]:
    """Per image, the mean over timesteps of the output's gradient (shared noise), name -> (n, ...)."""
    ac, betas = scheduler_tables(model, torch.device("cpu"), F64)
    params = dict(model.unet.named_parameters())
    total: dict[str, Tensor] = {}
    for t in timesteps:
        tt = torch.full((images.shape[0],), t)
        noise = row_noise(ids, tt, torch.zeros_like(tt), (1, 8, 8), seed, "shared").to(F64)
        x_t = model.scheduler.add_noise(images, noise, tt)
        g = per_sample_grads_loop(
            model, x_t, tt, noise, OUTPUTS[output], {n: params[n] for n in names}
        )
        total = {n: total.get(n, 0) + g[n] / len(timesteps) for n in names}
    return total


@pytest.mark.parametrize(
    ("method", "measurement", "output"),
    [("ekfac", "elbo", "loss"), ("kfac", "elbo", "loss"), ("ekfac", "square", "square")],
)
def test_scores_equal_the_dense_formula(
    model64, train, method: str, measurement: str, output: str
) -> None:
    """score = g_q^T (G + damping I)^-1 g_i with the dense per-layer (E)K-FAC matrices, exact
    (identity projector) on a parameter subset; measurement elbo (or square) on the query side,
    the training side's output loss (or square)."""
    train = ImageDataset("toy64", train.images.to(F64), train.ids)
    attr = make_attributor(
        method,
        model64,
        None,
        projector="identity",
        params=SUBSET,
        timesteps=3,
        seed=1,
        factor_passes=2,
        batch_size=4,
        measurement=measurement,
        output=output,
    )
    attr.fit(train)
    queries = Queries(images=train.images[[1, 4]] + 0.05, names=["a", "b"])
    s = attr.score(queries)
    ts = attr.query_args().timesteps.timesteps()
    want = dense_scores(attr, model64, train, queries.images, ts, measurement, output)
    tol = {"rtol": 1e-4, "atol": 1e-6 * float(want.abs().max())}
    np.testing.assert_allclose(s.values, want.numpy(), **tol)
    # the stability halves: samples (here timesteps) alternate, on both sides
    assert s.halves is not None and s.halves.shape == (2, 2, len(train))
    for h in (0, 1):
        want = dense_scores(attr, model64, train, queries.images, ts[h::2], measurement, output)
        np.testing.assert_allclose(s.halves[h], want.numpy(), **tol)


def dense_scores(
    attr,
    model,
    train: ImageDataset,
    queries: Tensor,
    ts: list[int],
    measurement: str,
    output: str = "loss",
) -> Tensor:
    """``g_q^T (G + damping I)^-1 g_i`` ``(m, n)``: per layer, the dense (E)K-FAC matrix of the
    fitted curvature, gradients by brute force (``output`` for training images, ``measurement``
    for queries)."""
    names = [n for ly in attr.layers.layers for n in (ly.weight_name, ly.bias_name) if n]
    g_train = brute_force_grads(model, train.images, train.ids, ts, output, 1, names)
    zeros = torch.zeros(queries.shape[0], dtype=torch.int64)
    g_query = brute_force_grads(model, queries, zeros, ts, measurement, 1, names)
    out = torch.zeros(queries.shape[0], len(train), dtype=F64)
    for ly in attr.layers.layers:
        c = attr.curvature[ly.name]
        matrix = c.dense() + c.damping * torch.eye(ly.d_in * ly.d_out, dtype=F64)
        pre = torch.linalg.solve(matrix, as_layer(g_query, ly).flatten(1).T).T
        out += pre @ as_layer(g_train, ly).flatten(1).T
    return out


@pytest.mark.parametrize("method", ["ekfac", "kfac", "ggn"])
def test_exact_copy_ranks_first(train, method: str) -> None:
    model = tiny_model(num_train_timesteps=100)
    passes = {"factor_passes": 20} if method == "ggn" else {}
    attr = make_attributor(
        method, model, None, timesteps=10, proj_dim=512, batch_size=16, seed=1, **passes
    )
    attr.fit(train)
    s = attr.score(Queries(images=train.images, names=[f"q{i}" for i in range(len(train))]))
    np.testing.assert_array_equal(s.values.argmax(axis=1), np.arange(len(train)))


def test_options_are_checked(model64) -> None:
    with pytest.raises(OptionError, match="measurement"):
        make_attributor("ekfac", model64, None, measurement="squared")
    with pytest.raises(OptionError, match="damping"):
        make_attributor("kfac", model64, None, damping=0)
    with pytest.raises(OptionError, match="space"):
        make_attributor("ekfac", model64, None, projector="gaussian")
    with pytest.raises(OptionError, match="factor_passes"):
        make_attributor("ekfac", model64, None, factor_passes=0)


def test_stores_reuse_refuse_and_resume(train, tmp_path, monkeypatch) -> None:
    model = tiny_model(num_train_timesteps=100)
    opts = dict(timesteps=2, proj_dim=64, batch_size=8, seed=1, factor_passes=3)
    real = ek.ggn_pass
    calls: list[tuple[int, bool]] = []

    def counting(*args, **kwargs):
        p, corrected = args[3], kwargs.get("bases") is not None
        calls.append((p, corrected))
        if fail_at == (p, corrected):
            raise KeyboardInterrupt("killed")
        return real(*args, **kwargs)

    monkeypatch.setattr(ek, "ggn_pass", counting)
    # a kill during factor pass 1: pass 0 is on disk
    fail_at: tuple[int, bool] | None = (1, False)
    with pytest.raises(KeyboardInterrupt):
        make_attributor("ekfac", model, tmp_path, **opts).fit(train)
    assert calls == [(0, False), (1, False)]
    calls.clear()
    fail_at = None
    attr = make_attributor("ekfac", model, tmp_path, **opts)
    attr.fit(train)
    assert calls == [(1, False), (2, False), (0, True), (1, True), (2, True)]
    first = attr.score(Queries(train.images[:2], ["a", "b"])).values
    # reopened: nothing recomputed, same scores
    calls.clear()
    again = make_attributor("ekfac", model, tmp_path, **opts)
    again.fit(train)
    assert calls == []
    np.testing.assert_array_equal(again.score(Queries(train.images[:2], ["a", "b"])).values, first)
    # kfac shares the factor store
    make_attributor("kfac", model, tmp_path, **opts).fit(train)
    assert calls == []
    # another model: another folder; its identity in the first model's folder is refused
    other = tiny_model(seed=1, num_train_timesteps=100)
    attr2 = make_attributor("kfac", other, tmp_path, **opts)
    attr2.fit(train)
    assert attr2.info["factor_store"] != attr.info["factor_store"]
    ident = ek.factor_identity(other, attr2.space(), train, 3, 1)
    with pytest.raises(StoreMismatchError, match="model_hash") as err:
        ek.curvature_store(attr.info["factor_store"], ident, 3, 1, lambda p: torch.zeros(1), False)
    assert "\n" not in str(err.value)


def test_projected_space(train) -> None:
    """``space="projected"``: the factors are the projected full-space ones
    (``P_in^T A P_in``, ``P_out^T S P_out``) and the query features, before preconditioning, are
    the featurizer's own projected gradients (same layout as the training features)."""
    model = tiny_model(num_train_timesteps=100)
    opts = dict(timesteps=3, proj_dim=64, batch_size=8, seed=1, factor_passes=2, params=SUBSET)
    full = make_attributor("kfac", model, None, space="full", **opts)
    full.fit(train)
    proj = make_attributor("kfac", model, None, **opts)
    proj.fit(train)
    projector = proj.projector()
    for ly in projector.layers:
        p_in, p_out = projector.matrices(ly, "cpu")
        p = torch.kron(p_out, p_in).to(F64)
        want = p.T @ full.curvature[ly.name].dense() @ p
        got = proj.curvature[ly.name].dense()
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6 * float(want.abs().max()))
    for c in proj.curvature.values():  # identity preconditioner
        c.eigen, c.damping = torch.zeros_like(c.eigen), 1.0
    queries = Queries(train.images[:2] + 0.1, ["a", "b"])
    args = proj.query_args()
    ref = featurize_images(model, queries.images, None, args.timesteps.timesteps(), args, "mean")
    got = proj.query_features(queries)
    torch.testing.assert_close(got.full, ref.full, rtol=1e-4, atol=1e-6)
    assert got.halves is not None and ref.halves is not None
    torch.testing.assert_close(got.halves[1], ref.halves[1], rtol=1e-4, atol=1e-6)


def test_methods_with_the_same_features_share_one_work_folder(train, tmp_path) -> None:
    """trak, grad-dot, grad-cos, ekfac and kfac all use projected loss gradients: in one work
    folder they are computed once; ekfac and kfac also share the GGN factors."""
    model = tiny_model(num_train_timesteps=100)
    opts = dict(timesteps=3, proj_dim=64, batch_size=8, seed=1)
    for name in ("trak", "grad-dot", "grad-cos", "ekfac", "kfac"):
        extra = {"factor_passes": 2} if name in ("ekfac", "kfac") else {}
        make_attributor(name, model, tmp_path, **opts, **extra).fit(train)
    names = sorted(p.name.rsplit("-", 1)[0] for p in tmp_path.iterdir())
    assert names == ["influence-eigen", "influence-factors", "loss-grads"]


# ------------------------------------------------------------------------ ggn (dense GGN)


def pseudo_gradients(model, train: ImageDataset, layers, passes: int, seed: int) -> Tensor:
    """``(passes, n, K)``: per pass and image (id order) the ``[dW | db]`` gradients of
    ``sum(eps * v)`` at the pass's draws, by a per-sample loop, layers concatenated."""
    order = torch.argsort(train.ids)
    images, ids = train.images[order], train.ids[order]
    params = dict(model.unet.named_parameters())
    sel = {n: params[n] for ly in layers.layers for n in (ly.weight_name, ly.bias_name) if n}
    out = []
    for p in range(passes):
        t, noise, vecs = ek.pass_draws(seed, ids.tolist(), p, (1, 8, 8), 100)
        x_t = model.scheduler.add_noise(images, noise.to(F64), t)
        grads = per_sample_grads_loop(
            model, x_t, t, vecs.to(F64), lambda e, v, *_: (e * v).flatten(1).sum(1), sel
        )
        out.append(torch.cat([as_layer(grads, ly).flatten(1) for ly in layers.layers], dim=1))
    return torch.stack(out)


@pytest.mark.parametrize("block_diagonal", [False, True])
def test_ggn_scores_equal_the_dense_formula(model64, train, block_diagonal: bool) -> None:
    """score = g_q^T (G + Lambda)^-1 g_i, G the mean outer product of brute-force
    pseudo-gradients at the passes' draws, Lambda per layer 0.1 x its block's mean diagonal,
    exact (identity projector) on a parameter subset; cross-layer blocks kept or zeroed."""
    train = ImageDataset("toy64", train.images.to(F64), train.ids)
    opts = dict(projector="identity", params=SUBSET, timesteps=3, seed=1, batch_size=4)
    attr = make_attributor(
        "ggn", model64, None, factor_passes=3, block_diagonal=block_diagonal, **opts
    )
    attr.fit(train)
    phi = pseudo_gradients(model64, train, attr.layers, 3, 1)
    ggn = torch.einsum("pni,pnj->ij", phi, phi) / (3 * len(train))
    # the store keeps float32 pseudo-gradients
    torch.testing.assert_close(attr.ggn, ggn, rtol=1e-4, atol=1e-6 * float(ggn.abs().max()))
    sizes = [ly.d_out * ly.d_in for ly in attr.layers.layers]
    matrix = torch.zeros_like(ggn)
    pos = 0
    for size in sizes:
        sl = slice(pos, pos + size)
        block = ggn[sl, sl]
        matrix[sl, sl] = block + 0.1 * torch.diagonal(block).mean() * torch.eye(size, dtype=F64)
        pos += size
    if not block_diagonal:
        matrix += ggn - torch.block_diag(*[ggn[s, s] for s in layer_ranges(sizes)])
    queries = Queries(images=train.images[[1, 4]] + 0.05, names=["a", "b"])
    s = attr.score(queries)
    ts = attr.query_args().timesteps.timesteps()
    names = [n for ly in attr.layers.layers for n in (ly.weight_name, ly.bias_name) if n]
    g_train = brute_force_grads(model64, train.images, train.ids, ts, "loss", 1, names)
    zeros = torch.zeros(2, dtype=torch.int64)
    g_query = brute_force_grads(model64, queries.images, zeros, ts, "loss", 1, names)
    flat = [
        torch.cat([as_layer(g, ly).flatten(1) for ly in attr.layers.layers], 1)
        for g in (g_query, g_train)
    ]
    want = torch.linalg.solve(matrix, flat[0].T).T @ flat[1].T
    np.testing.assert_allclose(
        s.values, want.numpy(), rtol=1e-4, atol=1e-6 * float(want.abs().max())
    )
    if block_diagonal:  # then each layer is preconditioned on its own, as ekfac does
        assert attr.info["ggn"]["block_diagonal"] is True


def layer_ranges(sizes: list[int]) -> list[slice]:
    out, pos = [], 0
    for size in sizes:
        out.append(slice(pos, pos + size))
        pos += size
    return out


def test_ggn_projected_is_the_projection_of_the_full_one(train) -> None:
    """In the Kronecker-projected space the dense GGN is ``P^T G P`` (``P``: per layer
    ``P_out (x) P_in``, block-diagonal over layers) of the unprojected one from the same draws,
    cross-layer blocks included."""
    model = tiny_model(num_train_timesteps=100)
    opts = dict(timesteps=2, batch_size=8, seed=1, factor_passes=2, params=SUBSET)
    full = make_attributor("ggn", model, None, projector="identity", **opts)
    full.fit(train)
    proj = make_attributor("ggn", model, None, proj_dim=64, **opts)
    proj.fit(train)
    projector = proj.projector()
    blocks = []
    for ly in projector.layers:
        p_in, p_out = projector.matrices(ly, "cpu")
        blocks.append(torch.kron(p_out, p_in).to(F64))
    p = torch.block_diag(*blocks)
    want = p.T @ full.ggn @ p
    torch.testing.assert_close(proj.ggn, want, rtol=1e-4, atol=1e-6 * float(want.abs().max()))


def test_ggn_options_are_checked(model64, train, monkeypatch) -> None:
    from diffattr.attribution.methods import ggn as ggn_mod

    with pytest.raises(OptionError, match="space"):
        make_attributor("ggn", model64, None, space="full")
    with pytest.raises(OptionError, match="block_diagonal"):
        make_attributor("ggn", model64, None, block_diagonal="yes")
    monkeypatch.setattr(ggn_mod, "MAX_DIMS", 10)
    attr = make_attributor("ggn", model64, None, proj_dim=64, factor_passes=1, timesteps=1)
    with pytest.raises(ValueError, match="over 10"):
        attr.fit(ImageDataset("toy64", train.images.to(F64), train.ids))
