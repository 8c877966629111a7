"""Rules shared by every loader: split names, class subsets, ``limit`` and how it selects.

Class subsets keep the source's own class order (not the order the user listed them in), and the
returned labels index the kept names, so ``labels`` of CIFAR-2 are 0 = automobile, 1 = horse. Ids are
never renumbered: a class subset or a ``limit`` keeps each image's original id.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from diffattr.data.dataset import DataError

SPLITS = ("train", "test")


def check_split(split: str, source: str) -> str:
    if split not in SPLITS:
        raise DataError(f"data.split: {source} has splits {list(SPLITS)}, got {split!r}")
    return split


def select_classes(
    requested: Sequence[str] | None,
    available: Sequence[str],
    source: str,
    default: Sequence[str] | None = None,
) -> list[str]:
    """The class names to keep, in ``available`` order.

    ``default`` is the source's fixed class set (CIFAR-2: automobile, horse) and ``requested`` (the
    config's ``classes``) may only narrow it. ``None`` keeps the default (or everything).
    """
    base = list(default) if default is not None else list(available)
    missing = [c for c in base if c not in available]
    if missing:
        raise DataError(
            f"{source}: class(es) {missing} not in the data's label names {list(available)}"
        )
    if requested is None:
        wanted = base
    else:
        if len(requested) == 0:
            raise DataError(f"data.classes: empty class list for {source}; valid: {base}")
        unknown = [c for c in requested if c not in base]
        if unknown:
            raise DataError(
                f"data.classes: unknown class(es) {unknown} for {source}; valid: {base}"
            )
        wanted = list(requested)
    keep = set(wanted)
    return [c for c in available if c in keep]


def class_mask(
    labels: np.ndarray, available: Sequence[str], keep: Sequence[str]
) -> tuple[np.ndarray, np.ndarray]:
    """Bool mask of images whose label is a kept class, and the new labels (index into ``keep``)."""
    lut = np.full(len(available), -1, dtype=np.int64)
    for new, name in enumerate(keep):
        lut[list(available).index(name)] = new
    new_labels = lut[labels]
    mask = new_labels >= 0
    return mask, new_labels


SELECTIONS = ("first", "stratified")


def stratified_rows(labels: np.ndarray, count: int | float, seed: int) -> np.ndarray:
    """Sorted row indices of a class-stratified random draw of ``count`` of ``len(labels)`` rows.

    ``count``: a number of rows, or a fraction in (0, 1). This is scikit-learn's
    ``train_test_split(arange(n), train_size=count, random_state=seed, stratify=labels)``: the
    draw depends only on the labels, ``count`` and ``seed``, so the same call on data in the same
    order picks the same rows (D-TRAK draws its CIFAR-2 training set and held-out queries so, with
    seed 42).
    """
    from sklearn.model_selection import train_test_split

    labels = np.asarray(labels)
    n = labels.shape[0]
    if isinstance(count, int) and count >= n:
        return np.arange(n)
    try:
        picked, _ = train_test_split(
            np.arange(n), train_size=count, random_state=seed, stratify=labels
        )
    except ValueError as exc:  # e.g. a class with a single image
        raise DataError(f"stratified selection of {count} of {n} images failed: {exc}") from exc
    return np.sort(picked)


def limit_rows(
    n: int,
    limit: int | None,
    labels: np.ndarray | None = None,
    selection: str = "first",
    seed: int = 0,
) -> np.ndarray:
    """Positions (ascending) of the images a ``limit`` keeps out of ``n`` images in id order.

    ``selection``: "first" keeps the first ``limit`` by id; "stratified" draws ``limit`` at random
    with every class keeping its share (:func:`stratified_rows` on ``labels``, seeded by ``seed``).
    """
    if selection not in SELECTIONS:
        raise DataError(f"data.selection: expected one of {list(SELECTIONS)}, got {selection!r}")
    count = limit_count(n, limit)
    if selection == "first" or count == n:
        return np.arange(count)
    if labels is None:
        raise DataError("data.selection: 'stratified' needs class labels; this data has none")
    return stratified_rows(labels, count, seed)


def limit_count(n: int, limit: int | None) -> int:
    """How many of ``n`` images (already in id order) a ``limit`` keeps."""
    if limit is None:
        return n
    if not isinstance(limit, int) or isinstance(limit, bool) or limit < 1:
        raise DataError(f"data.limit: must be a positive integer or null, got {limit!r}")
    return min(n, limit)
