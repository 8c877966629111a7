"""Timestep-aware gradient featurization shared by every TRAK-family method.

For a training (or query) image ``x0`` with id ``i``, a timestep ``t`` and a noise draw ``d``:
``noise = noise_for(seed, i, t, d, policy)`` (under the default ``shared`` policy the same for every
image, see :mod:`diffattr.attribution.timesteps`), ``x_t = scheduler.add_noise(x0, noise, t)``, the output
function ``OUTPUTS[output](eps_theta(x_t, t), noise, t, ...)`` is differentiated with respect to the
selected UNet parameters for this one sample, optionally unit-normalised, and randomly projected to
``k`` dimensions. Features of the ``num_noise`` draws are averaged. ``per_step_features`` returns
them per timestep ``(B, S, k)`` (or per draw, ``(B, S, D, k)``); ``aggregate_samples`` averages over
all samples (``"mean"``: TRAK / D-TRAK / DAS), keeps the steps (``"per-step"``: Journey-TRAK) or
averages two independent halves of the samples separately (``"halves"``, ``(B, 2, k)``: the
stability figure); ``featurize`` runs this over a data set into a resumable
:class:`~diffattr.attribution.store.FeatureStore`.

Normalisation (``normalize=True``) divides each (sample, t, draw) gradient by its exact L2 norm
*before* projection. In the vmap path the norm is over all selected parameters; in the Kronecker
path it is the exact norm over the parameters the projector covers (Linear/Conv2d weights and
biases), computed from the captured factors without projecting. Draws are averaged after
normalisation.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from diffattr.attribution.conditioning import prediction_target
from diffattr.attribution.gradients import (
    grad_sq_norms,
    per_sample_grads,
    scheduler_tables,
    select_params,
)
from diffattr.attribution.outputs import OUTPUTS, get_output
from diffattr.attribution.projectors import (
    DenseProjector,
    IdentityProjector,
    KroneckerProjector,
    ProjectorConfig,
    make_projector,
    output_gradients,
    outputs_in_graph,
    projector_info,
)
from diffattr.attribution.store import (
    STORE_TORCH_DTYPES,
    FeatureStore,
    StoreMismatchError,
    StoreSpec,
    fill_store,
)
from diffattr.attribution.timesteps import (
    TimestepPolicy,
    check_noise_policy,
    noise_for,
    validate_timesteps,
)
from diffattr.data.dataset import ImageDataset
from diffattr.diffusion.model import eval_mode
from diffattr.repro import to_jsonable

log = logging.getLogger(__name__)

__all__ = [
    "OUTPUTS",
    "FeatureStore",
    "FeaturizeArgs",
    "NonFiniteGradientError",
    "ProjectorConfig",
    "StoreMismatchError",
    "TimestepPolicy",
    "aggregate",
    "aggregate_samples",
    "build_projector",
    "featurize",
    "merge_halves",
    "per_step_features",
    "row_features",
    "split_halves",
]

AnyProjector = IdentityProjector | DenseProjector | KroneckerProjector
AGGREGATES = ("mean", "per-step", "halves")
# Raw per-sample gradients pooled before one dense projection call (values do not depend on it).
# Override with the environment variable DIFFATTR_PROJECT_BUFFER_MB.
PROJECT_BUFFER_BYTES = int(float(os.environ.get("DIFFATTR_PROJECT_BUFFER_MB", "1024")) * 2**20)
STORE_DTYPES = ("float32", "float16")


class NonFiniteGradientError(FloatingPointError):
    """A per-sample gradient (or its projection) contained NaN or inf; names the sample and t."""


@dataclass
class FeaturizeArgs:
    """Everything that decides a feature's value (recorded in a store's identity).

    ``output``: a key of :data:`OUTPUTS`; ``timesteps``: which t to differentiate at;
    ``num_noise``: noise draws per (sample, t), averaged; ``noise``: ``"shared"`` (one noise per
    (seed, t, draw) for every sample) or ``"per-sample"`` (see
    :mod:`~diffattr.attribution.timesteps`); ``aggregate``: ``"mean"`` over all samples,
    ``"per-step"`` or ``"halves"`` (see :func:`aggregate_samples`); ``normalize``: unit-normalise each raw gradient before projection;
    ``params``: fnmatch patterns of the parameters to differentiate (None = all);
    ``batch_size``: (sample, t, draw) rows per gradient call; ``seed``: noise seed;
    ``dtype``: store dtype ``"float32"`` or ``"float16"``; ``shard_size``: images per store shard;
    ``label``: the method name recorded in a store (e.g. ``"trak"``).
    """

    output: str = "loss"
    timesteps: TimestepPolicy = field(default_factory=TimestepPolicy)
    num_noise: int = 1
    noise: str = "shared"
    aggregate: str = "mean"
    normalize: bool = False
    projector: ProjectorConfig = field(default_factory=ProjectorConfig)
    params: list[str] | None = None
    batch_size: int = 16
    seed: int = 0
    dtype: str = "float32"
    shard_size: int = 256
    label: str = "features"

    def __post_init__(self) -> None:
        if isinstance(self.timesteps, Mapping):
            self.timesteps = TimestepPolicy(**dict(self.timesteps))
        if isinstance(self.projector, Mapping):
            self.projector = ProjectorConfig.from_dict(self.projector)
        if isinstance(self.params, str):
            self.params = [self.params]
        self.validate()

    def validate(self) -> None:
        get_output(self.output)
        if not isinstance(self.num_noise, int) or self.num_noise < 1:
            raise ValueError(f"featurize.num_noise: expected an int >= 1, got {self.num_noise!r}")
        check_noise_policy(self.noise, "featurize.noise")
        if self.aggregate not in AGGREGATES:
            raise ValueError(f"featurize.aggregate: {self.aggregate!r} is not one of {AGGREGATES}")
        if not isinstance(self.batch_size, int) or self.batch_size < 1:
            raise ValueError(f"featurize.batch_size: expected an int >= 1, got {self.batch_size!r}")
        if not isinstance(self.shard_size, int) or self.shard_size < 1:
            raise ValueError(f"featurize.shard_size: expected an int >= 1, got {self.shard_size!r}")
        if self.dtype not in STORE_DTYPES:
            raise ValueError(f"featurize.dtype: {self.dtype!r} is not one of {STORE_DTYPES}")


# -------------------------------------------------------------------------------- projector cache

_PROJECTOR_CACHE: dict[tuple[Any, ...], tuple[AnyProjector, dict[str, torch.nn.Parameter]]] = {}


def build_projector(
    model: Any, args: FeaturizeArgs
) -> tuple[AnyProjector, dict[str, torch.nn.Parameter]]:
    """The projector and selected parameters for ``model`` under ``args`` (memoised per UNet).

    Memoised so repeated ``per_step_features`` calls reuse generated dense blocks; rebuilding from
    the same config gives the same matrices anyway.
    """
    params = select_params(model.unet, args.params)
    key = (
        id(model.unet),
        tuple(sorted(args.projector.to_dict().items())),
        tuple((n, tuple(p.shape)) for n, p in params.items()),
    )
    hit = _PROJECTOR_CACHE.get(key)
    if hit is not None and all(
        a is b for a, b in zip(hit[1].values(), params.values(), strict=True)
    ):
        return hit[0], params
    shapes = {n: tuple(p.shape) for n, p in params.items()}
    proj = make_projector(args.projector, shapes, model=model.unet)
    if len(_PROJECTOR_CACHE) >= 4:
        _PROJECTOR_CACHE.pop(next(iter(_PROJECTOR_CACHE)))
    _PROJECTOR_CACHE[key] = (proj, params)
    return proj, params


# ------------------------------------------------------------------------------ one batch of rows


def check_finite(values: Tensor, what: str, ids: Tensor, t: Tensor, draws: Tensor) -> None:
    """Raise :class:`NonFiniteGradientError` naming the first bad row's sample id, t and draw."""
    bad = ~torch.isfinite(values.reshape(values.shape[0], -1)).all(dim=1)
    if bool(bad.any()):
        r = int(torch.nonzero(bad)[0])
        raise NonFiniteGradientError(
            f"non-finite {what} for sample id {int(ids[r])} at timestep {int(t[r])} "
            f"(noise draw {int(draws[r])}); {int(bad.sum())} of {len(bad)} rows in this batch are "
            "affected. Check the model weights and the output function; nothing was stored."
        )


