"""Featurize a tiny deterministic model and data set into a store (for the multi-process test).

Run under torchrun to use several CPU processes; ``Accelerator()`` joins the gloo process group::

    OMP_NUM_THREADS=1 torchrun --nproc_per_node 2 scripts/featurize_worker.py OUT [--kind gaussian]

Without torchrun it runs as a single process. ``build_inputs`` is shared with the tests so the
single- and multi-process stores come from the same model, data and arguments.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

import torch

from diffattr.attribution.featurize import FeaturizeArgs, featurize
from diffattr.attribution.projectors import ProjectorConfig
from diffattr.attribution.timesteps import TimestepPolicy
from diffattr.data.dataset import ImageDataset
from diffattr.diffusion.model import DiffusionModel
from diffattr.testing import tiny_model


def build_inputs(
    kind: str = "gaussian", n: int = 10
) -> tuple[DiffusionModel, ImageDataset, FeaturizeArgs]:
    """A seeded tiny UNet, ``n`` random 1x8x8 images with shuffled ids, and featurize arguments."""
    g = torch.Generator().manual_seed(1)
    images = torch.rand(n, 1, 8, 8, generator=g) * 2 - 1
    ids = torch.randperm(1000, generator=g)[:n]
    data = ImageDataset(name="tiny", images=images, ids=ids)
    args = FeaturizeArgs(
        output="loss",
        timesteps=TimestepPolicy(kind="uniform", count=2),
        projector=ProjectorConfig(kind=kind, dim=64, seed=1),
        batch_size=4,
        shard_size=3,
        label="worker-test",
    )
    return tiny_model(), data, args


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("out", type=Path)
    p.add_argument("--kind", default="gaussian")
    p.add_argument("--n", type=int, default=10)
    a = p.parse_args()
    logging.basicConfig(level=logging.WARNING)
    torch.set_num_threads(1)
    from accelerate import Accelerator

    accelerator = Accelerator(cpu=True)
    model, data, args = build_inputs(a.kind, a.n)
    store = featurize(model, data, a.out, args, accelerator=accelerator, progress=False)
    if accelerator.is_main_process:
        print(f"rank 0/{accelerator.num_processes}: wrote {len(store)} x {store.feature_shape[1:]}")


if __name__ == "__main__":
    main()
