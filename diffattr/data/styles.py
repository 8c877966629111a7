"""``digit-styles``: scikit-learn's digits drawn in six synthetic colour styles, with captions
(bundled, no download): a tiny text-to-image benchmark.

- Images: every digit row of ``sklearn.datasets.load_digits()`` (0..1796, all 10 digits) in every
  style of :data:`STYLE_NAMES`; RGB (3 channels) in ``[-1, 1]``.
- Rendering: the grey digit ``v / 16`` (in ``[0, 1]``) is first resized to ``size`` by
  :func:`diffattr.data.images.resize_images`, then a style turns it into a stroke mask ``m`` in
  ``[0, 1]`` and paints ``background + (foreground - background) * m`` per channel (see
  :data:`STYLES`). Deterministic: an image depends only on its digit row, style and ``size``.
- Ids: ``digit_row * len(STYLE_NAMES) + style_index`` (the index in :data:`STYLE_NAMES`, whatever
  ``classes`` keeps), stable across runs and selections.
- Split: by digit row with the ``digits`` rule (:func:`~diffattr.data.digits.digits_split_mask`:
  ``test`` = rows with ``row % 5 == 0``), so all styles of one drawing share a split.
- Size: default 16; any ``size`` in 8..32.
- Classes: the style names; all by default, ``classes`` narrows them. Labels index the kept
  styles; ``limit`` / ``selection`` apply to the images in id order, stratified by style.
- Groups: ``style``, ``digit`` (the digit's word) and ``caption``.
- Captions: always; ``"a {digit} in {style} style"`` ("a three in bold style"), or
  ``data.prompt_template`` with ``{class}`` and ``{style}`` as the style name and ``{digit}`` as the
  digit's word.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from diffattr.config import DataConfig
from diffattr.data.dataset import DataError, ImageDataset
from diffattr.data.digits import MAX_SIZE, MIN_SIZE, _sklearn_digits, digits_split_mask
from diffattr.data.images import resize_images
from diffattr.data.selection import check_split, class_mask, limit_rows, select_classes

SOURCE = "digit-styles"
DEFAULT_SIZE = 16
DIGIT_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
DEFAULT_TEMPLATE = "a {digit} in {style} style"
TEMPLATE_FIELDS = ("class", "style", "digit")

Mask = Callable[[torch.Tensor], torch.Tensor]
RGB = tuple[float, float, float]


def _dilate(gray: torch.Tensor) -> torch.Tensor:
    """3x3 max filter: every stroke one pixel thicker (padding keeps the size)."""
    return F.max_pool2d(gray, kernel_size=3, stride=1, padding=1)


def _band(size: int) -> int:
    """Width in pixels of a stripe or checker cell: 1 at 8x8, growing with the image so the
    pattern stays about 8 cells across at every size."""
    return max(1, size // 8)


def _stripes(gray: torch.Tensor) -> torch.Tensor:
    """Horizontal bands of the stroke: rows in even bands kept, odd bands blank."""
    rows = torch.arange(gray.shape[-2]) // _band(gray.shape[-2]) % 2 == 0
    return gray * rows.to(gray.dtype)[:, None]


def _checker(gray: torch.Tensor) -> torch.Tensor:
    """The stroke seen through a checkerboard of dots (cells of :func:`_band` pixels)."""
    h, w = gray.shape[-2:]
    band = _band(h)
    cells = (torch.arange(h)[:, None] // band + torch.arange(w)[None, :] // band) % 2 == 0
    return gray * cells.to(gray.dtype)


@dataclass(frozen=True)
class Style:
    mask: Mask  # (n, 1, H, W) grey digit in [0, 1] -> stroke mask in [0, 1]
    foreground: RGB  # colour where the mask is 1, each channel in [0, 1]
    background: RGB  # colour where the mask is 0
    description: str


# Every pair differs in mask or colour, so no two styles of one drawing look alike. The order fixes
# the ids: append new styles at the end, never reorder.
STYLES: dict[str, Style] = {
    "plain": Style(lambda g: g, (1.0, 1.0, 1.0), (0.0, 0.0, 0.0), "white stroke on black"),
    "bold": Style(_dilate, (1.0, 1.0, 0.0), (0.0, 0.0, 0.0), "3x3-dilated stroke, yellow"),
    "outline": Style(
        lambda g: _dilate(g) - g, (0.0, 1.0, 1.0), (0.0, 0.0, 0.0), "dilation minus stroke, cyan"
    ),
    "inverse": Style(lambda g: g, (0.0, 0.0, 0.0), (1.0, 1.0, 1.0), "black stroke on white"),
    "striped": Style(_stripes, (1.0, 0.0, 0.0), (0.0, 0.0, 0.0), "horizontal bands, red"),
    "dotted": Style(_checker, (0.0, 1.0, 0.0), (0.0, 0.0, 0.0), "checkerboard dots, green"),
}
STYLE_NAMES: tuple[str, ...] = tuple(STYLES)


def style_id(digit_row: int, style_index: int) -> int:
    """The stable id of digit row ``digit_row`` drawn in style ``STYLE_NAMES[style_index]``."""
    return digit_row * len(STYLE_NAMES) + style_index


def gray_digits(pixels: np.ndarray, size: int) -> torch.Tensor:
    """sklearn's ``(n, 8, 8)`` values 0..16 -> float32 ``(n, 1, size, size)`` in ``[0, 1]``."""
    # v / 16 is exact in float32; resizing all rows together is per-image, so one image's pixels
    # never depend on which others are loaded.
    gray = torch.from_numpy(pixels / 16.0).to(torch.float32).unsqueeze(1)
    # resize_images clamps to [-1, 1]; the filter is a convex mix, so [0, 1] only loses rounding.
    return resize_images(gray, size).clamp(0.0, 1.0)


