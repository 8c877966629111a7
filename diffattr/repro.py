"""Seeds, hashes and the result-folder convention shared by every long job.

Every named result (a trained model, a feature store, a score set, an evaluation) lives in its own
folder with a ``diffattr.json`` record of the arguments that made it. Reopening a folder with other
arguments is refused with a message naming the fields that differ.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import platform
import random
import time
import weakref
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from diffattr.errors import UserError

log = logging.getLogger(__name__)

RECORD_NAME = "diffattr.json"


class MismatchError(UserError, ValueError):
    """A result folder was reopened with arguments, a model or data other than those that made it."""


class RecordNotFoundError(UserError, FileNotFoundError):
    """A folder that should hold a diffattr result has no ``diffattr.json`` record."""


def seed_everything(seed: int) -> torch.Generator:
    """Seed python, numpy and torch; returns a CPU generator seeded the same way."""
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)
    return torch.Generator().manual_seed(seed)


def derive_seed(*parts: int | str) -> int:
    """A 63-bit seed that depends only on ``parts`` (e.g. (seed, sample id, timestep)).

    Used so that a sample always gets the same noise whatever batch, shard or process it lands in.
    """
    h = hashlib.blake2b(digest_size=8)
    for p in parts:
        h.update(str(p).encode())
        h.update(b"\x00")
    return int.from_bytes(h.digest(), "little") & ((1 << 63) - 1)


def _tensor_state(t: torch.Tensor) -> tuple[Any, ...]:
    # The version counter moves on every in-place change (under no_grad too); the data pointer,
    # dtype and device move when a module is cast or moved (``.to`` swaps ``.data``).
    return (t._version, t.data_ptr(), t.dtype, t.device, tuple(t.shape), t.stride())


def memo_digest(owner: Any, tensors: Sequence[torch.Tensor], compute: Callable[[], str]) -> str:
    """``compute()``, remembered on ``owner`` while every tensor of ``tensors`` is the same object
    in the same state (no in-place change, cast or move since).

    Every store folder and store identity asks for the data hash, about a second on a CIFAR-size
    set (the model hash is not remembered: weights change through ``.data`` writes, which the
    version counter does not see). Weak references: the memo keeps nothing alive.
    Inference-mode tensors have no version counter, so they are always hashed afresh."""
    try:
        state = tuple(_tensor_state(t) for t in tensors)
    except RuntimeError:
        return compute()
    memo = getattr(owner, "_digest_memo", None)
    if (
        memo is not None
        and len(memo[0]) == len(tensors)
        and all(ref() is t for ref, t in zip(memo[0], tensors, strict=True))
        and memo[1] == state
    ):
        return str(memo[2])
    digest = compute()
    object.__setattr__(
        owner, "_digest_memo", (tuple(weakref.ref(t) for t in tensors), state, digest)
    )
    return digest


def state_dict_hash(module_or_state: torch.nn.Module | Mapping[str, torch.Tensor]) -> str:
    """sha256 over parameter names, dtypes, shapes and bytes, in sorted name order."""
    state = (
        module_or_state.state_dict()
        if isinstance(module_or_state, torch.nn.Module)
        else module_or_state
    )
    h = hashlib.sha256()
    for name in sorted(state):
        t = state[name].detach().to("cpu").contiguous()
        h.update(name.encode())
        h.update(str(t.dtype).encode())
        h.update(str(tuple(t.shape)).encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def to_jsonable(obj: Any) -> Any:
    """Dataclasses, paths, tuples, numpy scalars -> plain JSON types."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: to_jsonable(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, Mapping):
        return {str(k): to_jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [to_jsonable(v) for v in obj]
    if isinstance(obj, Path):
        return str(obj)
    if isinstance(obj, np.generic):
        return obj.item()
    return obj


def environment() -> dict[str, str]:
    """Versions (and the CPU thread count) that matter for reproducing a number: on the CPU,
    float sums split differently over another number of threads, so the same seed trains a
    (slightly) different model with 1 and with 2 threads."""
    import diffusers

    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_threads": str(torch.get_num_threads()),
        "diffusers": diffusers.__version__,
        "numpy": np.__version__,
        "platform": platform.platform(),
    }


def write_json_atomic(path: str | os.PathLike, data: Any) -> None:
    """Write JSON via a temporary file and rename, so a kill never leaves half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_text(json.dumps(to_jsonable(data), indent=2, sort_keys=True))
    os.replace(tmp, path)


def diff_fields(
    expected: Mapping[str, Any], found: Mapping[str, Any], prefix: str = ""
) -> list[str]:
    """Dotted names of the fields where two (nested) records differ."""
    out: list[str] = []
    for key in sorted(set(expected) | set(found)):
        a, b = expected.get(key, "<missing>"), found.get(key, "<missing>")
        name = f"{prefix}{key}"
        if isinstance(a, Mapping) and isinstance(b, Mapping):
            out.extend(diff_fields(a, b, prefix=f"{name}."))
        elif to_jsonable(a) != to_jsonable(b):
            out.append(f"{name}: folder has {b!r}, asked for {a!r}")
    return out


def open_result_dir(
    path: str | os.PathLike,
    kind: str,
    identity: Mapping[str, Any],
    extra: Mapping[str, Any] | None = None,
) -> Path:
    """Create ``path`` for a result of ``kind`` made by ``identity``, or reopen it if it matches.

    ``identity`` holds everything that decides the result's content (arguments, model hash, data
    hash, seed). ``extra`` is recorded but not compared (timings, environment).
    Raises :class:`MismatchError` naming each differing field when the folder was made otherwise.
    """
    path = Path(path)
    record_path = path / RECORD_NAME
    ident = to_jsonable(dict(identity))
    if record_path.exists():
        try:
            record = json.loads(record_path.read_text())
        except json.JSONDecodeError as exc:
            raise MismatchError(f"{record_path}: not valid JSON ({exc})") from exc
        if record.get("kind") != kind:
            raise MismatchError(f"{path} holds a {record.get('kind')!r}, not a {kind!r}")
        diffs = diff_fields(ident, record.get("identity", {}))
        if diffs:
            raise MismatchError(
                f"{path} was made with other arguments; refusing to mix results. Differences:\n  "
                + "\n  ".join(diffs)
                + "\nUse another output folder, or delete this one to start over."
            )
        return path
    path.mkdir(parents=True, exist_ok=True)
    write_json_atomic(
        record_path,
        {
            "kind": kind,
            "identity": ident,
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "environment": environment(),
            **({"extra": to_jsonable(dict(extra))} if extra else {}),
        },
    )
    return path


def read_record(path: str | os.PathLike) -> dict[str, Any]:
    """The ``diffattr.json`` record of a result folder (clear error when absent)."""
    record_path = Path(path) / RECORD_NAME
    if not Path(path).is_dir():
        raise RecordNotFoundError(f"{path}: no such folder")
    if not record_path.exists():
        raise RecordNotFoundError(
            f"{record_path}: no diffattr record; is {path} a folder written by diffattr?"
        )
    try:
        return json.loads(record_path.read_text())
    except json.JSONDecodeError as exc:
        raise MismatchError(f"{record_path}: not valid JSON ({exc})") from exc
