"""Image files <-> tensors, and the one resize rule every loader uses.

Tensors are float32 in ``[-1, 1]``; files are 8-bit PNG/JPEG. A uint8 pixel ``v`` maps to
``v / 127.5 - 1`` and back through ``round((x + 1) * 127.5)``, so 8-bit data round-trips exactly.

Resizing (``resize_images``) is torch's bilinear interpolation with ``antialias=True`` and
``align_corners=False``; it is applied to the float images, so the same rule serves digits
(upsampling 8x8) and CIFAR/ArtBench (either direction).
"""

from __future__ import annotations

import csv
import logging
import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, UnidentifiedImageError
from tqdm.auto import tqdm

from diffattr.data.captions import write_metadata
from diffattr.data.dataset import DataError, ImageDataset

logger = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg")
INDEX_FILE = "index.csv"  # written by export_dataset, read by the imagefolder source
INDEX_COLUMNS = ("id", "label", "class_name", "file")
# PIL modes that hold one (grey) channel; every other mode we accept is treated as colour.
GRAY_MODES = frozenset({"1", "L", "LA", "I", "I;16", "I;16B", "I;16L", "I;16N", "F"})


def is_image_file(path: Path) -> bool:
    return (
        path.is_file() and path.suffix.lower() in IMAGE_EXTENSIONS and not path.name.startswith(".")
    )


def from_uint8(pixels: torch.Tensor | np.ndarray) -> torch.Tensor:
    """uint8 pixels (any shape) -> float32 in ``[-1, 1]`` (``v / 127.5 - 1``)."""
    if isinstance(pixels, np.ndarray):
        # Arrays rebuilt from a pickle may be read-only views of the file's bytes; torch wants a
        # writable buffer, so copy those.
        arr = pixels if pixels.flags.writeable else pixels.copy()
        t = torch.from_numpy(np.ascontiguousarray(arr))
    else:
        t = pixels
    if t.dtype != torch.uint8:
        raise DataError(f"from_uint8: expected uint8 pixels, got {t.dtype}")
    return t.to(torch.float32) / 127.5 - 1.0


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    """float in ``[-1, 1]`` (any shape) -> uint8, rounding to the nearest level (clamped)."""
    x = images.detach().to("cpu", torch.float32).clamp(-1.0, 1.0)
    return ((x + 1.0) * 127.5).round().to(torch.uint8)


def resize_images(images: torch.Tensor, size: int | tuple[int, int]) -> torch.Tensor:
    """``(n, C, H, W)`` -> ``(n, C, h, w)`` with antialiased bilinear interpolation.

    ``size`` is an int (square output) or ``(h, w)``. Returns the input unchanged when the size
    already matches. The result is clamped to ``[-1, 1]`` (the filter weights are non-negative, so
    this only removes float rounding).
    """
    h, w = (size, size) if isinstance(size, int) else size
    if h < 1 or w < 1:
        raise DataError(f"resize_images: size must be positive, got {size}")
    if images.ndim != 4:
        raise DataError(f"resize_images: expected (n, C, H, W), got {tuple(images.shape)}")
    if tuple(images.shape[2:]) == (h, w):
        return images
    out = F.interpolate(
        images.to(torch.float32), size=(h, w), mode="bilinear", align_corners=False, antialias=True
    )
    return out.clamp(-1.0, 1.0)


def _open(path: Path) -> Image.Image:
    """Open and fully decode an image file; any decode failure is a DataError naming the file."""
    try:
        with Image.open(path) as img:
            img.load()
            return img.copy()
    except FileNotFoundError as exc:
        raise DataError(f"{path}: image file not found") from exc
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
        raise DataError(f"{path}: cannot read image, corrupt or not an image ({exc})") from exc


def image_header(path: Path) -> tuple[tuple[int, int], int]:
    """``((width, height), channels)`` from the file header, without decoding the pixels."""
    try:
        with Image.open(path) as img:
            return img.size, (1 if img.mode in GRAY_MODES else 3)
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
        raise DataError(f"{path}: cannot read image, corrupt or not an image ({exc})") from exc


def read_image(path: str | Path, channels: int) -> torch.Tensor:
    """Decode ``path`` at its own size -> ``(channels, H, W)`` float32 in ``[-1, 1]``.

    ``channels`` is 1 (grey, mode ``L``) or 3 (``RGB``). A grey file read as 3 channels is
    replicated; a colour file read as 1 channel is an error (that would silently drop colour).
    """
    path = Path(path)
    if channels not in (1, 3):
        raise DataError(f"{path}: channels must be 1 or 3, got {channels}")
    img = _open(path)
    file_channels = 1 if img.mode in GRAY_MODES else 3
    if channels == 1 and file_channels != 1:
        raise DataError(f"{path}: expected a 1-channel (grey) image, file has mode {img.mode}")
    arr = np.array(img.convert("L" if channels == 1 else "RGB"), dtype=np.uint8)
    if arr.ndim == 2:
        arr = arr[:, :, None]
    return from_uint8(torch.from_numpy(np.ascontiguousarray(arr.transpose(2, 0, 1))))


def load_image(path: str | Path, shape: tuple[int, int, int]) -> torch.Tensor:
    """Load one image that must have ``shape = (C, H, W)``; returns ``(C, H, W)`` in ``[-1, 1]``.

    A file of another size, a colour file for ``C = 1``, or an unreadable file is a DataError
    naming the file.
    """
    path = Path(path)
    c, h, w = shape
    (fw, fh), fc = image_header(path)
    if (fh, fw) != (h, w):
        raise DataError(f"{path}: image is {fw}x{fh} (WxH), expected {w}x{h}")
    if c == 1 and fc != 1:
        raise DataError(f"{path}: expected a 1-channel (grey) image, file has 3 channels")
    return read_image(path, c)


