"""What a model takes: its input space and its conditioning, for any model kind.

Three kinds of model reach the attribution code, told apart by what they offer (duck typing, so
the attribution layer imports no model class):

- an unconditional pixel-space DDPM: images are its inputs, nothing conditions it;
- a class-conditional one (``num_classes`` set): class labels ``(n,)`` int64 condition it;
- a text-to-image latent model (``conditional`` true, ``tokenize`` / ``encode_images``): its
  inputs are VAE latents of the images (D-TRAK's ``latent_dist.mode() * scaling_factor``) and
  the token ids ``(n, L)`` of each image's caption (training) or prompt (query) condition it.

Attribution always runs in the model's input space; the images users give (training sets,
queries) stay in pixel space and are encoded here, once per data set and model.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from diffattr.data.dataset import ImageDataset
from diffattr.errors import UserError

ENCODE_BATCH = 32  # images per VAE call (values do not depend on it)
_CACHE = "_model_inputs"  # attribute of a data set holding its encodings


class ConditioningError(UserError, ValueError):
    """Images without the conditioning their model needs (prompts, captions, class labels)."""


def is_text_conditional(model: Any) -> bool:
    return bool(getattr(model, "conditional", False)) and hasattr(model, "tokenize")


def is_latent(model: Any) -> bool:
    return hasattr(model, "encode_images")


def pixel_shape(model: Any) -> tuple[int, int, int] | None:
    """The ``(C, H, W)`` of the images a user gives for ``model`` (a latent model's pixel shape)."""
    shape = getattr(model, "pixel_shape", None) if is_latent(model) else None
    if shape is None:
        shape = getattr(model, "image_shape", None)
    if shape is None:
        return None
    c, h, w = (int(v) for v in shape)
    return c, h, w


@torch.no_grad()
def model_inputs(model: Any, images: Tensor) -> Tensor:
    """``images`` ``(n, C, H, W)`` in the model's input space: unchanged for a pixel model, VAE
    latents ``(n, c, h, w)`` (float32, on the images' device) for a latent one."""
    if not is_latent(model):
        return images
    out = [
        model.encode_images(images[i : i + ENCODE_BATCH].to(model.device)).float()
        for i in range(0, images.shape[0], ENCODE_BATCH)
    ]
    return torch.cat(out).to(images.device)


def dataset_inputs(model: Any, data: ImageDataset) -> Tensor:
    """:func:`model_inputs` of every image of ``data`` ``(n, ...)``, encoded once per data set and
    VAE (kept on the data set while its images tensor is the same, unmodified one)."""
    if not is_latent(model):
        return data.images
    cache: dict[tuple[int, int, int], Tensor] = data.__dict__.setdefault(_CACHE, {})
    key = (id(model.vae), id(data.images), int(data.images._version))
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
    """The conditioning of ``n`` images for ``model``: token ids ``(n, L)`` of ``texts`` for a
    text-to-image model, class labels ``(n,)`` for a class-conditional one, else None.

    ``what`` names the images in errors ("queries", "training set ...")."""
    if is_text_conditional(model):
        if texts is None:
            raise ConditioningError(
                f"{what}: the model is text-conditional and these images have no "
                f"{'prompts' if 'quer' in what else 'captions'}; give each its text (queries: "
                "--prompt, or an image made by `diffattr generate`; training images: captions in "
                "metadata.jsonl or a prompt template), or an empty prompt to attribute "
                "unconditionally"
            )
        if len(texts) != n:
            raise ConditioningError(f"{what}: {len(texts)} texts for {n} images")
        return model.tokenize(list(texts))
    if getattr(model, "num_classes", None) is None:
        return None
    if labels is None:
        raise ConditioningError(f"{what}: the model is class-conditional; the images need labels")
    if labels.shape != (n,):
        raise ConditioningError(f"{what}: labels must have shape ({n},), got {tuple(labels.shape)}")
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
