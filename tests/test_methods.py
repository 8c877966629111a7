"""Each attribution method against its formula, computed here from explicit autograd gradients.

The references below take one ``torch.autograd.grad`` per (image, timestep, noise draw) on a tiny
UNet, with the same noise the featurizer uses (``noise_for`` under the method's noise policy), the
identity projector (so features are raw gradients of the selected parameters), and closed-form
kernels in float64 numpy. Queries are seeded by their content (``content_ids``), never their name.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from diffattr import testing
from diffattr.attribution.base import Queries, Trajectory
from diffattr.attribution.methods.common import content_ids
from diffattr.attribution.registry import ATTRIBUTORS, list_attributors, make_attributor
from diffattr.attribution.store import FeatureStore
from diffattr.attribution.timesteps import noise_for
from diffattr.data.dataset import ImageDataset
from diffattr.diffusion.model import DiffusionModel, load_model, save_model

PARAMS = ["conv_in.*", "conv_out.*"]
BASE = dict(projector="identity", params=PARAMS, batch_size=5, seed=3)
T_TRAIN = 100


def tiny_model(seed: int = 0) -> DiffusionModel:
    return testing.tiny_model(seed, num_train_timesteps=T_TRAIN)


@pytest.fixture(scope="module")
def model() -> DiffusionModel:
    return tiny_model()


@pytest.fixture(scope="module")
def train() -> ImageDataset:
    g = torch.Generator().manual_seed(11)
    return ImageDataset(
        "toy", torch.rand(5, 1, 8, 8, generator=g) * 2 - 1, torch.tensor([7, 3, 20, 4, 9])
    )


@pytest.fixture(scope="module")
def queries() -> Queries:
    g = torch.Generator().manual_seed(12)
    return Queries(images=torch.rand(3, 1, 8, 8, generator=g) * 2 - 1, names=["a", "b", "c"])


# ------------------------------------------------------------------------------ references


def outputs(name: str, eps: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    if name == "loss":
        return ((eps - noise) ** 2).mean()
    if name == "square":
        return (eps**2).mean()
    if name == "average":
        return eps.mean()
    raise KeyError(name)


def ref_grad(
    m: DiffusionModel,
    x0: torch.Tensor,
    sid: int,
    t: int,
    draw: int,
    output: str,
    seed: int,
    policy: str = "shared",
) -> np.ndarray:
    """Gradient (float64 numpy, selected params in named order) for one image, t and draw."""
    params = [p for n, p in m.unet.named_parameters() if n.startswith(("conv_in.", "conv_out."))]
    noise = noise_for(seed, sid, t, draw, tuple(x0.shape), policy)
    tt = torch.tensor([t])
    x_t = m.scheduler.add_noise(x0[None], noise[None], tt)
    with torch.enable_grad():
        eps = m.unet(x_t, tt).sample
        val = outputs(output, eps, noise[None])
        gs = torch.autograd.grad(val, params)
    return torch.cat([g.flatten() for g in gs]).double().numpy()


def ref_features(
    m: DiffusionModel,
    images: torch.Tensor,
    ids: list[int],
    ts: list[int],
    output: str = "loss",
    normalize: bool = False,
    draws: int = 1,
    seed: int = 3,
    policy: str = "shared",
    half: int | None = None,
) -> np.ndarray:
    """Mean over timesteps and draws of (optionally unit-normalised) gradients: ``(n, k)``.

    ``half`` 0 / 1: only the even / odd (t, draw) samples in timestep-major order (the halves
    behind the stability figure)."""
    rows = []
    for x0, sid in zip(images, ids, strict=True):
        acc = []
        for t in ts:
            for d in range(draws):
                g = ref_grad(m, x0, sid, t, d, output, seed, policy)
                acc.append(g / np.linalg.norm(g) if normalize else g)
        rows.append(np.mean(acc if half is None else acc[half::2], axis=0))
    return np.stack(rows)


def kernel(train: np.ndarray, query: np.ndarray, lam: float) -> np.ndarray:
    return query @ np.linalg.solve(train.T @ train + lam * np.eye(train.shape[1]), train.T)


def close(got: np.ndarray, want: np.ndarray, rtol: float = 2e-3) -> None:
    scale = np.abs(want).max()
    assert scale > 0
    np.testing.assert_allclose(got, want, rtol=0, atol=rtol * scale)


def qids(q: Queries) -> list[int]:
    return [int(i) for i in content_ids(q.images)]


# ------------------------------------------------------------------------------ registry


def test_registry_lists_every_method_with_description() -> None:
    names = [n for n, _ in list_attributors()]
    assert names == list(ATTRIBUTORS)
    for required in (
        "trak",
        "d-trak",
        "journey-trak",
        "das",
        "tracin",
        "grad-dot",
        "grad-cos",
        "diff-retrac",
        "pixel",
    ):
        assert required in names
    assert all(desc and "\n" not in desc for _, desc in list_attributors())


def test_bad_names_and_options_are_explained(model: DiffusionModel) -> None:
    with pytest.raises(ValueError, match=r"unknown; valid names: trak, d-trak"):
        make_attributor("trek", model)
    with pytest.raises(
        ValueError, match=r"unknown option\(s\) proj_dimm; valid options: .*proj_dim"
    ):
        make_attributor("trak", model, proj_dimm=3)
    with pytest.raises(ValueError, match="output"):
        make_attributor("d-trak", model, output="cube")
    with pytest.raises(ValueError, match="proj_dim"):
        make_attributor("trak", model, proj_dim=0)
    with pytest.raises(ValueError, match="learning_rates: 2 values for 1"):
        make_attributor("tracin", model, learning_rates=[1.0, 2.0])
    with pytest.raises(RuntimeError, match="fit"):
        make_attributor("trak", model).score(Queries(images=torch.zeros(1, 1, 8, 8), names=["x"]))


# ------------------------------------------------------------------------------ methods


@pytest.mark.parametrize("policy", ["shared", "per-sample"])
@pytest.mark.parametrize(("name", "output"), [("trak", "loss"), ("d-trak", "square")])
def test_trak_and_dtrak_match_closed_form(
    model, train, queries, name: str, output: str, policy: str
) -> None:
    ts = [10, 60]
    a = make_attributor(name, model, timestep_values=ts, lam=0.05, noise=policy, **BASE)
    a.fit(train)
    s = a.score(queries)
    phi = ref_features(model, train.images, train.ids.tolist(), ts, output, policy=policy)
    q = ref_features(model, queries.images, qids(queries), ts, output, policy=policy)
    close(s.values, kernel(phi, q, 0.05))
    assert s.config["lambda"] == 0.05 and s.config["timesteps"] == ts
    assert list(s.train_ids) == train.ids.tolist() and s.method == name
    # The stability figure: two attributions from disjoint halves of the samples, training and
    # query side alike (here: t = 10 in one half, t = 60 in the other).
    assert s.halves is not None
    for h in (0, 1):
        ph = ref_features(
            model, train.images, train.ids.tolist(), ts, output, policy=policy, half=h
        )
        qh = ref_features(model, queries.images, qids(queries), ts, output, policy=policy, half=h)
        close(s.halves[h], kernel(ph, qh, 0.05))


@pytest.mark.parametrize("name, output", [("trak", "loss"), ("d-trak", "square")])
def test_normalize_option_unit_normalises_each_sample(model, train, queries, name, output) -> None:
    """``normalize: true`` (DAS's per-sample, per-timestep normalisation) on trak / d-trak."""
    ts = [10, 60]
    a = make_attributor(name, model, timestep_values=ts, lam=0.05, normalize=True, **BASE)
    a.fit(train)
    phi = ref_features(model, train.images, train.ids.tolist(), ts, output, normalize=True)
    q = ref_features(model, queries.images, qids(queries), ts, output, normalize=True)
    close(a.score(queries).values, kernel(phi, q, 0.05))
    with pytest.raises(ValueError, match="normalize"):
        make_attributor(name, model, normalize="yes")


def test_query_budget_is_its_own(model, train, queries) -> None:
    """Query features average query_timesteps x query_num_noise samples; training ones do not."""
    a = make_attributor(
        "d-trak",
        model,
        timesteps=2,
        t_min=0,
        query_timesteps=4,
        query_num_noise=2,
        lam=0.05,
        **BASE,
    )
    a.fit(train)
    s = a.score(queries)
    assert s.config["timesteps"] == [0, 50] and s.config["query_timesteps"] == [0, 25, 50, 75]
    phi = ref_features(model, train.images, train.ids.tolist(), [0, 50], "square")
    ids, qts = qids(queries), [0, 25, 50, 75]
    q = ref_features(model, queries.images, ids, qts, "square", draws=2)
    close(s.values, kernel(phi, q, 0.05))
    assert s.halves is not None  # halves: t = 0 vs 50 (training), draw 0 vs 1 (query)
    for h in (0, 1):
        ph = ref_features(model, train.images, train.ids.tolist(), [[0], [50]][h], "square")
        qh = ref_features(model, queries.images, ids, qts, "square", draws=2, half=h)
        close(s.halves[h], kernel(ph, qh, 0.05))
    stab = s.stability(2)
    assert stab is not None and stab.overlap.shape == (3,) and stab.rank_corr.shape == (3,)


def test_trak_default_lambda_rule_and_uniform_timesteps(model, train, queries) -> None:
    a = make_attributor("trak", model, timesteps=2, num_noise=2, **BASE)
    a.fit(train)
    s = a.score(queries)
    ts = [0, 50]  # uniform: floor(i * T / count)
    assert s.config["timesteps"] == ts
    phi = ref_features(model, train.images, train.ids.tolist(), ts, draws=2)
    q = ref_features(model, queries.images, qids(queries), ts, draws=2)
    lam = 0.01 * np.trace(phi.T @ phi) / phi.shape[1]
    assert s.config["lambda"] == pytest.approx(lam, rel=1e-4)
    close(s.values, kernel(phi, q, lam))


def test_grad_dot_and_cos_match_explicit(model, train, queries) -> None:
    ts = [30]
    phi = ref_features(model, train.images, train.ids.tolist(), ts)
    q = ref_features(model, queries.images, qids(queries), ts)
    dot = make_attributor("grad-dot", model, timestep_values=ts, **BASE)
    dot.fit(train)
    close(dot.score(queries).values, q @ phi.T)
    cos = make_attributor("grad-cos", model, timestep_values=ts, **BASE)
    cos.fit(train)
    want = (q / np.linalg.norm(q, axis=1, keepdims=True)) @ (
        phi / np.linalg.norm(phi, axis=1, keepdims=True)
    ).T
    close(cos.score(queries).values, want)


def test_tracin_two_checkpoints_is_lr_weighted_sum_of_dots(model, train, queries, tmp_path) -> None:
    other = tiny_model(seed=5)
    paths = [save_model(model, tmp_path / "c0"), save_model(other, tmp_path / "c1")]
    ts = [20, 70]
    lrs = [0.3, 2.0]
    a = make_attributor(
        "tracin",
        model,
        tmp_path / "work",
        checkpoints=[str(p) for p in paths],
        learning_rates=lrs,
        timestep_values=ts,
        **BASE,
    )
    a.fit(train)
    s = a.score(queries)
    want = np.zeros((3, 5))
    for path, lr in zip(paths, lrs, strict=True):
        m = load_model(path)
        phi = ref_features(m, train.images, train.ids.tolist(), ts)
        q = ref_features(m, queries.images, qids(queries), ts)
        want += lr * (q @ phi.T)
    close(s.values, want)
    assert s.config["learning_rates"] == lrs
    # one feature store per checkpoint, inside the work folder
    assert len(list((tmp_path / "work").glob("loss-grads-*"))) == 2


def test_diff_retrac_uses_unit_normalised_gradients(model, train, queries) -> None:
    ts = [5, 40, 90]
    a = make_attributor("diff-retrac", model, timestep_values=ts, learning_rates=[0.5], **BASE)
    a.fit(train)
    phi = ref_features(model, train.images, train.ids.tolist(), ts, normalize=True)
    q = ref_features(model, queries.images, qids(queries), ts, normalize=True)
    close(a.score(queries).values, 0.5 * (q @ phi.T))


def test_das_matches_its_formula(model, train, queries) -> None:
    ts = [15, 55]
    a = make_attributor("das", model, timestep_values=ts, lam=0.02, num_noise=2, **BASE)
    a.fit(train)
    s = a.score(queries)
    phi = ref_features(
        model, train.images, train.ids.tolist(), ts, "average", normalize=True, draws=2
    )
    q = ref_features(model, queries.images, qids(queries), ts, "average", normalize=True, draws=2)
    errs = np.zeros((len(train), len(ts) * 2))  # (image, (t, draw) in timestep-major order)
    for j, (x0, sid) in enumerate(zip(train.images, train.ids.tolist(), strict=True)):
        for i, (t, d) in enumerate((t, d) for t in ts for d in range(2)):
            noise = noise_for(3, sid, t, d, (1, 8, 8), "shared")
            x_t = model.scheduler.add_noise(x0[None], noise[None], torch.tensor([t]))
            with torch.no_grad():
                eps = model.unet(x_t, torch.tensor([t])).sample
            errs[j, i] = float(((eps - noise) ** 2).mean().sqrt())
    r = errs.mean(axis=1)
    close(s.values, kernel(phi, q, 0.02) * r[None, :])
    assert s.halves is not None  # halves: draw 0 vs draw 1, residuals of the same samples
    for h in (0, 1):
        args = (ts, "average", True, 2)
        ph = ref_features(model, train.images, train.ids.tolist(), *args, half=h)
        qh = ref_features(model, queries.images, qids(queries), *args, half=h)
        close(s.halves[h], kernel(ph, qh, 0.02) * errs[:, h::2].mean(axis=1)[None, :])
    plain = make_attributor(
        "das", model, timestep_values=ts, lam=0.02, num_noise=2, residual="none", **BASE
    )
    plain.fit(train)
    close(plain.score(queries).values, kernel(phi, q, 0.02))


@pytest.mark.parametrize("name", ["trak", "das"])
def test_lambda_path_equals_refits_at_each_lambda(model, train, queries, name) -> None:
    lams = [0.005, 0.05, 2.0]
    swept = make_attributor(name, model, timesteps=2, **BASE)
    swept.fit(train)
    fitted_lambda = swept.config()["lambda"]
    path = swept.score_lambda_path(queries, lams)
    for lam, got in zip(lams, path, strict=True):
        one = make_attributor(name, model, timesteps=2, lam=lam, **BASE)
        one.fit(train)
        want = one.score(queries)
        close(got.values, want.values)
        assert got.config["lambda"] == lam and got.train_ids.tolist() == train.ids.tolist()
    assert swept.config()["lambda"] == fitted_lambda  # the fitted kernel is untouched


def _fake_trajectories(model: DiffusionModel, n: int, ts: list[int]) -> list[Trajectory]:
    g = torch.Generator().manual_seed(21)
    out = []
    for _ in range(n):
        xt = torch.randn(len(ts), 1, 8, 8, generator=g)
        eps = torch.randn(len(ts), 1, 8, 8, generator=g)
        out.append(Trajectory(timesteps=torch.tensor(ts), xt=xt, eps=eps))
    return out


def test_journey_trak_per_step_equals_loop_over_steps(model, train) -> None:
    ts = [90, 60, 30, 0]
    trajs = _fake_trajectories(model, 2, ts)
    q = Queries(images=torch.zeros(2, 1, 8, 8), names=["g0", "g1"], trajectories=trajs)
    lam = 0.03
    a = make_attributor("journey-trak", model, step_stride=2, query_draws=2, lam=lam, **BASE)
    a.fit(train)
    s = a.score(q)
    steps = [0, 2]
    assert s.per_step is not None and s.per_step.shape == (2, 2, 5)
    assert s.step_timesteps is not None and s.step_timesteps.tolist() == [90, 30]
    abar = model.scheduler.alphas_cumprod.double()
    ids = qids(q)
    for k, step in enumerate(steps):
        t = ts[step]
        phi = ref_features(model, train.images, train.ids.tolist(), [t])
        rows = []
        for j, traj in enumerate(trajs):
            x0 = (traj.xt[step].double() - (1 - abar[t]).sqrt() * traj.eps[step].double()) / abar[
                t
            ].sqrt()
            x0 = x0.clamp(-1, 1).float()
            rows.append(ref_features(model, x0[None], [ids[j]], [t], draws=2)[0])
        close(s.per_step[k], kernel(phi, np.stack(rows), lam))
    np.testing.assert_allclose(s.values, s.per_step.mean(axis=0), rtol=1e-5, atol=1e-7)


def test_journey_trak_needs_trajectories(model, train, queries) -> None:
    a = make_attributor("journey-trak", model, **BASE)
    a.fit(train)
    with pytest.raises(ValueError, match="diffattr generate"):
        a.score(queries)
    trajs = _fake_trajectories(model, 2, [50, 0]) + _fake_trajectories(model, 1, [60, 0])
    mixed = Queries(images=torch.zeros(3, 1, 8, 8), names=["a", "b", "c"], trajectories=trajs)
    with pytest.raises(ValueError, match="other timesteps"):
        a.score(mixed)


def test_pixel_is_explicit_cosine(model, train, queries) -> None:
    a = make_attributor("pixel", model)
    a.fit(train)
    x = train.images.reshape(5, -1).double().numpy()
    y = queries.images.reshape(3, -1).double().numpy()
    want = (y / np.linalg.norm(y, axis=1, keepdims=True)) @ (
        x / np.linalg.norm(x, axis=1, keepdims=True)
    ).T
    np.testing.assert_allclose(a.score(queries).values, want, rtol=1e-5, atol=1e-6)
    c = make_attributor("pixel", model, center=True)
    c.fit(train)
    xc, yc = x - x.mean(1, keepdims=True), y - y.mean(1, keepdims=True)
    want_c = (yc / np.linalg.norm(yc, axis=1, keepdims=True)) @ (
        xc / np.linalg.norm(xc, axis=1, keepdims=True)
    ).T
    np.testing.assert_allclose(c.score(queries).values, want_c, rtol=1e-5, atol=1e-6)


def test_work_dir_store_is_reused_and_keyed_by_options(model, train, queries, tmp_path) -> None:
    a = make_attributor("trak", model, tmp_path, timestep_values=[10], **BASE)
    a.fit(train)
    first = a.score(queries).values
    folders = sorted(p.name for p in tmp_path.iterdir())
    assert len(folders) == 1 and folders[0].startswith("loss-grads-")
    b = make_attributor("trak", model, tmp_path, timestep_values=[10], **BASE)
    b.fit(train)  # reuses the store (a mismatch would raise)
    np.testing.assert_array_equal(b.score(queries).values, first)
    assert sorted(p.name for p in tmp_path.iterdir()) == folders
    c = make_attributor("trak", model, tmp_path, timestep_values=[20], **BASE)
    c.fit(train)
    assert len(list(tmp_path.iterdir())) == 2
    # another training subset gets its own folder too
    c.fit(train.subset([True, False, True, True, True]))
    assert len(list(tmp_path.iterdir())) == 3


def test_journey_trak_can_featurize_in_fit(model, train, tmp_path) -> None:
    ts = [90, 60, 30, 0]
    q = Queries(
        images=torch.zeros(2, 1, 8, 8),
        names=["g0", "g1"],
        trajectories=_fake_trajectories(model, 2, ts),
    )
    eager = make_attributor(
        "journey-trak",
        model,
        tmp_path,
        trajectory_timesteps=ts,
        step_stride=2,
        query_draws=1,
        **BASE,
    )
    eager.fit(train)
    assert len(list(tmp_path.glob("*-grads-per-step-*"))) == 1  # featurized during fit
    lazy = make_attributor("journey-trak", model, None, step_stride=2, query_draws=1, **BASE)
    lazy.fit(train)
    np.testing.assert_array_equal(eager.score(q).values, lazy.score(q).values)


def test_class_conditional_model_uses_labels(train, queries) -> None:
    cond = testing.tiny_model(num_train_timesteps=T_TRAIN, num_class_embeds=2)
    labelled = ImageDataset("toy", train.images, train.ids, labels=torch.tensor([0, 1, 0, 1, 1]))
    for name in ("trak", "das", "grad-dot"):
        a = make_attributor(name, cond, timestep_values=[40], **BASE)
        a.fit(labelled)
        with pytest.raises(ValueError, match="class-conditional"):
            a.score(queries)
        q0 = Queries(
            images=queries.images, names=queries.names, labels=torch.zeros(3, dtype=torch.int64)
        )
        q1 = Queries(
            images=queries.images, names=queries.names, labels=torch.ones(3, dtype=torch.int64)
        )
        s0, s1 = a.score(q0).values, a.score(q1).values
        assert np.all(np.isfinite(s0)) and not np.allclose(s0, s1)


def test_options_from_text_config_are_coerced(model) -> None:
    a = make_attributor("trak", model, lam="0.5", lambda_scale="0.1")
    assert a.options.lam == 0.5 and a.options.lambda_scale == 0.1
    with pytest.raises(ValueError, match="lam: expected a number"):
        make_attributor("trak", model, lam="lots")


def test_das_residuals_are_stored_beside_the_features(model, train, queries, tmp_path):
    from diffattr.attribution.methods.das import residual_errors

    a = make_attributor("das", model, tmp_path, timestep_values=[15, 55], num_noise=2, **BASE)
    a.fit(train)
    first = a.score(queries).values
    (res,) = list(tmp_path.glob("residuals-*"))
    assert len(list(tmp_path.glob("*-unit-grads-*"))) == 1
    # The pass's residuals are the reference loop's (same noisy inputs, one forward for both).
    want = residual_errors(model, train, [15, 55], a.train_args())
    stored = torch.as_tensor(FeatureStore.open(res).features, dtype=torch.float64)
    torch.testing.assert_close(stored, want, rtol=1e-5, atol=1e-6)

    def fail(*_args, **_kwargs):
        raise AssertionError("the model was run although features and residuals were stored")

    b = make_attributor("das", model, tmp_path, timestep_values=[15, 55], num_noise=2, **BASE)
    forward = model.eps
    model.eps = fail  # reopening forwards nothing
    try:
        b.fit(train)
    finally:
        model.eps = forward
    np.testing.assert_array_equal(b.score(queries).values, first)


def test_t_max_spaces_timesteps_evenly_in_the_band(model, train, queries) -> None:
    from diffattr.attribution.methods.common import GradientOptions

    band = GradientOptions(timesteps=80, t_min=None, t_max=550).timestep_policy(1000).timesteps()
    assert band == [100 + (i * 450) // 80 for i in range(80)]
    half = GradientOptions(timesteps=40, t_min=None, t_max=550).timestep_policy(1000).timesteps()
    assert half == band[::2]  # das's 40 are every second of d-trak's 80: one pass forwards both
    # On the test model (T = 100): the band's features are those of its explicit list.
    a = make_attributor("d-trak", model, timesteps=4, t_min=20, t_max=60, lam=0.05, **BASE)
    b = make_attributor("d-trak", model, timestep_values=[20, 30, 40, 50], lam=0.05, **BASE)
    for x in (a, b):
        x.fit(train)
    np.testing.assert_array_equal(a.score(queries).values, b.score(queries).values)
    for bad in ({"t_min": 60, "t_max": 60}, {"t_max": 500}):
        with pytest.raises(ValueError, match="t_max"):
            make_attributor("d-trak", model, timesteps=4, **bad).fit(train)
    with pytest.raises(ValueError, match="t_max"):
        make_attributor("d-trak", model, timestep_kind="random", t_max=50)
