"""Subset masks (seeded, exact size, saved/loaded) and the eval config schema."""

from __future__ import annotations

import numpy as np
import pytest
import yaml

from diffattr.config import ConfigError
from diffattr.evaluation.config import eval_config_from_dict, load_eval_config
from diffattr.evaluation.subsets import (
    SubsetError,
    ensure_subsets,
    load_subsets,
    make_subsets,
    save_subsets,
)

IDS = np.arange(1000, 1101)  # 101 ids: alpha * n is not an integer


def test_subsets_reproducible_and_right_size():
    a = make_subsets(IDS, 10, 0.5, seed=4)
    b = make_subsets(IDS, 10, 0.5, seed=4)
    np.testing.assert_array_equal(a.masks, b.masks)
    assert a.masks.shape == (10, 101)
    assert (a.masks.sum(axis=1) == round(0.5 * 101)).all()
    # Subsets differ from each other and across seeds.
    assert len({a.masks[m].tobytes() for m in range(10)}) == 10
    assert not np.array_equal(a.masks, make_subsets(IDS, 10, 0.5, seed=5).masks)
    # Subset m depends only on (seed, m): a longer list starts with the same subsets.
    np.testing.assert_array_equal(make_subsets(IDS, 15, 0.5, seed=4).masks[:10], a.masks)
    assert set(a.ids(0).tolist()) <= set(IDS.tolist())


def test_subsets_other_fraction_and_balance():
    s = make_subsets(IDS, 200, 0.25, seed=0)
    assert (s.masks.sum(axis=1) == 25).all()
    # Each image is in ~25% of subsets (binomial sd ~ 3%): no id is systematically favoured.
    freq = s.masks.mean(axis=0)
    assert freq.min() > 0.12 and freq.max() < 0.40


def test_empty_subset_and_bad_alpha_are_errors():
    with pytest.raises(SubsetError, match="empty subset"):
        make_subsets(IDS[:3], 4, 0.1, seed=0)
    with pytest.raises(SubsetError, match="alpha"):
        make_subsets(IDS, 4, 1.5, seed=0)
    with pytest.raises(SubsetError, match="empty"):
        from diffattr.evaluation.subsets import SubsetMasks

        SubsetMasks(np.zeros((2, 3), bool), np.arange(3), 0.5, 0)


def test_save_load_roundtrip_and_mismatch(tmp_path):
    s = make_subsets(IDS, 6, 0.5, seed=1)
    save_subsets(s, tmp_path / "sub")
    back = load_subsets(tmp_path / "sub")
    np.testing.assert_array_equal(back.masks, s.masks)
    np.testing.assert_array_equal(back.train_ids, s.train_ids)
    assert (tmp_path / "sub" / "subsets.json").exists()
    again = ensure_subsets(tmp_path / "sub", IDS, 6, 0.5, seed=1)
    np.testing.assert_array_equal(again.masks, s.masks)
    with pytest.raises(SubsetError, match="differ"):
        ensure_subsets(tmp_path / "sub", IDS, 6, 0.5, seed=2)


def test_aligned_reorders_columns():
    s = make_subsets(IDS, 3, 0.5, seed=0)
    perm = np.random.default_rng(0).permutation(len(IDS))
    al = s.aligned(IDS[perm])
    np.testing.assert_array_equal(al, s.masks[:, perm])
    with pytest.raises(SubsetError, match="do not match"):
        s.aligned(IDS[:-1])


EXP = {"data": {"source": "digits-2", "size": 8}, "train": {"steps": 100}}


def test_eval_config_unknown_keys_named():
    with pytest.raises(ConfigError, match="nonsense"):
        eval_config_from_dict({"experiment": EXP, "nonsense": 1})
    with pytest.raises(ConfigError, match=r"subsets.*num_subset"):
        eval_config_from_dict({"experiment": EXP, "subsets": {"num_subset": 3}})
    with pytest.raises(ConfigError, match="experiment"):
        eval_config_from_dict({"subsets": {}})
    with pytest.raises(ConfigError, match="timesteps"):
        eval_config_from_dict({"experiment": EXP, "ground_truth": {"timesteps": 5000}})
    assert eval_config_from_dict({"experiment": EXP, "stack_models": 4}).stack_models == 4
    for key in ("stack_models", "workers"):
        with pytest.raises(ConfigError, match=f"{key}: expected an integer >= 1"):
            eval_config_from_dict({"experiment": EXP, key: 0})


def test_eval_config_experiment_path_and_overrides(tmp_path):
    (tmp_path / "exp.yaml").write_text(yaml.safe_dump({"seed": 3, **EXP}))
    (tmp_path / "eval").mkdir()
    path = tmp_path / "eval" / "e.yaml"
    path.write_text(
        yaml.safe_dump(
            {
                "experiment": "../exp.yaml",
                "experiment_overrides": {"train": {"steps": 7}},
                "subsets": {"num_subsets": 8, "alpha": 0.25},
                "methods": {"trak": {"timesteps": 4}},
            }
        )
    )
    cfg = load_eval_config(path)
    assert cfg.experiment.seed == 3
    assert cfg.experiment.train.steps == 7
    assert cfg.experiment.data.size == 8
    assert cfg.subsets.num_subsets == 8 and cfg.subsets.alpha == 0.25
    assert cfg.method_options("trak") == {"timesteps": 4}
    assert cfg.method_options("pixel") == {}
    with pytest.raises(ConfigError, match="not found"):
        eval_config_from_dict({"experiment": "nowhere.yaml"}, folder=tmp_path)


@pytest.mark.parametrize(
    "name", ["digits2", "digits2-smoke", "cifar2", "cifar10", "artbench2", "artbench5"]
)
def test_shipped_eval_configs_parse(name):
    from pathlib import Path

    cfg = load_eval_config(Path(__file__).parents[1] / "configs" / "eval" / f"{name}.yaml")
    assert cfg.methods
    from diffattr.attribution.registry import make_options

    for name in cfg.methods:
        method, options, _ = cfg.method_spec(name)
        make_options(method, **options)  # every option name is valid


def test_stratified_subsets_keep_class_shares():
    from sklearn.model_selection import train_test_split

    from diffattr.repro import derive_seed

    labels = np.array([0] * 30 + [1] * 10 + [2] * 20)
    ids = np.arange(100, 160)
    subs = make_subsets(ids, 6, 0.5, seed=3, labels=labels)
    assert subs.masks.sum(axis=1).tolist() == [30] * 6
    for m in range(6):
        assert np.bincount(labels[subs.masks[m]]).tolist() == [15, 5, 10]
    want, _ = train_test_split(
        np.arange(60),
        train_size=30,
        random_state=derive_seed(3, "subset", 2) % 2**32,
        stratify=labels,
    )
    assert np.flatnonzero(subs.masks[2]).tolist() == sorted(want.tolist())
    again = make_subsets(ids, 6, 0.5, seed=3, labels=labels)
    np.testing.assert_array_equal(again.masks, subs.masks)
    assert not np.array_equal(make_subsets(ids, 6, 0.5, seed=3).masks, subs.masks)
    with pytest.raises(SubsetError, match="labels"):
        make_subsets(ids, 2, 0.5, seed=3, labels=labels[:5])
