"""Captioned training data: metadata.jsonl and prompt templates, kept aligned with ids everywhere."""

from __future__ import annotations

import hashlib
import json
import pathlib

import numpy as np
import pytest
import torch

from diffattr.config import ConfigError, DataConfig, config_from_dict, identity_dict
from diffattr.data import DataError, ImageDataset, export_dataset, load_dataset, save_image
from diffattr.data.captions import METADATA_FILE
from diffattr.data.fixtures import write_artbench10_fixture


def _write_images(folder: pathlib.Path, names: list[str], seed: int = 0) -> None:
    g = torch.Generator().manual_seed(seed)
    for name in names:
        save_image(torch.rand((3, 8, 8), generator=g) * 2 - 1, folder / name)


def _write_metadata(path: pathlib.Path, rows: list[dict]) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def _folder(cfg_root: pathlib.Path, **kw) -> ImageDataset:
    return load_dataset(DataConfig(source="imagefolder", root=str(cfg_root), **kw))


def _old_hash(ds: ImageDataset) -> str:
    """The data hash as it was computed before captions existed (shape, ids, images, labels)."""
    h = hashlib.sha256()
    h.update(str(tuple(ds.images.shape)).encode())
    h.update(ds.ids.to(torch.int64).contiguous().numpy().tobytes())
    h.update(ds.images.to(torch.float32).contiguous().numpy().tobytes())
    if ds.labels is not None:
        h.update(ds.labels.to(torch.int64).contiguous().numpy().tobytes())
    return h.hexdigest()


@pytest.fixture
def flat(tmp_path) -> pathlib.Path:
    root = tmp_path / "flat"
    names = ["b.png", "a.png", "c.png", "d.png"]
    _write_images(root, names)
    _write_metadata(
        root / METADATA_FILE,
        [{"file_name": n, "text": f"caption of {n}", "other": n.upper()} for n in names],
    )
    return root


@pytest.fixture
def classes(tmp_path) -> pathlib.Path:
    root = tmp_path / "classes"
    files = [f"{c}/{i}.png" for c in ("post_impressionism", "ukiyo_e") for i in range(4)]
    _write_images(root, files, seed=1)
    return root


@pytest.fixture(scope="module")
def artbench_root(tmp_path_factory) -> pathlib.Path:
    root = tmp_path_factory.mktemp("artbench")
    write_artbench10_fixture(root, n_per_batch=20, seed=4)
    return root


# --- reading -------------------------------------------------------------------------------------


def test_metadata_jsonl_captions_follow_the_images(flat):
    ds = _folder(flat)
    # Ids follow sorted file names; each image keeps its own caption.
    assert ds.captions == [f"caption of {n}" for n in ("a.png", "b.png", "c.png", "d.png")]
    other = _folder(flat, caption_column="other")
    assert other.captions == ["A.PNG", "B.PNG", "C.PNG", "D.PNG"]
    # "./" prefixes and blank lines are fine (as Hugging Face writes them).
    rows = [{"file_name": f"./{n}", "text": n} for n in ("d.png", "a.png", "b.png", "c.png")]
    (flat / METADATA_FILE).write_text("\n".join(json.dumps(r) for r in rows) + "\n\n")
    assert _folder(flat).captions == ["a.png", "b.png", "c.png", "d.png"]


def test_template_fills_class_folder_names(classes):
    ds = _folder(classes, prompt_template="a {class} painting")
    assert ds.class_names == ["post_impressionism", "ukiyo_e"]
    assert ds.captions == ["a post impressionism painting"] * 4 + ["a ukiyo e painting"] * 4
    assert _folder(classes).captions is None


def test_metadata_wins_over_the_template(classes):
    rows = [
        {"file_name": f"{c}/{i}.png", "text": f"{c} {i}"} for c in ("ukiyo_e",) for i in range(4)
    ]
    rows += [{"file_name": f"post_impressionism/{i}.png", "text": f"pi {i}"} for i in range(4)]
    _write_metadata(classes / METADATA_FILE, rows)
    ds = _folder(classes, prompt_template="a {class} painting")
    assert ds.captions == [f"pi {i}" for i in range(4)] + [f"ukiyo_e {i}" for i in range(4)]
    # A class subset keeps each image's own caption.
    uk = _folder(classes, classes=["ukiyo_e"], prompt_template="a {class} painting")
    assert uk.captions == [f"ukiyo_e {i}" for i in range(4)]
    assert uk.ids.tolist() == [4, 5, 6, 7]


