"""Name -> loader table for every data source, and ``load_dataset``.

Adding a source is one entry in ``DATASETS``; the CLI's ``diffattr data list`` prints this table.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from diffattr.config import DataConfig
from diffattr.data.cifar import (
    load_artbench2,
    load_artbench5,
    load_artbench10,
    load_cifar2,
    load_cifar10,
)
from diffattr.data.dataset import DataError, ImageDataset
from diffattr.data.digits import MAX_SIZE as DIGITS_MAX_SIZE
from diffattr.data.digits import MIN_SIZE as DIGITS_MIN_SIZE
from diffattr.data.digits import load_digits2, load_digits_all
from diffattr.data.imagefolder import load_imagefolder
from diffattr.data.selection import check_split
from diffattr.data.styles import load_digit_styles

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class DatasetSource:
    name: str
    description: str
    loader: Callable[[DataConfig], ImageDataset]
    #: ``(smallest, largest)`` image side the loader produces; None: any size (resized).
    sizes: tuple[int, int] | None = None


DATASETS: dict[str, DatasetSource] = {
    s.name: s
    for s in (
        DatasetSource(
            "digits",
            "scikit-learn 8x8 digits, 10 classes, 1 channel (bundled; test = ids % 5 == 0)",
            load_digits_all,
            (DIGITS_MIN_SIZE, DIGITS_MAX_SIZE),
        ),
        DatasetSource(
            "digits-2",
            "scikit-learn digits 0 and 1 only, 1 channel (bundled; test = ids % 5 == 0)",
            load_digits2,
            (DIGITS_MIN_SIZE, DIGITS_MAX_SIZE),
        ),
        DatasetSource(
            "digit-styles",
            "scikit-learn digits in 6 colour styles, RGB, captioned (bundled; default size 16)",
            load_digit_styles,
            (DIGITS_MIN_SIZE, DIGITS_MAX_SIZE),
        ),
        DatasetSource(
            "cifar10", "CIFAR-10 32x32 RGB from a local cifar-10-batches-py folder", load_cifar10
        ),
        DatasetSource(
            "cifar2",
            "CIFAR-2 (automobile, horse; as in D-TRAK) from a local cifar-10-batches-py folder",
            load_cifar2,
        ),
        DatasetSource(
            "artbench10",
            "ArtBench-10 32x32 RGB, 10 styles, from a local artbench-10-batches-py folder",
            load_artbench10,
        ),
        DatasetSource(
            "artbench2",
            "ArtBench-2 (post_impressionism, ukiyo_e; as in D-TRAK) from artbench-10-batches-py",
            load_artbench2,
        ),
        DatasetSource(
            "artbench5",
            "ArtBench-5 (post_impressionism, ukiyo_e, romanticism, renaissance, baroque; D-TRAK)",
            load_artbench5,
        ),
        DatasetSource(
            "imagefolder",
            "local folder root/<class_name>/*.png|jpg (or flat root/*.png), ids from index.csv",
            load_imagefolder,
        ),
    )
}


def list_datasets() -> list[tuple[str, str]]:
    """``(name, one-line description)`` for every registered source."""
    return [(s.name, s.description) for s in DATASETS.values()]


def supported_sizes(source: str) -> tuple[int, int] | None:
    """``(smallest, largest)`` image side ``source`` can be read at; None: any (or unknown)."""
    entry = DATASETS.get(source)
    return None if entry is None else entry.sizes


def _normalize(cfg: DataConfig) -> DataConfig:
    """Check the generic fields once; YAML ints in ``classes`` (``[0, 1]``) become names."""
    if cfg.source not in DATASETS:
        raise DataError(f"data.source: unknown source {cfg.source!r}; known: {sorted(DATASETS)}")
    check_split(cfg.split, cfg.source)
    if cfg.size is not None and (
        not isinstance(cfg.size, int) or isinstance(cfg.size, bool) or cfg.size < 1
    ):
        raise DataError(f"data.size: must be a positive integer or null, got {cfg.size!r}")
    classes: Any = cfg.classes
    if classes is not None:
        if isinstance(classes, str | int) or not all(
            isinstance(c, str | int) and not isinstance(c, bool) for c in classes
        ):
            raise DataError(f"data.classes: must be a list of class names, got {classes!r}")
        classes = [str(c) for c in classes]
        if len(set(classes)) != len(classes):
            raise DataError(f"data.classes: duplicate names in {classes}")
    return dataclasses.replace(cfg, classes=classes)


def load_dataset(cfg: DataConfig) -> ImageDataset:
    """Load the data set ``cfg`` describes (float32 ``(n, C, H, W)`` in ``[-1, 1]``, stable ids)."""
    cfg = _normalize(cfg)
    ds = DATASETS[cfg.source].loader(cfg)
    logger.info("loaded %s: %d images of shape %s", ds.name, len(ds), ds.image_shape)
    return ds


def inspect_dataset(ds: ImageDataset) -> dict:
    """JSON-able summary of a loaded data set (``ImageDataset.describe``)."""
    return ds.describe()
