"""Several gradient feature stores of one model and data set in one pass over the data.

TRAK, D-TRAK, DAS, grad-dot, grad-cos, Diff-ReTrac, EK-FAC ... differ in the output function
they differentiate (loss, D-TRAK's squared norm, DAS's average), whether each gradient is
unit-normalised, and the timesteps they average, not in the noisy images they start from: under
one noise seed and policy, every method sees the same ``x_t`` for a given (image, timestep, draw).
:func:`featurize_many` therefore runs each (image chunk, timestep, draw) forward once for every
store that needs it, each output function's backward from that forward, and (Kronecker
projection) each layer's projected inputs once for all outputs; see
:func:`~diffattr.attribution.featurize.kronecker_batch`.

Rows are batched by timestep: a batch is a chunk of at most ``batch_size`` images of a shard at one
(timestep, draw). A store's batches are therefore the same whichever other stores share the pass,
and so are its features, bit for bit: featurizing a store alone
(:func:`~diffattr.attribution.featurize.featurize` is this function with one store) and beside
others give identical shards.

Stores share a pass when they agree on what decides the noisy inputs and the projection: noise
seed and policy, selected parameters, projector, batch and shard size. Others are grouped apart
(each group one pass). Requests for the same store (same identity) are computed once and copied
to the other folders.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from diffattr.attribution.conditioning import data_condition, dataset_inputs, pixel_shape
from diffattr.attribution.featurize import (
    PROJECT_BUFFER_BYTES,
    FeaturizeArgs,
    Rows,
    Want,
    _noisy_rows,
    aggregate_samples,
    build_projector,
    check_finite,
    feature_store_spec,
    kronecker_batch,
    raw_batch,
    rms_errors,
    store_identity,
)
from diffattr.attribution.projectors import DenseProjector, IdentityProjector, KroneckerProjector
from diffattr.attribution.store import (
    MANIFEST,
    SHARD_DIR,
    FeatureStore,
    StoreMismatchError,
    fill_stores,
    open_store_dir,
)
from diffattr.data.dataset import ImageDataset
from diffattr.diffusion.model import eval_mode
from diffattr.repro import RECORD_NAME, read_record

log = logging.getLogger(__name__)


WHAT = ("grads", "residuals")


@dataclass(frozen=True)
class StoreRequest:
    """One store to fill: the settings that make it, its folder and what it holds: projected
    gradient features (``"grads"``), or (``"residuals"``) the root-mean-square denoising error of
    every (timestep, draw) sample, ``(S, D)`` per image, from the same forwards (DAS's weights)."""

    args: FeaturizeArgs
    out: Path
    what: str = "grads"

    def __post_init__(self) -> None:
        if self.what not in WHAT:
            raise ValueError(f"StoreRequest.what: {self.what!r} is not one of {WHAT}")


@dataclass
class _Plan:
    """A request with what the pass needs of it: its timesteps, where each timestep sits in its
    sample order (``positions``), projector, parameters, feature shape and store identity."""

    request: StoreRequest
    timesteps: list[int]
    positions: dict[int, list[int]]
    proj: Any
    params: dict[str, torch.nn.Parameter]
    feature_shape: tuple[int, ...]
    identity: dict[str, Any]

    @property
    def args(self) -> FeaturizeArgs:
        return self.request.args

    @property
    def want(self) -> Want:
        return (self.args.output, self.args.normalize)

    @property
    def residuals(self) -> bool:
        return self.request.what == "residuals"


def pass_key(args: FeaturizeArgs) -> str:
    """What stores sharing one pass must agree on (noisy inputs, projection, batching)."""
    return json.dumps(
        {
            "seed": args.seed,
            "noise": args.noise,
            "params": args.params,
            "projector": args.projector.to_dict(),
            "batch_size": args.batch_size,
            "shard_size": args.shard_size,
        },
        sort_keys=True,
    )


def featurize_many(
    model: Any,
    data: ImageDataset,
    requests: Sequence[StoreRequest],
    accelerator: Any = None,
    progress: bool = True,
    on_shard: Callable[[int], None] | None = None,
) -> list[FeatureStore]:
    """Fill every requested store (resuming what is on disk) and return them, in request order.

    Stores are grouped by :func:`pass_key`; each group is one pass over the data's shards, in
    which shard ``i`` is computed only for the stores that lack it. With an ``accelerator`` of
    ``world`` processes, shard ``i`` is computed by process ``i % world`` (as
    :func:`~diffattr.attribution.store.fill_stores`). ``on_shard(i)``: called after shard ``i``
    of a group is written (tests). Raises :class:`StoreMismatchError` when a folder holds a store
    made otherwise.
    """
    if not requests:
        return []
    if len(data) == 0:
        raise ValueError(f"featurize: data set {data.name!r} is empty")
    if accelerator is not None:
        model.to(accelerator.device)
    plans = [_plan(model, data, r) for r in requests]
    # The same store asked for in several folders: computed once, copied to the others.
    first: dict[str, int] = {}
    copies: list[tuple[int, int]] = []
    for j, p in enumerate(plans):
        key = json.dumps(p.identity, sort_keys=True, default=str)
        if key in first:
            copies.append((j, first[key]))
        else:
            first[key] = j
    groups: dict[str, list[int]] = {}
    for j in first.values():
        groups.setdefault(pass_key(plans[j].args), []).append(j)
    stores: dict[int, FeatureStore] = {}
    for members in groups.values():
        group = [plans[j] for j in members]
        filled = _fill_group(model, data, group, accelerator, progress, on_shard)
        stores.update(zip(members, filled, strict=True))
    for j, src in copies:
        stores[j] = copy_store(stores[src], plans[j].request.out, plans[j].identity)
    return [stores[j] for j in range(len(plans))]


def featurize_for(
    attributors: Sequence[Any],
    train: ImageDataset,
    accelerator: Any = None,
    progress: bool = True,
    on_error: Callable[[Any, Exception], None] | None = None,
) -> list[tuple[Any, list[Path]]]:
    """Fill, one pass per model, the gradient feature stores the ``attributors`` will read when
    they ``fit(train)`` (those with a ``store_requests`` hook, and the members of an ensemble;
    others are left alone), so fitting them afterwards only loads their stores. Returns each
    attributor that had stores filled, with their folders.

    ``on_error(attributor, exc)``: given, an attributor whose stores cannot be described (bad
    options) is reported to it and left out (its ``fit`` raises the same error later); without
    it the error propagates."""
    by_model: dict[int, tuple[Any, dict[Path, StoreRequest]]] = {}
    filled: list[tuple[Any, list[Path]]] = []
    for a in attributors:
        # An ensemble (diffattr.attribution.ensemble) fills the stores of each member's model.
        leaves = [m for m in getattr(a, "members", [a]) if hasattr(m, "store_requests")]
        if not leaves:
            continue
        try:
            per_leaf = []
            for leaf in leaves:
                requests = leaf.store_requests(train)
                for r in requests:
                    _timesteps(leaf.model, r.args)
                per_leaf.append((leaf.model, requests))
        except Exception as exc:
            if on_error is None:
                raise
            on_error(a, exc)
            continue
        folders = []
        for model, requests in per_leaf:
            for r in requests:
                # A folder's name holds a hash of its settings: one folder, one request.
                by_model.setdefault(id(model), (model, {}))[1].setdefault(Path(r.out), r)
                folders.append(Path(r.out))
        if folders:
            filled.append((a, folders))
    for model, unique in by_model.values():
        featurize_many(model, train, list(unique.values()), accelerator, progress)
    return filled


def _timesteps(model: Any, args: FeaturizeArgs) -> list[int]:
    """``args``' timesteps after checking the settings against the model's schedule."""
    args.validate()
    T = int(model.scheduler.config.num_train_timesteps)
    if args.timesteps.num_train_timesteps != T:
        raise ValueError(
            f"timesteps.num_train_timesteps is {args.timesteps.num_train_timesteps} but the model's "
            f"scheduler has {T} training timesteps"
        )
    timesteps = [int(t) for t in args.timesteps.timesteps()]
    if args.aggregate == "halves" and len(timesteps) * args.num_noise < 2:
        raise ValueError("featurize: aggregate 'halves' needs at least 2 (timestep, draw) samples")
    return timesteps


def _plan(model: Any, data: ImageDataset, request: StoreRequest) -> _Plan:
    args = request.args
    timesteps = _timesteps(model, args)
    image_shape = pixel_shape(model)
    if image_shape is not None and tuple(data.images.shape[1:]) != image_shape:
        raise ValueError(
            f"featurize: data {data.name!r} has images of shape {tuple(data.images.shape[1:])}, "
            f"the model takes {image_shape}"
        )
    proj, params = build_projector(model, args)
    n = len(data)
    fshape: tuple[int, ...] = {
        "mean": (n, proj.dim),
        "per-step": (n, len(timesteps), proj.dim),
        "halves": (n, 2, proj.dim),
    }[args.aggregate]
    if request.what == "residuals":
        fshape = (n, len(timesteps), args.num_noise)
    positions: dict[int, list[int]] = {}
    for s, t in enumerate(timesteps):
        positions.setdefault(t, []).append(s)
    identity = store_identity(model, data, args, proj, fshape)
    if request.what != "grads":
        identity["what"] = request.what
    return _Plan(request, timesteps, positions, proj, params, fshape, identity)


def _fill_group(
    model: Any,
    data: ImageDataset,
    group: list[_Plan],
    accelerator: Any,
    progress: bool,
    on_shard: Callable[[int], None] | None,
) -> list[FeatureStore]:
    specs = [
        feature_store_spec(p.request.out, p.identity, p.feature_shape[1:], p.args, p.proj)
        for p in group
    ]

    def compute(sl: slice, which: list[int]) -> list[Tensor]:
        return shard_features(model, data, sl, [group[j] for j in which])

    return fill_stores(
        specs,
        data.ids,
        group[0].args.shard_size,
        compute,
        progress=progress,
        accelerator=accelerator,
        on_shard=on_shard,
    )


def chunks(n: int, size: int) -> list[slice]:
    """``n`` items in ``ceil(n / size)`` consecutive chunks of near-equal length (at most
    ``size``): a shard's tail is not left as one tiny batch."""
    count = -(-n // size)
    base, extra = divmod(n, count)
    out, start = [], 0
    for c in range(count):
        length = base + (1 if c < extra else 0)
        out.append(slice(start, start + length))
        start += length
    return out


def shard_features(model: Any, data: ImageDataset, sl: slice, plans: list[_Plan]) -> list[Tensor]:
    """Aggregated features of ``data``'s items ``sl`` for each plan (its store's rows)."""
    # The model's inputs (a latent model's VAE latents, encoded once per data set) and its
    # conditioning (class labels, caption token ids) of these rows.
    x0, ids = dataset_inputs(model, data)[sl], data.ids[sl]
    labels = data_condition(model, data, sl)
    out: list[list[Tensor]] = [[] for _ in plans]
    with eval_mode(model.unet):
        for c in chunks(int(ids.shape[0]), plans[0].args.batch_size):
            feats = _chunk_features(
                model, x0[c], ids[c], None if labels is None else labels[c], plans
            )
            for acc, f, p in zip(out, feats, plans, strict=True):
                acc.append(f if p.residuals else aggregate_samples(f, p.args.aggregate))
    return [torch.cat(parts) for parts in out]


class _DensePool:
    """One plan's raw gradients waiting for one dense projection call (values do not depend on
    the pooling; speed does: a dense projection regenerates its matrix blocks on every call)."""

    def __init__(self, proj: IdentityProjector | DenseProjector, buf: Tensor) -> None:
        self.proj, self.buf = proj, buf
        self.items: list[tuple[dict[str, Tensor], Rows, list[int], int]] = []
        self.bytes = 0

    def add(self, grads: dict[str, Tensor], rows: Rows, steps: list[int], draw: int) -> None:
        self.items.append((grads, rows, steps, draw))
        self.bytes += sum(g.numel() * g.element_size() for g in grads.values())
        if not isinstance(self.proj, DenseProjector) or self.bytes >= PROJECT_BUFFER_BYTES:
            self.flush()

    def flush(self) -> None:
        if not self.items:
            return
        names = list(self.items[0][0])
        grads = {n: torch.cat([g[n] for g, _, _, _ in self.items]) for n in names}
        feats = self.proj.project(grads)
        check_finite(
            feats,
            "projected gradient",
            torch.cat([r.ids for _, r, _, _ in self.items]),
            torch.cat([r.t for _, r, _, _ in self.items]),
            torch.cat([r.draws for _, r, _, _ in self.items]),
        )
        r0 = 0
        for _, rows, steps, draw in self.items:
            part = feats[r0 : r0 + rows.ids.shape[0]]
            r0 += rows.ids.shape[0]
            for s in steps:
                self.buf[:, s, draw] = part.to(self.buf.dtype)
        self.items.clear()
        self.bytes = 0


def _chunk_features(
    model: Any, x0: Tensor, ids: Tensor, labels: Tensor | None, plans: list[_Plan]
) -> list[Tensor]:
    """Per-sample values of one chunk of images for each plan: features ``(b, S, D, k)``, or
    residuals ``(b, S, D)``.

    One forward per (timestep, draw) that any plan needs, in increasing timestep order; each plan
    reads the rows of its own timesteps and draws."""
    b = int(ids.shape[0])
    device = model.device
    x0 = x0.to(device)
    y = None if labels is None else labels.to(device)
    proj = plans[0].proj  # one projector per pass (pass_key)
    bufs = [
        torch.zeros(b, len(p.timesteps), p.args.num_noise, dtype=torch.float32)
        if p.residuals
        else torch.zeros(
            b, len(p.timesteps), p.args.num_noise, p.proj.dim, dtype=p.args.projector.torch_dtype
        )
        for p in plans
    ]
    kron = isinstance(proj, KroneckerProjector)
    pools: dict[int, _DensePool] = {}
    if not kron:
        pools = {j: _DensePool(proj, buf) for j, buf in enumerate(bufs) if not plans[j].residuals}
    draws = max(p.args.num_noise for p in plans)
    union = sorted({t for p in plans for t in p.timesteps})
    for t in union:
        for d in range(draws):
            need = [j for j, p in enumerate(plans) if t in p.positions and d < p.args.num_noise]
            if not need:
                continue
            rows = Rows(
                x0,
                ids,
                torch.full((b,), t, dtype=torch.int64),
                torch.full((b,), d, dtype=torch.int64),
            )
            grads = [j for j in need if not plans[j].residuals]
            args = plans[need[0]].args  # seed and noise policy: shared by the pass
            wants = list(dict.fromkeys(plans[j].want for j in grads))
            pred = None
            if grads and kron:
                feats, pred = kronecker_batch(model, proj, rows, y, wants, args)
                for j in grads:
                    f = feats[plans[j].want].detach().to("cpu", bufs[j].dtype)
                    for s in plans[j].positions[t]:
                        bufs[j][:, s, d] = f
            elif grads:
                raw = raw_batch(model, plans[grads[0]].params, rows, y, wants, args)
                for j in grads:
                    pools[j].add(raw[plans[j].want], rows, plans[j].positions[t], d)
            residuals = [j for j in need if plans[j].residuals]
            if residuals:
                x_t, target, t_dev = _noisy_rows(model, rows, args)
                if pred is None:
                    # No Kronecker forward to read it from (dense projection, or residuals only).
                    with torch.no_grad():
                        pred = model.eps(x_t, t_dev, y)
                err = rms_errors(pred, target).to("cpu")
                check_finite(err, "denoising error", rows.ids, rows.t, rows.draws)
                for j in residuals:
                    for s in plans[j].positions[t]:
                        bufs[j][:, s, d] = err
    for pool in pools.values():
        pool.flush()
    return bufs


def copy_store(src: FeatureStore, out: Path, identity: dict[str, Any]) -> FeatureStore:
    """A complete copy of store ``src`` in folder ``out`` (hard links where the file system
    allows), recorded with ``identity``; an existing complete store there is kept as it is."""
    out = Path(out)
    if out.resolve() == src.path.resolve():
        return src
    if (out / MANIFEST).exists():
        try:
            return FeatureStore.open(out)
        except Exception as exc:  # incomplete or damaged: rebuilt from src below
            log.info("%s: replacing an unusable store copy (%s)", out, exc)
    if (out / RECORD_NAME).exists():
        # Refuses a folder made with other settings, as filling it would.
        open_store_dir(out, identity)
    tmp = out.with_name(f".{out.name}.tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    (tmp / SHARD_DIR).mkdir(parents=True)
    for f in sorted((src.path / SHARD_DIR).iterdir()):
        _link_or_copy(f, tmp / SHARD_DIR / f.name)
    shutil.copy2(src.path / RECORD_NAME, tmp / RECORD_NAME)
    shutil.copy2(src.path / MANIFEST, tmp / MANIFEST)
    if read_record(tmp).get("identity") != read_record(src.path).get("identity"):
        raise StoreMismatchError(f"{out}: copy of {src.path} has another identity")
    shutil.rmtree(out, ignore_errors=True)
    os.replace(tmp, out)
    return FeatureStore.open(out)


def _link_or_copy(src: Path, dst: Path) -> None:
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)
