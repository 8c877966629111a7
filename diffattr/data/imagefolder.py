"""A folder of image files as an :class:`ImageDataset`, and the reverse (``export_dataset``, defined in
:mod:`diffattr.data.images` and re-exported here).

Layout read by ``load_imagefolder`` (``data.root``):

- ``root/<class_name>/*.png|jpg|jpeg``: labelled, classes in sorted folder-name order; or
- ``root/*.png|jpg|jpeg``: unlabelled (mixing both is an error);
- if ``root`` has both ``train/`` and ``test/`` subfolders, ``data.split`` picks one of them;
  otherwise ``root`` is the train split and asking for ``test`` is an error.

Ids: when ``root/index.csv`` (written by :func:`export_dataset`) exists, ids come from it, so an
exported subset keeps its original ids; its file list must match the folder exactly. Without it,
an image's id is its position in sorted ``(class, filename)`` order over all classes (so a class
subset keeps the ids it has in the full folder).

Captions (text-to-image training; :mod:`diffattr.data.captions`): a ``metadata.jsonl`` in the
split folder (or in ``root`` with ``file_name`` paths starting ``train/`` / ``test/``), one JSON
object per line with ``file_name`` (path relative to the metadata file's folder) and the caption
under ``data.caption_column`` (default ``text``), as Hugging Face's imagefolder reads it; every
image must have exactly one row and every row must name an image of the folder. Without it,
``data.prompt_template`` (``"a {class} painting"``) captions class folders by their names
(underscores as spaces). When both are given, the metadata wins (the template is ignored, with a
log line). A folder with ``metadata.jsonl`` always loads with captions, which enter its data hash.

Size and channels: with ``data.size`` set every image is resized to ``size x size`` (torch
antialiased bilinear, aspect ratio not kept); without it all images must share one size, and the
first file of another size is named in the error. Images are 1 channel when every file is grey,
else 3 (grey files are replicated to RGB).
"""

from __future__ import annotations

import csv
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from diffattr.config import DataConfig
from diffattr.data.captions import METADATA_FILE, match_captions, read_metadata, template_captions
from diffattr.data.dataset import DataError, ImageDataset
from diffattr.data.images import (
    INDEX_COLUMNS,
    INDEX_FILE,
    export_dataset,
    image_header,
    is_image_file,
    read_image,
    resize_images,
)
from diffattr.data.selection import SPLITS, check_split, limit_rows, select_classes

logger = logging.getLogger(__name__)

PROGRESS_MIN = 2000  # images; smaller folders load in about a second


@dataclass
class _Entry:
    path: Path
    rel: str  # path relative to the split folder, posix
    class_name: str | None
    id: int = -1


def _split_folder(root: Path, split: str) -> Path:
    if all((root / s).is_dir() for s in SPLITS):
        return root / split
    if split != "train":
        raise DataError(
            f"{root}: split {split!r} requested but the folder has no train/ and test/ subfolders "
            "(a plain image folder is the train split)"
        )
    return root


def _scan(folder: Path) -> list[_Entry]:
    """All image files, sorted by (class, filename); class is None for a flat folder."""
    subdirs = sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))
    loose = sorted(p for p in folder.iterdir() if is_image_file(p))
    if subdirs and loose:
        raise DataError(
            f"{folder}: has both image files ({loose[0].name}, ...) and class folders "
            f"({subdirs[0].name}, ...); use root/<class>/*.png or a flat folder, not both"
        )
    if loose:
        return [_Entry(p, p.name, None) for p in loose]
    entries: list[_Entry] = []
    for d in subdirs:
        files = sorted((p for p in d.iterdir() if is_image_file(p)), key=lambda p: p.name)
        if not files:
            raise DataError(f"{d}: class folder has no image files (.png/.jpg/.jpeg)")
        entries.extend(_Entry(p, f"{d.name}/{p.name}", d.name) for p in files)
    if not entries:
        raise DataError(f"{folder}: no images; expected <root>/<class_name>/*.png or <root>/*.png")
    return entries


def _assign_ids(folder: Path, entries: list[_Entry]) -> None:
    index = folder / INDEX_FILE
    if not index.is_file():
        for i, e in enumerate(entries):
            e.id = i
        return
    with index.open(newline="") as fh:
        reader = csv.DictReader(fh)
        if reader.fieldnames is None or not {"id", "file"} <= set(reader.fieldnames):
            raise DataError(f"{index}: expected columns {list(INDEX_COLUMNS)}")
        try:
            by_file = {row["file"]: int(row["id"]) for row in reader}
        except (TypeError, ValueError) as exc:
            raise DataError(f"{index}: bad id value ({exc})") from exc
    on_disk = {e.rel for e in entries}
    extra, missing = sorted(on_disk - set(by_file)), sorted(set(by_file) - on_disk)
    if extra or missing:
        what = f"file {extra[0]} is not listed" if extra else f"listed file {missing[0]} is missing"
        raise DataError(f"{index}: does not match the folder ({what}); re-export or delete it")
    if len(set(by_file.values())) != len(by_file):
        raise DataError(f"{index}: ids are not unique")
    for e in entries:
        e.id = by_file[e.rel]
    entries.sort(key=lambda e: e.id)