def row_noise(
    ids: Tensor, t: Tensor, draws: Tensor, shape: tuple[int, ...], seed: int, policy: str
) -> Tensor:
    """The featurizer's noise ``(R, *shape)`` (float32, CPU) of rows ``(id, t, draw)``."""
    return torch.stack(
        [
            noise_for(seed, int(i), int(tt), int(d), shape, policy)
            for i, tt, d in zip(ids.tolist(), t.tolist(), draws.tolist(), strict=True)
        ]
    )


def _noisy_rows(model: Any, rows: Rows, args: FeaturizeArgs) -> tuple[Tensor, Tensor, Tensor]:
    """``(x_t, target, t)`` on the rows' device for the clean images ``rows.x0`` ``(R, C, H, W)``:
    the noisy inputs and what the model should predict there (the noise, or the velocity of a
    v-prediction model; :func:`~diffattr.attribution.conditioning.prediction_target`)."""
    x0 = rows.x0
    noise = row_noise(rows.ids, rows.t, rows.draws, tuple(x0.shape[1:]), args.seed, args.noise).to(
        device=x0.device, dtype=x0.dtype
    )
    t = rows.t
    t_dev = t.to(x0.device)
    x_t = model.scheduler.add_noise(x0, noise, t_dev)
    return x_t, prediction_target(model, x0, noise, t_dev), t_dev


