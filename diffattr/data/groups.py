"""Training-image groups for group-level attribution (GGDA: Ley et al., "Generalized Group Data
Attribution"): which group each training image belongs to.

A group spec is one of

* ``"class"``: the data set's class labels (``ImageDataset.labels`` / ``class_names``);
* another name, e.g. ``"artist"``: that entry of ``ImageDataset.groups``;
* ``{"csv": path}``: a CSV of ``id,group`` rows (a header row is optional; with a header the
  columns ``id`` and ``group`` are used, else the first two). Every training id must be listed;
  ids the training set lacks are ignored (one CSV may cover a whole data set);
* ``{"kmeans": K, "seed": 0, "n_init": 10}``: scikit-learn ``KMeans`` on the flattened pixels,
  for data whose classes are too few to be useful groups (digits-2 has two).

:func:`assign_groups` turns a spec and a training set into a :class:`GroupAssignment` (a group
index per training image, and the group names). This module sits in the data layer so every
upper layer (evaluation, reports) can share it.
"""

from __future__ import annotations

import csv
import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from diffattr.data.dataset import DataError, ImageDataset

__all__ = ["GroupAssignment", "GroupSpec", "assign_groups", "kmeans_groups", "parse_group_spec"]

CLASS = "class"
CAPTION = "caption"  # group by the images' captions (a text-to-image training set)
DEFAULT_N_INIT = 10


@dataclass(frozen=True)
class GroupSpec:
    """A parsed group spec: ``kind`` is "grouping" (``key``: "class" or an ``ImageDataset.groups``
    name), "csv" (``csv``: the file) or "kmeans" (``k`` clusters, ``seed``, ``n_init``)."""

    kind: str
    key: str | None = None
    csv: str | None = None
    k: int | None = None
    seed: int = 0
    n_init: int = DEFAULT_N_INIT

    def describe(self) -> str:
        if self.kind == "csv":
            return f"csv {self.csv}"
        if self.kind == "kmeans":
            return f"k-means K={self.k} (seed {self.seed}, n_init {self.n_init})"
        return str(self.key)