def _entries(root: Path, split: str) -> list[_Entry]:
    """The split's image files with their ids, in id order (ids from ``index.csv`` if present)."""
    folder = _split_folder(root, split)
    entries = _scan(folder)
    _assign_ids(folder, entries)
    return entries


def imagefolder_files(root: str | Path, split: str) -> dict[int, str]:
    """Id -> file path relative to the split folder (posix), paired exactly as the loader pairs
    them; raises :class:`DataError` for a folder the loader would refuse."""
    return {e.id: e.rel for e in _entries(Path(root).expanduser(), split)}


def _metadata_captions(
    root: Path, folder: Path, split: str, entries: list[_Entry], column: str
) -> dict[str, str] | None:
    """``rel`` -> caption of every entry from the split's ``metadata.jsonl`` (in the split folder,
    or in ``root`` with split-prefixed file names); None when there is none."""
    if (folder / METADATA_FILE).is_file():
        path = folder / METADATA_FILE
        return match_captions(read_metadata(path, column), [e.rel for e in entries], path)
    if folder == root or not (root / METADATA_FILE).is_file():
        return None
    path = root / METADATA_FILE
    rels = [f"{split}/{e.rel}" for e in entries]
    others = [f"{s}/" for s in SPLITS if s != split]
    found = match_captions(read_metadata(path, column), rels, path, ignore_prefixes=others)
    return {e.rel: found[r] for e, r in zip(entries, rels, strict=True)}


def _common_size(entries: list[_Entry]) -> tuple[tuple[int, int], int]:
    """``((w, h), channels)`` shared by all files; the first odd-sized file is an error."""
    first_size, channels = None, 1
    for e in entries:
        size, c = image_header(e.path)
        channels = max(channels, c)
        if first_size is None:
            first_size = size
        elif size != first_size:
            raise DataError(
                f"{e.path}: image is {size[0]}x{size[1]} (WxH) but {entries[0].path.name} is "
                f"{first_size[0]}x{first_size[1]}; set data.size to resize them all"
            )
    assert first_size is not None
    return first_size, channels


def load_imagefolder(cfg: DataConfig) -> ImageDataset:
    split = check_split(cfg.split, "imagefolder")
    if cfg.root is None:
        raise DataError("data.root: imagefolder needs a folder (root/<class_name>/*.png)")
    root = Path(cfg.root).expanduser()
    if not root.is_dir():
        raise DataError(f"{root}: image folder not found (expected root/<class_name>/*.png)")
    folder = _split_folder(root, split)
    entries = _entries(root, split)

    by_file = _metadata_captions(root, folder, split, entries, cfg.caption_column)
    if by_file is not None and cfg.prompt_template is not None:
        logger.info(
            "%s: captions from %s; data.prompt_template %r is not used",
            folder,
            METADATA_FILE,
            cfg.prompt_template,
        )

    labelled = entries[0].class_name is not None
    names: list[str] | None = None
    if labelled:
        all_names = sorted({e.class_name for e in entries if e.class_name is not None})
        names = select_classes(cfg.classes, all_names, "imagefolder")
        entries = [e for e in entries if e.class_name in names]
    elif cfg.classes is not None:
        raise DataError(f"data.classes: {folder} has no class folders, so classes must be null")
    class_idx = (
        np.array([names.index(e.class_name) for e in entries if e.class_name is not None])
        if names is not None
        else None
    )
    rows = limit_rows(len(entries), cfg.limit, class_idx, cfg.selection, cfg.selection_seed)
    entries = [entries[int(i)] for i in rows]

    # A progress bar only for folders big enough to take a few seconds.
    bar = tqdm(entries, desc="read images", unit="img", disable=len(entries) < PROGRESS_MIN)
    if cfg.size is None:
        _, channels = _common_size(entries)
        images = torch.stack([read_image(e.path, channels) for e in bar])
    else:
        if cfg.size < 1:
            raise DataError(f"data.size: must be positive, got {cfg.size}")
        channels = max(image_header(e.path)[1] for e in entries)
        images = torch.cat(
            [resize_images(read_image(e.path, channels)[None], cfg.size) for e in bar]
        )
    labels = None
    groups: dict[str, list[str]] = {}
    if names is not None:
        labels = torch.tensor([names.index(str(e.class_name)) for e in entries], dtype=torch.int64)
        groups["class"] = [str(e.class_name) for e in entries]
    captions: list[str] | None
    if by_file is not None:
        captions = [by_file[e.rel] for e in entries]
    else:
        captions = template_captions(cfg, names, labels, f"imagefolder {folder} (flat folder)")
    logger.info("imagefolder %s: %d images from %s", split, len(entries), folder)
    return ImageDataset(
        name=f"imagefolder:{folder.name}",
        images=images.contiguous(),
        ids=torch.tensor([e.id for e in entries], dtype=torch.int64),
        labels=labels,
        class_names=names,
        groups=groups,
        captions=captions,
    )


__all__ = ["export_dataset", "load_imagefolder"]