Want = tuple[str, bool]  # (output function, unit-normalise each row's gradient)


def kronecker_batch(
    model: Any,
    proj: KroneckerProjector,
    rows: Rows,
    labels: Tensor | None,
    wants: Sequence[Want],
    args: FeaturizeArgs,
) -> tuple[dict[Want, Tensor], Tensor]:
    """Kronecker-projected features ``(R, k)`` of one chunk of rows for every ``(output,
    normalize)`` in ``wants``, from one forward, and the forward's prediction ``(R, C, H, W)``
    (detached; DAS's residuals come from it).

    Each output function gets its own backward from the shared forward graph (only gradients at
    the layer outputs), the layers' projected inputs are computed once for all of them, and an
    output's exact gradient norms once for its normalised and unnormalised features. Samples do
    not interact inside a UNet (GroupNorm and attention are per sample), so the gradient of the
    *sum* of per-sample outputs at a layer's output is, row by row, each sample's own. Every
    feature is exactly what this function gives when asked for that feature alone.
    ``args``: the noise seed and policy.
    """
    x_t, noise, t_dev = _noisy_rows(model, rows, args)
    outputs = list(dict.fromkeys(o for o, _ in wants))
    norms = [any(n for w, n in wants if w == o) for o in outputs]
    ac, betas = scheduler_tables(model, x_t.device, x_t.dtype)
    gouts: list[dict[str, list[Tensor]]] = []
    with proj.capture() as calls, torch.enable_grad(), outputs_in_graph(proj):
        # Projected weights require grad so every layer output is in the graph even for a frozen
        # UNet; only gradients at the layer outputs are requested, so no weight gradient is formed.
        eps = model.eps(x_t.detach(), t_dev, labels)
        for j, o in enumerate(outputs):
            total = OUTPUTS[o](eps, noise, t_dev, ac, betas).sum()
            pairs = output_gradients(proj, calls, total, retain_graph=j < len(outputs) - 1)
            gouts.append({name: [g for _, g in p] for name, p in pairs.items()})
        acts = {name: [a for a, _ in calls[name]] for name in calls}
    results = proj.features_of_outputs(acts, gouts, norms)
    out: dict[Want, Tensor] = {}
    for o, n in wants:
        feats, sq = results[outputs.index(o)]
        check_finite(feats, "gradient", rows.ids, rows.t, rows.draws)
        if n:
            assert sq is not None
            check_finite(sq, "gradient norm", rows.ids, rows.t, rows.draws)
            feats = feats / sq.sqrt().clamp_min(1e-30)[:, None].to(feats.dtype)
        out[(o, n)] = feats
    return out, eps.detach()


def rms_errors(pred: Tensor, target: Tensor) -> Tensor:
    """Root-mean-square denoising error per row ``(R,)`` float32: the prediction ``(R, C, H, W)``
    against what it should predict (the noise; a v-prediction model's velocity)."""
    return (pred.float() - target.float()).pow(2).flatten(1).mean(dim=1).sqrt()


