"""Data layer: official batch formats, restricted unpickling, digits, image folders, image I/O."""

from __future__ import annotations

import csv
import os
import pathlib
import pickle
import pickletools

import numpy as np
import pytest
import torch
from PIL import Image

from diffattr.config import DataConfig
from diffattr.data import (
    DATASETS,
    DataError,
    UnsafePickleError,
    export_dataset,
    inspect_dataset,
    list_datasets,
    load_dataset,
    load_image,
    load_image_folder,
    make_grid,
    safe_load,
    save_image,
    save_images,
    write_artbench10_fixture,
    write_cifar10_fixture,
)
from diffattr.data.fixtures import (
    ARTBENCH10_STYLES,
    CIFAR10_LABEL_NAMES,
    dump_py2_pickle,
    fixture_arrays,
    write_batch,
)
from diffattr.data.images import resize_images

N_PER_BATCH = 20


@pytest.fixture(scope="module")
def cifar_root(tmp_path_factory) -> pathlib.Path:
    root = tmp_path_factory.mktemp("cifar")
    write_cifar10_fixture(root, n_per_batch=N_PER_BATCH, seed=3)
    return root


@pytest.fixture(scope="module")
def artbench_root(tmp_path_factory) -> pathlib.Path:
    root = tmp_path_factory.mktemp("artbench")
    write_artbench10_fixture(root, n_per_batch=N_PER_BATCH, seed=4)
    return root


@pytest.fixture(scope="module")
def sk_digits():
    from sklearn.datasets import load_digits

    b = load_digits()
    return b.images, b.target


def _cfg(**kw) -> DataConfig:
    return DataConfig(**kw)


def _train_labels(seed: int) -> np.ndarray:
    arrays = fixture_arrays(N_PER_BATCH, seed)
    return np.concatenate([arrays[f"data_batch_{i}"][1] for i in range(1, 6)])


def _scaled(v) -> np.ndarray:
    """Reference scaling of uint8 pixels, computed independently of the package."""
    return np.asarray(v, dtype=np.float64) / 127.5 - 1.0


# --- official format ---------------------------------------------------------------------------


def test_cifar_fixture_has_the_official_pickle_structure(cifar_root):
    folder = cifar_root / "cifar-10-batches-py"
    names = sorted(p.name for p in folder.iterdir())
    assert names == sorted(
        [*(f"data_batch_{i}" for i in range(1, 6)), "test_batch", "batches.meta"]
    )
    raw = (folder / "data_batch_1").read_bytes()
    assert raw[:2] == b"\x80\x02"  # protocol 2
    ops = list(pickletools.genops(raw))
    globals_used = {arg for op, arg, _ in ops if op.name == "GLOBAL"}
    assert globals_used == {"numpy.core.multiarray _reconstruct", "numpy ndarray", "numpy dtype"}
    # Keys are Python-2 strings, as in the real files.
    assert {"SHORT_BINSTRING", "BINSTRING"} & {op.name for op, _, _ in ops}
    assert "BINUNICODE" not in {op.name for op, _, _ in ops}
    # The stock reader recipe from the CIFAR-10 page reads it (safe: the test wrote this file).
    rec = pickle.loads(raw, encoding="bytes")
    assert set(rec) == {b"data", b"labels", b"filenames", b"batch_label"}
    data, labels = fixture_arrays(N_PER_BATCH, 3)["data_batch_1"]
    np.testing.assert_array_equal(rec[b"data"], data)
    assert rec[b"labels"] == labels.tolist()
    meta = pickle.loads((folder / "batches.meta").read_bytes(), encoding="bytes")
    assert [n.decode() for n in meta[b"label_names"]] == list(CIFAR10_LABEL_NAMES)
    # ArtBench fixture: the torchvision-style reader (latin1) finds meta["styles"].
    art = pickle.loads(
        (write_artbench10_fixture(cifar_root / "ab", 10) / "meta").read_bytes(), encoding="latin1"
    )
    assert art["styles"] == list(ARTBENCH10_STYLES)


