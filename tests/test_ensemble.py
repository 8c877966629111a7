"""Model ensembles: combining member scores (against hand computation), the attributor over
several models, and which models an ensemble trains (prefix-stable, never the ground truth's)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from diffattr.attribution.base import Queries, Scores
from diffattr.attribution.ensemble import Ensemble, combine_scores, make_ensemble, standardise
from diffattr.attribution.onepass import featurize_for
from diffattr.attribution.registry import make_attributor
from diffattr.data.dataset import ImageDataset
from diffattr.errors import OptionError
from diffattr.evaluation.config import load_eval_config
from diffattr.evaluation.ensembles import EnsembleSpec, ensemble_jobs
from diffattr.evaluation.subsets import make_subsets
from diffattr.testing import tiny_model

ROOT = Path(__file__).parents[1]


def _scores(values: np.ndarray, halves: np.ndarray | None = None, h: str = "m") -> Scores:
    return Scores(
        values=values,
        train_ids=np.arange(values.shape[1]) + 10,
        query_names=[f"q{i}" for i in range(values.shape[0])],
        method="trak",
        config={"model_hash": h},
        halves=halves,
    )


def test_standardise_and_combine_by_hand():
    a = np.array([[1.0, 2.0, 3.0, 6.0], [5.0, 5.0, 5.0, 5.0]])
    b = np.array([[10.0, 0.0, 0.0, 30.0], [1.0, 0.0, 0.0, 0.0]])
    z = standardise(a)
    row = a[0] - 3.0
    np.testing.assert_allclose(z[0], row / np.sqrt(np.mean(row**2)))
    np.testing.assert_array_equal(z[1], 0.0)  # a constant row carries no ranking
    combined = combine_scores([_scores(a, h="a"), _scores(b, h="b")], norm="z")
    zb = (b - b.mean(1, keepdims=True)) / b.std(1, keepdims=True)
    np.testing.assert_allclose(combined.values, ((z + zb) / 2).astype(np.float32), rtol=1e-6)
    assert combined.config["ensemble"] == {"size": 2, "norm": "z", "members": ["a", "b"]}
    plain = combine_scores([_scores(a), _scores(b)], norm="none")
    np.testing.assert_allclose(plain.values, (a + b) / 2, rtol=1e-6)
    # A member on a 1000x larger scale does not outvote the other after standardising.
    np.testing.assert_allclose(
        combine_scores([_scores(a), _scores(1000 * b)]).values, combined.values, rtol=1e-5
    )


def test_halves_are_combined_and_mismatches_refused():
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=(2, 3, 5))
    ha, hb = rng.normal(size=(2, 2, 3, 5))
    out = combine_scores([_scores(a, ha), _scores(b, hb)])
    assert out.halves is not None
    np.testing.assert_allclose(out.halves, (standardise(ha) + standardise(hb)) / 2, rtol=1e-5)
    assert combine_scores([_scores(a, ha), _scores(b)]).halves is None
    other = _scores(b)
    other.query_names = ["x", "y", "z"]
    with pytest.raises(ValueError, match="member 1 scored other queries"):
        combine_scores([_scores(a), other])
    with pytest.raises(ValueError, match="norm"):
        combine_scores([_scores(a)], norm="rank")
    with pytest.raises(ValueError, match="no member"):
        combine_scores([])


@pytest.fixture(scope="module")
def train() -> ImageDataset:
    g = torch.Generator().manual_seed(0)
    return ImageDataset(
        images=torch.rand(12, 1, 8, 8, generator=g) * 2 - 1, ids=torch.arange(12) * 3, name="toy"
    )


def test_ensemble_attributor_is_its_members_combined(train, tmp_path):
    models = [tiny_model(num_train_timesteps=100, seed=s) for s in (0, 1, 2)]
    opts = {"timesteps": 3, "proj_dim": 64, "batch_size": 8}
    ens = make_ensemble("d-trak", models, work_dir=tmp_path, **opts)
    assert isinstance(ens, Ensemble) and len(ens.members) == 3
    # One featurization pass fills every member's stores (one per model).
    filled = featurize_for([ens], train, progress=False)
    assert len(filled) == 1 and len({f.name for f in filled[0][1]}) == 3
    ens.fit(train)
    q = Queries(images=train.images[:4], names=["a", "b", "c", "d"])
    got = ens.score(q)
    parts = []
    for m in models:
        one = make_attributor("d-trak", m, work_dir=tmp_path / "alone", **opts)
        one.fit(train)
        parts.append(one.score(q).values)
    np.testing.assert_allclose(got.values, np.mean([standardise(p) for p in parts], 0), atol=1e-5)
    assert got.halves is not None and got.stability() is not None
    # One model: the ensemble ranks exactly like the method alone.
    single = make_ensemble("d-trak", models[:1], work_dir=tmp_path, **opts)
    single.fit(train)
    order = np.argsort(-single.score(q).values, axis=1, kind="stable")
    np.testing.assert_array_equal(order, np.argsort(-parts[0], axis=1, kind="stable"))


def test_ensemble_jobs_are_prefix_stable_and_not_the_ground_truth(tmp_path):
    exp = load_eval_config(ROOT / "configs" / "eval" / "digits2-smoke.yaml").experiment
    ids = np.arange(64) * 2
    big = ensemble_jobs(EnsembleSpec("subsets", 8), exp, ids, tmp_path)
    small = ensemble_jobs(EnsembleSpec("subsets", 2), exp, ids, tmp_path)
    assert [(j.name, j.cfg.seed, j.keep_ids.tolist()) for j in small] == [
        (j.name, j.cfg.seed, j.keep_ids.tolist()) for j in big[:2]
    ]
    assert all(len(j.keep_ids) == 32 for j in big)
    assert len({tuple(j.keep_ids) for j in big}) == 8 and len({j.cfg.seed for j in big}) == 8
    truth = make_subsets(ids, 16, 0.5, 0)  # the evaluation's own subsets (seed 0)
    assert not {tuple(j.keep_ids) for j in big} & {tuple(truth.ids(m)) for m in range(16)}
    seeds = ensemble_jobs(EnsembleSpec("seeds", 3), exp, ids, tmp_path)
    assert [j.name for j in seeds] == ["member-001", "member-002"]  # member 0: the full model
    assert exp.seed not in {j.cfg.seed for j in seeds}
    (run,) = ensemble_jobs(EnsembleSpec("checkpoints", 4), exp, ids, tmp_path)
    assert run.cfg.train.checkpoint_every == 2  # a sixteenth of the 30 steps, rounded up
    assert run.cfg.seed == exp.seed
    assert EnsembleSpec("subsets", 2).folder_name() == EnsembleSpec("subsets", 8).folder_name()
    assert EnsembleSpec("subsets", 2).folder_name() != EnsembleSpec("seeds", 2).folder_name()


@pytest.mark.parametrize(
    "raw, message",
    [
        ({"kind": "bagging", "size": 2}, "kind: 'bagging' is not one of"),
        ({"kind": "seeds", "size": 0}, "size: expected an int >= 1"),
        ({"kind": "seeds", "size": 2, "norm": "rank"}, "norm"),
        ({"kind": "subsets", "size": 2, "alpha": 1.5}, "alpha"),
        ({"kind": "seeds", "size": 2, "models": 3}, "unknown key"),
        ({"size": 2}, "kind"),
        ("seeds", "expected a mapping"),
    ],
)
def test_bad_ensemble_settings_are_one_line_errors(raw, message):
    with pytest.raises(OptionError, match=message) as info:
        EnsembleSpec.from_dict(raw, "methods.x.ensemble")
    assert "methods.x.ensemble" in str(info.value) and "\n" not in str(info.value)
