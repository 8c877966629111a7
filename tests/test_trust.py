"""Trust: an exact copy of a training image is ranked first, and a query's scores depend on what
it shows, never on its name (the conformance test checks names and batch positions bit for bit)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from diffattr.attribution.base import Queries
from diffattr.attribution.registry import make_attributor
from diffattr.data.dataset import ImageDataset
from diffattr.testing import tiny_model

TRAK_FAMILY = ["trak", "d-trak", "das", "grad-cos"]


@pytest.fixture(scope="module")
def model():
    return tiny_model(num_train_timesteps=100)


@pytest.fixture(scope="module")
def train() -> ImageDataset:
    # Smooth blobs (not white noise), so images differ the way real ones do.
    g = torch.Generator().manual_seed(4)
    coarse = torch.rand(12, 1, 4, 4, generator=g) * 2 - 1
    images = torch.nn.functional.interpolate(coarse, size=(8, 8), mode="bilinear")
    return ImageDataset("blobs", images, torch.arange(100, 112))


@pytest.mark.parametrize("name", TRAK_FAMILY)
def test_exact_copies_are_ranked_first_at_the_defaults(name, model, train) -> None:
    """Every training image, used as the query, is its own top-1 (default options: shared noise,
    the query budget equal to the training budget)."""
    attr = make_attributor(name, model, None, proj_dim=256)
    attr.fit(train)
    scores = attr.score(Queries(train.images.clone(), [f"copy-{i}" for i in range(len(train))]))
    top1 = [row[0][0] for row in scores.top_k(1)]
    assert top1 == train.ids.tolist()


def test_per_sample_noise_depends_on_content_not_name(model, train) -> None:
    """Under per-sample noise a query's noise is seeded by its pixels: renaming changes nothing,
    a different image gets different noise."""
    attr = make_attributor("d-trak", model, None, proj_dim=256, noise="per-sample")
    attr.fit(train)
    a = attr.score(Queries(train.images[:2], ["a.png", "b.png"])).values
    b = attr.score(Queries(train.images[:2], ["renamed.png", "other.png"])).values
    np.testing.assert_array_equal(a, b)