def test_known_pixels_round_trip_with_plane_layout(tmp_path):
    folder = tmp_path / "cifar-10-batches-py"
    rng = np.random.default_rng(0)
    batches = {}
    for name in [*(f"data_batch_{i}" for i in range(1, 6)), "test_batch"]:
        data = rng.integers(0, 256, size=(3, 3072), dtype=np.uint8)
        batches[name] = data
        write_batch(folder / name, data, [0, 1, 2], filenames=["a.png", "b.png", "c.png"])
    dump_py2_pickle({"label_names": list(CIFAR10_LABEL_NAMES)}, folder / "batches.meta")
    d = batches["data_batch_2"]
    d[1, 0 * 1024 + 5 * 32 + 7] = 200  # red plane, row 5, column 7 of image 1 of batch 2
    d[1, 2 * 1024 + 31 * 32 + 0] = 13  # blue plane, row 31, column 0
    write_batch(folder / "data_batch_2", d, [0, 1, 2])

    ds = load_dataset(_cfg(source="cifar10", root=str(folder)))  # root = the folder itself
    assert ds.ids.tolist() == list(range(15))
    k = 3 + 1  # global id: batch 1 has 3 rows
    assert ds.images[k, 0, 5, 7].item() == pytest.approx(200 / 127.5 - 1, abs=1e-7)
    assert ds.images[k, 2, 31, 0].item() == pytest.approx(13 / 127.5 - 1, abs=1e-7)
    # Every pixel: R, G, B planes of 32x32, row-major.
    full = np.concatenate([batches[f"data_batch_{i}"] for i in range(1, 6)])
    for idx in [(0, 0, 0, 0), (7, 1, 17, 3), (14, 2, 31, 31), (9, 1, 0, 31)]:
        n, c, y, x = idx
        want = _scaled(full[n, c * 1024 + y * 32 + x])
        assert ds.images[idx].item() == pytest.approx(float(want), abs=1e-7)
    ref = _scaled(full.reshape(15, 3, 32, 32))
    np.testing.assert_allclose(ds.images.numpy(), ref, atol=1e-6)
    test = load_dataset(_cfg(source="cifar10", root=str(tmp_path), split="test"))
    np.testing.assert_allclose(
        test.images.numpy(), _scaled(batches["test_batch"].reshape(3, 3, 32, 32)), atol=1e-6
    )


# --- CIFAR / ArtBench selection ------------------------------------------------------------------


def test_cifar10_ids_labels_and_test_split(cifar_root):
    ds = load_dataset(_cfg(source="cifar10", root=str(cifar_root)))
    labels = _train_labels(3)
    assert ds.ids.tolist() == list(range(5 * N_PER_BATCH))
    assert ds.labels.tolist() == labels.tolist()
    assert ds.class_names == list(CIFAR10_LABEL_NAMES)
    assert ds.groups["class"] == [CIFAR10_LABEL_NAMES[i] for i in labels]
    assert ds.images.dtype == torch.float32 and ds.image_shape == (3, 32, 32)
    test = load_dataset(_cfg(source="cifar10", root=str(cifar_root), split="test"))
    assert test.ids.tolist() == list(range(N_PER_BATCH))
    np.testing.assert_allclose(
        test.images.numpy(),
        _scaled(fixture_arrays(N_PER_BATCH, 3)["test_batch"][0].reshape(-1, 3, 32, 32)),
        atol=1e-6,
    )


