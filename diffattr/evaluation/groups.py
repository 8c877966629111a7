"""Group-level LDS: does a method's score predict what removing whole *groups* does?

GGDA (Ley et al., "Generalized Group Data Attribution") attributes to groups of training images.
Its validation here is LDS with group subsets: subset ``m`` keeps a seeded random ``alpha`` share
of the ``K`` groups (every group entirely in or out), so it is an ordinary :class:`SubsetMasks`
whose kept ids are the union of the kept groups. Everything after the drawing is the image-level
machinery unchanged: the same retraining jobs, ground truth and :func:`~diffattr.evaluation.lds.lds`.
The prediction for query ``q`` is the sum of its scores over the kept groups' images, i.e. the
sum of its group scores, so group LDS is also the check "do summed image scores predict group
removal?".

Files (under the evaluation's ``group_subsets/``): ``subsets/`` (as :func:`save_subsets` writes
them) and ``groups.json`` (the group of every training id, the kept groups of every subset).

GGDA's own method, one feature per group scored with a kernel over groups, is the ``ggda``
attributor (:mod:`diffattr.attribution.methods.ggda`); ``configs/eval/digits2-groups.yaml``
measures it here against the summed image scores.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np

from diffattr.attribution.base import Scores
from diffattr.data.groups import GroupAssignment
from diffattr.evaluation.subsets import SubsetError, SubsetMasks, load_subsets, save_subsets
from diffattr.repro import derive_seed, write_json_atomic

log = logging.getLogger(__name__)

GROUPS_FILE = "groups.json"


def groups_kept(num_groups: int, alpha: float) -> int:
    """Groups each subset keeps: ``round(alpha * K)``; refused when that is 0 or all ``K``."""
    if num_groups < 2:
        raise SubsetError(f"group subsets need at least 2 groups, got {num_groups}")
    if not 0.0 < alpha < 1.0:
        raise SubsetError(f"group subsets: alpha must be in (0, 1), got {alpha}")
    k = int(round(alpha * num_groups))
    if k < 1:
        raise SubsetError(f"alpha={alpha} of {num_groups} groups keeps no group (empty subset)")
    if k >= num_groups:
        # Every subset would be the full set: nothing varies, LDS is undefined.
        raise SubsetError(f"alpha={alpha} of {num_groups} groups keeps every group")
    return k


def kept_groups(num_groups: int, num_subsets: int, alpha: float, seed: int) -> np.ndarray:
    """bool ``(M, K)``: group g kept in subset m. Row m depends only on ``(seed, m)``."""
    if num_subsets < 1:
        raise SubsetError(f"num_subsets must be >= 1, got {num_subsets}")
    k = groups_kept(num_groups, alpha)
    kept = np.zeros((num_subsets, num_groups), dtype=bool)
    for m in range(num_subsets):
        rng = np.random.default_rng(derive_seed(seed, "group-subset", m))
        kept[m, rng.permutation(num_groups)[:k]] = True
    return kept


def make_group_subsets(
    groups: GroupAssignment, num_subsets: int, alpha: float, seed: int
) -> SubsetMasks:
    """Image masks ``(M, n)`` of ``num_subsets`` group subsets (each keeps ``round(alpha * K)``
    whole groups); ``masks[m, j]`` is true when image j's group is kept in subset m."""
    kept = kept_groups(groups.num_groups, num_subsets, alpha, seed)
    masks = kept[:, groups.index]  # (M, n): each image takes its group's
    return SubsetMasks(masks=masks, train_ids=groups.train_ids, alpha=alpha, seed=seed)


def save_groups(folder: Path, groups: GroupAssignment, subsets: SubsetMasks) -> None:
    """``folder/groups.json``: the assignment and, per subset, the names of its kept groups."""
    kept = [
        [groups.names[g] for g in np.unique(groups.index[subsets.masks[m]])]
        for m in range(len(subsets))
    ]
    write_json_atomic(Path(folder) / GROUPS_FILE, {**groups.to_dict(), "subset_groups": kept})


def load_groups(folder: Path) -> GroupAssignment:
    path = Path(folder) / GROUPS_FILE
    if not path.exists():
        raise FileNotFoundError(f"{path}: missing; no saved groups here")
    return GroupAssignment.from_dict(json.loads(path.read_text()))


def ensure_group_subsets(
    folder: Path, groups: GroupAssignment, num_subsets: int, alpha: float, seed: int
) -> SubsetMasks:
    """Load the group subsets saved in ``folder`` (``subsets/`` + ``groups.json``), or make and
    save them; saved ones must equal those the settings make (else refuse, naming the folder)."""
    folder = Path(folder)
    want = make_group_subsets(groups, num_subsets, alpha, seed)
    if (folder / "subsets" / "subsets.safetensors").exists():
        have = load_subsets(folder / "subsets")
        same = have.masks.shape == want.masks.shape and np.array_equal(have.masks, want.masks)
        if not same or not np.array_equal(have.train_ids, want.train_ids):
            raise SubsetError(
                f"{folder}: saved group subsets differ from those made by {groups.spec}, "
                f"seed={seed}, alpha={alpha}, num_subsets={num_subsets}; use another output folder"
            )
        return have
    save_subsets(want, folder / "subsets")
    save_groups(folder, groups, want)
    sizes = want.masks.sum(axis=1)
    log.info(
        "made %d group subsets (%d of %d groups; %d-%d of %d images)",
        num_subsets,
        groups_kept(groups.num_groups, alpha),
        groups.num_groups,
        int(sizes.min()),
        int(sizes.max()),
        len(groups.train_ids),
    )
    return want


def group_score_sums(scores: Scores, groups: GroupAssignment) -> np.ndarray:
    """float64 ``(Q, K)``: each query's scores summed over each group's images."""
    return scores.values.astype(np.float64) @ groups.one_hot(scores.train_ids)
