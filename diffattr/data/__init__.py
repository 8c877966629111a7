"""Training data: loaders for every source, image I/O, safe batch reading, test fixtures."""

from __future__ import annotations

from diffattr.data.dataset import DataError, ImageDataset
from diffattr.data.fixtures import write_artbench10_fixture, write_cifar10_fixture
from diffattr.data.images import (
    export_dataset,
    load_image,
    load_image_folder,
    make_grid,
    save_image,
    save_images,
)
from diffattr.data.registry import (
    DATASETS,
    DatasetSource,
    inspect_dataset,
    list_datasets,
    load_dataset,
)
from diffattr.data.safe_pickle import UnsafePickleError, safe_load

__all__ = [
    "DATASETS",
    "DataError",
    "DatasetSource",
    "ImageDataset",
    "UnsafePickleError",
    "export_dataset",
    "inspect_dataset",
    "list_datasets",
    "load_dataset",
    "load_image",
    "load_image_folder",
    "make_grid",
    "safe_load",
    "save_image",
    "save_images",
    "write_artbench10_fixture",
    "write_cifar10_fixture",
]
