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

Stores are built by :func:`fill_store` (the one shard loop of the package), which
:func:`diffattr.attribution.featurize.featurize` (gradient features) and the embedding baselines
(``diffattr.attribution.methods.embedding``) call with their own per-shard computation.
With ``accelerate`` (``Accelerator()`` joins a ``torchrun`` process group), shard ``i`` is computed
by process ``i % world_size``; process 0 waits for the others and then marks the store complete. The
result is the same as a single-process run because noise depends only on (seed, id, t, draw).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

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


def _dist(accelerator: Any) -> tuple[int, int]:
    """``(rank, world size)``: ``(0, 1)`` without an accelerator."""
    if accelerator is None:
        return 0, 1
    return int(accelerator.process_index), int(accelerator.num_processes)


def _barrier(accelerator: Any) -> None:
    if accelerator is not None and int(accelerator.num_processes) > 1:
        accelerator.wait_for_everyone()


def _checked_rows(
    feats: torch.Tensor, i: int, rows: int, feature_shape: tuple[int, ...], dtype: torch.dtype
) -> torch.Tensor:
    """Shard ``i``'s features as float32 on CPU after checking shape, finiteness and range."""
    feats = feats.detach().to("cpu", torch.float32)
    if tuple(feats.shape) != (rows, *feature_shape):
        raise ValueError(
            f"featurize: shard {i} has features of shape {tuple(feats.shape)}, expected "
            f"{(rows, *feature_shape)}"
        )
    if not bool(torch.isfinite(feats).all()):
        raise ValueError(f"featurize: shard {i} has non-finite features")
    if dtype == torch.float16 and bool((feats.abs() > 65504).any()):
        raise ValueError(
            f"featurize: features of shard {i} exceed the float16 range (max |value| "
            f"{float(feats.abs().max()):.3g}); use dtype='float32' or normalize=True"
        )
    return feats


@dataclass
class StoreSpec:
    """One store that :func:`fill_stores` fills: its folder, identity (compared field by field on
    reopening), per-item feature shape, progress label, recorded-not-compared ``extra``, more
    manifest entries (``manifest_extra``: projector info) and the dtype its shards are written in."""

    out: Path
    identity: dict[str, Any]
    feature_shape: tuple[int, ...]
    label: str = "features"
    extra: dict[str, Any] | None = None
    manifest_extra: dict[str, Any] | None = None
    dtype: torch.dtype = torch.float32


def fill_store(
    out: str | Path,
    identity: dict[str, Any],
    ids: torch.Tensor,
    shard_size: int,
    compute: Callable[[slice], torch.Tensor],
    feature_shape: tuple[int, ...],
    progress: bool = True,
    label: str = "features",
    accelerator: Any = None,
    extra: dict[str, Any] | None = None,
    manifest_extra: dict[str, Any] | None = None,
    dtype: torch.dtype = torch.float32,
    on_shard: Callable[[int], None] | None = None,
    unit: str = "image",
) -> FeatureStore:
    """Compute the features of ``len(ids)`` items into the resumable store at ``out``.

    ``identity``: everything that decides the values (compared field by field on reopening:
    :class:`StoreMismatchError` names each differing field); ``extra``: recorded, not compared.
    ``compute(slice)`` returns the ``(rows, *feature_shape)`` features of the items in ``slice``.
    The rest as in :func:`fill_stores`, of which this is the one-store case.
    """
    spec = StoreSpec(
        Path(out),
        identity,
        tuple(feature_shape),
        label=label,
        extra=extra,
        manifest_extra=manifest_extra,
        dtype=dtype,
    )
    return fill_stores(
        [spec],
        ids,
        shard_size,
        lambda sl, which: [compute(sl)],
        progress=progress,
        accelerator=accelerator,
        on_shard=on_shard,
        unit=unit,
    )[0]