def test_cifar2_keeps_original_ids_and_limit(cifar_root):
    labels = _train_labels(3)
    want_ids = np.flatnonzero(np.isin(labels, [1, 7]))  # automobile, horse
    ds = load_dataset(_cfg(source="cifar2", root=str(cifar_root)))
    assert ds.ids.tolist() == want_ids.tolist()
    assert ds.class_names == ["automobile", "horse"]
    assert ds.labels.tolist() == [0 if labels[i] == 1 else 1 for i in want_ids]
    assert ds.groups["class"] == [CIFAR10_LABEL_NAMES[labels[i]] for i in want_ids]
    full = load_dataset(_cfg(source="cifar10", root=str(cifar_root)))
    torch.testing.assert_close(ds.images, full.select_ids(ds.ids).images, rtol=0, atol=0)

    lim = load_dataset(_cfg(source="cifar2", root=str(cifar_root), limit=5))
    assert lim.ids.tolist() == want_ids[:5].tolist()
    horse = load_dataset(_cfg(source="cifar2", root=str(cifar_root), classes=["horse"]))
    assert horse.ids.tolist() == np.flatnonzero(labels == 7).tolist()
    assert horse.labels.tolist() == [0] * len(horse) and horse.class_names == ["horse"]
    with pytest.raises(DataError, match="valid"):
        load_dataset(_cfg(source="cifar2", root=str(cifar_root), classes=["dog"]))


def test_stratified_limit_is_sklearns_class_balanced_draw(sk_digits):
    from sklearn.model_selection import train_test_split

    _, target = sk_digits
    pool = [i for i in range(len(target)) if target[i] in (0, 1) and i % 5]  # digits-2 train
    cfg = _cfg(source="digits-2", limit=40, selection="stratified", selection_seed=42)
    ds = load_dataset(cfg)
    # D-TRAK's recipe: train_test_split(pool, train_size=N, random_state=42, stratify=labels).
    want, _ = train_test_split(
        np.array(pool), train_size=40, random_state=42, stratify=target[pool]
    )
    assert ds.ids.tolist() == sorted(want.tolist())
    counts = np.bincount(ds.labels.numpy())
    share = np.bincount(target[pool]) / len(pool) * 40
    assert np.all(np.abs(counts - share) <= 1)  # each class keeps its share
    assert load_dataset(cfg).ids.tolist() == ds.ids.tolist()  # reproducible
    other = load_dataset(_cfg(source="digits-2", limit=40, selection="stratified"))
    assert other.ids.tolist() != ds.ids.tolist()  # the seed matters
    with pytest.raises(DataError, match="selection"):
        load_dataset(_cfg(source="digits-2", limit=40, selection="random"))


def test_artbench_variants_select_styles(artbench_root):
    labels = _train_labels(4)
    for source, styles in [
        ("artbench10", ARTBENCH10_STYLES),
        ("artbench2", ("post_impressionism", "ukiyo_e")),
        ("artbench5", ("baroque", "post_impressionism", "renaissance", "romanticism", "ukiyo_e")),
    ]:
        ds = load_dataset(_cfg(source=source, root=str(artbench_root)))
        idx = [ARTBENCH10_STYLES.index(s) for s in styles]
        want = np.flatnonzero(np.isin(labels, idx))
        assert ds.ids.tolist() == want.tolist(), source
        assert ds.class_names == list(styles)
        assert ds.groups["style"] == [ARTBENCH10_STYLES[labels[i]] for i in want]
        assert "class" not in ds.groups
    full = load_dataset(_cfg(source="artbench10", root=str(artbench_root), limit=3))
    data = fixture_arrays(N_PER_BATCH, 4)["data_batch_1"][0][:3].reshape(3, 3, 32, 32)
    np.testing.assert_allclose(full.images.numpy(), _scaled(data), atol=1e-6)