def test_split_folders_read_root_metadata_with_split_prefixes(tmp_path):
    root = tmp_path / "splits"
    _write_images(root, ["train/x.png", "train/y.png", "test/z.png"])
    _write_metadata(
        root / METADATA_FILE,
        [{"file_name": f, "text": f} for f in ("train/x.png", "test/z.png", "train/y.png")],
    )
    assert _folder(root).captions == ["train/x.png", "train/y.png"]
    assert _folder(root, split="test").captions == ["test/z.png"]
    # A metadata file inside the split folder takes file names relative to that folder.
    _write_metadata(root / "test" / METADATA_FILE, [{"file_name": "z.png", "text": "zed"}])
    assert _folder(root, split="test").captions == ["zed"]


def test_template_on_other_sources_uses_their_class_names(artbench_root):
    ds = load_dataset(
        DataConfig(
            source="artbench2", root=str(artbench_root), prompt_template="a {class} painting"
        )
    )
    want = {0: "a post impressionism painting", 1: "a ukiyo e painting"}
    assert ds.captions == [want[i] for i in ds.labels.tolist()]
    digits = load_dataset(DataConfig(source="digits-2", limit=6, prompt_template="digit {class}"))
    assert digits.captions == [f"digit {i}" for i in digits.labels.tolist()]
    assert load_dataset(DataConfig(source="digits-2", limit=6)).captions is None


# --- errors --------------------------------------------------------------------------------------


def test_an_image_without_caption_is_named(flat):
    lines = (flat / METADATA_FILE).read_text().splitlines()
    (flat / METADATA_FILE).write_text("\n".join(lines[1:]) + "\n")  # drops b.png
    with pytest.raises(DataError, match=r"image b\.png has no caption") as err:
        _folder(flat)
    assert "\n" not in str(err.value)


def test_metadata_errors_name_file_and_line(flat):
    meta = flat / METADATA_FILE
    good = meta.read_text()
    cases = [
        (good + json.dumps({"file_name": "gone.png", "text": "?"}) + "\n", r"gone\.png names no"),
        (good + "{not json\n", rf"{METADATA_FILE}:5: not a JSON object"),
        (good + json.dumps({"text": "no name"}) + "\n", r":5: no 'file_name'"),
        (good + json.dumps({"file_name": "a.png", "text": "again"}) + "\n", "already has"),
        (
            json.dumps({"file_name": "a.png", "caption": "x"}) + "\n",
            r":1: no caption column 'text'",
        ),
        (json.dumps({"file_name": "a.png", "text": 3}) + "\n", r"is int, expected a string"),
    ]
    for text, pattern in cases:
        meta.write_text(text)
        with pytest.raises(DataError, match=pattern):
            _folder(flat)


def test_bad_templates_and_columns_are_refused(classes, tmp_path):
    with pytest.raises(ConfigError, match=r"must|expected a string containing \{class\}"):
        config_from_dict({"data": {"prompt_template": "a painting"}})
    with pytest.raises(ConfigError, match="caption_column"):
        config_from_dict({"data": {"caption_column": ""}})
    with pytest.raises(ConfigError, match=r"\{class\}"):
        _folder(classes, prompt_template="a painting")
    flat = tmp_path / "plain"
    _write_images(flat, ["a.png"])
    with pytest.raises(DataError, match="no class labels"):
        _folder(flat, prompt_template="a {class}")
    cfg = config_from_dict({"data": {"prompt_template": "a {class} painting"}})
    assert cfg.data.prompt_template == "a {class} painting"


def test_dataset_refuses_misaligned_captions():
    images, ids = torch.zeros(3, 1, 4, 4), torch.arange(3)
    with pytest.raises(DataError, match="3 strings"):
        ImageDataset("x", images, ids, captions=["a", "b"])
    with pytest.raises(DataError, match="row 1"):
        ImageDataset("x", images, ids, captions=["a", None, "c"])  # type: ignore[list-item]


# --- subsets, hashes, description -----------------------------------------------------------------


