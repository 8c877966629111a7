"""CIFAR-10 / CIFAR-2 and ArtBench-10 / 2 / 5 from their official "python batches" folders.

Both data sets ship the same layout (ArtBench-10's 32x32 release copies CIFAR's):

- ``cifar-10-batches-py/``: ``data_batch_1`` .. ``data_batch_5``, ``test_batch``, ``batches.meta``
  (label names under ``label_names``).
- ``artbench-10-batches-py/``: the same batch names, meta file ``meta`` with the style names under
  ``styles`` (per the ArtBench repository's ``artbench.py``, liaopeiyuan/artbench).

Each batch is a pickle of a dict: ``data`` uint8 ``(N, 3072)``, one image per row as three
row-major 32x32 planes (R, G, B); ``labels`` N ints; CIFAR also has ``filenames`` and
``batch_label``. Keys may be Python-2 strings (read back as bytes) or str; both are accepted. Files
are read only through :mod:`diffattr.data.safe_pickle`.

Ids: train = global row index over ``data_batch_1..5`` in order (0..49999 for the full set), test =
row index in ``test_batch``. Class subsets and ``limit`` (first N by id after class filtering) keep
ids. Size: native 32; another ``size`` is made by :func:`diffattr.data.images.resize_images`
(torch antialiased bilinear on the float images). Captions: with ``data.prompt_template``, e.g.
``"a {class} painting"`` (style names with underscores as spaces: ``a ukiyo e painting``).

Named subsets (fixed class sets; ``classes`` may only narrow them):

- CIFAR-2 = automobile + horse, the two-class CIFAR used by D-TRAK (Zheng et al., 2024).
- ArtBench-2 = post_impressionism + ukiyo_e, as in D-TRAK.
- ArtBench-5 = post_impressionism, ukiyo_e, romanticism, renaissance, baroque: the styles selected
  in D-TRAK's ArtBench-5 experiments (sail-sg/D-TRAK, ``ArtBench5/00_EDA.ipynb``).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from diffattr.config import DataConfig
from diffattr.data.captions import template_captions
from diffattr.data.dataset import DataError, ImageDataset
from diffattr.data.images import from_uint8, resize_images
from diffattr.data.safe_pickle import safe_load
from diffattr.data.selection import check_split, class_mask, limit_rows, select_classes

logger = logging.getLogger(__name__)

NATIVE_SIZE = 32
ROW_LENGTH = 3 * NATIVE_SIZE * NATIVE_SIZE  # 3072 bytes per image
TRAIN_FILES = tuple(f"data_batch_{i}" for i in range(1, 6))
TEST_FILES = ("test_batch",)

CIFAR2_CLASSES = ("automobile", "horse")
ARTBENCH2_STYLES = ("post_impressionism", "ukiyo_e")
ARTBENCH5_STYLES = ("post_impressionism", "ukiyo_e", "romanticism", "renaissance", "baroque")


@dataclass(frozen=True)
class BatchFormat:
    """Where a python-batches release keeps its files and names."""

    title: str  # "CIFAR-10"
    folder: str  # the folder name inside the release archive
    meta_file: str
    names_keys: tuple[str, ...]  # meta keys that may hold the label names, first found wins
    group_key: str  # ImageDataset.groups key for the label names

    def files(self, split: str) -> tuple[str, ...]:
        return TRAIN_FILES if split == "train" else TEST_FILES

    def layout(self) -> str:
        names = [*TRAIN_FILES, *TEST_FILES, self.meta_file]
        return f"{self.folder}/ containing {', '.join(names)}"


CIFAR10_FORMAT = BatchFormat(
    "CIFAR-10", "cifar-10-batches-py", "batches.meta", ("label_names",), "class"
)
ARTBENCH10_FORMAT = BatchFormat(
    "ArtBench-10", "artbench-10-batches-py", "meta", ("styles", "label_names"), "style"
)


def find_batch_folder(root: str | None, fmt: BatchFormat, source: str) -> Path:
    """``root`` itself if it holds the meta file, else ``root/<fmt.folder>``; else a DataError."""
    if root is None:
        raise DataError(
            f"data.root: {source} needs the local {fmt.title} python batches, i.e. a folder "
            f"{fmt.layout()} (data.root may point at that folder or its parent)"
        )
    base = Path(root).expanduser()
    for candidate in (base, base / fmt.folder):
        if (candidate / fmt.meta_file).is_file():
            return candidate
    raise DataError(
        f"{base}: no {fmt.title} python batches found at {base} or {base / fmt.folder}; "
        f"expected {fmt.layout()}"
    )


def _str_keys(record: Any, path: Path) -> dict[str, Any]:
    if not isinstance(record, dict):
        raise DataError(f"{path}: expected a pickled dict, got {type(record).__name__}")
    return {(k.decode("latin1") if isinstance(k, bytes) else str(k)): v for k, v in record.items()}


def _text(value: Any) -> str:
    return value.decode("utf-8") if isinstance(value, bytes) else str(value)


def read_label_names(folder: Path, fmt: BatchFormat) -> list[str]:
    """The label (style) names from the release's meta file, in label-index order."""
    path = folder / fmt.meta_file
    meta = _str_keys(safe_load(path), path)
    for key in fmt.names_keys:
        if key in meta:
            names = [_text(v) for v in meta[key]]
            if not names or len(set(names)) != len(names):
                raise DataError(f"{path}: {key!r} must be non-empty unique names, got {names}")
            return names
    raise DataError(f"{path}: no label names under {list(fmt.names_keys)}; keys: {sorted(meta)}")