def raw_batch(
    model: Any,
    params: dict[str, torch.nn.Parameter],
    rows: Rows,
    labels: Tensor | None,
    wants: Sequence[Want],
    args: FeaturizeArgs,
) -> dict[Want, dict[str, Tensor]]:
    """Per-row raw gradients name -> ``(R, *shape)`` for every ``(output, normalize)`` in
    ``wants`` (checked finite, normalised where asked); one vmap pass per output function."""
    x_t, noise, t_dev = _noisy_rows(model, rows, args)
    out: dict[Want, dict[str, Tensor]] = {}
    for o in dict.fromkeys(w for w, _ in wants):
        grads = per_sample_grads(model, x_t, t_dev, noise, OUTPUTS[o], params, labels)
        sq = grad_sq_norms(grads)
        check_finite(sq, "gradient", rows.ids, rows.t, rows.draws)
        for w, n in wants:
            if w != o:
                continue
            if n:
                inv = 1.0 / sq.sqrt().clamp_min(1e-30)
                out[(o, n)] = {
                    name: g * inv.reshape(-1, *([1] * (g.ndim - 1))).to(g.dtype)
                    for name, g in grads.items()
                }
            else:
                out[(o, n)] = grads
    return out


@dataclass
class Rows:
    """One chunk of (sample, t, draw) rows: clean images ``(R, C, H, W)`` and int64 ``(R,)``s."""

    x0: Tensor
    ids: Tensor
    t: Tensor
    draws: Tensor


def per_step_features(
    model: Any,
    x0: Tensor,
    ids: Tensor,
    timesteps: list[int],
    args: FeaturizeArgs,
    class_labels: Tensor | None = None,
    keep_draws: bool = False,
) -> Tensor:
    """Projected per-timestep gradient features ``(B, S, k)`` (float32 or the projector dtype).

    ``x0``: ``(B, C, H, W)``, or ``(B, S, C, H, W)`` for a different clean image per step
    (Journey-TRAK); ``ids``: ``(B,)`` sample ids (seed per-sample noise); ``timesteps``: ``S``
    ints in ``[0, T)``; ``class_labels``: ``(B,)`` for a class-conditional model. Averaged over
    ``args.num_noise`` draws (``keep_draws``: not averaged, ``(B, S, D, k)``); each raw gradient
    unit-normalised first if ``args.normalize``.
    """
    args.validate()
    ids = torch.as_tensor(ids, dtype=torch.int64).flatten().cpu()
    B = int(ids.shape[0])
    if x0.ndim not in (4, 5) or x0.shape[0] != B:
        raise ValueError(
            f"per_step_features: x0 must be (B, C, H, W) or (B, S, C, H, W) with B = {B} ids, "
            f"got {tuple(x0.shape)}"
        )
    validate_timesteps(list(timesteps), int(model.scheduler.config.num_train_timesteps))
    timesteps = [int(v) for v in timesteps]
    S = len(timesteps)
    if x0.ndim == 5 and x0.shape[1] != S:
        raise ValueError(f"per_step_features: x0 has {x0.shape[1]} steps, timesteps has {S}")
    _check_images_and_labels(model, x0, class_labels, B, "per_step_features")
    proj, params = build_projector(model, args)
    device = model.device
    with eval_mode(model.unet):
        feats = _features(model, proj, params, x0, ids, timesteps, args, class_labels, device)
    return feats if keep_draws else feats.mean(dim=2)


def _check_images_and_labels(
    model: Any, x0: Tensor, class_labels: Tensor | None, n: int, what: str
) -> None:
    """Refuse inputs ``(..., C, H, W)`` the model does not take and a conditioning (class labels
    ``(n,)``, token ids ``(n, L)``) of another length."""
    if class_labels is not None and class_labels.shape[0] != n:
        raise ValueError(
            f"{what}: the conditioning has {class_labels.shape[0]} rows for {n} images"
        )
    image_shape = getattr(model, "image_shape", None)
    if image_shape is not None and tuple(x0.shape[-3:]) != tuple(image_shape):
        raise ValueError(
            f"{what}: images are {tuple(x0.shape[-3:])}, the model takes {tuple(image_shape)}"
        )