def test_resize_is_antialiased_bilinear(cifar_root):
    ds16 = load_dataset(_cfg(source="cifar10", root=str(cifar_root), size=16, limit=4))
    ds32 = load_dataset(_cfg(source="cifar10", root=str(cifar_root), limit=4))
    assert ds16.image_shape == (3, 16, 16)
    # Brute force: halving with an antialiased bilinear (triangle) filter averages input pixels
    # 2i-1..2i+2 with weights 1,3,3,1 / 8 along each axis (interior outputs).
    x = ds32.images.double().numpy()
    w = np.array([1, 3, 3, 1]) / 8
    i, j = 5, 9
    patch = x[:, :, 2 * i - 1 : 2 * i + 3, 2 * j - 1 : 2 * j + 3]
    want = np.einsum("ncyx,y,x->nc", patch, w, w)
    np.testing.assert_allclose(ds16.images[:, :, i, j].numpy(), want, atol=1e-5)
    assert ds16.images.min() >= -1 and ds16.images.max() <= 1
    const = torch.full((1, 3, 32, 32), 0.25)
    torch.testing.assert_close(resize_images(const, 20), torch.full((1, 3, 20, 20), 0.25))


# --- restricted unpickler --------------------------------------------------------------------------


class _SystemPayload:
    def __init__(self, marker: pathlib.Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"echo pwned > {self.marker}",))


