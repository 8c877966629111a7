"""Raw-pixel cosine similarity: the model-free baseline every gradient method should beat.

``score[q, i] = <x_q, x_i> / (|x_q| |x_i|)`` over the flattened ``[-1, 1]`` pixels (optionally
after subtracting each image's mean, which makes it the pixel Pearson correlation). The model is
accepted only so every method is built by the same factory; it is not used.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from diffattr.attribution.base import Queries, Scores
from diffattr.attribution.methods.common import make_scores
from diffattr.attribution.scoring import cosine_scores
from diffattr.data.dataset import ImageDataset
from diffattr.repro import to_jsonable


@dataclass
class PixelOptions:
    """``center``: subtract each image's mean pixel first (Pearson correlation of pixels)."""

    center: bool = False

    def __post_init__(self) -> None:
        if not isinstance(self.center, bool):
            raise ValueError(f"center: expected true or false, got {self.center!r}")


def flat_pixels(images: Tensor, center: bool) -> Tensor:
    """``(n, C, H, W)`` -> ``(n, C*H*W)`` float32, optionally mean-centred per image."""
    x = images.reshape(images.shape[0], -1).to(torch.float32)
    return x - x.mean(dim=1, keepdim=True) if center else x


class PixelCosine:
    """``pixel``: cosine similarity of raw pixels."""

    name: str = "pixel"

    def __init__(
        self, model: Any, work_dir: Path | None, options: PixelOptions, progress: bool = False
    ) -> None:
        self.model = model
        self.options = options
        self.train: ImageDataset | None = None
        self.timing: dict[str, float] = {}

    def fit(self, train: ImageDataset) -> None:
        if len(train) == 0:
            raise ValueError("pixel: empty training set")
        self.train = train
        self._train_flat = flat_pixels(train.images, self.options.center)

    def score(self, queries: Queries) -> Scores:
        if self.train is None:
            raise RuntimeError("pixel: call fit(train) before score(queries)")
        if tuple(queries.images.shape[1:]) != tuple(self.train.images.shape[1:]):
            raise ValueError(
                f"pixel: query images are {tuple(queries.images.shape[1:])}, training images "
                f"{tuple(self.train.images.shape[1:])}"
            )
        t0 = time.perf_counter()
        values = cosine_scores(self._train_flat, flat_pixels(queries.images, self.options.center))
        self.timing["score_s"] = time.perf_counter() - t0
        return make_scores(self, self.train, queries, values)

    def config(self) -> dict[str, Any]:
        return {"options": to_jsonable(self.options), "timing": dict(self.timing)}
