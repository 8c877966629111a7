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
from diffattr.repro import write_json_atomic


@dataclass
class Trajectory:
    """One generation's sampling trajectory (what Journey-TRAK differentiates along).

    ``timesteps``: int64 ``(S,)`` scheduler timesteps in sampling order.
    ``xt``: ``(S, C, H, W)`` the noisy image fed to the model at each step.
    ``eps``: ``(S, C, H, W)`` the model's predicted noise at each step.
    """

    timesteps: torch.Tensor
    xt: torch.Tensor
    eps: torch.Tensor


@dataclass
class Queries:
    """Images to attribute. ``images``: float32 ``(n, C, H, W)`` in ``[-1, 1]``."""

    images: torch.Tensor
    names: list[str]
    labels: torch.Tensor | None = None
    trajectories: list[Trajectory] | None = None

    def __post_init__(self) -> None:
        if self.images.ndim != 4:
            raise ValueError(
                f"queries: images must be (n, C, H, W), got {tuple(self.images.shape)}"
            )
        if len(self.names) != self.images.shape[0]:
            raise ValueError(f"queries: {len(self.names)} names for {self.images.shape[0]} images")
        if self.trajectories is not None and len(self.trajectories) != len(self.names):
            raise ValueError("queries: one trajectory per image is required")

    def __len__(self) -> int:
        return int(self.images.shape[0])

    @classmethod
    def from_dataset(cls, data: ImageDataset) -> Queries:
        return cls(
            images=data.images,
            names=[f"{data.name}:{int(i)}" for i in data.ids],
            labels=data.labels,
        )


@dataclass
class Scores:
    """Attribution scores of ``n_queries`` queries against ``n_train`` training images.

    ``values``: float32 ``(n_queries, n_train)``; column j belongs to training id ``train_ids[j]``.
    ``per_step``: optional ``(n_steps, n_queries, n_train)`` (Journey-TRAK: which sampling step a
    training image mattered at), with ``step_timesteps`` ``(n_steps,)``.
    """

    values: np.ndarray
    train_ids: np.ndarray
    query_names: list[str]
    method: str
    config: dict[str, Any] = field(default_factory=dict)
    per_step: np.ndarray | None = None
    step_timesteps: np.ndarray | None = None

    def __post_init__(self) -> None:
        self.values = np.asarray(self.values, dtype=np.float32)
        self.train_ids = np.asarray(self.train_ids, dtype=np.int64)
        nq, nt = len(self.query_names), len(self.train_ids)
        if self.values.shape != (nq, nt):
            raise ValueError(f"scores: values have shape {self.values.shape}, want ({nq}, {nt})")
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

    def save(self, path: str | Path) -> Path:
        """Write ``scores.safetensors`` + ``scores.json`` + ``top_k.csv`` into folder ``path``."""
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        tensors = {"values": self.values, "train_ids": self.train_ids}
        if self.per_step is not None:
            tensors["per_step"] = np.asarray(self.per_step, dtype=np.float32)
        if self.step_timesteps is not None:
            tensors["step_timesteps"] = np.asarray(self.step_timesteps, dtype=np.int64)
        save_file(tensors, str(path / "scores.safetensors"))
        write_json_atomic(
            path / "scores.json",
            {"method": self.method, "query_names": self.query_names, "config": self.config},
        )
        lines = ["query,rank,train_id,score"]
        for q, row in enumerate(self.top_k(min(100, self.values.shape[1]))):
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
