"""One conformance test for every registered attribution method (new methods are covered
automatically): shape, id order, finiteness, determinism, save/load, protocol, column permutation,
and "same image, same scores": a query's scores do not depend on its name, its position in the
batch or the other queries scored with it (bit for bit).
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any

import numpy as np
import pytest
import torch

from diffattr.attribution.base import Attributor, Queries, Scores, Trajectory
from diffattr.attribution.registry import ATTRIBUTORS, make_attributor
from diffattr.data.dataset import ImageDataset
from diffattr.diffusion.model import DiffusionModel
from diffattr.testing import tiny_clip_folder, tiny_dino_folder, tiny_model

# Small settings, applied to whichever of them a method's options dataclass has.
FAST_OPTIONS: dict[str, Any] = {
    "timesteps": 2,
    "num_noise": 1,
    "proj_dim": 64,
    "batch_size": 8,
    "query_draws": 2,
    "step_stride": 2,
    "seed": 1,
    "factor_passes": 2,
}


def fast_options(name: str) -> dict[str, Any]:
    fields = {f.name for f in dataclasses.fields(ATTRIBUTORS[name].options)}
    return {k: v for k, v in FAST_OPTIONS.items() if k in fields}


@pytest.fixture(scope="module")
def required_options(tmp_path_factory) -> dict[str, dict[str, Any]]:
    """Options a method cannot run without (the embedding baselines' checkpoint folders: tiny
    random ones saved with save_pretrained, loaded through the user's code path)."""
    root = tmp_path_factory.mktemp("checkpoints")
    return {
        "clip": {"model": str(tiny_clip_folder(root / "clip"))},
        "dino": {"model": str(tiny_dino_folder(root / "dino"))},
        # The toy set has no labels: groups from k-means.
        "ggda": {"groups": {"kmeans": 3}},
    }


@pytest.fixture(scope="module")
def model() -> DiffusionModel:
    return tiny_model(num_train_timesteps=100)


@pytest.fixture(scope="module")
def train() -> ImageDataset:
    g = torch.Generator().manual_seed(3)
    images = torch.rand(7, 1, 8, 8, generator=g) * 2 - 1
    return ImageDataset("toy", images, torch.tensor([40, 2, 17, 8, 33, 5, 21]))


def _trajectories(model: DiffusionModel, n: int) -> tuple[torch.Tensor, list[Trajectory]]:
    """Generated images and their trajectories from the real sampler (synthetic if unavailable)."""
    try:
        from diffattr.diffusion.sampling import sample
    except ImportError:  # pragma: no cover - the sampler is part of the package
        g = torch.Generator().manual_seed(9)
        ts = torch.tensor([75, 50, 25, 0])
        trajs = [
            Trajectory(
                ts, torch.randn(4, 1, 8, 8, generator=g), torch.randn(4, 1, 8, 8, generator=g)
            )
            for _ in range(n)
        ]
        return torch.rand(n, 1, 8, 8, generator=g) * 2 - 1, trajs
    res = sample(model, n, seed=4, num_inference_steps=4)
    return res.images, [res.trajectory(i) for i in range(n)]


@pytest.fixture(scope="module")
def queries(model: DiffusionModel) -> Queries:
    images, trajs = _trajectories(model, 3)
    return Queries(images=images, names=["q0", "q1", "q2"], trajectories=trajs)


@pytest.mark.parametrize("name", list(ATTRIBUTORS))
def test_attributor_conformance(
    name: str, model, train, queries, tmp_path, required_options
) -> None:
    opts = {**fast_options(name), **required_options.get(name, {})}
    attr = make_attributor(name, model, None, **opts)
    assert isinstance(attr, Attributor)
    assert attr.name == name
    attr.fit(train)
    s = attr.score(queries)

    # shape, ids, names, finiteness, method, JSON-able config
    assert s.values.shape == (len(queries), len(train))
    assert s.values.dtype == np.float32
    np.testing.assert_array_equal(s.train_ids, train.ids.numpy())
    assert s.query_names == queries.names
    assert np.all(np.isfinite(s.values))
    assert s.method == name
    json.dumps(s.config)
    assert "options" in s.config and "timing" in s.config
    if s.per_step is not None:
        assert s.per_step.shape[1:] == s.values.shape
        assert s.step_timesteps is not None and s.step_timesteps.shape == (s.per_step.shape[0],)
    # not degenerate: scores differ across training images
    assert np.ptp(s.values) > 0

    # deterministic: a fresh attributor with the same options gives identical scores
    again = make_attributor(name, model, None, **opts)
    again.fit(train)
    np.testing.assert_array_equal(again.score(queries).values, s.values)

    # the stability figure: two half-budget score tables (methods that draw noise)
    if s.halves is not None:
        assert s.halves.shape == (2, *s.values.shape) and np.all(np.isfinite(s.halves))
        stab = s.stability(3)
        assert stab is not None and stab.overlap.shape == (len(queries),)
        assert np.all((stab.overlap >= 0) & (stab.overlap <= 1))

    # same image, same scores: renamed, moved to another batch position, with other batch-mates
    assert queries.trajectories is not None
    order = [2, 0, 1, 0]
    moved = Queries(
        images=queries.images[order],
        names=["other-2", "renamed.png", "other-1", "renamed-again.png"],
        trajectories=[queries.trajectories[i] for i in order],
    )
    ms = attr.score(moved)
    for row, i in enumerate(order):
        np.testing.assert_array_equal(ms.values[row], s.values[i])
    alone = attr.score(
        Queries(queries.images[1:2], ["solo"], trajectories=queries.trajectories[1:2])
    )
    np.testing.assert_array_equal(alone.values[0], s.values[1])
    if s.halves is not None:
        assert ms.halves is not None
        np.testing.assert_array_equal(ms.halves[:, 1], s.halves[:, 0])

    # save / load round trip
    loaded = Scores.load(s.save(tmp_path / "scores"))
    np.testing.assert_array_equal(loaded.values, s.values)
    np.testing.assert_array_equal(loaded.train_ids, s.train_ids)
    assert loaded.query_names == s.query_names and loaded.method == name
    assert loaded.config == json.loads(json.dumps(s.config))
    if s.per_step is not None:
        assert loaded.per_step is not None
        np.testing.assert_array_equal(loaded.per_step, s.per_step)
    if s.halves is not None:
        assert loaded.halves is not None
        np.testing.assert_array_equal(loaded.halves, s.halves)
    saved = json.loads((tmp_path / "scores" / "scores.json").read_text())
    assert (saved["stability"] is None) == (s.halves is None)

    # permuting the training set permutes the columns: ids stay attached to their scores
    perm_ids = train.ids[torch.tensor([3, 6, 0, 5, 1, 4, 2])]
    permuted = train.select_ids(perm_ids)
    p_attr = make_attributor(name, model, tmp_path / "work", **opts)
    p_attr.fit(permuted)
    ps = p_attr.score(queries)
    np.testing.assert_array_equal(ps.train_ids, perm_ids.numpy())
    col = {int(i): j for j, i in enumerate(s.train_ids)}
    reordered = s.values[:, [col[int(i)] for i in ps.train_ids]]
    np.testing.assert_allclose(ps.values, reordered, rtol=1e-4, atol=1e-5 * np.abs(s.values).max())