def row_features(
    model: Any,
    x0: Tensor,
    ids: Tensor,
    t: Tensor,
    args: FeaturizeArgs,
    class_labels: Tensor | None = None,
) -> Tensor:
    """Per-draw features ``(R, D, k)`` of explicit rows: clean image ``x0[r]`` ``(R, C, H, W)``
    of sample ``ids[r]`` at timestep ``t[r]``, ``D = args.num_noise`` noise draws each.

    Row ``r``'s features equal those :func:`per_step_features` gives the same image, id and
    timestep (same noise, same projector); the rows need not share timesteps, which lets a group
    of images split a timestep budget between its members (:mod:`~diffattr.attribution.groupfeat`).
    """
    args.validate()
    ids = torch.as_tensor(ids, dtype=torch.int64).flatten().cpu()
    t = torch.as_tensor(t, dtype=torch.int64).flatten().cpu()
    R, D = int(ids.shape[0]), args.num_noise
    if x0.ndim != 4 or x0.shape[0] != R or t.shape[0] != R:
        raise ValueError(
            f"row_features: x0 must be (R, C, H, W) with R = {R} ids and {R} timesteps, got "
            f"x0 {tuple(x0.shape)} and {t.shape[0]} timesteps"
        )
    validate_timesteps(sorted(set(t.tolist())), int(model.scheduler.config.num_train_timesteps))
    _check_images_and_labels(model, x0, class_labels, R, "row_features")
    proj, params = build_projector(model, args)
    b_idx = torch.arange(R).repeat_interleave(D)
    d_idx = torch.arange(D).repeat(R)
    with eval_mode(model.unet):
        feats = _row_features(
            model,
            proj,
            params,
            lambda sl: x0[b_idx[sl]],
            b_idx,
            t[b_idx],
            d_idx,
            ids,
            args,
            class_labels,
            model.device,
        )
    return feats.reshape(R, D, feats.shape[1])


def _features(
    model: Any,
    proj: AnyProjector,
    params: dict[str, torch.nn.Parameter],
    x0: Tensor,
    ids: Tensor,
    timesteps: list[int],
    args: FeaturizeArgs,
    class_labels: Tensor | None,
    device: torch.device,
) -> Tensor:
    """Body of :func:`per_step_features` (arguments already checked): ``(B, S, D, k)``."""
    B, S, D = int(ids.shape[0]), len(timesteps), args.num_noise
    # Rows in (sample, step, draw) order.
    b_idx = torch.arange(B).repeat_interleave(S * D)
    s_idx = torch.arange(S).repeat_interleave(D).repeat(B)
    d_idx = torch.arange(D).repeat(B * S)
    t_rows = torch.tensor(timesteps, dtype=torch.int64)[s_idx]

    def images(sl: slice) -> Tensor:
        bi = b_idx[sl]
        return x0[bi, s_idx[sl]] if x0.ndim == 5 else x0[bi]

    feats = _row_features(
        model, proj, params, images, b_idx, t_rows, d_idx, ids, args, class_labels, device
    )
    return feats.reshape(B, S, D, feats.shape[1])


def _row_features(
    model: Any,
    proj: AnyProjector,
    params: dict[str, torch.nn.Parameter],
    images: Callable[[slice], Tensor],
    b_idx: Tensor,
    t_rows: Tensor,
    d_idx: Tensor,
    ids: Tensor,
    args: FeaturizeArgs,
    class_labels: Tensor | None,
    device: torch.device,
) -> Tensor:
    """Features ``(R, k)`` of ``R`` explicit rows: row ``r`` is image ``images(r)`` (clean,
    ``(C, H, W)``) of sample ``b_idx[r]`` at timestep ``t_rows[r]`` with noise draw ``d_idx[r]``."""
    out: list[Tensor] = []
    # Dense projection regenerates its matrix blocks on every call (beyond the cache), so raw
    # gradients of several chunks are pooled (up to PROJECT_BUFFER_BYTES) and projected together.
    pending: list[tuple[dict[str, Tensor], Rows]] = []
    pending_bytes = 0

    def flush() -> None:
        nonlocal pending_bytes
        if not pending:
            return
        assert not isinstance(proj, KroneckerProjector)
        grads = {n: torch.cat([g[n] for g, _ in pending]) for n in pending[0][0]}
        feats = proj.project(grads)
        meta = [r for _, r in pending]
        check_finite(
            feats,
            "projected gradient",
            torch.cat([r.ids for r in meta]),
            torch.cat([r.t for r in meta]),
            torch.cat([r.draws for r in meta]),
        )
        out.append(feats)
        pending.clear()
        pending_bytes = 0

    for r0 in range(0, int(b_idx.shape[0]), args.batch_size):
        sl = slice(r0, r0 + args.batch_size)
        bi = b_idx[sl]
        rows = Rows(images(sl).to(device), ids[bi], t_rows[sl], d_idx[sl])
        labels = None if class_labels is None else class_labels[bi].to(device)
        want = (args.output, args.normalize)
        if isinstance(proj, KroneckerProjector):
            out.append(kronecker_batch(model, proj, rows, labels, [want], args)[0][want])
            continue
        grads = raw_batch(model, params, rows, labels, [want], args)[want]
        pending.append((grads, rows))
        pending_bytes += sum(g.numel() * g.element_size() for g in grads.values())
        if not isinstance(proj, DenseProjector) or pending_bytes >= PROJECT_BUFFER_BYTES:
            flush()
    flush()
    return torch.cat(out)