def fill_stores(
    specs: list[StoreSpec],
    ids: torch.Tensor,
    shard_size: int,
    compute: Callable[[slice, list[int]], list[torch.Tensor]],
    progress: bool = True,
    accelerator: Any = None,
    on_shard: Callable[[int], None] | None = None,
    unit: str = "image",
) -> list[FeatureStore]:
    """Compute several stores of the same ``len(ids)`` items, shard by shard, into their folders.

    Items are cut into shards of ``shard_size`` (in ``ids`` order), the same for every store.
    ``compute(slice, which)`` returns, for the stores ``specs[j]`` with ``j`` in ``which`` (in
    that order), the ``(rows, *feature_shape)`` features of the items in ``slice``; it is asked
    only for the stores whose shard is not already complete on disk, so rerunning after a kill
    computes only what is missing. With an ``accelerator`` of ``world`` processes, shard ``i`` is
    computed by process ``i % world``; process 0 then checks every shard and marks each store
    complete. ``on_shard(i)`` is called after shard ``i`` of every store is written (tests use it
    to simulate a kill); ``unit``: what an item is, for the progress bar.
    """
    ids = torch.as_tensor(ids, dtype=torch.int64).flatten().cpu()
    n = int(ids.shape[0])
    if not specs:
        return []
    if n == 0:
        raise ValueError(f"{specs[0].out}: nothing to featurize (no ids)")
    if not isinstance(shard_size, int) or shard_size < 1:
        raise ValueError(f"featurize.shard_size: expected an int >= 1, got {shard_size!r}")
    rank, world = _dist(accelerator)
    starts = list(range(0, n, shard_size))
    shard_rows = [min(shard_size, n - s) for s in starts]
    manifests = []
    for spec in specs:
        # Process 0 creates (or checks) the folder first so the others never race to create it.
        if rank == 0:
            open_store_dir(spec.out, spec.identity, extra=spec.extra)
        manifests.append(
            {
                "kind": STORE_KIND,
                "identity": spec.identity,
                "ids": [int(i) for i in ids.tolist()],
                "num_shards": len(starts),
                "feature_shape": [n, *(int(d) for d in spec.feature_shape)],
                **(spec.manifest_extra or {}),
                "complete": False,
            }
        )
    _barrier(accelerator)
    for spec, manifest in zip(specs, manifests, strict=True):
        if rank != 0:
            open_store_dir(spec.out, spec.identity)
        elif not (spec.out / MANIFEST).exists():
            write_json_atomic(spec.out / MANIFEST, manifest)

    mine = [i for i in range(len(starts)) if i % world == rank]
    todo: dict[int, list[int]] = {i: [] for i in mine}
    for j, spec in enumerate(specs):
        done = set(complete_shards(spec.out, shard_rows, mine))
        if done:
            log.info("%s: %d of %d shards already done", spec.out, len(done), len(mine))
        for i in mine:
            if i not in done:
                todo[i].append(j)
    todo = {i: which for i, which in todo.items() if which}
    # Counted in images, not shards: a store of a few large shards is a multi-minute job.
    labels = "+".join(dict.fromkeys(spec.label for spec in specs))
    bar = tqdm(
        total=sum(shard_rows[i] for i in todo),
        desc=f"featurize {labels}",
        unit=unit,
        disable=not progress or rank != 0 or not todo,
    )
    for i, which in todo.items():
        sl = slice(starts[i], starts[i] + shard_rows[i])
        results = compute(sl, which)
        if len(results) != len(which):
            raise RuntimeError(f"featurize: {len(results)} results for {len(which)} stores")
        for j, feats in zip(which, results, strict=True):
            spec = specs[j]
            checked = _checked_rows(feats, i, shard_rows[i], spec.feature_shape, spec.dtype)
            write_shard(spec.out, i, checked.to(spec.dtype), ids[sl])
        bar.update(shard_rows[i])
        if on_shard is not None:
            on_shard(i)
    bar.close()

    _barrier(accelerator)
    if rank == 0:
        # This process verified or wrote its own shards above; check only the others' (hashing
        # every shard again would double the cost of reopening a finished store).
        others = [i for i in range(len(starts)) if i % world != rank]
        for spec, manifest in zip(specs, manifests, strict=True):
            missing = sorted(set(others) - set(complete_shards(spec.out, shard_rows, others)))
            if missing:
                raise IncompleteStoreError(
                    f"{spec.out}: shards {missing[:10]} were not written by any process"
                )
            manifest["complete"] = True
            write_json_atomic(spec.out / MANIFEST, manifest)
    _barrier(accelerator)
    return [FeatureStore.open(spec.out) for spec in specs]
