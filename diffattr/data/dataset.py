"""The training-set type every part of diffattr shares."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from diffattr.errors import UserError
from diffattr.repro import memo_digest


class DataError(UserError, ValueError):
    """Bad or missing data: the message names the file or field and what was expected."""


@dataclass
class ImageDataset:
    """Training (or query) images with stable integer ids.

    ``images``: float32 tensor ``(n, C, H, W)`` scaled to ``[-1, 1]``.
    ``ids``: int64 tensor ``(n,)``; an image keeps its id in every subset and every run, so scores,
    feature stores and retraining masks can always be joined on it.
    ``labels``: optional int64 ``(n,)`` class index into ``class_names``.
    ``groups``: optional named groupings for group-level attribution, e.g. ``{"class": [...],
    "artist": [...]}``, each a list of ``n`` strings.
    ``captions``: optional text prompt of each image (``n`` strings, row order), for text-to-image
    models: from an image folder's ``metadata.jsonl`` or the data config's ``prompt_template``
    (:mod:`diffattr.data.captions`). Every subset keeps each image's caption with it.
    """

    name: str
    images: torch.Tensor
    ids: torch.Tensor
    labels: torch.Tensor | None = None
    class_names: list[str] | None = None
    groups: dict[str, list[str]] = field(default_factory=dict)
    captions: list[str] | None = None

    def __post_init__(self) -> None:
        if self.images.ndim != 4:
            raise DataError(
                f"{self.name}: images must be (n, C, H, W), got shape {tuple(self.images.shape)}"
            )
        n = self.images.shape[0]
        if self.ids.shape != (n,):
            raise DataError(f"{self.name}: ids must have shape ({n},), got {tuple(self.ids.shape)}")
        if self.labels is not None and self.labels.shape != (n,):
            raise DataError(
                f"{self.name}: labels must have shape ({n},), got {tuple(self.labels.shape)}"
            )
        for key, values in self.groups.items():
            if len(values) != n:
                raise DataError(f"{self.name}: group {key!r} has {len(values)} entries, want {n}")
        if self.captions is not None:
            if isinstance(self.captions, str) or len(self.captions) != n:
                got = "a string" if isinstance(self.captions, str) else f"{len(self.captions)}"
                raise DataError(f"{self.name}: captions must be a list of {n} strings, got {got}")
            bad = next((i for i, c in enumerate(self.captions) if not isinstance(c, str)), None)
            if bad is not None:
                raise DataError(
                    f"{self.name}: caption of row {bad} (id {int(self.ids[bad])}) is "
                    f"{type(self.captions[bad]).__name__}, not a string"
                )
            self.captions = list(self.captions)
        if n and torch.unique(self.ids).numel() != n:
            raise DataError(f"{self.name}: ids are not unique")

    def __len__(self) -> int:
        return int(self.images.shape[0])

    @property
    def image_shape(self) -> tuple[int, int, int]:
        c, h, w = self.images.shape[1:]
        return int(c), int(h), int(w)

    def subset(self, mask: torch.Tensor | np.ndarray | Sequence[bool], name: str | None = None):
        """The images where ``mask`` (bool, one entry per image, in order) is true; ids are kept."""
        m = torch.as_tensor(np.asarray(mask), dtype=torch.bool)
        if m.shape != (len(self),):
            raise DataError(
                f"{self.name}: subset mask must have shape ({len(self)},), got {tuple(m.shape)}"
            )
        if not bool(m.any()):
            raise DataError(f"{self.name}: subset mask selects no images (empty subset)")
        idx = torch.nonzero(m).flatten()
        return self._take(idx, name or f"{self.name}[subset {int(m.sum())}]")

    def select_ids(self, ids: Sequence[int] | torch.Tensor | np.ndarray, name: str | None = None):
        """The images with these ids, in the order given. Unknown ids are an error."""
        wanted = torch.as_tensor(np.asarray(ids), dtype=torch.int64).flatten()
        if wanted.numel() == 0:
            raise DataError(f"{self.name}: select_ids got no ids (empty subset)")
        pos = {int(i): k for k, i in enumerate(self.ids.tolist())}
        missing = [int(i) for i in wanted.tolist() if int(i) not in pos]
        if missing:
            raise DataError(
                f"{self.name}: unknown ids {missing[:10]}{'...' if len(missing) > 10 else ''}"
            )
        idx = torch.tensor([pos[int(i)] for i in wanted.tolist()], dtype=torch.int64)
        return self._take(idx, name or f"{self.name}[{idx.numel()} ids]")

    def id_mask(self, ids: Sequence[int] | torch.Tensor | np.ndarray) -> torch.Tensor:
        """Bool mask ``(n,)`` over this set that is true where the image's id is in ``ids``."""
        wanted = torch.as_tensor(np.asarray(ids), dtype=torch.int64).flatten()
        return torch.isin(self.ids, wanted)

    def _take(self, idx: torch.Tensor, name: str) -> ImageDataset:
        return ImageDataset(
            name=name,
            images=self.images[idx],
            ids=self.ids[idx],
            labels=None if self.labels is None else self.labels[idx],
            class_names=self.class_names,
            groups={k: [v[i] for i in idx.tolist()] for k, v in self.groups.items()},
            captions=None if self.captions is None else [self.captions[i] for i in idx.tolist()],
        )

    def data_hash(self) -> str:
        """sha256 over ids, shape and image bytes (and labels, and captions): identical data,
        identical hash.

        The tensor part is remembered until a tensor is replaced or changed in place
        (:func:`~diffattr.repro.memo_digest`; a change through ``.data`` bypasses the version
        counter and is not seen: data sets are never modified that way here). Captions, when
        present, are hashed on every call (cheap next to the pixels) into a second sha256 over the
        tensor digest, so a set without captions keeps the hash it had before captions existed.
        """
        tensors = [self.images, self.ids] + ([] if self.labels is None else [self.labels])
        digest = memo_digest(self, tensors, self._data_hash)
        if self.captions is None:
            return digest
        h = hashlib.sha256(b"diffattr captions v1\x00")
        h.update(digest.encode())
        h.update(json.dumps(self.captions, ensure_ascii=False).encode())
        return h.hexdigest()

    def _data_hash(self) -> str:
        h = hashlib.sha256()
        h.update(str(tuple(self.images.shape)).encode())
        h.update(self.ids.to(torch.int64).contiguous().numpy().tobytes())
        h.update(self.images.to(torch.float32).contiguous().numpy().tobytes())
        if self.labels is not None:
            h.update(self.labels.to(torch.int64).contiguous().numpy().tobytes())
        return h.hexdigest()

    def describe(self) -> dict:
        """A JSON-able summary (what ``diffattr data inspect`` prints)."""
        out: dict = {
            "name": self.name,
            "n": len(self),
            "image_shape": list(self.image_shape),
            "id_range": [int(self.ids.min()), int(self.ids.max())] if len(self) else None,
            "min": float(self.images.min()) if len(self) else None,
            "max": float(self.images.max()) if len(self) else None,
            "data_hash": self.data_hash(),
        }
        if self.labels is not None:
            counts = torch.bincount(self.labels, minlength=len(self.class_names or [])).tolist()
            names = self.class_names or [str(i) for i in range(len(counts))]
            out["classes"] = {names[i]: int(c) for i, c in enumerate(counts) if c}
        if self.groups:
            out["groups"] = {k: len(set(v)) for k, v in self.groups.items()}
        if self.captions is not None:
            distinct = sorted(set(self.captions))
            out["captions"] = {
                "n": len(self.captions),
                "distinct": len(distinct),
                "first": self.captions[0] if self.captions else None,
                **({"values": distinct} if len(distinct) <= 10 else {}),
            }
        return out