def aggregate(feats: Tensor, how: str) -> Tensor:
    """``(B, S, k)`` -> ``(B, k)`` mean over timesteps (``"mean"``) or unchanged (``"per-step"``)."""
    if feats.ndim != 3:
        raise ValueError(f"aggregate: features must be (B, S, k), got {tuple(feats.shape)}")
    if how == "mean":
        return feats.mean(dim=1)
    if how == "per-step":
        return feats
    raise ValueError(f"aggregate: {how!r} is not one of {AGGREGATES}")


def aggregate_samples(feats: Tensor, how: str) -> Tensor:
    """Per-draw features ``(B, S, D, k)`` -> ``(B, k)`` (``"mean"``: over draws, then steps),
    ``(B, S, k)`` (``"per-step"``) or ``(B, 2, k)`` (``"halves"``: :func:`split_halves`)."""
    if how == "halves":
        halves = split_halves(feats, "mean")
        if halves is None:
            raise ValueError(
                "aggregate 'halves' needs at least 2 (timestep, draw) samples per image, got "
                f"{feats.shape[1]} x {feats.shape[2]}"
            )
        return torch.stack(halves, dim=1)
    return aggregate(feats.mean(dim=2), how)


def merge_halves(halves: Tensor, samples: int) -> Tensor:
    """The all-sample mean ``(B, k)`` from ``"halves"`` features ``(B, 2, k)`` of ``samples``
    (timestep, draw) samples (the first half holds the extra one when ``samples`` is odd)."""
    a, b = (samples + 1) // 2, samples // 2
    if a == b:
        return halves.mean(dim=1)
    return (a * halves[:, 0] + b * halves[:, 1]) / samples


def split_halves(feats: Tensor, how: str) -> tuple[Tensor, Tensor] | None:
    """Two independent halves of per-draw features ``(B, S, D, k)``, aggregated as ``how``.

    ``"mean"``: the ``S * D`` (timestep, draw) samples, in timestep-major order, alternate between
    the halves (with one draw: even and odd timesteps; with two: draw 0 and draw 1 of every
    timestep), each half averaged -> two ``(B, k)``. ``"per-step"``: the draws of every step
    alternate -> two ``(B, S, k)``. ``None`` when there are not two samples to split.
    """
    if feats.ndim != 4:
        raise ValueError(f"split_halves: features must be (B, S, D, k), got {tuple(feats.shape)}")
    B, S, D, k = feats.shape
    if how == "mean":
        if S * D < 2:
            return None
        rows = feats.reshape(B, S * D, k)
        return rows[:, 0::2].mean(dim=1), rows[:, 1::2].mean(dim=1)
    if how == "per-step":
        if D < 2:
            return None
        return feats[:, :, 0::2].mean(dim=2), feats[:, :, 1::2].mean(dim=2)
    raise ValueError(f"split_halves: {how!r} is not one of {AGGREGATES}")


# ------------------------------------------------------------------------------- whole data sets


