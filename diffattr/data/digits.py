"""scikit-learn's bundled 8x8 handwritten digits (no download): ``digits`` and ``digits-2``.

- Pixels: sklearn's values ``0..16`` scaled to ``v / 8 - 1`` in ``[-1, 1]``, 1 channel.
- Ids: the row index in ``sklearn.datasets.load_digits()`` (0..1796), stable across runs.
- Split (fixed, by id, so held-out queries always exist): ``test`` = ids with ``id % 5 == 0``
  (360 images, 20%), ``train`` = all others (1437 images).
- Size: native 8; any ``size`` in 8..32 is produced by :func:`diffattr.data.images.resize_images`
  (torch antialiased bilinear) from the float 8x8 images.
- Classes: names ``"0"`` .. ``"9"``; ``digits`` keeps all by default, ``digits-2`` keeps ``"0"`` and
  ``"1"``; ``classes`` narrows either. Labels index the kept names (``digits-2``: the digit itself).
- Captions: only with ``data.prompt_template`` (``"a drawing of the digit {class}"``).
"""

from __future__ import annotations

import numpy as np
import torch

from diffattr.config import DataConfig
from diffattr.data.captions import template_captions
from diffattr.data.dataset import DataError, ImageDataset
from diffattr.data.images import resize_images
from diffattr.data.selection import check_split, class_mask, limit_rows, select_classes

DIGIT_NAMES = [str(d) for d in range(10)]
DIGITS2_CLASSES = ("0", "1")
TEST_EVERY = 5  # test split: ids divisible by 5
MIN_SIZE, MAX_SIZE = 8, 32


def digits_split_mask(ids: np.ndarray, split: str) -> np.ndarray:
    """True for the ids that belong to ``split`` (see module docstring for the rule)."""
    in_test = ids % TEST_EVERY == 0
    return in_test if split == "test" else ~in_test


def _sklearn_digits() -> tuple[np.ndarray, np.ndarray]:
    """``images`` float64 ``(1797, 8, 8)`` in 0..16 and ``target`` int64 ``(1797,)``."""
    from sklearn.datasets import load_digits  # imported lazily: sklearn import is slow

    bunch = load_digits()
    return np.asarray(bunch.images, dtype=np.float64), np.asarray(bunch.target, dtype=np.int64)


def load_digits_dataset(
    cfg: DataConfig, default: tuple[str, ...] | None = None, source: str = "digits"
) -> ImageDataset:
    split = check_split(cfg.split, source)
    size = MIN_SIZE if cfg.size is None else cfg.size
    if not MIN_SIZE <= size <= MAX_SIZE:
        raise DataError(f"data.size: {source} supports sizes {MIN_SIZE}..{MAX_SIZE}, got {size}")
    keep = select_classes(cfg.classes, DIGIT_NAMES, source, default)

    pixels, target = _sklearn_digits()
    ids = np.arange(len(target), dtype=np.int64)
    in_class, new_labels = class_mask(target, DIGIT_NAMES, keep)
    sel = np.flatnonzero(in_class & digits_split_mask(ids, split))
    if sel.size == 0:
        raise DataError(f"{source}: no images of classes {keep} in split {split!r}")
    sel = sel[limit_rows(sel.size, cfg.limit, new_labels[sel], cfg.selection, cfg.selection_seed)]

    # 0..16 -> [-1, 1]; every value is a multiple of 1/8, so this is exact in float32.
    images = torch.from_numpy(pixels[sel] / 8.0 - 1.0).to(torch.float32).unsqueeze(1)
    images = resize_images(images, size)
    labels = torch.from_numpy(new_labels[sel])
    return ImageDataset(
        name=f"{source}:{split}",
        images=images.contiguous(),
        ids=torch.from_numpy(ids[sel]),
        labels=labels,
        class_names=keep,
        groups={"class": [keep[i] for i in labels.tolist()]},
        captions=template_captions(cfg, keep, labels, source),
    )


def load_digits_all(cfg: DataConfig) -> ImageDataset:
    return load_digits_dataset(cfg, None, "digits")


def load_digits2(cfg: DataConfig) -> ImageDataset:
    return load_digits_dataset(cfg, DIGITS2_CLASSES, "digits-2")