def read_batch(path: Path, num_classes: int) -> tuple[np.ndarray, np.ndarray]:
    """One batch file -> ``data`` uint8 ``(N, 3072)`` and ``labels`` int64 ``(N,)`` (validated)."""
    if not path.is_file():
        raise DataError(f"{path}: batch file not found")
    record = _str_keys(safe_load(path), path)
    if "data" not in record:
        raise DataError(f"{path}: no 'data' entry (keys: {sorted(record)})")
    data = record["data"]
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2:
        got = (
            f"{data.dtype} array of shape {data.shape}"
            if isinstance(data, np.ndarray)
            else type(data).__name__
        )
        raise DataError(f"{path}: 'data' must be a uint8 array (N, {ROW_LENGTH}), got {got}")
    if data.shape[1] != ROW_LENGTH:
        raise DataError(f"{path}: 'data' must have shape (N, {ROW_LENGTH}), got {data.shape}")
    key = "labels" if "labels" in record else "fine_labels" if "fine_labels" in record else None
    if key is None:
        raise DataError(f"{path}: no 'labels' entry (keys: {sorted(record)})")
    try:
        labels = np.asarray(record[key])
    except (TypeError, ValueError) as exc:
        raise DataError(f"{path}: {key!r} is not a list of integers ({exc})") from exc
    if labels.ndim != 1 or (labels.size and not np.issubdtype(labels.dtype, np.integer)):
        raise DataError(f"{path}: {key!r} must be a flat list of integers, got {labels.dtype}")
    if labels.shape[0] != data.shape[0]:
        raise DataError(
            f"{path}: {labels.shape[0]} labels for {data.shape[0]} images (lengths must match)"
        )
    labels = labels.astype(np.int64)
    bad = (labels < 0) | (labels >= num_classes)
    if bad.any():
        raise DataError(
            f"{path}: label {int(labels[bad][0])} outside 0..{num_classes - 1} (meta has "
            f"{num_classes} names)"
        )
    return data, labels


def load_batches(
    cfg: DataConfig, fmt: BatchFormat, source: str, default: tuple[str, ...] | None
) -> ImageDataset:
    """Shared loader for every CIFAR / ArtBench variant (see module docstring)."""
    split = check_split(cfg.split, source)
    folder = find_batch_folder(cfg.root, fmt, source)
    names = read_label_names(folder, fmt)
    keep = select_classes(cfg.classes, names, source, default)

    datas, labels = [], []
    for fname in fmt.files(split):
        d, lab = read_batch(folder / fname, len(names))
        datas.append(d)
        labels.append(lab)
    data, label = np.concatenate(datas), np.concatenate(labels)
    ids = np.arange(data.shape[0], dtype=np.int64)

    in_class, new_labels = class_mask(label, names, keep)
    sel = np.flatnonzero(in_class)
    if sel.size == 0:
        raise DataError(f"{folder}: no {split} images of {fmt.group_key}(es) {keep}")
    sel = sel[limit_rows(sel.size, cfg.limit, new_labels[sel], cfg.selection, cfg.selection_seed)]

    pixels = data[sel].reshape(-1, 3, NATIVE_SIZE, NATIVE_SIZE)
    images = from_uint8(pixels)
    if cfg.size is not None and cfg.size != NATIVE_SIZE:
        images = resize_images(images, cfg.size)
    kept_labels = torch.from_numpy(new_labels[sel])
    logger.info("%s %s: %d images from %s", source, split, sel.size, folder)
    return ImageDataset(
        name=f"{source}:{split}",
        images=images.contiguous(),
        ids=torch.from_numpy(ids[sel]),
        labels=kept_labels,
        class_names=keep,
        groups={fmt.group_key: [keep[i] for i in kept_labels.tolist()]},
        captions=template_captions(cfg, keep, kept_labels, source),
    )


def load_cifar10(cfg: DataConfig) -> ImageDataset:
    return load_batches(cfg, CIFAR10_FORMAT, "cifar10", None)


def load_cifar2(cfg: DataConfig) -> ImageDataset:
    return load_batches(cfg, CIFAR10_FORMAT, "cifar2", CIFAR2_CLASSES)


def load_artbench10(cfg: DataConfig) -> ImageDataset:
    return load_batches(cfg, ARTBENCH10_FORMAT, "artbench10", None)


def load_artbench2(cfg: DataConfig) -> ImageDataset:
    return load_batches(cfg, ARTBENCH10_FORMAT, "artbench2", ARTBENCH2_STYLES)


def load_artbench5(cfg: DataConfig) -> ImageDataset:
    return load_batches(cfg, ARTBENCH10_FORMAT, "artbench5", ARTBENCH5_STYLES)
