"""The report's sections one by one, on hand-made inputs: perceptual hash, near-copy verdict,
group shares and their bootstrap, agreement, method quality from an evaluation folder."""

from __future__ import annotations

import json
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from diffattr.data.dataset import ImageDataset
from diffattr.report.agreement import agreement, likely_sources
from diffattr.report.groups import (
    GroupError,
    Groups,
    bootstrap_shares,
    make_groups,
    method_groups,
    shares,
)
from diffattr.report.nearcopy import hamming, near_copy, phash_bits, verdict
from diffattr.report.quality import quality
from diffattr.report.render import fmt_num, fmt_pct, fmt_ratio


def blobs(n: int, seed: int = 0, size: int = 16) -> torch.Tensor:
    """``(n, 1, size, size)`` smooth random images in [-1, 1] (8x8 noise upsampled). Images with
    much less detail leave most of pHash's 64 coefficients near zero, where noise flips bits."""
    g = torch.Generator().manual_seed(seed)
    small = torch.rand(n, 1, 8, 8, generator=g) * 2 - 1
    return torch.nn.functional.interpolate(small, size=(size, size), mode="bilinear")


def test_phash_is_stable_under_noise_and_flips_for_the_negative():
    x = blobs(6)
    bits = phash_bits(x)
    assert bits.shape == (6, 64) and bits.dtype == bool
    noisy = (x + 0.03 * torch.randn(x.shape, generator=torch.Generator().manual_seed(1))).clamp(
        -1, 1
    )
    assert hamming(phash_bits(noisy), bits).max() <= 6
    assert hamming(phash_bits(-x), bits).min() >= 50  # the negative inverts nearly every bit
    others = hamming(bits[1:], bits[0])
    assert others.min() > hamming(phash_bits(noisy), bits)[0]


def test_near_copy_flags_a_copy_and_not_a_new_image():
    train = blobs(40)
    ids = np.arange(100, 140)
    copy = (train[7] + 0.01).clamp(-1, 1)
    result = near_copy(train, ids, copy, {}, quantile=0.01)
    assert result["flagged"] and "probable memorisation" in result["verdict"]
    assert "107" in result["verdict"] and result["closest"][0]["id"] == 107
    pixel = result["signals"][0]
    assert pixel["name"] == "pixel_rms" and pixel["flag"] and pixel["value"] < pixel["threshold"]
    assert result["n_pairs"] == 40 * 39 // 2 and not result["pairs_sampled"]
    fresh = near_copy(train, ids, blobs(1, seed=99)[0], {}, quantile=0.01)
    assert not fresh["flagged"] and fresh["verdict"].startswith("no near copy")


def test_embedding_signal_alone_is_only_possible():
    train = blobs(30)
    feats = torch.randn(30, 5, generator=torch.Generator().manual_seed(0))
    cos = torch.nn.functional.cosine_similarity(feats, feats[3][None]).numpy()
    result = near_copy(train, np.arange(30), blobs(1, seed=7)[0], {"unet-features": (feats, cos)})
    emb = result["signals"][-1]
    assert emb["name"] == "embedding_cosine:unet-features" and emb["flag"]
    assert result["verdict"].startswith("possible near copy")


def test_group_shares_and_bootstrap():
    index = np.array([0, 0, 1, 1, 1, 1, 1, 1])
    values = np.array([3.0, 1.0, 1.0, -5.0, 0.0, 0.0, 0.0, 0.0])
    np.testing.assert_allclose(shares(values, index, 2), [0.8, 0.2])
    assert shares(-np.abs(values), index, 2) is None
    boot = bootstrap_shares(values, index, 2, draws=300, seed=0)
    assert boot.shape == (300, 2)
    ok = ~np.isnan(boot[:, 0])
    np.testing.assert_allclose(boot[ok].sum(axis=1), 1.0)
    groups = Groups("class", "test", ["a", "b"], index)
    table = method_groups(values, np.stack([values, values]), groups, draws=300)
    top = table["rows"][0]
    assert top["group"] == "a" and top["share"] == pytest.approx(0.8)
    assert top["train_share"] == pytest.approx(0.25) and top["ratio"] == pytest.approx(3.2)
    assert top["ci"][0] <= top["share"] <= top["ci"][1] and top["half_shares"] == [0.8, 0.8]


def _dataset(n: int = 12) -> ImageDataset:
    return ImageDataset(
        name="t",
        images=blobs(n),
        ids=torch.arange(10, 10 + n),
        labels=torch.tensor([i % 3 for i in range(n)]),
        class_names=["x", "y", "z"],
    )


