"""What a model takes, asked of the model: its inputs for some images and their conditioning.

Attribution code never branches on the kind of model. Every model answers three questions (the
diffusion layer implements them: :class:`~diffattr.diffusion.model.DiffusionModel` for
pixel-space DDPMs, :class:`~diffattr.diffusion.text2image.TextToImageModel` for text-to-image
latent models):

- ``model.inputs(images)``: the UNet's inputs for images in pixel space (the images themselves,
  or their VAE latents as D-TRAK computes them);
- ``model.condition(labels, texts, n, what)``: the conditioning of ``n`` images (class labels of
  a class-conditional model, the token ids of their captions or prompts, or None);
- ``model.target(x0, noise, t)``: what it is trained to predict (the noise, or the velocity).

This module adds what attribution needs on top: data sets encoded once, the conditioning of rows
of a data set or of queries, the pixel shape users' images must have.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from diffattr.data.dataset import ImageDataset
from diffattr.errors import ConditioningError

__all__ = [
    "ConditioningError",
    "condition",
    "data_condition",
    "dataset_inputs",
    "model_inputs",
    "pixel_shape",
    "prediction_target",
]

_CACHE = "_model_inputs"  # attribute of a data set holding its encodings


def pixel_shape(model: Any) -> tuple[int, int, int] | None:
    """The ``(C, H, W)`` of the images a user gives for ``model``."""
    shape = getattr(model, "pixel_shape", None) or getattr(model, "image_shape", None)
    if shape is None:
        return None
    c, h, w = (int(v) for v in shape)
    return c, h, w


@torch.no_grad()
def model_inputs(model: Any, images: Tensor) -> Tensor:
    """``images`` ``(n, C, H, W)`` in the model's input space (``model.inputs``), on the images'
    device."""
    inputs = getattr(model, "inputs", None)
    return images if inputs is None else inputs(images)


def dataset_inputs(model: Any, data: ImageDataset) -> Tensor:
    """:func:`model_inputs` of every image of ``data`` ``(n, ...)``. A latent model's are
    encoded once per data set and encoder (kept on the data set while its images tensor is the
    same, unmodified one)."""
    if not getattr(model, "inputs_are_latents", False):
        return model_inputs(model, data.images)
    cache: dict[tuple[str, int, int], Tensor] = data.__dict__.setdefault(_CACHE, {})
    key = (str(model.inputs_key()), id(data.images), int(data.images._version))
    if key not in cache:
        cache.clear()
        cache[key] = model_inputs(model, data.images).cpu()
    return cache[key]


def condition(
    model: Any,
    labels: Tensor | None,
    texts: Sequence[str] | None,
    n: int,
    what: str,
) -> Tensor | None:
    """The conditioning of ``n`` images for ``model`` (``model.condition``); ``what`` names
    them in errors ("queries", "training set ...")."""
    ask = getattr(model, "condition", None)
    if ask is not None:
        return ask(labels, texts, n, what)
    if getattr(model, "num_classes", None) is None:  # a bare model object (tests)
        return None
    if labels is None:
        raise ConditioningError(f"{what}: the model is class-conditional; the images need labels")
    return labels.to(torch.int64)


def data_condition(model: Any, data: ImageDataset, rows: slice | Tensor) -> Tensor | None:
    """:func:`condition` of ``data``'s ``rows`` (captions or class labels of those rows)."""
    index = torch.arange(len(data))[rows]
    labels = None if data.labels is None else data.labels[index]
    captions = getattr(data, "captions", None)
    texts = None if captions is None else [captions[int(i)] for i in index]
    return condition(model, labels, texts, int(index.shape[0]), f"training set {data.name!r}")


def prediction_target(model: Any, x0: Tensor, noise: Tensor, t: Tensor) -> Tensor:
    """What the model is trained to predict at ``x_t = add_noise(x0, noise, t)``: the noise for
    epsilon-prediction, the velocity for v-prediction (the model's ``target``)."""
    target = getattr(model, "target", None)
    return noise if target is None else target(x0, noise, t)