def _int(value: Any, what: str, low: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise DataError(f"{what}: expected an integer >= {low}, got {value!r}")
    return value


def parse_group_spec(value: Any, where: str = "groups") -> GroupSpec:
    """A :class:`GroupSpec` from its YAML form (see the module docstring); errors name ``where``."""
    if isinstance(value, GroupSpec):
        return value
    if isinstance(value, str) and value:
        return GroupSpec("grouping", key=value)
    if not isinstance(value, dict):
        raise DataError(
            f"{where}: expected 'class', a grouping name, {{csv: path}} or {{kmeans: K, seed: S}}, "
            f"got {value!r}"
        )
    if "csv" in value:
        unknown = sorted(set(value) - {"csv"})
        if unknown or not isinstance(value["csv"], str):
            raise DataError(f"{where}: expected {{csv: path}}, got {value!r}")
        return GroupSpec("csv", csv=value["csv"])
    if "kmeans" in value:
        unknown = sorted(set(value) - {"kmeans", "seed", "n_init"})
        if unknown:
            raise DataError(f"{where}: unknown key(s) {unknown}; known: kmeans, seed, n_init")
        return GroupSpec(
            "kmeans",
            k=_int(value["kmeans"], f"{where}.kmeans", 2),
            seed=_int(value.get("seed", 0), f"{where}.seed", 0),
            n_init=_int(value.get("n_init", DEFAULT_N_INIT), f"{where}.n_init", 1),
        )
    raise DataError(f"{where}: a mapping needs 'csv' or 'kmeans', got keys {sorted(value)}")


@dataclass
class GroupAssignment:
    """``index``: int64 ``(n,)``, the group (``0..K-1``) of training image ``train_ids[j]``;
    ``names``: ``(K,)`` group names; ``spec``: how the groups were made (for reports)."""

    index: np.ndarray
    names: list[str]
    train_ids: np.ndarray
    spec: str

    def __post_init__(self) -> None:
        self.index = np.asarray(self.index, dtype=np.int64)
        self.train_ids = np.asarray(self.train_ids, dtype=np.int64)
        if self.index.shape != self.train_ids.shape:
            raise DataError(f"groups: {self.index.shape[0]} entries for {len(self.train_ids)} ids")
        if self.index.size and (self.index.min() < 0 or self.index.max() >= len(self.names)):
            raise DataError(f"groups: group index out of range [0, {len(self.names)})")

    @property
    def num_groups(self) -> int:
        return len(self.names)

    def sizes(self) -> np.ndarray:
        """``(K,)`` training images per group."""
        return np.bincount(self.index, minlength=self.num_groups)

    def one_hot(self, train_ids: np.ndarray | None = None) -> np.ndarray:
        """float64 ``(n, K)``: row j has a 1 in the column of image j's group (rows in the order
        of ``train_ids`` when given, see :meth:`aligned`)."""
        index = self.index if train_ids is None else self.aligned(train_ids)
        out = np.zeros((len(index), self.num_groups))
        out[np.arange(len(index)), index] = 1.0
        return out

    def aligned(self, train_ids: np.ndarray) -> np.ndarray:
        """The group index ``(len(train_ids),)`` in the order of ``train_ids`` (same id set)."""
        train_ids = np.asarray(train_ids, dtype=np.int64)
        if np.array_equal(train_ids, self.train_ids):
            return self.index
        pos = {int(i): j for j, i in enumerate(self.train_ids)}
        missing = [int(i) for i in train_ids if int(i) not in pos]
        if missing or len(train_ids) != len(self.train_ids):
            raise DataError(f"groups: training ids differ (unknown: {missing[:5]})")
        return self.index[[pos[int(i)] for i in train_ids]]

    def digest(self) -> str:
        """sha256 over ids, group index and names: equal digests, equal groups."""
        h = hashlib.sha256()
        h.update(self.train_ids.tobytes())
        h.update(self.index.tobytes())
        h.update("\x00".join(self.names).encode())
        return h.hexdigest()

    def to_dict(self) -> dict[str, Any]:
        return {
            "spec": self.spec,
            "names": list(self.names),
            "sizes": self.sizes().tolist(),
            "train_ids": self.train_ids.tolist(),
            "index": self.index.tolist(),
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> GroupAssignment:
        return cls(np.array(d["index"]), list(d["names"]), np.array(d["train_ids"]), d["spec"])


def _from_values(values: list[str], train: ImageDataset, spec: str) -> GroupAssignment:
    """Groups from one value per image; groups named by their values, in sorted order."""
    names = sorted(set(values))
    pos = {v: g for g, v in enumerate(names)}
    return GroupAssignment(np.array([pos[v] for v in values]), names, train.ids.numpy(), spec)


def _grouping(train: ImageDataset, key: str) -> GroupAssignment:
    if key == CLASS and train.labels is not None:
        labels = train.labels.numpy()
        present = np.unique(labels)  # only the classes present form groups
        cn = train.class_names
        names = [cn[c] if cn and c < len(cn) else str(c) for c in present.tolist()]
        return GroupAssignment(np.searchsorted(present, labels), names, train.ids.numpy(), key)
    if key in train.groups:
        return _from_values([str(v) for v in train.groups[key]], train, key)
    captions = getattr(train, "captions", None)
    if key == CAPTION and captions is not None:
        # Images sharing one caption ("a ukiyo-e painting") form a group.
        return _from_values(list(captions), train, key)
    have = (
        ([CLASS] if train.labels is not None else [])
        + ([CAPTION] if captions is not None else [])
        + sorted(train.groups)
    )
    raise DataError(f"{train.name}: no grouping {key!r} (this data set has: {have or 'none'})")


def _read_csv(path: Path) -> dict[int, str]:
    """id -> group from ``path``; bad rows and conflicting duplicates are errors naming the line."""
    if not path.exists():
        raise DataError(f"{path}: group CSV not found")
    with path.open(newline="") as f:
        rows = [r for r in csv.reader(f) if r and any(c.strip() for c in r)]
    if not rows:
        raise DataError(f"{path}: group CSV is empty")
    id_col, group_col, start = 0, 1, 0
    head = [c.strip().lower() for c in rows[0]]
    if not head[0].lstrip("-").isdigit():  # a header row
        if "id" in head and "group" in head:
            id_col, group_col = head.index("id"), head.index("group")
        start = 1
    out: dict[int, str] = {}
    for line, row in enumerate(rows[start:], start=start + 1):
        if len(row) <= max(id_col, group_col):
            raise DataError(f"{path}: line {line}: expected id and group, got {row!r}")
        try:
            i = int(row[id_col].strip())
        except ValueError:
            raise DataError(f"{path}: line {line}: id {row[id_col]!r} is not an integer") from None
        g = row[group_col].strip()
        if i in out and out[i] != g:
            raise DataError(f"{path}: line {line}: id {i} listed in groups {out[i]!r} and {g!r}")
        out[i] = g
    return out


def _csv(train: ImageDataset, path: str) -> GroupAssignment:
    table = _read_csv(Path(path))
    ids = train.ids.tolist()
    missing = [i for i in ids if i not in table]
    if missing:
        raise DataError(
            f"{path}: no group for training id {missing[0]} ({len(missing)} of {len(ids)} "
            f"training ids missing, e.g. {missing[:5]})"
        )
    return _from_values([table[i] for i in ids], train, f"csv {path}")


def kmeans_groups(
    train: ImageDataset,
    k: int,
    seed: int = 0,
    n_init: int = DEFAULT_N_INIT,
    vectors: np.ndarray | None = None,
) -> GroupAssignment:
    """K-means on flattened pixels (or on ``vectors`` ``(n, d)``, one row per training image in
    ``train`` order, e.g. embeddings), fitted in id order so the result depends only on the
    id -> image map; clusters are numbered by their smallest member id (stable names)."""
    from sklearn.cluster import KMeans

    n = len(train)
    if k > n:
        raise DataError(f"{train.name}: k-means with K={k} clusters needs >= {k} images, got {n}")
    if vectors is not None and len(vectors) != n:
        raise DataError(f"k-means: {len(vectors)} vectors for {n} training images")
    ids = train.ids.numpy()
    order = np.argsort(ids, kind="stable")
    x = train.images.reshape(n, -1).numpy() if vectors is None else np.asarray(vectors)
    x = x.reshape(n, -1).astype(np.float64)[order]
    raw = KMeans(n_clusters=k, random_state=seed, n_init=n_init).fit_predict(x)
    _, first = np.unique(raw, return_index=True)
    rank = np.empty(k, dtype=np.int64)
    rank[raw[np.sort(first)]] = np.arange(len(first))
    index = np.empty(n, dtype=np.int64)
    index[order] = rank[raw]
    names = [f"cluster-{g:0{len(str(k - 1))}d}" for g in range(k)]
    return GroupAssignment(index, names, ids, f"kmeans K={k} seed={seed} n_init={n_init}")


def assign_groups(train: ImageDataset, spec: Any) -> GroupAssignment:
    """The group of every training image under ``spec`` (a :class:`GroupSpec` or its YAML form).

    Every image is in exactly one group; groups without images do not exist (K counts only
    groups that have members).
    """
    s = parse_group_spec(spec)
    if s.kind == "csv":
        assert s.csv is not None
        return _csv(train, s.csv)
    if s.kind == "kmeans":
        assert s.k is not None
        return kmeans_groups(train, s.k, s.seed, s.n_init)
    assert s.key is not None
    return _grouping(train, s.key)
