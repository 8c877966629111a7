"""Tiny CIFAR-10 / ArtBench-10 python-batch folders in the official on-disk format, for tests.

The real batches are protocol-2 pickles. Python 3's pickler cannot write them as they are (it
stores ``bytes`` through ``_codecs.encode`` at protocol 2 and names numpy's private module), so this
module emits the opcodes itself:

- ``flavor="py2"`` (CIFAR-10): what Python 2's ``cPickle.dump(d, f, 2)`` wrote for the official
  files: dict keys, file names and the array buffer as Python-2 strings (``SHORT_BINSTRING`` /
  ``BINSTRING``), arrays through ``numpy.core.multiarray._reconstruct``.
- ``flavor="py3"`` (ArtBench-10, whose 32x32 release was produced with Python 3): text as unicode
  (``BINUNICODE``) and bytes through ``_codecs.encode(text, "latin1")``, exactly as Python 3's
  pickle writes protocol 2.

The fixture data are reproducible from ``seed`` (see :func:`fixture_arrays`); each batch holds
every class ``n_per_batch // num_classes`` or more times.
"""

from __future__ import annotations

import struct
from pathlib import Path
from typing import Any

import numpy as np

from diffattr.data.cifar import (
    ARTBENCH10_FORMAT,
    CIFAR10_FORMAT,
    ROW_LENGTH,
    TEST_FILES,
    TRAIN_FILES,
)

CIFAR10_LABEL_NAMES = (
    "airplane",
    "automobile",
    "bird",
    "cat",
    "deer",
    "dog",
    "frog",
    "horse",
    "ship",
    "truck",
)
# ArtBench-10's ten styles in label order (alphabetical, as in the release's meta file).
ARTBENCH10_STYLES = (
    "art_nouveau",
    "baroque",
    "expressionism",
    "impressionism",
    "post_impressionism",
    "realism",
    "renaissance",
    "romanticism",
    "surrealism",
    "ukiyo_e",
)


