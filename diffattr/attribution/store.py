"""On-disk feature stores: sharded, resumable, safe to run on several processes.

Layout of a store folder::

    diffattr.json                 identity record (repro.open_result_dir): refuses other args/model/data
    manifest.json                 everything about the features (ids, shape, projector, complete flag)
    shards/shard_00000.safetensors   "features" (rows, k) or (rows, S, k) + "ids" (rows,)
    shards/shard_00000.done.json     completion record: rows, bytes and sha256 of the shard file

A shard file is written to a temporary name and renamed, and its completion record is written
(atomically) only after the rename; a shard counts as complete only when both exist and the file's
size and hash match the record. A kill therefore costs at most the shards in progress, and a
half-written temporary file is ignored (and overwritten) on resume.

Stores are built by :func:`diffattr.attribution.featurize.featurize`.
With ``accelerate`` (``Accelerator()`` joins a ``torchrun`` process group), shard ``i`` is computed
by process ``i % world_size``; process 0 waits for the others and then marks the store complete. The
result is the same as a single-process run because noise depends only on (seed, id, t, draw).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from diffattr.repro import MismatchError, open_result_dir, write_json_atomic

log = logging.getLogger(__name__)

STORE_KIND = "feature-store"
MANIFEST = "manifest.json"
SHARD_DIR = "shards"
STORE_TORCH_DTYPES = {"float32": torch.float32, "float16": torch.float16}


class StoreMismatchError(MismatchError):
    """A feature store was reopened with other arguments, another model or other data."""


class IncompleteStoreError(RuntimeError):
    """A store folder whose featurization has not finished (run featurize again to resume)."""


def shard_name(i: int) -> str:
    return f"shard_{i:05d}.safetensors"


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def shard_is_complete(folder: Path, i: int, rows: int) -> bool:
    """True when shard ``i`` and its completion record exist and agree (size, hash, rows)."""
    f = folder / SHARD_DIR / shard_name(i)
    done = folder / SHARD_DIR / f"{shard_name(i)[: -len('.safetensors')]}.done.json"
    if not (f.exists() and done.exists()):
        return False
    try:
        rec = json.loads(done.read_text())
    except json.JSONDecodeError:
        return False
    if rec.get("rows") != rows or rec.get("bytes") != f.stat().st_size:
        return False
    return rec.get("sha256") == _sha256(f)


def write_shard(folder: Path, i: int, features: torch.Tensor, ids: torch.Tensor) -> Path:
    """Atomically write shard ``i`` (tmp + rename), then its completion record."""
    d = folder / SHARD_DIR
    d.mkdir(parents=True, exist_ok=True)
    final = d / shard_name(i)
    tmp = d / f".{shard_name(i)}.tmp{os.getpid()}"
    save_file(
        {"features": features.contiguous().cpu(), "ids": ids.to(torch.int64).contiguous().cpu()},
        str(tmp),
    )
    os.replace(tmp, final)
    write_json_atomic(
        d / f"{shard_name(i)[: -len('.safetensors')]}.done.json",
        {"rows": int(ids.shape[0]), "bytes": final.stat().st_size, "sha256": _sha256(final)},
    )
    return final


class FeatureStore:
    """A finished feature store, opened lazily.

    ``features``: float32 ``(n, k)`` (aggregate ``"mean"``) or ``(n, S, k)`` (``"per-step"``), rows in
    the order of ``ids`` (the data set's order); loaded from the shards on first access.
    """

    def __init__(self, path: str | Path, manifest: dict[str, Any]) -> None:
        self.path = Path(path)
        self.manifest = manifest
        self._features: torch.Tensor | None = None

    @classmethod
    def open(cls, path: str | Path) -> FeatureStore:
        """Open a complete store; ``IncompleteStoreError`` if featurization has not finished."""
        path = Path(path)
        mpath = path / MANIFEST
        if not mpath.exists():
            raise FileNotFoundError(f"{mpath}: missing; is {path} a diffattr feature store?")
        manifest = json.loads(mpath.read_text())
        if manifest.get("kind") != STORE_KIND:
            raise ValueError(f"{mpath}: kind is {manifest.get('kind')!r}, not {STORE_KIND!r}")
        if not manifest.get("complete"):
            raise IncompleteStoreError(
                f"{path}: feature store is incomplete; run featurize again with the same arguments "
                "to compute the missing shards"
            )
        return cls(path, manifest)

    def __len__(self) -> int:
        return len(self.manifest["ids"])

    @property
    def ids(self) -> torch.Tensor:
        return torch.tensor(self.manifest["ids"], dtype=torch.int64)

    @property
    def timesteps(self) -> list[int]:
        return [int(t) for t in self.manifest["identity"]["timesteps"]]

    @property
    def feature_shape(self) -> tuple[int, ...]:
        return tuple(self.manifest["feature_shape"])

    @property
    def features(self) -> torch.Tensor:
        if self._features is None:
            self._features = self._load()
        return self._features

    def _load(self) -> torch.Tensor:
        parts, ids = [], []
        for i in range(int(self.manifest["num_shards"])):
            f = self.path / SHARD_DIR / shard_name(i)
            if not f.exists():
                raise FileNotFoundError(f"{f}: shard missing from a store marked complete")
            t = load_file(str(f))
            parts.append(t["features"].to(torch.float32))
            ids.append(t["ids"])
        feats = torch.cat(parts)
        if not torch.equal(torch.cat(ids), self.ids):
            raise ValueError(
                f"{self.path}: shard ids do not match the manifest's ids (corrupt store)"
            )
        if tuple(feats.shape) != self.feature_shape:
            raise ValueError(
                f"{self.path}: features have shape {tuple(feats.shape)}, manifest says {self.feature_shape}"
            )
        return feats

    def check_model(self, model: Any) -> None:
        """Raise :class:`StoreMismatchError` when ``model`` is not the model the store was made with."""
        want = self.manifest["identity"]["model_hash"]
        got = model.model_hash()
        if got != want:
            raise StoreMismatchError(
                f"{self.path}: features were computed with model {want[:12]}..., "
                f"this model is {got[:12]}... (model_hash differs)"
            )


# ------------------------------------------------------------------------------------ building


def open_store_dir(
    path: str | Path, identity: dict[str, Any], extra: dict[str, Any] | None = None
) -> Path:
    """Create or reopen a store folder; :class:`StoreMismatchError` naming each differing field."""
    try:
        return open_result_dir(path, STORE_KIND, identity, extra=extra)
    except StoreMismatchError:
        raise
    except MismatchError as exc:
        raise StoreMismatchError(str(exc)) from exc


def complete_shards(
    folder: Path, shard_rows: list[int], which: list[int] | None = None
) -> list[int]:
    """Indices (of ``which``, default all) of the shards that are complete on disk."""
    idx = range(len(shard_rows)) if which is None else which
    return [i for i in idx if shard_is_complete(folder, i, shard_rows[i])]