def list_image_files(folder: str | Path) -> list[Path]:
    """Image files directly inside ``folder`` (png/jpg/jpeg), sorted by name."""
    folder = Path(folder)
    if not folder.is_dir():
        raise DataError(f"{folder}: image folder not found")
    return sorted((p for p in folder.iterdir() if is_image_file(p)), key=lambda p: p.name)


def load_image_folder(
    folder: str | Path, shape: tuple[int, int, int]
) -> tuple[torch.Tensor, list[str]]:
    """All images in ``folder`` (sorted by file name) -> ``(n, C, H, W)`` and their file names."""
    files = list_image_files(folder)
    if not files:
        raise DataError(f"{folder}: no image files ({', '.join(IMAGE_EXTENSIONS)}) in folder")
    images = torch.stack([load_image(p, shape) for p in files])
    return images, [p.name for p in files]


def save_image(image: torch.Tensor, path: str | Path) -> Path:
    """Write ``(C, H, W)`` in ``[-1, 1]`` (C = 1 or 3) as an 8-bit image (format from suffix)."""
    path = Path(path)
    if image.ndim != 3 or image.shape[0] not in (1, 3):
        raise DataError(f"{path}: save_image expects (1|3, H, W), got {tuple(image.shape)}")
    pixels = to_uint8(image).permute(1, 2, 0).numpy()
    pil = (
        Image.fromarray(pixels[:, :, 0], mode="L")
        if pixels.shape[2] == 1
        else Image.fromarray(pixels, mode="RGB")
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    pil.save(path)
    return path


def save_images(
    images: torch.Tensor, folder: str | Path, names: Sequence[str] | None = None
) -> list[Path]:
    """Write ``(n, C, H, W)`` as one file each in ``folder``; default names ``000000.png``..."""
    folder = Path(folder)
    if images.ndim != 4:
        raise DataError(f"{folder}: save_images expects (n, C, H, W), got {tuple(images.shape)}")
    n = images.shape[0]
    if names is None:
        names = [f"{i:06d}.png" for i in range(n)]
    if len(names) != n:
        raise DataError(f"{folder}: {len(names)} names for {n} images")
    return [save_image(images[i], folder / name) for i, name in enumerate(names)]


def make_grid(
    images: torch.Tensor, nrow: int | None = None, padding: int = 2, pad_value: float = -1.0
) -> torch.Tensor:
    """Tile ``(n, C, H, W)`` into one ``(C, H', W')`` image, ``nrow`` images per row.

    ``nrow`` defaults to ``ceil(sqrt(n))``; ``padding`` pixels of ``pad_value`` separate and
    surround the tiles, so ``W' = nrow * (W + padding) + padding``.
    """
    if images.ndim != 4 or images.shape[0] == 0:
        raise DataError(f"make_grid expects a non-empty (n, C, H, W), got {tuple(images.shape)}")
    n, c, h, w = images.shape
    ncol = nrow or math.ceil(math.sqrt(n))
    nrows = math.ceil(n / ncol)
    grid = torch.full(
        (c, nrows * (h + padding) + padding, ncol * (w + padding) + padding),
        float(pad_value),
        dtype=images.dtype,
    )
    for k in range(n):
        r, q = divmod(k, ncol)
        y, x = padding + r * (h + padding), padding + q * (w + padding)
        grid[:, y : y + h, x : x + w] = images[k]
    return grid


def _safe_component(name: str, what: str) -> str:
    if not name or name in (".", "..") or "/" in name or "\\" in name or "\0" in name:
        raise DataError(f"export_dataset: {what} {name!r} cannot be used as a folder name")
    return name


def export_dataset(ds: ImageDataset, folder: str | Path, progress: bool = True) -> Path:
    """Write ``ds`` as PNGs named by id and an ``index.csv``; returns ``folder``.

    Files are ``<id:06d>.png``, inside ``<class_name>/`` when ``ds`` has labels; ``index.csv`` has
    columns id, label, class_name, file (path relative to ``folder``). When ``ds`` has captions,
    ``metadata.jsonl`` holds them (``file_name``, ``text``: Hugging Face's imagefolder convention).
    ``folder`` must be new or empty. Reading it back with the ``imagefolder`` source gives the same
    ids, class names, captions and 8-bit pixels (labels then index the sorted class-folder names).
    """
    folder = Path(folder)
    if folder.exists() and any(folder.iterdir()):
        raise DataError(f"{folder}: export folder is not empty")
    folder.mkdir(parents=True, exist_ok=True)
    labelled = ds.labels is not None
    if labelled and ds.class_names is None:
        raise DataError(f"{ds.name}: has labels but no class_names to name the folders")
    rows = []
    ids = ds.ids.tolist()
    for i, id_ in enumerate(tqdm(ids, desc="export", unit="img", disable=not progress)):
        label = int(ds.labels[i]) if ds.labels is not None else None
        cname = ds.class_names[label] if (label is not None and ds.class_names) else None
        rel = f"{id_:06d}.png"
        if cname is not None:
            rel = f"{_safe_component(cname, 'class name')}/{rel}"
        save_image(ds.images[i], folder / rel)
        rows.append((id_, "" if label is None else label, cname or "", rel))
    with (folder / INDEX_FILE).open("w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(INDEX_COLUMNS)
        writer.writerows(rows)
    if ds.captions is not None:
        write_metadata(folder, [r[3] for r in rows], ds.captions)
    logger.info("exported %d images of %s to %s", len(rows), ds.name, folder)
    return folder
