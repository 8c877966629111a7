"""Group-level LDS (issue 10, GGDA): group assignment, group subsets, group LDS, config identity,
grouped TRAK features, and the harness end to end on the group smoke config."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import scipy.stats
import torch

from diffattr.attribution.base import Scores
from diffattr.config import ConfigError
from diffattr.data.dataset import DataError, ImageDataset
from diffattr.data.groups import GroupAssignment, assign_groups, parse_group_spec
from diffattr.evaluation.compare import MethodResult, table_rows
from diffattr.evaluation.config import eval_config_from_dict, load_eval_config
from diffattr.evaluation.groups import (
    ensure_group_subsets,
    group_score_sums,
    kept_groups,
    make_group_subsets,
)
from diffattr.evaluation.lds import lds
from diffattr.evaluation.subsets import SubsetError, load_subsets

ROOT = Path(__file__).parents[1]
SMOKE = ROOT / "configs" / "eval" / "digits2-groups-smoke.yaml"


def dataset(n: int = 30, seed: int = 0, **kw) -> ImageDataset:
    """``n`` 1x4x4 images in three well-separated pixel clusters; ids 100, 103, 106, ..."""
    g = torch.Generator().manual_seed(seed)
    centers = torch.tensor([-0.8, 0.0, 0.8])[torch.arange(n) % 3]
    images = centers[:, None, None, None] + 0.05 * torch.randn(n, 1, 4, 4, generator=g)
    ids = 100 + 3 * torch.arange(n)
    return ImageDataset("toy", images, ids, **kw)


def groups_of(n: int, k: int) -> GroupAssignment:
    return GroupAssignment(np.arange(n) % k, [f"g{i}" for i in range(k)], np.arange(n), "toy")


# ------------------------------------------------------------------------ group assignment


def test_class_groups_and_named_groupings():
    labels = torch.tensor([2, 0, 2, 2, 0, 0])
    d = dataset(
        6, labels=labels, class_names=["zero", "one", "two"], groups={"artist": list("babaab")}
    )
    g = assign_groups(d, "class")
    assert g.names == ["zero", "two"]  # only classes present are groups
    np.testing.assert_array_equal(g.index, [1, 0, 1, 1, 0, 0])
    np.testing.assert_array_equal(g.train_ids, d.ids.numpy())
    a = assign_groups(d, "artist")
    assert a.names == ["a", "b"] and a.index.tolist() == [1, 0, 1, 0, 0, 1]
    with pytest.raises(DataError, match="no grouping 'style'.*class.*artist"):
        assign_groups(d, "style")


def test_csv_groups_with_and_without_header(tmp_path):
    d = dataset(4)  # ids 100, 103, 106, 109
    with_header = tmp_path / "g.csv"
    with_header.write_text("group,id\nx,100\ny,103\nx,106\nz,109\nw,999\n")  # 999: not training
    g = assign_groups(d, {"csv": str(with_header)})
    assert g.names == ["x", "y", "z"] and g.index.tolist() == [0, 1, 0, 2]
    bare = tmp_path / "bare.csv"
    bare.write_text("100,x\n103,y\n106,x\n109,z\n")
    np.testing.assert_array_equal(assign_groups(d, {"csv": str(bare)}).index, g.index)


def test_csv_missing_id_names_the_file_and_the_id(tmp_path):
    path = tmp_path / "groups.csv"
    path.write_text("id,group\n100,x\n103,y\n109,z\n")
    with pytest.raises(DataError, match=r"groups\.csv: no group for training id 106"):
        assign_groups(dataset(4), {"csv": str(path)})
    path.write_text("id,group\n100,x\n100,y\n")
    with pytest.raises(DataError, match="line 3: id 100 listed in groups 'x' and 'y'"):
        assign_groups(dataset(4), {"csv": str(path)})
    with pytest.raises(DataError, match="not found"):
        assign_groups(dataset(4), {"csv": str(tmp_path / "nope.csv")})


def test_kmeans_is_deterministic_and_every_image_in_one_group():
    d = dataset(30)
    a = assign_groups(d, {"kmeans": 3, "seed": 0})
    b = assign_groups(d, {"kmeans": 3, "seed": 0})
    np.testing.assert_array_equal(a.index, b.index)
    assert a.index.shape == (30,) and a.num_groups == 3
    assert a.sizes().sum() == 30 and (a.sizes() == 10).all()  # the three clusters are found
    # Clusters are the pixel clusters, numbered by their smallest member id.
    np.testing.assert_array_equal(a.index, np.arange(30) % 3)
    # The id -> group map does not depend on the order of the images.
    perm = torch.randperm(30, generator=torch.Generator().manual_seed(1))
    shuffled = ImageDataset("toy", d.images[perm], d.ids[perm])
    c = assign_groups(shuffled, {"kmeans": 3, "seed": 0})
    np.testing.assert_array_equal(c.aligned(d.ids.numpy()), a.index)
    with pytest.raises(DataError, match="needs >= 40 images"):
        assign_groups(d, {"kmeans": 40})


def test_group_spec_errors():
    with pytest.raises(DataError, match="groups.kmeans: expected an integer >= 2"):
        parse_group_spec({"kmeans": 1})
    with pytest.raises(DataError, match="unknown key"):
        parse_group_spec({"kmeans": 4, "seeds": 1})
    with pytest.raises(DataError, match="needs 'csv' or 'kmeans'"):
        parse_group_spec({"k": 4})


# -------------------------------------------------------------------------- group subsets


def test_group_subsets_drop_whole_groups():
    groups = GroupAssignment(
        np.random.default_rng(0).integers(0, 10, 200), [f"g{i}" for i in range(10)],
        np.arange(1000, 1200), "toy",
    )  # fmt: skip
    s = make_group_subsets(groups, 300, 0.5, seed=3)
    assert s.masks.shape == (300, 200) and s.masks.flags.c_contiguous
    for m in range(len(s)):
        kept = set()
        for g in range(10):
            members = s.masks[m, groups.index == g]
            assert members.all() or not members.any()  # every group entirely in or out
            if members.all():
                kept.add(g)
        assert len(kept) == 5
    # Each group is kept in about alpha of the subsets (binomial sd ~ 3%).
    freq = kept_groups(10, 300, 0.5, 3).mean(axis=0)
    assert np.all(np.abs(freq - 0.5) < 0.1)
    # Subset m depends only on (seed, m).
    np.testing.assert_array_equal(make_group_subsets(groups, 10, 0.5, 3).masks, s.masks[:10])
    assert not np.array_equal(make_group_subsets(groups, 10, 0.5, 4).masks, s.masks[:10])


def test_group_subsets_refuse_too_few_groups_or_empty_or_full_subsets():
    with pytest.raises(SubsetError, match="at least 2 groups"):
        make_group_subsets(groups_of(8, 1), 4, 0.5, 0)
    with pytest.raises(SubsetError, match="keeps no group"):
        make_group_subsets(groups_of(8, 3), 4, 0.1, 0)
    with pytest.raises(SubsetError, match="keeps every group"):
        make_group_subsets(groups_of(8, 3), 4, 0.9, 0)


def test_saved_group_subsets_roundtrip_and_refuse_other_settings(tmp_path):
    groups = groups_of(40, 8)
    made = ensure_group_subsets(tmp_path, groups, 6, 0.5, 0)
    # Fancy indexing gives a column-major array; the saved masks must still be the same masks.
    np.testing.assert_array_equal(load_subsets(tmp_path / "subsets").masks, made.masks)
    np.testing.assert_array_equal(
        ensure_group_subsets(tmp_path, groups, 6, 0.5, 0).masks, made.masks
    )
    saved = json.loads((tmp_path / "groups.json").read_text())
    assert all(len(kept) == 4 for kept in saved["subset_groups"])
    with pytest.raises(SubsetError, match="differ"):
        ensure_group_subsets(tmp_path, groups, 6, 0.5, 1)


# ----------------------------------------------------------------------------- group LDS


def test_group_lds_equals_spearman_by_hand():
    rng = np.random.default_rng(0)
    n, Q, M, K = 12, 3, 7, 4
    groups = GroupAssignment(rng.permutation(np.arange(n) % K), list("abcd"), np.arange(n), "toy")
    subsets = make_group_subsets(groups, M, 0.5, seed=2)
    values = rng.normal(size=(Q, n)).astype(np.float32)
    # The scores list the training images in another order than the subsets: matched by id.
    order = rng.permutation(n)
    scores = Scores(values=values[:, order], train_ids=np.arange(n)[order],
                    query_names=["q0", "q1", "q2"], method="toy")  # fmt: skip
    losses = rng.normal(size=(M, Q))
    names = ["q2", "q0", "q1"]  # loss columns in another order than the scores' queries
    res = lds(scores, subsets, losses[:, [2, 0, 1]], names, n_boot=50)
    for qi in range(Q):
        pred = [values[qi, subsets.masks[m]].astype(np.float64).sum() for m in range(M)]
        want = scipy.stats.spearmanr(pred, -losses[:, qi]).statistic
        assert res.per_query[qi] == pytest.approx(want, abs=1e-12)
    assert res.mean == pytest.approx(res.per_query.mean())
    # The prediction is the sum of the kept groups' score sums.
    sums = group_score_sums(scores, groups)  # (Q, K)
    kept = kept_groups(K, M, 0.5, 2).astype(np.float64)
    pred = kept @ sums.T
    np.testing.assert_allclose(pred, subsets.masks.astype(np.float64) @ values.T.astype(np.float64))


def test_group_columns_only_when_measured():
    plain = MethodResult("m", fit_seconds=1.0, score_seconds=1.0)
    assert "group_lds" not in plain.to_dict()
    header, _ = table_rows([plain])
    assert not any(h.startswith("group LDS") for h in header)
    rng = np.random.default_rng(0)
    scores = Scores(rng.normal(size=(2, 8)).astype(np.float32), np.arange(8), ["a", "b"], "m")
    plain.group_lds["held_out"] = lds(
        scores, make_group_subsets(groups_of(8, 4), 4, 0.5, 0), rng.normal(size=(4, 2)),
        ["a", "b"], n_boot=20,
    )  # fmt: skip
    assert "group_lds" in plain.to_dict()
    header, rows = table_rows([plain])
    assert "group LDS held_out" in header and len(rows[0]) == len(header)


# ---------------------------------------------------------------------------------- config


def test_identity_unchanged_without_group_subsets():
    base = load_eval_config(ROOT / "configs" / "eval" / "digits2.yaml")
    ident = base.identity()
    assert "group_subsets" not in ident and not base.group_subsets.enabled
    # The group config shares everything that decides the image-level results.
    groups = load_eval_config(ROOT / "configs" / "eval" / "digits2-groups.yaml")
    assert groups.group_subsets.enabled and groups.identity() == ident
    assert groups.group_subsets.groups == {"kmeans": 20, "seed": 0}
    assert {"pixel", "d-trak", "das", "unlearn-up", "unet-features", "ggda"} <= set(groups.methods)
    for name in ("d-trak", "das", "unlearn-up", "unet-features"):
        assert groups.methods[name] == base.methods[name]


def test_group_config_validated():
    exp = {"experiment": str(ROOT / "configs" / "digits2.yaml")}
    with pytest.raises(ConfigError, match="group_subsets.groups"):
        eval_config_from_dict({**exp, "group_subsets": {"groups": {"kmeans": "x"}}})
    with pytest.raises(ConfigError, match="group_subsets.alpha"):
        eval_config_from_dict({**exp, "group_subsets": {"alpha": 1.0}})
    with pytest.raises(ConfigError, match="unknown key"):
        eval_config_from_dict({**exp, "group_subsets": {"groupz": "class"}})


# ------------------------------------------------------------------------------ end to end


@pytest.mark.slow
def test_harness_with_group_subsets_end_to_end(tmp_path):
    from diffattr.evaluation.harness import evaluate

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        res = evaluate(SMOKE, None, tmp_path / "out", progress=False)
    finally:
        torch.set_num_threads(threads)
    out = res.out
    assert res.group_subsets is not None
    gs = res.group_subsets
    assert len(gs.subsets) == 4 and gs.groups.num_groups == 6
    for m in range(len(gs.subsets)):  # the retrained group subsets keep whole groups
        for g in range(6):
            members = gs.subsets.masks[m, gs.groups.index == g]
            assert members.all() or not members.any()
    assert gs.ground_truth.losses.shape == (4, 8)
    for r in res.methods:
        assert r.ok and set(r.group_lds) == {"held_out", "generated"}
        assert -1.0 <= r.group_lds["held_out"].mean <= 1.0
    saved = json.loads((out / "results.json").read_text())
    assert saved["group_subsets"]["groups"]["sizes"] == gs.groups.sizes().tolist()
    assert all("group_lds" in m for m in saved["methods"])
    assert "group LDS held_out" in (out / "comparison.md").read_text()
    assert (out / "group_subsets" / "diffattr.json").exists()
