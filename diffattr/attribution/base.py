"""The attributor interface, the query type and the score set every method returns.

Sign convention (fixed once, used everywhere): a **higher score means the training image helped
the query**, i.e. training on it lowers the query's diffusion loss. The evaluation harness therefore
correlates subset score sums with the *negative* measured loss (see ``diffattr.evaluation.lds``).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import numpy as np
import torch
from safetensors.numpy import load_file, save_file

from diffattr.data.dataset import ImageDataset
from diffattr.data.groups import GroupAssignment
from diffattr.diffusion.trajectory import Trajectory
from diffattr.repro import write_json_atomic
from diffattr.stats import spearman_columns, top_k_overlap

# The ranking depth of the stability figure written into scores.json (and the CLI's default).
DEFAULT_TOP_K = 10


@dataclass
class Queries:
    """Images to attribute. ``images``: float32 ``(n, C, H, W)`` in ``[-1, 1]`` (pixels, also for
    a latent model: attributors encode them). ``labels``: class labels ``(n,)`` for a
    class-conditional model; ``prompts``: the text of each image for a text-to-image model (the
    prompt it was generated with; ``""`` attributes it unconditionally); ``trajectories``: the
    sampling trajectory of each image (Journey-TRAK), in the model's input space."""

    images: torch.Tensor
    names: list[str]
    labels: torch.Tensor | None = None
    trajectories: list[Trajectory] | None = None
    prompts: list[str] | None = None

    def __post_init__(self) -> None:
        if self.images.ndim != 4:
            raise ValueError(
                f"queries: images must be (n, C, H, W), got {tuple(self.images.shape)}"
            )
        if len(self.names) != self.images.shape[0]:
            raise ValueError(f"queries: {len(self.names)} names for {self.images.shape[0]} images")
        if self.trajectories is not None and len(self.trajectories) != len(self.names):
            raise ValueError("queries: one trajectory per image is required")
        if self.prompts is not None and (
            isinstance(self.prompts, str) or len(self.prompts) != len(self.names)
        ):
            raise ValueError("queries: one prompt per image is required")

    def __len__(self) -> int:
        return int(self.images.shape[0])

    @classmethod
    def from_dataset(cls, data: ImageDataset) -> Queries:
        return cls(
            images=data.images,
            names=[f"{data.name}:{int(i)}" for i in data.ids],
            labels=data.labels,
            prompts=data.captions,
        )


@dataclass
class Stability:
    """How far to trust each query's ranking: the agreement of the two rankings obtained from two
    independent halves of the query's Monte-Carlo samples (timesteps x noise draws).

    ``overlap``: ``(n_queries,)`` fraction of the top ``k`` training images both halves share;
    ``rank_corr``: ``(n_queries,)`` Spearman correlation of the two halves' scores over every
    training image. Each half has half the samples of the reported scores, so the reported ranking
    is at least as stable as its halves agree with each other.
    """

    k: int
    overlap: np.ndarray
    rank_corr: np.ndarray

    def to_dict(self, names: list[str]) -> dict[str, Any]:
        return {
            "top_k": self.k,
            "what": "agreement of two independent halves of each query's (timestep, noise) samples",
            "mean_overlap": float(self.overlap.mean()),
            "mean_rank_corr": float(np.nanmean(self.rank_corr)) if self.rank_corr.size else None,
            "per_query": [
                {"query": n, "overlap": float(o), "rank_corr": float(r)}
                for n, o, r in zip(names, self.overlap, self.rank_corr, strict=True)
            ],
        }


def describe_stability(stability: Stability | None, q: int) -> str:
    """One line telling how far to trust query ``q``'s ranking (see README, "Stability")."""
    if stability is None:
        return "stability: exact (this method draws no noise)"
    shared = int(round(stability.overlap[q] * stability.k))
    return (
        f"stability: {shared}/{stability.k} of the top-{stability.k} shared by two attributions "
        f"from independent halves of the (timestep, noise) samples (rank correlation "
        f"{stability.rank_corr[q]:.2f})"
    )