def test_group_specs(tmp_path):
    data = _dataset()
    cls = make_groups("class", data, None)
    assert cls.names == ["x", "y", "z"] and cls.of(4) == "y" and cls.label == "class"
    path = tmp_path / "g.csv"
    path.write_text(
        "id,group\n" + "".join(f"{i},{'hi' if i < 15 else 'lo'}\n" for i in range(10, 22))
    )
    csv = make_groups(f"csv:{path}", data, None)
    assert csv.names == ["hi", "lo"] and int((csv.index == 0).sum()) == 5
    path.write_text("10,a\n")
    with pytest.raises(GroupError, match="no group for training id 11"):
        make_groups(f"csv:{path}", data, None)
    km = make_groups("kmeans:3", data, None, seed=0)
    again = make_groups("kmeans:3", data, None, seed=0)
    assert np.array_equal(km.index, again.index) and len(set(km.index.tolist())) == 3
    feats = np.random.default_rng(0).normal(size=(12, 4))
    assert "unet-features" in make_groups("kmeans:2", data, ("unet-features", feats)).how
    for bad, msg in [("kmeans:1", "K must be between"), ("nope", "expected class")]:
        with pytest.raises(GroupError, match=msg):
            make_groups(bad, data, None)


def test_agreement_and_likely_sources():
    rows, need = likely_sources({"a": [1, 2, 3], "b": [2, 1, 9], "c": [7, 8, 2]})
    assert need == 2 and [r["id"] for r in rows] == [2, 1]
    assert rows[0]["n_methods"] == 3 and rows[0]["methods"] == ["a", "b", "c"]
    v = np.arange(10.0)
    section = agreement({"a": v, "b": v, "c": -v}, {"a": [9, 8], "b": [9, 8], "c": [0, 1]}, 2)
    pairs = {(p["a"], p["b"]): p for p in section["pairs"]}
    assert pairs[("a", "b")]["overlap"] == 1.0 and pairs[("a", "b")]["spearman"] == pytest.approx(1)
    assert pairs[("a", "c")]["overlap"] == 0.0 and pairs[("a", "c")]["spearman"] == pytest.approx(
        -1
    )


def _eval_folder(tmp_path, model_hash: str, experiment: dict) -> object:
    folder = tmp_path / "eval"
    folder.mkdir()
    lds = {"generated": {"mean": 0.3, "ci_low": 0.2, "ci_high": 0.4, "n_subsets": 16}}
    results = {
        "model_hash": model_hash,
        "methods": [
            {"method": "d-trak", "error": None, "lds": lds},
            {"method": "das", "error": "boom", "lds": {}},
        ],
    }
    (folder / "results.json").write_text(json.dumps(results))
    record = {"kind": "evaluation", "identity": {"eval_config": {"experiment": experiment}}}
    (folder / "diffattr.json").write_text(json.dumps(record))
    return folder


def test_quality_says_which_model_was_evaluated(tmp_path):
    config = {"data": {"size": 16}, "model": {"sample_size": 16}, "train": {"steps": 10}}
    model = SimpleNamespace(model_hash=lambda: "a" * 64, record={"config": config})
    none = quality(None, model, ["d-trak"])
    assert none["relation"] == "none" and "No evaluation exists" in none["message"]
    same = quality(_eval_folder(tmp_path, "a" * 64, config), model, ["d-trak", "das", "pixel"])
    assert same["relation"] == "this model"
    assert same["methods"][0]["lds"]["generated"]["mean"] == 0.3
    assert same["methods"][1]["note"] == "evaluation failed: boom"
    assert same["methods"][2]["note"] == "not evaluated"
    other = {**config, "data": {"size": 8}}
    (tmp_path / "b").mkdir()
    got = quality(_eval_folder(tmp_path / "b", "b" * 64, other), model, ["d-trak"])
    assert got["relation"] == "other config" and "data.size" in got["message"]
    (tmp_path / "c").mkdir()
    got = quality(_eval_folder(tmp_path / "c", "b" * 64, config), model, ["d-trak"])
    assert got["relation"] == "same config" and "same config" in got["message"]


def test_number_formats():
    assert fmt_num(0.123456) == "0.1235" and fmt_num(7) == "7" and fmt_num(None) == "-"
    assert fmt_num(float("nan")) == "-" and fmt_pct(0.125) == "12.5%" and fmt_ratio(4.04) == "4.0x"


def test_verdict_needs_pixels_or_two_signals_for_probable():
    def sig(name, flag, closest):
        return {"name": name, "label": name, "flag": flag, "closest_id": closest}

    phash_only = [sig("pixel_rms", False, 1), sig("phash", True, 4)]
    text, flagged = verdict(phash_only)
    assert flagged and text.startswith("possible near copy of training image(s) [4]")
    two = [sig("phash", True, 4), sig("embedding_cosine:clip", True, 4)]
    assert verdict(two)[0].startswith("probable memorisation: near copy of training image(s) [4]")
    apart = [sig("phash", True, 4), sig("embedding_cosine:clip", True, 9)]
    assert verdict(apart)[0].startswith("possible near copy")
    assert verdict([sig("pixel_cosine", True, 2)])[0].startswith("probable memorisation")
    assert verdict([sig("pixel_rms", False, 2)]) == (
        "no near copy found: the query is not unusually close to any training image",
        False,
    )
