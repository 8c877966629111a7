"""Grouped features (GGDA): timestep sharing, group features against image features and an
explicit loop, the group kernels against their closed forms, store reuse and errors."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from diffattr import testing
from diffattr.attribution import groupfeat
from diffattr.attribution.base import Queries
from diffattr.attribution.featurize import (
    FeaturizeArgs,
    featurize,
    per_step_features,
    row_features,
)
from diffattr.attribution.groupfeat import featurize_groups, member_steps
from diffattr.attribution.projectors import ProjectorConfig
from diffattr.attribution.registry import make_attributor
from diffattr.attribution.timesteps import TimestepPolicy
from diffattr.data.dataset import ImageDataset
from diffattr.data.groups import GroupAssignment, assign_groups
from diffattr.errors import OptionError

T = 100


@pytest.fixture(scope="module")
def model():
    return testing.tiny_model(num_train_timesteps=T)


@pytest.fixture(scope="module")
def train() -> ImageDataset:
    g = torch.Generator().manual_seed(5)
    images = torch.rand(7, 1, 8, 8, generator=g) * 2 - 1
    ids = torch.tensor([40, 2, 17, 8, 33, 5, 21])
    return ImageDataset("toy", images, ids, labels=torch.tensor([1, 0, 1, 2, 0, 1, 2]))


def _args(aggregate: str = "mean", num_noise: int = 1, noise: str = "shared") -> FeaturizeArgs:
    return FeaturizeArgs(
        output="square",
        timesteps=TimestepPolicy(kind="uniform", count=6, num_train_timesteps=T, t_min=10),
        num_noise=num_noise,
        noise=noise,
        aggregate=aggregate,
        projector=ProjectorConfig(kind="kronecker", dim=64, seed=0),
        batch_size=5,
        shard_size=3,
    )


def test_member_steps_share_the_schedule():
    assert member_steps(3, 4, 4) == [[0, 1, 2, 3]] * 3  # r = S: every member every step
    steps = member_steps(3, 2, 6)  # G r = S: the members' steps partition the schedule
    assert sorted(s for m in steps for s in m) == list(range(6))
    assert all(m == sorted(m) and len(m) == 2 for m in steps)
    counts = np.bincount([s for m in member_steps(5, 3, 6) for s in m], minlength=6)
    assert counts.max() - counts.min() <= 1  # 15 rows over 6 steps: as even as possible
    with pytest.raises(ValueError, match="timesteps_per_image"):
        member_steps(2, 7, 6)


def test_row_features_match_per_step_features(model):
    args = _args(num_noise=2, noise="per-sample")
    x = torch.rand(2, 1, 8, 8, generator=torch.Generator().manual_seed(1))
    ids = torch.tensor([3, 9])
    steps = [20, 55, 90]
    want = per_step_features(model, x, ids, steps, args, keep_draws=True)  # (2, 3, 2, k)
    got = row_features(
        model, x.repeat_interleave(3, 0), ids.repeat_interleave(3), torch.tensor(steps * 2), args
    )
    torch.testing.assert_close(got.reshape(2, 3, 2, -1), want, rtol=1e-4, atol=1e-6)
    with pytest.raises(ValueError, match="row_features"):
        row_features(model, x, ids, torch.tensor([20]), args)


@pytest.mark.parametrize("aggregate", ["mean", "halves"])
def test_full_budget_group_features_are_summed_image_features(model, train, tmp_path, aggregate):
    args = _args(aggregate)
    groups = assign_groups(train, "class")
    images = torch.as_tensor(
        featurize(model, train, tmp_path / "img", args, progress=False).features
    )
    store = featurize_groups(model, train, groups, tmp_path / "grp", args, 6, progress=False)
    want = torch.as_tensor(groups.one_hot().T, dtype=torch.float64) @ images.to(
        torch.float64
    ).flatten(1)
    got = torch.as_tensor(store.features, dtype=torch.float64).flatten(1)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5 * float(want.abs().max()))


def test_partial_budget_group_features_against_a_loop(model, train, tmp_path):
    args = _args(num_noise=2, noise="per-sample")
    groups = assign_groups(train, "class")
    steps = args.timesteps.timesteps()
    store = featurize_groups(model, train, groups, tmp_path / "grp", args, 2, progress=False)
    ids = train.ids.tolist()
    want = torch.zeros(groups.num_groups, 64, dtype=torch.float64)
    for g in range(groups.num_groups):
        members = sorted((ids[j], j) for j in np.flatnonzero(groups.index == g))
        for (i, j), mine in zip(members, member_steps(len(members), 2, 6), strict=True):
            f = per_step_features(
                model, train.images[j : j + 1], torch.tensor([i]), [steps[s] for s in mine], args
            )
            want[g] += f[0].mean(dim=0).to(torch.float64)  # mean over its 2 steps (draws: mean)
    got = torch.as_tensor(store.features, dtype=torch.float64)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5 * float(want.abs().max()))


def _ggda(model, work, **opts):
    base = dict(timesteps=6, t_min=10, proj_dim=64, batch_size=5, groups="class")
    return make_attributor("ggda", model, work, **{**base, **opts})


@pytest.mark.parametrize("kernel", ["group", "dot"])
def test_ggda_scores_are_the_group_kernel_shared_within_groups(model, train, tmp_path, kernel):
    attr = _ggda(model, tmp_path / "work", kernel=kernel, timesteps_per_image=3)
    attr.fit(train)
    queries = Queries(train.images[:2] * 0.5, ["a", "b"])
    s = attr.score(queries)
    groups = assign_groups(train, "class")
    store = featurize_groups(
        model, train, groups, tmp_path / "again", attr.train_args(), 3, progress=False
    )
    feats = torch.as_tensor(store.features, dtype=torch.float64)
    phi = (2 * feats[:, 0] + feats[:, 1]) / 3  # 3 samples per member: halves of 2 and 1
    q = attr.query_features(queries).full.to(torch.float64)
    if kernel == "group":
        lam = attr.info["lambda"]
        gram = phi.T @ phi
        assert lam == pytest.approx(0.01 * float(torch.trace(gram)) / 64)
        group = q @ torch.linalg.solve(gram + lam * torch.eye(64, dtype=torch.float64), phi.T)
    else:
        group = q @ phi.T
    sizes = torch.as_tensor(groups.sizes(), dtype=torch.float64)
    want = (group[:, groups.index] / sizes[groups.index]).numpy()
    np.testing.assert_allclose(s.values, want, rtol=1e-3, atol=1e-4 * np.abs(want).max())
    # the images of a group sum to the group score
    summed = s.values.astype(np.float64) @ groups.one_hot()
    np.testing.assert_allclose(summed, group.numpy(), rtol=1e-3, atol=1e-4 * np.abs(want).max())
    assert s.config["num_groups"] == 3 and s.config["timesteps_per_image"] == 3


def test_ggda_reuses_its_store_and_separates_other_groups(model, train, tmp_path, monkeypatch):
    work = tmp_path / "work"
    first = _ggda(model, work, timesteps_per_image=2)
    first.fit(train)
    calls = []
    real = groupfeat.row_features
    monkeypatch.setattr(groupfeat, "row_features", lambda *a, **k: calls.append(1) or real(*a, **k))
    again = _ggda(model, work, timesteps_per_image=2)
    again.fit(train)
    assert calls == []  # every group shard reused
    q = Queries(train.images[:1], ["q"])
    np.testing.assert_array_equal(again.score(q).values, first.score(q).values)
    other = _ggda(model, work, timesteps_per_image=2, groups={"kmeans": 2})
    other.fit(train)
    assert calls and other.info["store"] != first.info["store"]


def test_ggda_errors_name_the_option(model, train):
    with pytest.raises(OptionError, match="kernel"):
        _ggda(model, None, kernel="ridge")
    with pytest.raises(OptionError, match="groups"):
        _ggda(model, None, groups={"kmeanz": 3})
    with pytest.raises(ValueError, match="timesteps_per_image"):
        _ggda(model, None, timesteps_per_image=7).fit(train)
    unlabeled = ImageDataset("plain", train.images, train.ids)
    with pytest.raises(ValueError, match="no grouping 'class'"):
        _ggda(model, None).fit(unlabeled)


def test_spread_to_images_keeps_group_totals():
    from diffattr.attribution.methods.ggda import spread_to_images

    groups = GroupAssignment(np.array([1, 0, 1, 1]), ["a", "b"], np.arange(4), "t")
    out = spread_to_images(torch.tensor([[2.0, 3.0]]), groups)
    np.testing.assert_allclose(out.numpy(), [[1.0, 2.0, 1.0, 1.0]])


def test_one_sample_per_member_has_no_stability_figure(model, train):
    attr = _ggda(model, None, timesteps_per_image=1)
    attr.fit(train)
    s = attr.score(Queries(train.images[:1], ["q"]))
    assert s.halves is None and np.all(np.isfinite(s.values))


def test_scores_per_group_sum_columns_in_any_id_order():
    from diffattr.attribution.base import Scores

    rng = np.random.default_rng(0)
    values, halves = rng.normal(size=(2, 5)), rng.normal(size=(2, 2, 5))
    ids = np.array([7, 3, 9, 1, 4])
    groups = GroupAssignment(
        np.array([0, 1, 1, 0, 2]), ["a", "b", "c"], np.array([1, 3, 4, 7, 9]), "t"
    )
    s = Scores(values, ids, ["q0", "q1"], "m", halves=halves).per_group(groups)
    # id -> group: 1 a, 3 b, 4 b, 7 a, 9 c; columns in ids order 7 3 9 1 4 -> a b c a b
    want = np.stack([values[:, 0] + values[:, 3], values[:, 1] + values[:, 4], values[:, 2]], 1)
    np.testing.assert_allclose(s.values, want, rtol=1e-5, atol=1e-6)
    assert s.halves is not None
    np.testing.assert_allclose(s.halves[1][:, 1], halves[1][:, 1] + halves[1][:, 4], atol=1e-6)
    assert s.train_ids.tolist() == [0, 1, 2]