class Py2PickleWriter:
    """Protocol-2 pickle opcodes for the value types the batch files use.

    Supports None, bool, int, str, bytes, list, tuple, dict and numeric numpy arrays.
    """

    def __init__(self, flavor: str = "py2") -> None:
        if flavor not in ("py2", "py3"):
            raise ValueError(f"flavor must be 'py2' or 'py3', got {flavor!r}")
        self.flavor = flavor
        self.out = bytearray(b"\x80\x02")  # PROTO 2

    def dumps(self, value: Any) -> bytes:
        self.write(value)
        self.out += b"."  # STOP
        return bytes(self.out)

    # -- scalars -------------------------------------------------------------------------------
    def _global(self, module: str, name: str) -> None:
        self.out += b"c" + module.encode() + b"\n" + name.encode() + b"\n"

    def _int(self, v: int) -> None:
        if 0 <= v < 256:
            self.out += b"K" + bytes([v])  # BININT1
        elif 0 <= v < 65536:
            self.out += b"M" + struct.pack("<H", v)  # BININT2
        elif -(2**31) <= v < 2**31:
            self.out += b"J" + struct.pack("<i", v)  # BININT
        else:
            raw = v.to_bytes((v.bit_length() + 8) // 8, "little", signed=True)
            self.out += b"\x8a" + bytes([len(raw)]) + raw  # LONG1

    def _py2_str(self, raw: bytes) -> None:
        if len(raw) < 256:
            self.out += b"U" + bytes([len(raw)]) + raw  # SHORT_BINSTRING
        else:
            self.out += b"T" + struct.pack("<I", len(raw)) + raw  # BINSTRING

    def _unicode(self, text: str) -> None:
        raw = text.encode("utf-8")
        self.out += b"X" + struct.pack("<I", len(raw)) + raw  # BINUNICODE

    def _bytes(self, raw: bytes) -> None:
        if self.flavor == "py2":
            self._py2_str(raw)
        else:  # Python 3 at protocol 2: _codecs.encode(raw.decode('latin1'), 'latin1')
            self._global("_codecs", "encode")
            self._unicode(raw.decode("latin1"))
            self._unicode("latin1")
            self.out += b"\x86R"  # TUPLE2 REDUCE

    def _text(self, text: str) -> None:
        if self.flavor == "py2":
            self._py2_str(text.encode("latin1"))
        else:
            self._unicode(text)

    # -- containers ------------------------------------------------------------------------------
    def _tuple(self, items: tuple) -> None:
        if not items:
            self.out += b")"
            return
        if len(items) <= 3:
            for item in items:
                self.write(item)
            self.out += {1: b"\x85", 2: b"\x86", 3: b"\x87"}[len(items)]
            return
        self.out += b"("
        for item in items:
            self.write(item)
        self.out += b"t"

    def _dtype(self, dt: np.dtype) -> None:
        self._global("numpy", "dtype")
        self._text(dt.str[1:])  # e.g. "u1", "i8"
        self.out += b"K\x00K\x01\x87R"  # (name, 0, 1) TUPLE3 REDUCE
        state = (3, dt.str[0], None, None, None, -1, -1, 0)  # endian "|" or "<"
        self._tuple(state)
        self.out += b"b"  # BUILD

    def _ndarray(self, arr: np.ndarray) -> None:
        if arr.dtype.kind not in "biuf":
            raise ValueError(f"only numeric arrays are supported, got {arr.dtype}")
        arr = np.ascontiguousarray(arr)
        self._global("numpy.core.multiarray", "_reconstruct")
        self._global("numpy", "ndarray")
        self.write((0,))
        self._bytes(b"b")
        self.out += b"\x87R"  # TUPLE3 REDUCE
        self.out += b"("  # state: (version, shape, dtype, is_fortran, raw bytes)
        self._int(1)
        self.write(tuple(int(s) for s in arr.shape))
        self._dtype(arr.dtype)
        self.out += b"\x89"  # NEWFALSE
        self._bytes(arr.tobytes())
        self.out += b"tb"  # TUPLE BUILD

    def write(self, value: Any) -> None:
        if value is None:
            self.out += b"N"
        elif isinstance(value, bool):
            self.out += b"\x88" if value else b"\x89"
        elif isinstance(value, int | np.integer):
            self._int(int(value))
        elif isinstance(value, str):
            self._text(value)
        elif isinstance(value, bytes):
            self._bytes(value)
        elif isinstance(value, np.ndarray):
            self._ndarray(value)
        elif isinstance(value, tuple):
            self._tuple(value)
        elif isinstance(value, list):
            self.out += b"]"
            if value:
                self.out += b"("
                for item in value:
                    self.write(item)
                self.out += b"e"  # APPENDS
        elif isinstance(value, dict):
            self.out += b"}"
            if value:
                self.out += b"("
                for k, v in value.items():
                    self.write(k)
                    self.write(v)
                self.out += b"u"  # SETITEMS
        else:
            raise TypeError(f"cannot write {type(value).__name__} in a batch pickle")


def dump_py2_pickle(value: Any, path: str | Path, flavor: str = "py2") -> Path:
    """Write ``value`` as a protocol-2 pickle in the given flavor (see module docstring)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(Py2PickleWriter(flavor).dumps(value))
    return path


def write_batch(
    path: str | Path,
    data: np.ndarray,
    labels: list[int] | np.ndarray,
    batch_label: str = "fixture batch",
    filenames: list[str] | None = None,
    flavor: str = "py2",
) -> Path:
    """One batch file: ``data`` uint8 ``(N, 3072)`` (R, G, B planes, row-major) and ``labels``."""
    data = np.asarray(data)
    if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != ROW_LENGTH:
        raise ValueError(f"data must be uint8 (N, {ROW_LENGTH}), got {data.dtype} {data.shape}")
    record: dict[Any, Any] = {
        "batch_label": batch_label,
        "labels": [int(v) for v in labels],
        "data": data,
    }
    if filenames is not None:
        record["filenames"] = list(filenames)
    return dump_py2_pickle(record, path, flavor)


def fixture_arrays(
    n_per_batch: int = 20, seed: int = 0, num_classes: int = 10, n_test: int | None = None
) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """``{file name: (data uint8 (N, 3072), labels int64 (N,))}`` for the five train batches and
    ``test_batch`` (``n_test`` rows, default ``n_per_batch``). Labels cycle through all classes
    in a seeded order; pixels are seeded uniform noise."""
    rng = np.random.default_rng(seed)
    out = {}
    for name in (*TRAIN_FILES, *TEST_FILES):
        n = n_per_batch if name != "test_batch" or n_test is None else n_test
        labels = rng.permutation(np.arange(n) % num_classes).astype(np.int64)
        data = rng.integers(0, 256, size=(n, ROW_LENGTH), dtype=np.uint8)
        out[name] = (data, labels)
    return out


def write_cifar10_fixture(
    root: str | Path, n_per_batch: int = 20, seed: int = 0, n_test: int | None = None
) -> Path:
    """Write ``root/cifar-10-batches-py`` (python-2 flavor) and return that folder."""
    folder = Path(root) / CIFAR10_FORMAT.folder
    arrays = fixture_arrays(n_per_batch, seed, len(CIFAR10_LABEL_NAMES), n_test)
    for i, (name, (data, labels)) in enumerate(arrays.items()):
        title = f"training batch {i + 1} of 5" if name != "test_batch" else "testing batch 1 of 1"
        files = [f"fixture_{name}_{k:05d}.png" for k in range(len(labels))]
        write_batch(folder / name, data, labels, title, files, flavor="py2")
    meta = {
        "num_cases_per_batch": n_per_batch,
        "label_names": list(CIFAR10_LABEL_NAMES),
        "num_vis": ROW_LENGTH,
    }
    dump_py2_pickle(meta, folder / CIFAR10_FORMAT.meta_file, "py2")
    return folder


def write_artbench10_fixture(
    root: str | Path, n_per_batch: int = 20, seed: int = 0, n_test: int | None = None
) -> Path:
    """Write ``root/artbench-10-batches-py`` (python-3 protocol-2 flavor) and return that folder."""
    folder = Path(root) / ARTBENCH10_FORMAT.folder
    arrays = fixture_arrays(n_per_batch, seed, len(ARTBENCH10_STYLES), n_test)
    for i, (name, (data, labels)) in enumerate(arrays.items()):
        title = f"training batch {i + 1} of 5" if name != "test_batch" else "testing batch 1 of 1"
        write_batch(folder / name, data, labels, title, None, flavor="py3")
    dump_py2_pickle(
        {"styles": list(ARTBENCH10_STYLES)}, folder / ARTBENCH10_FORMAT.meta_file, "py3"
    )
    return folder