@dataclass
class Scores:
    """Attribution scores of ``n_queries`` queries against ``n_train`` training images.

    ``values``: float32 ``(n_queries, n_train)``; column j belongs to training id ``train_ids[j]``.
    ``per_step``: optional ``(n_steps, n_queries, n_train)`` (Journey-TRAK: which sampling step a
    training image mattered at), with ``step_timesteps`` ``(n_steps,)``.
    ``halves``: optional ``(2, n_queries, n_train)``, the scores from each half of the queries'
    samples (see :class:`Stability`); ``None`` for a method without sampling (e.g. ``pixel``).
    """

    values: np.ndarray
    train_ids: np.ndarray
    query_names: list[str]
    method: str
    config: dict[str, Any] = field(default_factory=dict)
    per_step: np.ndarray | None = None
    step_timesteps: np.ndarray | None = None
    halves: np.ndarray | None = None

    def __post_init__(self) -> None:
        self.values = np.asarray(self.values, dtype=np.float32)
        self.train_ids = np.asarray(self.train_ids, dtype=np.int64)
        nq, nt = len(self.query_names), len(self.train_ids)
        if self.values.shape != (nq, nt):
            raise ValueError(f"scores: values have shape {self.values.shape}, want ({nq}, {nt})")
        if self.halves is not None:
            self.halves = np.asarray(self.halves, dtype=np.float32)
            if self.halves.shape != (2, nq, nt):
                raise ValueError(
                    f"scores: halves have shape {self.halves.shape}, want (2, {nq}, {nt})"
                )
        if not np.all(np.isfinite(self.values)):
            bad = np.argwhere(~np.isfinite(self.values))[0]
            raise ValueError(
                f"scores from {self.method}: non-finite value for query {self.query_names[bad[0]]!r}, "
                f"train id {int(self.train_ids[bad[1]])}"
            )

    def top_k(self, k: int) -> list[list[tuple[int, float]]]:
        """Per query, the ``k`` (train id, score) pairs with the highest scores, best first."""
        k = min(k, self.values.shape[1])
        order = np.argsort(-self.values, axis=1, kind="stable")[:, :k]
        return [
            [(int(self.train_ids[j]), float(self.values[q, j])) for j in order[q]]
            for q in range(self.values.shape[0])
        ]

    def per_group(self, groups: GroupAssignment) -> Scores:
        """The same scores with one column per group of ``groups`` (its images' scores summed,
        halves likewise): ``(n_queries, K)``, ``train_ids`` the group indices ``0..K-1``."""
        onehot = groups.one_hot(self.train_ids)
        halves = None
        if self.halves is not None:
            halves = np.einsum("hqn,nk->hqk", self.halves.astype(np.float64), onehot)
        return Scores(
            values=self.values.astype(np.float64) @ onehot,
            train_ids=np.arange(groups.num_groups),
            query_names=list(self.query_names),
            method=self.method,
            config=self.config,
            halves=halves,
        )

    def stability(self, k: int = DEFAULT_TOP_K) -> Stability | None:
        """Top-``k`` overlap and rank correlation of the two halves (None without halves)."""
        if self.halves is None:
            return None
        if not isinstance(k, int) or k < 1:
            raise ValueError(f"stability: top-k must be an int >= 1, got {k!r}")
        a, b = self.halves
        rank_corr = (
            spearman_columns(a.T, b.T)
            if a.shape[1] >= 2
            else np.full(a.shape[0], np.nan, dtype=np.float64)
        )
        return Stability(k=min(k, a.shape[1]), overlap=top_k_overlap(a, b, k), rank_corr=rank_corr)

    def save(self, path: str | Path, top_k: int = DEFAULT_TOP_K) -> Path:
        """Write ``scores.safetensors`` + ``scores.json`` + ``top_k.csv`` into folder ``path``.

        ``top_k.csv`` holds each query's best ``top_k`` rows; ``scores.json`` the stability figure
        at that depth (the full score table is in ``scores.safetensors``).
        """
        if not isinstance(top_k, int) or top_k < 1:
            raise ValueError(f"top_k: expected an int >= 1, got {top_k!r}")
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        tensors = {"values": self.values, "train_ids": self.train_ids}
        if self.per_step is not None:
            tensors["per_step"] = np.asarray(self.per_step, dtype=np.float32)
        if self.step_timesteps is not None:
            tensors["step_timesteps"] = np.asarray(self.step_timesteps, dtype=np.int64)
        if self.halves is not None:
            tensors["halves"] = self.halves
        save_file(tensors, str(path / "scores.safetensors"))
        stab = self.stability(top_k)
        write_json_atomic(
            path / "scores.json",
            {
                "method": self.method,
                "query_names": self.query_names,
                "config": self.config,
                "stability": None if stab is None else stab.to_dict(self.query_names),
            },
        )
        lines = ["query,rank,train_id,score"]
        for q, row in enumerate(self.top_k(top_k)):
            name = self.query_names[q].replace(",", "_")
            lines += [f"{name},{r + 1},{tid},{s:.6g}" for r, (tid, s) in enumerate(row)]
        (path / "top_k.csv").write_text("\n".join(lines) + "\n")
        return path

    @classmethod
    def load(cls, path: str | Path) -> Scores:
        path = Path(path)
        for name in ("scores.safetensors", "scores.json"):
            if not (path / name).exists():
                raise FileNotFoundError(f"{path / name}: missing; is {path} a diffattr score set?")
        tensors = load_file(str(path / "scores.safetensors"))
        meta = json.loads((path / "scores.json").read_text())
        return cls(
            values=tensors["values"],
            train_ids=tensors["train_ids"],
            query_names=list(meta["query_names"]),
            method=meta["method"],
            config=meta.get("config", {}),
            per_step=tensors.get("per_step"),
            step_timesteps=tensors.get("step_timesteps"),
            halves=tensors.get("halves"),
        )


@runtime_checkable
class Attributor(Protocol):
    """What every attribution method implements.

    ``fit(train)`` does the per-training-set work (featurize, build kernels, embed) and may cache
    it on disk; ``score(queries)`` returns a :class:`Scores` of shape ``(n_queries, len(train))``
    with columns in ``train.ids`` order.
    """

    name: str

    def fit(self, train: ImageDataset) -> None: ...

    def score(self, queries: Queries) -> Scores: ...
