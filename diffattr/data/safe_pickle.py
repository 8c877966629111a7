"""Read the official CIFAR-10 / ArtBench-10 python batches without trusting pickle.

Those batches are pickles, and a plain ``pickle.load`` runs whatever callable a file names. This
module's unpickler resolves only the handful of globals a numpy-array pickle needs and refuses every
other one *before* anything is called, so a doctored file cannot run code.

What a batch file contains (checked against the format): a dict whose values are a uint8
``ndarray`` (rebuilt through ``numpy.core.multiarray._reconstruct``, ``numpy.ndarray`` and
``numpy.dtype``), lists of ints and byte strings. Admitted globals:

- ``numpy.core.multiarray._reconstruct`` / ``numpy._core.multiarray._reconstruct`` (numpy 1 / 2
  spelling), ``numpy.ndarray``, ``numpy.dtype``: array reconstruction.
- ``numpy.core.multiarray.scalar`` / ``numpy._core.multiarray.scalar``: a numpy integer label
  stored as a scalar (a file written from Python 3 may hold labels that way); it only rebuilds a
  number from a dtype and its bytes.
- ``_codecs.encode``, but only as ``encode(text, "latin1")``: Python 3's pickler writes ``bytes``
  this way at protocol 2, so a batch re-saved from Python 3 contains it. Any other codec is refused.

Plain containers, strings, bytes and numbers need no globals at all.
"""

from __future__ import annotations

import io
import pickle
from pathlib import Path
from typing import Any

import numpy as np

from diffattr.data.dataset import DataError

try:  # numpy >= 2 keeps the implementation in numpy._core
    from numpy._core.multiarray import _reconstruct, scalar
except ImportError:  # pragma: no cover - numpy 1.x
    from numpy.core.multiarray import _reconstruct, scalar  # type: ignore[no-redef]


class UnsafePickleError(DataError):
    """A pickle named a global outside the allow-list; nothing from it was called."""


class _RefusedCall(pickle.UnpicklingError):
    """An admitted global was called with arguments outside what batch files use."""


_LATIN1_NAMES = {"latin1", "latin-1", "iso-8859-1", "iso8859-1", "l1"}


def _latin1_encode(text: Any, encoding: Any = "utf-8", errors: Any = "strict") -> bytes:
    """Stand-in for ``_codecs.encode`` that only performs the latin-1 text -> bytes step."""
    if not isinstance(text, str) or not isinstance(encoding, str):
        raise _RefusedCall("refused _codecs.encode call: only encode(str, 'latin1') is allowed")
    if encoding.lower() not in _LATIN1_NAMES or errors != "strict":
        raise _RefusedCall(
            f"refused _codecs.encode with codec {encoding!r}: only the latin1 codec is allowed"
        )
    return text.encode("latin1")


ALLOWED_GLOBALS: dict[tuple[str, str], Any] = {
    ("numpy.core.multiarray", "_reconstruct"): _reconstruct,
    ("numpy._core.multiarray", "_reconstruct"): _reconstruct,
    ("numpy.core.multiarray", "scalar"): scalar,
    ("numpy._core.multiarray", "scalar"): scalar,
    ("numpy", "ndarray"): np.ndarray,
    ("numpy", "dtype"): np.dtype,
    ("_codecs", "encode"): _latin1_encode,
}


class _RestrictedUnpickler(pickle.Unpickler):
    """``pickle.Unpickler`` whose global lookup is a fixed allow-list (see module docstring)."""

    def __init__(self, file: io.BufferedIOBase, source: str) -> None:
        # encoding="bytes": Python 2 ``str`` objects (keys, file names, the raw array buffer) come
        # back as ``bytes``, as the CIFAR-10 page documents; numpy accepts them as array state.
        super().__init__(file, encoding="bytes")
        self._source = source

    def find_class(self, module: str, name: str) -> Any:
        found = ALLOWED_GLOBALS.get((module, name))
        if found is None:
            allowed = ", ".join(f"{m}.{n}" for m, n in ALLOWED_GLOBALS)
            raise UnsafePickleError(
                f"{self._source}: refused to load global {module}.{name} from this pickle "
                f"(only {allowed} are allowed); the file is not an official data batch"
            )
        return found

    def persistent_load(self, pid: Any) -> Any:
        raise UnsafePickleError(f"{self._source}: refused a persistent id in this pickle")


def safe_loads(payload: bytes, source: str = "<bytes>") -> Any:
    """Unpickle ``payload`` with the restricted unpickler; ``source`` names it in errors."""
    try:
        return _RestrictedUnpickler(io.BytesIO(payload), source).load()
    except UnsafePickleError:
        raise
    except _RefusedCall as exc:
        raise UnsafePickleError(f"{source}: {exc}") from exc
    except (pickle.UnpicklingError, EOFError) as exc:
        raise DataError(f"{source}: truncated or corrupt pickle ({exc})") from exc
    except (ValueError, TypeError, KeyError, IndexError, AttributeError, MemoryError) as exc:
        # Malformed opcodes or array state that numpy rejects.
        raise DataError(f"{source}: corrupt pickle ({type(exc).__name__}: {exc})") from exc


def safe_load(path: str | Path) -> Any:
    """Read and unpickle the file at ``path`` with the restricted unpickler."""
    path = Path(path)
    try:
        payload = path.read_bytes()
    except FileNotFoundError as exc:
        raise DataError(f"{path}: file not found") from exc
    except OSError as exc:
        raise DataError(f"{path}: cannot read ({exc})") from exc
    return safe_loads(payload, source=str(path))