class _WritePayload:
    def __init__(self, marker: pathlib.Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (pathlib.Path.write_text, (self.marker, "pwned"))


@pytest.mark.parametrize("payload_cls", [_SystemPayload, _WritePayload])
@pytest.mark.parametrize("protocol", [0, 2, 4])
def test_restricted_unpickler_refuses_code(tmp_path, payload_cls, protocol):
    marker = tmp_path / "side_effect.txt"
    folder = tmp_path / "cifar-10-batches-py"
    write_cifar10_fixture(tmp_path, n_per_batch=10)
    evil = {b"data": payload_cls(marker), b"labels": [0], b"batch_label": b"x"}
    (folder / "data_batch_1").write_bytes(pickle.dumps(evil, protocol=protocol))
    with pytest.raises(UnsafePickleError) as err:
        load_dataset(_cfg(source="cifar10", root=str(tmp_path)))
    msg = str(err.value)
    assert "data_batch_1" in msg and "refused" in msg
    # The first global the pickle names is refused: os.system itself, or for the file-writing
    # payload pathlib's class / builtins.getattr (how protocols < 4 reach a method).
    first = {_SystemPayload: "system", _WritePayload: "write_text" if protocol >= 4 else "getattr"}
    assert first[payload_cls] in msg
    assert not marker.exists()
    with pytest.raises(UnsafePickleError):
        safe_load(folder / "data_batch_1")
    assert not marker.exists()


def test_restricted_unpickler_limits_codecs_and_builtins(tmp_path):
    path = tmp_path / "p.pkl"
    path.write_bytes(b"\x80\x02c_codecs\nencode\nX\x03\x00\x00\x00abcX\x05\x00\x00\x00rot13\x86R.")
    with pytest.raises(UnsafePickleError, match=r"p\.pkl.*refused _codecs.encode.*rot13"):
        safe_load(path)
    path.write_bytes(pickle.dumps(eval, protocol=2))
    with pytest.raises(UnsafePickleError, match=r"refused.*\.eval"):
        safe_load(path)
    path.write_bytes(b"\x80\x02c_codecs\nencode\nX\x03\x00\x00\x00abcX\x06\x00\x00\x00latin1\x86R.")
    assert safe_load(path) == b"abc"


# --- clear errors --------------------------------------------------------------------------------


def _fresh(tmp_path) -> pathlib.Path:
    return write_cifar10_fixture(tmp_path, n_per_batch=10)


def test_truncated_and_corrupt_batches_name_the_file(tmp_path):
    folder = _fresh(tmp_path)
    raw = (folder / "data_batch_2").read_bytes()
    (folder / "data_batch_2").write_bytes(raw[: len(raw) // 2])
    with pytest.raises(DataError, match=r"data_batch_2.*(truncated|corrupt)"):
        load_dataset(_cfg(source="cifar10", root=str(tmp_path)))
    (folder / "data_batch_2").write_bytes(b"not a pickle at all")
    with pytest.raises(DataError, match="data_batch_2"):
        load_dataset(_cfg(source="cifar10", root=str(tmp_path)))


@pytest.mark.parametrize(
    "data, labels, pattern",
    [
        (np.zeros((4, 100), np.uint8), [0] * 4, r"data_batch_3.*3072"),
        (np.zeros((4, 3072), np.float32), [0] * 4, r"data_batch_3.*uint8"),
        (np.zeros((4, 3072), np.uint8), [0] * 3, r"data_batch_3.*3 labels for 4 images"),
        (np.zeros((4, 3072), np.uint8), [0, 1, 2, 10], r"data_batch_3.*label 10"),
    ],
)
def test_bad_batch_contents_are_refused(tmp_path, data, labels, pattern):
    folder = _fresh(tmp_path)
    record = {b"data": data, b"labels": labels, b"batch_label": b"bad"}
    dump_py2_pickle(record, folder / "data_batch_3")
    with pytest.raises(DataError, match=pattern):
        load_dataset(_cfg(source="cifar10", root=str(tmp_path)))


def test_missing_folder_and_files(tmp_path):
    with pytest.raises(DataError) as err:
        load_dataset(_cfg(source="cifar2", root=str(tmp_path / "nowhere")))
    msg = str(err.value)
    assert "cifar-10-batches-py" in msg and "data_batch_1" in msg and "batches.meta" in msg
    assert str(tmp_path / "nowhere") in msg
    with pytest.raises(DataError, match="artbench-10-batches-py.*meta"):
        load_dataset(_cfg(source="artbench2", root=str(tmp_path)))
    with pytest.raises(DataError, match="data.root"):
        load_dataset(_cfg(source="cifar10"))
    folder = _fresh(tmp_path)
    (folder / "data_batch_4").unlink()
    with pytest.raises(DataError, match="data_batch_4.*not found"):
        load_dataset(_cfg(source="cifar10", root=str(tmp_path)))
    # The test split does not need the train batches.
    assert len(load_dataset(_cfg(source="cifar10", root=str(tmp_path), split="test"))) == 10


def test_config_errors(cifar_root):
    with pytest.raises(DataError, match="empty class list"):
        load_dataset(_cfg(source="cifar10", root=str(cifar_root), classes=[]))
    with pytest.raises(DataError, match="unknown class.*'cow'.*airplane"):
        load_dataset(_cfg(source="cifar10", root=str(cifar_root), classes=["cow"]))
    with pytest.raises(DataError, match="unknown source.*cifar10"):
        load_dataset(_cfg(source="mnist"))
    with pytest.raises(DataError, match="split"):
        load_dataset(_cfg(source="digits-2", split="val"))
    with pytest.raises(DataError, match="limit"):
        load_dataset(_cfg(source="digits-2", limit=0))
    with pytest.raises(DataError, match="duplicate"):
        load_dataset(_cfg(source="digits", classes=["1", "1"]))


# --- digits --------------------------------------------------------------------------------------


@pytest.mark.parametrize("size", [8, 16, 32])
def test_digits2_is_exactly_sklearn_zeros_and_ones(sk_digits, size):
    images, target = sk_digits
    train = load_dataset(_cfg(source="digits-2", size=size))
    test = load_dataset(_cfg(source="digits-2", size=size, split="test"))
    want = np.flatnonzero(np.isin(target, [0, 1]))
    assert sorted(train.ids.tolist() + test.ids.tolist()) == want.tolist()
    assert all(i % 5 == 0 for i in test.ids.tolist())
    assert not any(i % 5 == 0 for i in train.ids.tolist())
    for ds in (train, test):
        assert ds.image_shape == (1, size, size)
        assert ds.images.min() >= -1 and ds.images.max() <= 1
        assert ds.labels.tolist() == target[ds.ids.numpy()].tolist()
        assert ds.class_names == ["0", "1"]
    if size == 8:
        ref = images[train.ids.numpy()] / 16 * 2 - 1
        np.testing.assert_array_equal(train.images[:, 0].numpy(), ref.astype(np.float32))


def test_digits_classes_and_limits(sk_digits):
    _, target = sk_digits
    ds = load_dataset(_cfg(source="digits", classes=[7, "3"], limit=11))  # YAML ints accepted
    want = [i for i in range(len(target)) if target[i] in (3, 7) and i % 5][:11]
    assert ds.ids.tolist() == want
    assert ds.class_names == ["3", "7"]
    assert ds.groups["class"] == [str(target[i]) for i in want]
    assert len(load_dataset(_cfg(source="digits"))) == sum(1 for i in range(len(target)) if i % 5)
    for bad in (7, 33):
        with pytest.raises(DataError, match="8..32"):
            load_dataset(_cfg(source="digits-2", size=bad))
    with pytest.raises(DataError, match="valid"):
        load_dataset(_cfg(source="digits-2", classes=["2"]))


def test_subset_views_keep_ids():
    ds = load_dataset(_cfg(source="digits-2", limit=20))
    mask = torch.arange(20) % 3 == 0
    sub = ds.subset(mask)
    assert sub.ids.tolist() == ds.ids[mask].tolist()
    torch.testing.assert_close(sub.images, ds.images[mask])
    picked = ds.select_ids(ds.ids[[4, 1]])
    assert picked.ids.tolist() == [int(ds.ids[4]), int(ds.ids[1])]
    assert picked.groups["class"] == [ds.groups["class"][4], ds.groups["class"][1]]
    info = inspect_dataset(ds)
    assert info["n"] == 20 and info["image_shape"] == [1, 8, 8]


# --- image folders and image I/O ----------------------------------------------------------------


def test_imagefolder_round_trip_keeps_ids_labels_and_pixels(cifar_root, tmp_path):
    ds = load_dataset(_cfg(source="cifar2", root=str(cifar_root), limit=12))
    out = export_dataset(ds, tmp_path / "export", progress=False)
    with (out / "index.csv").open() as fh:
        rows = list(csv.DictReader(fh))
    assert [int(r["id"]) for r in rows] == ds.ids.tolist()
    assert rows[0]["file"] == f"{ds.groups['class'][0]}/{int(ds.ids[0]):06d}.png"
    back = load_dataset(_cfg(source="imagefolder", root=str(out)))
    assert back.ids.tolist() == ds.ids.tolist()
    assert back.groups["class"] == ds.groups["class"]
    torch.testing.assert_close(back.images, ds.images, rtol=0, atol=1e-6)  # 8-bit data: exact
    horse = load_dataset(_cfg(source="imagefolder", root=str(out), classes=["horse"]))
    assert horse.ids.tolist() == [
        i for i, c in zip(ds.ids.tolist(), ds.groups["class"], strict=True) if c == "horse"
    ]
    with pytest.raises(DataError, match="not empty"):
        export_dataset(ds, out)

    # Without index.csv, ids are positions in sorted (class, filename) order.
    (out / "index.csv").unlink()
    plain = load_dataset(_cfg(source="imagefolder", root=str(out)))
    files = sorted((p.parent.name, p.name) for p in out.rglob("*.png"))
    assert plain.ids.tolist() == list(range(len(files)))
    assert plain.groups["class"] == [c for c, _ in files]


def test_imagefolder_grey_flat_and_size_rules(tmp_path):
    ds = load_dataset(_cfg(source="digits-2", limit=6))
    unlabelled = type(ds)(name="u", images=ds.images, ids=ds.ids + 1000)
    out = export_dataset(unlabelled, tmp_path / "flat", progress=False)
    back = load_dataset(_cfg(source="imagefolder", root=str(out)))
    assert back.labels is None and back.image_shape == (1, 8, 8)
    assert back.ids.tolist() == (ds.ids + 1000).tolist()
    assert (back.images - ds.images).abs().max() <= 1 / 127.5 + 1e-6  # 8-bit quantisation
    resized = load_dataset(_cfg(source="imagefolder", root=str(out), size=12))
    assert resized.image_shape == (1, 12, 12)

    odd = tmp_path / "odd" / "a"
    odd.mkdir(parents=True)
    Image.new("RGB", (8, 8)).save(odd / "1.png")
    Image.new("RGB", (9, 8)).save(odd / "2.png")
    with pytest.raises(DataError, match=r"2\.png.*9x8"):
        load_dataset(_cfg(source="imagefolder", root=str(tmp_path / "odd")))
    assert load_dataset(
        _cfg(source="imagefolder", root=str(tmp_path / "odd"), size=8)
    ).image_shape == (3, 8, 8)
    (odd / "3.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    with pytest.raises(DataError, match=r"3\.png"):
        load_dataset(_cfg(source="imagefolder", root=str(tmp_path / "odd"), size=8))
    with pytest.raises(DataError, match="test"):
        load_dataset(_cfg(source="imagefolder", root=str(out), split="test"))


def test_image_io_errors_and_grid(tmp_path):
    img = torch.linspace(-1, 1, 3 * 4 * 5).reshape(3, 4, 5)
    p = save_image(img, tmp_path / "x.png")
    back = load_image(p, (3, 4, 5))
    assert (back - img).abs().max() <= 1 / 127.5
    with pytest.raises(DataError, match=r"x\.png.*5x4.*expected 6x4"):
        load_image(p, (3, 4, 6))
    with pytest.raises(DataError, match=r"x\.png.*1-channel"):
        load_image(p, (1, 4, 5))
    broken = tmp_path / "broken.png"
    broken.write_bytes(p.read_bytes()[:40])
    with pytest.raises(DataError, match="broken.png"):
        load_image(broken, (3, 4, 5))
    broken.unlink()

    batch = torch.rand(3, 1, 4, 5) * 2 - 1
    paths = save_images(batch, tmp_path / "many")
    assert [q.name for q in paths] == ["000000.png", "000001.png", "000002.png"]
    loaded, names = load_image_folder(tmp_path / "many", (1, 4, 5))
    assert names == [q.name for q in paths]
    assert (loaded - batch).abs().max() <= 1 / 127.5

    grid = make_grid(batch, nrow=2, padding=1)
    assert grid.shape == (1, 2 * 5 + 1, 2 * 6 + 1)
    torch.testing.assert_close(grid[:, 1:5, 1:6], batch[0])
    torch.testing.assert_close(grid[:, 1:5, 7:12], batch[1])
    torch.testing.assert_close(grid[:, 6:10, 1:6], batch[2])
    assert (grid[:, 6:10, 7:12] == -1).all() and (grid[:, 0] == -1).all()


def test_registry_lists_contract_names():
    names = [n for n, _ in list_datasets()]
    assert names == list(DATASETS)
    assert set(names) == {
        "digits",
        "digits-2",
        "digit-styles",
        "cifar10",
        "cifar2",
        "artbench10",
        "artbench2",
        "artbench5",
        "imagefolder",
    }
    assert all(desc for _, desc in list_datasets())


def test_data_hash_is_remembered_only_while_the_tensors_are_unchanged():
    from diffattr.data.dataset import ImageDataset

    g = torch.Generator().manual_seed(0)
    d = ImageDataset("m", torch.rand(4, 1, 8, 8, generator=g), torch.arange(4))

    def fresh() -> str:
        return ImageDataset("f", d.images.clone(), d.ids.clone(), d.labels)._data_hash()

    first = d.data_hash()
    assert d.data_hash() == first == fresh()
    d.images[0, 0, 0, 0] += 1.0  # in place: the version counter moves
    assert d.data_hash() != first and d.data_hash() == fresh()
    d.images = d.images.to(torch.float64)  # replaced (cast)
    assert d.data_hash() == fresh()
    d.labels = torch.tensor([0, 1, 0, 1])  # a tensor added
    assert d.data_hash() == fresh() != ImageDataset("n", d.images, d.ids).data_hash()