def store_identity(
    model: Any, data: Any, args: FeaturizeArgs, proj: AnyProjector, feature_shape: tuple[int, ...]
) -> dict[str, Any]:
    """Everything that decides a store's values (compared field by field when it is reopened)."""
    dense = args.projector.kind in ("gaussian", "rademacher")
    return {
        "label": args.label,
        "output": args.output,
        "timesteps": args.timesteps.timesteps(),
        "timestep_policy": to_jsonable(args.timesteps),
        "num_noise": args.num_noise,
        "noise": args.noise,
        "aggregate": args.aggregate,
        "normalize": args.normalize,
        "projector": args.projector.to_dict(),
        # Dense matrices come from the generator of the device (CPU vs CUDA Philox streams differ).
        "projector_device_type": model.device.type if dense else "any",
        "params": args.params,
        "seed": args.seed,
        "dtype": args.dtype,
        "shard_size": args.shard_size,
        "model_hash": model.model_hash(),
        "data_hash": data.data_hash(),
        "n": len(data),
        "feature_shape": list(feature_shape),
        "feature_dim": proj.dim,
    }


def featurize(
    model: Any,
    data: ImageDataset,
    out: str | Path,
    args: FeaturizeArgs,
    accelerator: Any = None,
    progress: bool = True,
    on_shard: Callable[[int], None] | None = None,
) -> FeatureStore:
    """Featurize every image of ``data`` into the resumable feature store at ``out``.

    Images are cut into shards of ``args.shard_size`` (in ``data`` order); shards already complete
    on disk are skipped, so rerunning after a kill computes only the missing ones. With an
    ``accelerator`` (``accelerate.Accelerator``) of ``world`` processes, shard ``i`` is computed by
    process ``i % world``; process 0 then checks every shard and marks the store complete.
    Returns the opened store (features ``(n, k)``, ``(n, S, k)`` for ``aggregate="per-step"``,
    ``(n, 2, k)`` for ``"halves"``).
    ``on_shard(i)`` is called after shard ``i`` is written (tests use it to simulate a kill).
    Raises :class:`StoreMismatchError` when ``out`` holds a store made otherwise.
    This is :func:`~diffattr.attribution.onepass.featurize_many` with one store (the same
    computation, so a store made alone and one made beside others are bit-identical).
    """
    from diffattr.attribution.onepass import StoreRequest, featurize_many

    return featurize_many(
        model,
        data,
        [StoreRequest(args, Path(out))],
        accelerator=accelerator,
        progress=progress,
        on_shard=on_shard,
    )[0]


def feature_store_spec(
    out: str | Path,
    identity: dict[str, Any],
    feature_shape: tuple[int, ...],
    args: FeaturizeArgs,
    proj: AnyProjector,
    extra: dict[str, Any] | None = None,
) -> StoreSpec:
    """The :class:`~diffattr.attribution.store.StoreSpec` of gradient features made with
    ``args`` and ``proj``: the store's dtype, label, batch size and projector record come from
    them."""
    return StoreSpec(
        Path(out),
        identity,
        tuple(feature_shape),
        label=args.label,
        extra={"batch_size": args.batch_size, **(extra or {})},
        manifest_extra={"projector_info": to_jsonable(projector_info(proj))},
        dtype=STORE_TORCH_DTYPES[args.dtype],
    )


def fill_feature_store(
    out: str | Path,
    identity: dict[str, Any],
    ids: Tensor,
    shard_size: int,
    compute: Callable[[slice], Tensor],
    feature_shape: tuple[int, ...],
    args: FeaturizeArgs,
    proj: AnyProjector,
    progress: bool = True,
    accelerator: Any = None,
    on_shard: Callable[[int], None] | None = None,
    unit: str = "image",
    extra: dict[str, Any] | None = None,
) -> FeatureStore:
    """:func:`~diffattr.attribution.store.fill_store` of gradient features made with ``args``
    and ``proj`` (their record: :func:`feature_store_spec`)."""
    spec = feature_store_spec(out, identity, feature_shape, args, proj, extra)
    return fill_store(
        spec.out,
        spec.identity,
        ids,
        shard_size,
        compute,
        spec.feature_shape,
        progress=progress,
        label=spec.label,
        accelerator=accelerator,
        extra=spec.extra,
        manifest_extra=spec.manifest_extra,
        dtype=spec.dtype,
        on_shard=on_shard,
        unit=unit,
    )