def render_style(gray: torch.Tensor, name: str) -> torch.Tensor:
    """``(n, 1, H, W)`` grey digits in ``[0, 1]`` -> ``(n, 3, H, W)`` in ``[-1, 1]`` in ``name``."""
    style = STYLES[name]
    mask = style.mask(gray).clamp(0.0, 1.0)
    fg = torch.tensor(style.foreground, dtype=torch.float32)[None, :, None, None]
    bg = torch.tensor(style.background, dtype=torch.float32)[None, :, None, None]
    # With fg 1 and bg 0 this is the mask itself, bit for bit, so "plain" is the grey digit.
    return (bg + (fg - bg) * mask) * 2.0 - 1.0


def caption_words() -> tuple[str, ...]:
    """Every word of every default caption, sorted and unique (a tokenizer's vocabulary)."""
    fixed = DEFAULT_TEMPLATE.replace("{digit}", "").replace("{style}", "").split()
    return tuple(sorted({*fixed, *STYLE_NAMES, *DIGIT_WORDS}))


def _check_template(template: object) -> str:
    """``data.prompt_template`` as a string naming only :data:`TEMPLATE_FIELDS`."""
    if not isinstance(template, str):
        raise DataError(f"data.prompt_template: expected a string, got {template!r}")
    unknown = sorted(set(re.findall(r"\{([^{}]*)\}", template)) - set(TEMPLATE_FIELDS))
    if unknown:
        fields = ", ".join("{" + f + "}" for f in TEMPLATE_FIELDS)
        raise DataError(
            f"data.prompt_template: {SOURCE} fills {fields}; unknown field(s) "
            f"{['{' + f + '}' for f in unknown]} in {template!r}"
        )
    return template


def style_caption(template: str, style: str, digit: int) -> str:
    """``template`` filled for one image (see the module docstring for the fields)."""
    return (
        template.replace("{class}", style)
        .replace("{style}", style)
        .replace("{digit}", DIGIT_WORDS[digit])
    )


def load_digit_styles(cfg: DataConfig) -> ImageDataset:
    split = check_split(cfg.split, SOURCE)
    size = DEFAULT_SIZE if cfg.size is None else cfg.size
    if not MIN_SIZE <= size <= MAX_SIZE:
        raise DataError(f"data.size: {SOURCE} supports sizes {MIN_SIZE}..{MAX_SIZE}, got {size}")
    keep = select_classes(cfg.classes, STYLE_NAMES, SOURCE)
    template = DEFAULT_TEMPLATE if cfg.prompt_template is None else cfg.prompt_template
    template = _check_template(template)

    pixels, target = _sklearn_digits()
    n_styles = len(STYLE_NAMES)
    # One candidate per (row, style) in id order: id = row * n_styles + style.
    ids = np.arange(len(target) * n_styles, dtype=np.int64)
    rows, styles = ids // n_styles, ids % n_styles
    in_class, new_labels = class_mask(styles, STYLE_NAMES, keep)
    sel = np.flatnonzero(in_class & digits_split_mask(rows, split))
    sel = sel[limit_rows(sel.size, cfg.limit, new_labels[sel], cfg.selection, cfg.selection_seed)]

    gray = gray_digits(pixels, size)
    images = torch.empty((sel.size, 3, size, size), dtype=torch.float32)
    for index, name in enumerate(STYLE_NAMES):
        at = np.flatnonzero(styles[sel] == index)
        if at.size:
            images[torch.from_numpy(at)] = render_style(gray[torch.from_numpy(rows[sel[at]])], name)

    style_of = [STYLE_NAMES[s] for s in styles[sel].tolist()]
    digit_of = target[rows[sel]].tolist()
    captions = [style_caption(template, s, d) for s, d in zip(style_of, digit_of, strict=True)]
    return ImageDataset(
        name=f"{SOURCE}:{split}",
        images=images,
        ids=torch.from_numpy(ids[sel]),
        labels=torch.from_numpy(new_labels[sel]),
        class_names=keep,
        groups={
            "style": style_of,
            "digit": [DIGIT_WORDS[d] for d in digit_of],
            "caption": list(captions),
        },
        captions=captions,
    )
