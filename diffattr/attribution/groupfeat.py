"""Grouped features (GGDA's speed-up): one gradient feature per group of training images.

GGDA (Ley et al., "Generalized Group Data Attribution") attributes to groups instead of images:
the feature of group ``g`` is the projected gradient of the group's summed output,

    phi_g = P^T sum_{i in g} (1 / r) sum_{t in T_i} grad_theta f(x_i, t)

(``T_i``: the ``r`` timesteps image ``i`` is differentiated at, each averaged over the noise draws).
For a diffusion model the cost of featurization is the number of (image, timestep) gradient rows,
so the saving has to come from the timestep budget: the ``G`` members of a group share the ``S``
timesteps of the image-level settings, each member taking ``r`` of them
(``timesteps_per_image``), staggered so that the group together covers the ``S`` timesteps evenly
(:func:`member_steps`). With ``r = S`` every member gets every timestep and ``phi_g`` is exactly
the sum of its members' image features (tested against the image store); with ``r < S`` a group
costs ``r / S`` of featurizing its images one by one, and its feature is a noisier estimate of the
same sum (the timestep average of each member is estimated from ``r`` instead of ``S`` timesteps,
while the noise draws stay those of the image-level settings).

Members are taken in id order, so the features depend only on the id -> image map, not on the
order of the training set. :func:`featurize_groups` writes them into a resumable
:class:`~diffattr.attribution.store.FeatureStore` whose items are the groups.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from diffattr.attribution.conditioning import data_condition, dataset_inputs
from diffattr.attribution.featurize import (
    FeaturizeArgs,
    aggregate_samples,
    build_projector,
    fill_feature_store,
    row_features,
    store_identity,
)
from diffattr.attribution.store import FeatureStore
from diffattr.data.dataset import ImageDataset
from diffattr.data.groups import GroupAssignment

# Gradient rows per call of the featurizer (members of one or more groups): bounds the memory of
# the repeated clean images and the per-row features.
ROW_CHUNK = 2048


def member_steps(group_size: int, per_image: int, num_steps: int) -> list[list[int]]:
    """Indices into the ``S = num_steps`` timesteps for each of a group's ``G`` members.

    Member ``k`` (in id order) takes ``r = per_image`` indices ``((k + j G) S) // (G r)``,
    ``j = 0..r-1``: increasing, spread over the whole schedule, and offset from the other members'
    so that the group's ``G r`` rows cover the ``S`` timesteps evenly. ``r = S`` gives every member
    every index (``j``)."""
    if group_size < 1:
        raise ValueError(f"member_steps: a group needs at least one member, got {group_size}")
    if not 1 <= per_image <= num_steps:
        raise ValueError(
            f"timesteps_per_image: expected an int in [1, {num_steps}] (the timesteps of the "
            f"settings), got {per_image}"
        )
    G, r, S = group_size, per_image, num_steps
    return [[((k + j * G) * S) // (G * r) for j in range(r)] for k in range(G)]


def group_members(data: ImageDataset, groups: GroupAssignment) -> list[np.ndarray]:
    """Positions in ``data`` of each group's members, in id order: ``K`` int arrays."""
    index = groups.aligned(data.ids.numpy())
    ids = data.ids.numpy()
    out = []
    for g in range(groups.num_groups):
        pos = np.flatnonzero(index == g)
        out.append(pos[np.argsort(ids[pos], kind="stable")])
    return out


def group_features(
    model: Any,
    data: ImageDataset,
    members: list[np.ndarray],
    timesteps: list[int],
    args: FeaturizeArgs,
    per_image: int,
) -> Tensor:
    """Features of the groups whose member positions are ``members`` (float32, CPU).

    ``(len(members), k)`` for ``args.aggregate == "mean"``, ``(len(members), 2, k)`` for
    ``"halves"`` (each member's ``r x D`` samples alternate between the halves, as for images).
    """
    if args.aggregate not in ("mean", "halves"):
        raise ValueError(f"group features: aggregate {args.aggregate!r} is not mean or halves")
    # (slot of the group in the output, data position, timestep indices) per member
    items = [
        (slot, int(pos), steps)
        for slot, mem in enumerate(members)
        for pos, steps in zip(
            mem.tolist(), member_steps(len(mem), per_image, len(timesteps)), strict=True
        )
    ]
    out: Tensor | None = None
    per_call = max(1, ROW_CHUNK // per_image)
    for c0 in range(0, len(items), per_call):
        chunk = items[c0 : c0 + per_call]
        pos = torch.tensor([p for _, p, steps in chunk for _ in steps], dtype=torch.int64)
        t = torch.tensor([timesteps[s] for _, _, steps in chunk for s in steps], dtype=torch.int64)
        labels = data_condition(model, data, pos)
        x0 = dataset_inputs(model, data)[pos]
        f = row_features(model, x0, data.ids[pos], t, args, labels)
        f = f.detach().to("cpu", torch.float32)
        per_member = aggregate_samples(
            f.reshape(len(chunk), per_image, *f.shape[1:]), args.aggregate
        )
        if out is None:
            out = torch.zeros(len(members), *per_member.shape[1:], dtype=torch.float64)
        slots = torch.tensor([s for s, _, _ in chunk], dtype=torch.int64)
        out.index_add_(0, slots, per_member.to(torch.float64))
    assert out is not None
    return out.to(torch.float32)


def featurize_groups(
    model: Any,
    data: ImageDataset,
    groups: GroupAssignment,
    out: str | Path,
    args: FeaturizeArgs,
    per_image: int,
    progress: bool = True,
    accelerator: Any = None,
) -> FeatureStore:
    """One feature per group of ``groups`` into the resumable store at ``out`` (items: groups
    ``0..K-1``; features ``(K, k)`` or ``(K, 2, k)`` for ``aggregate="halves"``).

    Shards hold about ``args.shard_size`` images' worth of groups; the identity adds the groups'
    digest and ``timesteps_per_image`` to the image store's, so other groups or another budget
    are refused by name (:class:`~diffattr.attribution.store.StoreMismatchError`)."""
    args.validate()
    if len(data) == 0:
        raise ValueError(f"group features: data set {data.name!r} is empty")
    timesteps = args.timesteps.timesteps()
    member_steps(1, per_image, len(timesteps))  # validates per_image
    members = group_members(data, groups)
    K = groups.num_groups
    proj, _ = build_projector(model, args)
    fshape = (K, proj.dim) if args.aggregate == "mean" else (K, 2, proj.dim)
    identity = {
        **store_identity(model, data, args, proj, fshape),
        "groups": groups.digest(),
        "group_spec": groups.spec,
        "timesteps_per_image": per_image,
    }
    groups_per_shard = max(1, round(args.shard_size * K / len(data)))

    def compute(sl: slice) -> Tensor:
        return group_features(model, data, members[sl], timesteps, args, per_image)

    return fill_feature_store(
        out,
        identity,
        torch.arange(K),
        groups_per_shard,
        compute,
        fshape[1:],
        args,
        proj,
        progress=progress,
        accelerator=accelerator,
        unit="group",
        extra={"group_names": list(groups.names), "group_sizes": groups.sizes().tolist()},
    )
