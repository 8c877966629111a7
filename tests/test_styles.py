"""The ``digit-styles`` source: stable ids, deterministic styled pixels, splits, captions."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch

from diffattr.config import DataConfig
from diffattr.data.dataset import DataError
from diffattr.data.digits import _sklearn_digits
from diffattr.data.images import resize_images
from diffattr.data.registry import DATASETS, load_dataset, supported_sizes
from diffattr.data.styles import DIGIT_WORDS, STYLE_NAMES, caption_words

N_ROWS = 1797
N_STYLES = len(STYLE_NAMES)


def _load(**kw):
    return load_dataset(DataConfig(source="digit-styles", **kw))


@pytest.fixture(scope="module")
def train():
    return _load()


@pytest.fixture(scope="module")
def test_split():
    return _load(split="test")


@pytest.fixture(scope="module")
def sk():
    return _sklearn_digits()


def test_registered_with_sizes_and_default_16(train):
    assert "digit-styles" in DATASETS
    assert supported_sizes("digit-styles") == (8, 32)
    assert train.image_shape == (3, 16, 16)
    assert train.images.dtype == torch.float32
    assert float(train.images.min()) >= -1.0 and float(train.images.max()) <= 1.0
    assert _load(size=8, limit=3).image_shape == (3, 8, 8)
    assert _load(size=32, limit=3).image_shape == (3, 32, 32)
    # The digits sources keep their own default.
    assert load_dataset(DataConfig(source="digits", limit=2)).image_shape == (1, 8, 8)


def test_ids_follow_the_formula_and_cover_both_splits(train, test_split, sk):
    _, target = sk
    all_ids = torch.cat([train.ids, test_split.ids]).sort().values
    assert torch.equal(all_ids, torch.arange(N_ROWS * N_STYLES))
    for ds in (train, test_split):
        ids = ds.ids.numpy()
        assert np.all(np.diff(ids) > 0)  # id order
        rows, styles = ids // N_STYLES, ids % N_STYLES
        assert ds.class_names == list(STYLE_NAMES)
        assert np.array_equal(ds.labels.numpy(), styles)
        assert ds.groups["style"] == [STYLE_NAMES[s] for s in styles]
        assert ds.groups["digit"] == [DIGIT_WORDS[d] for d in target[rows]]
    # A few ids by hand: row 3 is a "3"; id = row * 6 + style index.
    one = train.select_ids([3 * N_STYLES + STYLE_NAMES.index("bold")])
    assert one.groups["style"] == ["bold"] and one.groups["digit"] == ["three"]


def test_splits_are_disjoint_by_digit_row(train, test_split):
    train_rows = set((train.ids // N_STYLES).tolist())
    test_rows = set((test_split.ids // N_STYLES).tolist())
    assert not train_rows & test_rows
    assert train_rows | test_rows == set(range(N_ROWS))
    assert all(r % 5 == 0 for r in test_rows)
    # Every row brings all of its styles into its split.
    assert len(train) == len(train_rows) * N_STYLES
    assert len(test_split) == len(test_rows) * N_STYLES


def test_pixels_are_deterministic_across_loads_and_class_selections(train):
    again = _load()
    assert torch.equal(again.ids, train.ids)
    assert torch.equal(again.images, train.images)
    assert again.data_hash() == train.data_hash()
    some = _load(classes=["dotted", "bold"])
    assert some.class_names == ["bold", "dotted"]  # STYLE_NAMES order, not the listed order
    assert set(some.groups["style"]) == {"bold", "dotted"}
    assert np.array_equal(
        some.labels.numpy(), [["bold", "dotted"].index(s) for s in some.groups["style"]]
    )
    same = train.select_ids(some.ids)
    assert torch.equal(same.images, some.images)
    assert same.captions == some.captions
    # A limit keeps each image's pixels too.
    few = _load(classes=["outline"], limit=5)
    assert torch.equal(train.select_ids(few.ids).images, few.images)


def test_plain_is_the_resized_grey_digit_on_three_channels(train, sk):
    pixels, _ = sk
    plain = train.subset([s == "plain" for s in train.groups["style"]])
    rows = (plain.ids // N_STYLES).numpy()
    gray = torch.from_numpy(pixels[rows] / 16.0).to(torch.float32).unsqueeze(1)
    want = resize_images(gray, 16).clamp(0.0, 1.0) * 2.0 - 1.0
    assert torch.equal(plain.images, want.expand(-1, 3, -1, -1))
    # ... and matches the 1-channel digits source up to float rounding.
    digits = load_dataset(DataConfig(source="digits", size=16)).select_ids(rows)
    assert torch.allclose(plain.images[:, :1], digits.images, atol=1e-5)


def test_every_style_differs_from_every_other_for_the_same_digit(train):
    img = train.images.view(-1, N_STYLES, *train.image_shape)  # (rows, style, C, H, W)
    assert torch.equal(
        train.ids.view(-1, N_STYLES) % N_STYLES, torch.arange(N_STYLES).expand(len(img), -1)
    )
    for a, b in itertools.combinations(range(N_STYLES), 2):
        dist = (img[:, a] - img[:, b]).abs().mean(dim=(1, 2, 3))
        assert float(dist.min()) > 0.05, (STYLE_NAMES[a], STYLE_NAMES[b], float(dist.min()))


def test_default_captions(train, test_split, sk):
    _, target = sk
    assert train.captions == train.groups["caption"]
    both = {"train": train, "test": test_split}
    for row, style in [(3, "bold"), (0, "plain"), (1796, "dotted"), (42, "inverse")]:
        ds = both["test" if row % 5 == 0 else "train"]
        one = ds.select_ids([row * N_STYLES + STYLE_NAMES.index(style)])
        assert one.captions == [f"a {DIGIT_WORDS[target[row]]} in {style} style"]
    assert train.select_ids([3 * N_STYLES + 1]).captions == ["a three in bold style"]


def test_prompt_template_fills_class_style_and_digit(sk):
    _, target = sk
    ds = _load(prompt_template="{digit}: {class} / {style}", classes=["striped"], limit=3)
    rows = (ds.ids // N_STYLES).tolist()
    assert ds.captions == [f"{DIGIT_WORDS[target[r]]}: striped / striped" for r in rows]
    assert ds.groups["caption"] == ds.captions


def test_prompt_template_with_unknown_field_is_a_data_error():
    with pytest.raises(DataError, match=r"data\.prompt_template.*\{colour\}"):
        _load(prompt_template="a {class} in {colour}")


def test_bad_class_and_size_name_the_field():
    with pytest.raises(DataError, match=r"data\.classes.*'wavy'"):
        _load(classes=["bold", "wavy"])
    for size in (7, 33):
        with pytest.raises(DataError, match=r"data\.size.*8\.\.32"):
            _load(size=size)


def test_stratified_limit_balances_styles():
    ds = _load(limit=60, selection="stratified", selection_seed=1)
    assert len(ds) == 60
    assert torch.bincount(ds.labels, minlength=N_STYLES).tolist() == [10] * N_STYLES
    again = _load(limit=60, selection="stratified", selection_seed=1)
    assert torch.equal(ds.ids, again.ids)


def test_caption_words_cover_every_caption(train, test_split):
    words = caption_words()
    assert list(words) == sorted(set(words))
    assert {"a", "in", "style", *STYLE_NAMES, *DIGIT_WORDS} == set(words)
    used = {w for ds in (train, test_split) for c in ds.captions for w in c.split()}
    assert used == set(words)
