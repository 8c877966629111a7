"""Captions of training images, for text-to-image models.

Two ways to give every image its prompt:

- ``metadata.jsonl`` beside the images (Hugging Face's imagefolder convention): one JSON object
  per line with ``file_name`` (the image's path relative to the metadata file's folder) and the
  caption under ``data.caption_column`` (default ``text``). Read by the ``imagefolder`` source and
  written by :func:`~diffattr.data.images.export_dataset`, so an exported set re-loads with its
  captions.
- ``data.prompt_template``, e.g. ``"a {class} painting"``: ``{class}`` becomes each image's class
  name with underscores as spaces (ArtBench's ``post_impressionism`` -> ``a post impressionism
  painting``). Every labelled source accepts it.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path, PurePosixPath

import torch

from diffattr.config import PROMPT_CLASS_FIELD, DataConfig, check_data_captions
from diffattr.data.dataset import DataError

METADATA_FILE = "metadata.jsonl"
FILE_NAME_KEY = "file_name"
DEFAULT_CAPTION_COLUMN = "text"


def fill_template(template: str, class_name: str) -> str:
    """``template`` with ``{class}`` replaced by ``class_name`` (underscores as spaces)."""
    return template.replace(PROMPT_CLASS_FIELD, class_name.replace("_", " "))


def template_captions(
    cfg: DataConfig, class_names: Sequence[str] | None, labels: torch.Tensor | None, source: str
) -> list[str] | None:
    """One caption per image from ``cfg.prompt_template`` and the images' class labels (row
    order), or None when the config has no template."""
    if cfg.prompt_template is None:
        return None
    check_data_captions(cfg)
    if labels is None or class_names is None:
        raise DataError(
            f"data.prompt_template: {source} has no class labels to fill "
            f"{PROMPT_CLASS_FIELD} with; use class folders or a {METADATA_FILE}"
        )
    filled = [fill_template(cfg.prompt_template, name) for name in class_names]
    return [filled[i] for i in labels.tolist()]


def normalize_file_name(name: str) -> str:
    """A metadata ``file_name`` as a clean relative posix path (``./a/b.png`` -> ``a/b.png``)."""
    return PurePosixPath(name.replace("\\", "/")).as_posix().removeprefix("./")


def read_metadata(path: Path, column: str = DEFAULT_CAPTION_COLUMN) -> dict[str, str]:
    """``file_name`` -> caption from a ``metadata.jsonl``; every bad line is a DataError naming
    the file and line (not JSON, no ``file_name``, no ``column``, not a string, a repeated file)."""
    out: dict[str, str] = {}
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise DataError(f"{path}: cannot read captions ({exc})") from exc
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        where = f"{path}:{number}"
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise DataError(f"{where}: not a JSON object ({exc.msg})") from exc
        if not isinstance(row, dict):
            raise DataError(f"{where}: expected a JSON object, got {type(row).__name__}")
        name = row.get(FILE_NAME_KEY)
        if not isinstance(name, str) or not name:
            raise DataError(
                f"{where}: no {FILE_NAME_KEY!r} (the image path relative to {path.parent})"
            )
        if column not in row:
            raise DataError(
                f"{where}: no caption column {column!r} (keys: {sorted(row)}); set "
                "data.caption_column to the column that holds the captions"
            )
        caption = row[column]
        if not isinstance(caption, str):
            raise DataError(
                f"{where}: caption {column!r} is {type(caption).__name__}, expected a string"
            )
        rel = normalize_file_name(name)
        if rel in out:
            raise DataError(f"{where}: {rel} already has a caption on an earlier line")
        out[rel] = caption
    return out


def match_captions(
    metadata: dict[str, str], rels: Sequence[str], path: Path, ignore_prefixes: Sequence[str] = ()
) -> dict[str, str]:
    """The caption of each image file ``rels`` (paths relative to ``path``'s folder) from
    ``metadata``; an image without a caption or a metadata row naming no image is a DataError
    (rows under ``ignore_prefixes``, e.g. another split's folder, are skipped)."""
    on_disk = set(rels)
    missing = [r for r in rels if r not in metadata]
    if missing:
        raise DataError(
            f"{path}: image {missing[0]} has no caption"
            + (f" (nor do {len(missing) - 1} more)" if len(missing) > 1 else "")
            + f"; every image needs a {FILE_NAME_KEY} row"
        )
    stray = [
        r
        for r in metadata
        if r not in on_disk and not any(r.startswith(p) for p in ignore_prefixes)
    ]
    if stray:
        raise DataError(
            f"{path}: row for {stray[0]} names no image in {path.parent}"
            + (f" (nor do {len(stray) - 1} more rows)" if len(stray) > 1 else "")
        )
    return {r: metadata[r] for r in rels}


def write_metadata(
    folder: Path, rels: Sequence[str], captions: Sequence[str], column: str = "text"
) -> Path:
    """Write ``folder/metadata.jsonl`` with one ``{"file_name": rel, column: caption}`` per image."""
    path = folder / METADATA_FILE
    with path.open("w", encoding="utf-8") as fh:
        for rel, caption in zip(rels, captions, strict=True):
            fh.write(json.dumps({FILE_NAME_KEY: rel, column: caption}, ensure_ascii=False) + "\n")
    return path