def test_subsets_and_limits_keep_captions_with_their_ids(artbench_root):
    cfg = dict(source="artbench2", root=str(artbench_root), prompt_template="a {class} painting")
    full = load_dataset(DataConfig(**cfg))
    by_id = dict(zip(full.ids.tolist(), full.captions, strict=True))
    ds = ImageDataset(
        "captioned",
        full.images,
        full.ids,
        full.labels,
        full.class_names,
        captions=[f"{c} #{i}" for c, i in zip(full.captions, full.ids.tolist(), strict=True)],
    )
    own = dict(zip(ds.ids.tolist(), ds.captions, strict=True))
    mask = torch.arange(len(ds)) % 3 == 1
    picked = [ds.subset(mask), ds.select_ids(ds.ids[[5, 0, 3]])]
    for sub in picked:
        assert sub.captions == [own[i] for i in sub.ids.tolist()]
    for extra in (dict(limit=7), dict(limit=8, selection="stratified", selection_seed=3)):
        lim = load_dataset(DataConfig(**cfg, **extra))
        assert lim.captions == [by_id[i] for i in lim.ids.tolist()]


def test_hash_covers_captions_and_is_unchanged_without_them(classes):
    plain = _folder(classes)
    assert plain.captions is None
    assert plain.data_hash() == _old_hash(plain)  # the pre-caption formula, computed here
    digits = load_dataset(DataConfig(source="digits-2", limit=10))
    assert digits.data_hash() == _old_hash(digits)

    captioned = _folder(classes, prompt_template="a {class} painting")
    h = captioned.data_hash()
    assert h != plain.data_hash()
    other = _folder(classes, prompt_template="an {class} painting")
    assert other.data_hash() != h
    assert _folder(classes, prompt_template="a {class} painting").data_hash() == h
    captioned.captions[2] = "changed"  # in place: the hash sees it (captions are not memoised)
    assert captioned.data_hash() not in (h, plain.data_hash())


def test_describe_mentions_captions(classes):
    d = _folder(classes, prompt_template="a {class} painting").describe()
    assert d["captions"]["n"] == 8 and d["captions"]["distinct"] == 2
    assert d["captions"]["values"] == ["a post impressionism painting", "a ukiyo e painting"]
    assert "captions" not in _folder(classes).describe()


def test_new_data_keys_stay_out_of_old_identities():
    ident = identity_dict(config_from_dict({}))
    assert "prompt_template" not in ident["data"] and "caption_column" not in ident["data"]
    ident = identity_dict(config_from_dict({"data": {"prompt_template": "a {class}"}}))
    assert ident["data"]["prompt_template"] == "a {class}"


# --- export ----------------------------------------------------------------------------------------


def test_export_round_trip_keeps_captions(artbench_root, tmp_path):
    cfg = DataConfig(
        source="artbench2", root=str(artbench_root), limit=9, prompt_template="a {class} painting"
    )
    ds = load_dataset(cfg)
    out = export_dataset(ds, tmp_path / "export", progress=False)
    rows = [json.loads(line) for line in (out / METADATA_FILE).read_text().splitlines()]
    assert [r["text"] for r in rows] == ds.captions
    back = _folder(out)
    assert back.ids.tolist() == ds.ids.tolist()
    assert back.captions == ds.captions
    assert back.class_names == ds.class_names
    np.testing.assert_array_equal(back.labels.numpy(), ds.labels.numpy())
    assert back.data_hash() == ds.data_hash()  # same 8-bit pixels, ids, labels and captions
    # A subset exported keeps its captions too.
    sub = ds.select_ids(ds.ids[[4, 1]])
    again = _folder(export_dataset(sub, tmp_path / "sub", progress=False))
    # (re-read in id order: each id with its own caption)
    assert dict(zip(again.ids.tolist(), again.captions, strict=True)) == dict(
        zip(sub.ids.tolist(), sub.captions, strict=True)
    )
    assert sorted(sub.ids.tolist()) == again.ids.tolist() and len(set(sub.captions)) == 2
    # Without captions no metadata file is written.
    plain = export_dataset(load_dataset(DataConfig(source="digits-2", limit=3)), tmp_path / "p")
    assert not (plain / METADATA_FILE).exists()
