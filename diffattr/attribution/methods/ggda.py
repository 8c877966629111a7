"""``ggda``: D-TRAK on one feature per group of training images (GGDA, Ley et al. 2024).

Training features are group features (:mod:`diffattr.attribution.groupfeat`): the projected
gradient of the group's summed output, each member differentiated at ``timesteps_per_image`` of
the ``timesteps`` (None: all of them, so the group feature is exactly the sum of its members'
D-TRAK features). Query features are D-TRAK's. Kernels over the ``K`` group features ``Phi_G``
``(K, k)``:

* ``"group"`` (GGDA's recipe): ``phi_q^T (Phi_G^T Phi_G + lambda I)^{-1} phi_g``, the ridge by the
  TRAK rule of :mod:`~diffattr.attribution.scoring` on the group Gram matrix;
* ``"dot"``: ``phi_q^T phi_g`` (no kernel; a TracIn-like baseline for the same features).

Scores are per group; to keep the attributor contract ``(n_queries, n_train)`` every image gets its
group's score divided by the group's size, so the images of a group tie and sum to the group
score (what group shares and group-level LDS read). Per-image rankings are therefore not
available from this method: use it for groups, not for "which image".
"""

from __future__ import annotations

import dataclasses
import functools
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import Tensor

from diffattr.attribution.featurize import FeaturizeArgs
from diffattr.attribution.groupfeat import featurize_groups
from diffattr.attribution.methods.common import (
    FeatureAttributor,
    Scorer,
    check_int,
    kernel_device,
    make_featurize_args,
    short_hash,
    store_folder,
)
from diffattr.attribution.methods.dtrak import DTrakOptions
from diffattr.attribution.onepass import StoreRequest
from diffattr.attribution.scoring import TrakKernel, dot_scores
from diffattr.data.dataset import ImageDataset
from diffattr.data.groups import GroupAssignment, assign_groups, parse_group_spec

KERNELS = ("group", "dot")


@dataclass
class GGDAOptions(DTrakOptions):
    """D-TRAK's options plus ``groups`` (``"class"``, a grouping name, ``{csv: path}`` or
    ``{kmeans: K, seed: S}``; see :mod:`diffattr.data.groups`), ``timesteps_per_image`` (None:
    all ``timesteps``; ``r`` makes the fit cost ``r / timesteps`` of D-TRAK's) and ``kernel``
    (``"group"`` or ``"dot"``)."""

    groups: Any = "class"
    timesteps_per_image: int | None = None
    kernel: str = "group"

    def __post_init__(self) -> None:
        super().__post_init__()
        parse_group_spec(self.groups, "groups")
        if self.timesteps_per_image is not None:
            check_int(self.timesteps_per_image, "timesteps_per_image")
        if self.kernel not in KERNELS:
            raise ValueError(f"kernel: {self.kernel!r} is unknown; expected one of {KERNELS}")


def spread_to_images(group_scores: Tensor, groups: GroupAssignment) -> Tensor:
    """Group scores ``(m, K)`` -> image scores ``(m, n)``: each image its group's score over the
    group's size (float32; columns in ``groups.train_ids`` order)."""
    index = torch.as_tensor(groups.index)
    sizes = torch.as_tensor(groups.sizes(), dtype=torch.float64)
    return (group_scores.to(torch.float64)[:, index] / sizes[index]).to(torch.float32)


class GGDA(FeatureAttributor):
    """``ggda``: group features, a kernel over groups, scores shared within each group."""

    name: str = "ggda"
    # Scores groups, not images: readers show ``self.groups`` instead of a per-image top-k.
    scores_groups: ClassVar[bool] = True

    def train_args(self) -> FeaturizeArgs:
        args = make_featurize_args(self.options, self.model, str(self.options.output), self.name)
        if args.aggregate == "halves" and self.per_image(args) * args.num_noise < 2:
            # One sample per member: nothing to split, so no stability figure.
            args = dataclasses.replace(args, aggregate="mean")
        return args

    def per_image(self, args: FeaturizeArgs) -> int:
        """Timesteps each member is differentiated at (``r``)."""
        r = self.options.timesteps_per_image
        return len(args.timesteps.timesteps()) if r is None else int(r)

    def store_requests(self, train: ImageDataset) -> list[StoreRequest]:
        """None: group features are featurized by their own loop (:mod:`groupfeat`)."""
        return []

    def training_features(
        self, train: ImageDataset, args: FeaturizeArgs
    ) -> tuple[Tensor, Path, int | None]:
        """Group features ``(K, k)`` (or halves) from their store; the groups are assigned here,
        before :meth:`build` needs them."""
        self.groups = assign_groups(train, self.options.groups)
        r = self.per_image(args)
        tag = short_hash(self.groups.digest(), r)
        folder = store_folder(self.work, args, self.model, train, tag=f"groups-{tag}")
        store = featurize_groups(self.model, train, self.groups, folder, args, r, self.progress)
        return torch.as_tensor(store.features, dtype=torch.float32), folder, r * args.num_noise

    def fit(self, train: ImageDataset) -> None:
        super().fit(train)
        args = self.train_args()
        self.info.update(
            groups=self.groups.spec,
            num_groups=self.groups.num_groups,
            timesteps_per_image=self.per_image(args),
            timesteps=args.timesteps.timesteps(),
            query_timesteps=self.query_args().timesteps.timesteps(),
        )

    def build(self, train_feats: Tensor, train: ImageDataset, part: int | None) -> Scorer:
        """A scorer ``(m, k) -> (m, n)`` from group features ``(K, k)``."""
        if self.options.kernel == "group":
            kernel = TrakKernel(
                train_feats,
                lam=self.options.lam,
                lambda_scale=self.options.lambda_scale,
                device=kernel_device(self.model),
            )
            if part is None:
                self.info["lambda"] = kernel.lam
            group_scores: Scorer = kernel.scores
        else:
            group_scores = functools.partial(dot_scores, train_feats)
        # The groups were assigned from ``train``: their rows are in ``train.ids`` order.
        return functools.partial(_spread, group_scores, self.groups)


def _spread(group_scores: Scorer, groups: GroupAssignment, query_feats: Tensor) -> Tensor:
    return spread_to_images(group_scores(query_feats), groups)


__all__ = ["GGDA", "GGDAOptions", "spread_to_images"]
