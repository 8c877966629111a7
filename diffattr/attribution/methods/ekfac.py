"""Influence functions with an (E)K-FAC GGN (``ekfac``, ``kfac``).

After Mlodozeniec et al., "Influence Functions for Scalable Data Attribution in Diffusion Models"
(ICLR 2025; code BrunoKM/diffusion-influence):

    score(q, i) = grad m(q)^T (G + lambda I)^-1 grad L(z_i)

``m``: the query's measurement (``measurement``: the denoising ``loss``, the ``elbo``-weighted
loss, or D-TRAK's ``square`` output ``mean eps^2``, not a loss, offered to test whether D-TRAK's
gain over TRAK comes from the query's function), ``L``: the training image's denoising loss, both averaged over the configured timesteps and
noise draws with the package's shared noise (like every gradient method); ``G``: the GGN of the
training loss, block-diagonal over the Linear / Conv2d layers (attention projections included;
biases as an extra input column of ones; norm scales and embeddings left out), each block
K-FAC-expand factored and, for ``ekfac``, eigenvalue-corrected (``kfac``: without the correction);
``lambda``: per layer, ``damping`` (0.1) times the mean eigenvalue, fixed in advance (see
:mod:`diffattr.attribution.curvature` for the formulas and why). Higher = training on ``z_i``
lowers the query's measurement (the package-wide sign: upweighting ``z_i`` moves the parameters by
``-(G + lambda I)^-1 grad L(z_i)``, which changes ``m`` by minus the score).

Fit, once per model and training set, each part in its own resumable store of the work folder
(identity: model hash, data hash and the options that decide it; another model gets another folder,
reopening a folder with other values is refused naming the field):

1. **Factors**: ``factor_passes`` passes over the training set; in pass ``p`` every image gets one
   timestep drawn uniformly from ``[0, T)`` (the training distribution, not ``t_min``: ``G`` is the
   curvature of the training loss), one noise and one Monte-Carlo output vector, all seeded by
   ``(seed, id, p)``. A store row per pass holds that pass's mean ``A`` and ``S`` of every layer.
2. **Eigenvalues** (``ekfac`` only): the same draws again, in the eigenbasis of the mean factors.
3. **Training gradients**: the projected, timestep-averaged loss gradients, exactly as
   ``grad-dot`` computes them (same store layout; with ``stability`` the two half means).

Scoring a query: its measurement gradient per layer (summed separately over the two interleaved
halves of its (timestep, draw) samples) is preconditioned, ``Q_S ((Q_S^T g Q_A) / (lambda_ij +
damping)) Q_A^T``, and dotted with the training features. The full score and the two half scores
(the stability figure) come from the same two preconditioned sums. Where the GGN lives
(``space``):

- ``projected`` (default; LoGra-style, Choe et al. 2024): the GGN of the *projected* layer, i.e.
  of the gradients ``P_out^T G P_in`` the ``kronecker`` projector produces (factors of
  ``P_in^T a`` and ``P_out^T s``, ``k_in x k_in`` and ``k_out x k_out``); the query's projected
  gradient is preconditioned there. TRAK likewise inverts in the projected space.
- ``full``: the GGN of the full layer; the query's full gradient ``(d_out, d_in)`` is
  preconditioned, then projected (``P_out^T g P_in``) and dotted with the projected training
  gradients: ``<P g_pre, P g_i>`` approximates ``<g_pre, g_i>`` by Johnson-Lindenstrauss.

With ``projector: identity`` both are the exact formula (all factored parameters, no projection).
Measured on the tiny test UNet (26k parameters, 40 training images, 8 queries, 20 timesteps,
mean Spearman of each query's scores against the exact ones; ekfac): ``projected`` 0.61 / 0.79 /
0.86 / 0.94 at ``proj_dim`` 256 / 1024 / 4096 / 16384, ``full`` 0.36 / 0.45 / 0.60 / 0.81, at the
same cost (fit 3.5-4.5 s, exact: 6.4 s). ``full`` is worse because the preconditioned query
gradient points into low-curvature directions the training gradients hardly have, so their inner
product is small against the norms that set the projection's error. On the digits-2 model (651k
parameters, 290 images, one CPU thread) one factor pass takes 2.7 s projected (2048 dims) and
6.8 s full, the eigenvalue pass the same again, a query 1 s (100 timesteps).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
from torch import Tensor
from tqdm.auto import tqdm

from diffattr.attribution.base import Queries
from diffattr.attribution.conditioning import (
    data_condition,
    dataset_inputs,
    model_inputs,
    prediction_target,
)
from diffattr.attribution.curvature import (
    LayerCurvature,
    curvature_layers,
    eigen_sums,
    eigenbasis,
    factor_sums,
    kfac_eigen,
    output_grads,
    sample_grads,
)
from diffattr.attribution.featurize import FeaturizeArgs, build_projector, row_noise
from diffattr.attribution.gradients import default_params, scheduler_tables
from diffattr.attribution.methods.common import (
    FeatureAttributor,
    GradientOptions,
    QueryFeatures,
    Scorer,
    check_int,
    content_ids,
    kernel_device,
    make_featurize_args,
    query_condition,
    short_hash,
)
from diffattr.attribution.outputs import OUTPUTS
from diffattr.attribution.projectors import (
    KroneckerProjector,
    output_gradients,
    outputs_in_graph,
)
from diffattr.attribution.scoring import dot_scores
from diffattr.attribution.store import StoreMismatchError, fill_store
from diffattr.attribution.timesteps import noise_for, validate_timesteps
from diffattr.data.dataset import ImageDataset
from diffattr.diffusion.model import eval_mode
from diffattr.repro import derive_seed

MEASUREMENTS = ("loss", "elbo", "square")

SPACES = ("projected", "full")

# layer name -> (Q_A, Q_S) eigenbases, or None for the factor pass
Bases = dict[str, tuple[Tensor, Tensor]] | None


@dataclass
class CurvatureSpace:
    """Where each layer's GGN is factored: ``dims`` name -> ``(d_out, d_in)`` of that space and
    ``proj``: None for the full layer space, else the Kronecker projector whose per-layer
    ``P_in`` / ``P_out`` map the per-position rows into the projected space (LoGra-style: the
    GGN of the projected layer, ``k_out x k_in``)."""

    dims: dict[str, tuple[int, int]]
    proj: KroneckerProjector | None = None

    @classmethod
    def of(cls, layers: KroneckerProjector, proj: KroneckerProjector | None) -> CurvatureSpace:
        if proj is None:
            return cls({ly.name: (ly.d_out, ly.d_in) for ly in layers.layers})
        return cls({ly.name: (ly.k_out, ly.k_in) for ly in proj.layers}, proj)

    def gradient_rows(
        self,
        layers: KroneckerProjector,
        calls: dict[str, list[tuple[Tensor, Tensor]]],
        total: Tensor,
    ) -> dict[str, tuple[Tensor, Tensor]]:
        """Per layer, the per-position rows ``(B, P, d_in)`` and ``(B, P, d_out)`` in this space
        of the gradient of ``total`` (``calls``: what ``layers.capture()`` recorded).

        Projected rows ``P_in^T a`` / ``P_out^T s`` come straight from the layer input (for a
        conv, one convolution with ``P_in`` as its kernels) in the projector's dtype, exactly as
        the training features are made, never through the im2col patches (9x the activation
        memory for a 3x3 conv)."""
        if self.proj is None:
            return output_grads(layers, calls, total)
        pairs = output_gradients(layers, calls, total)
        out: dict[str, tuple[Tensor, Tensor]] = {}
        for ly in self.proj.layers:
            parts = [self.proj.factors(ly, a, g) for a, g in pairs[ly.name]]
            out[ly.name] = (
                torch.cat([a for a, _ in parts], 1),
                torch.cat([g for _, g in parts], 1),
            )
        return out

    def identity(self) -> dict[str, Any]:
        """What of the space decides the curvature's values (part of the store identities)."""
        if self.proj is None:
            return {"space": None}
        return {"space": self.proj.config.to_dict(), "rows": "factored"}


@dataclass
class InfluenceOptions(GradientOptions):
    """The shared gradient options plus: ``measurement`` (``loss``, ``elbo`` or ``square``: the
    query's function whose influence is measured); ``output``: the function differentiated for the
    training images (default ``loss``, what influence functions prescribe; ``square`` mirrors
    D-TRAK, the GGN staying that of the loss); ``factor_passes``: passes over the training set for
    the GGN (one (timestep, noise, output vector) per image and pass); ``damping``: per-layer
    damping as a fraction of the layer's mean eigenvalue (fixed rule, not tuned); ``space``:
    ``projected`` (GGN of the Kronecker-projected layers) or ``full`` (module docstring)."""

    measurement: str = "loss"
    output: str = "loss"
    factor_passes: int = 5
    damping: float = 0.1
    space: str = "projected"

    def __post_init__(self) -> None:
        super().__post_init__()
        for what, value in (("measurement", self.measurement), ("output", self.output)):
            if value not in MEASUREMENTS:
                raise ValueError(f"{what}: {value!r} is unknown; expected one of {MEASUREMENTS}")
        check_int(self.factor_passes, "factor_passes")
        if self.space not in SPACES:
            raise ValueError(f"space: {self.space!r} is unknown; expected one of {SPACES}")
        if self.space == "projected" and self.projector not in ("kronecker", "identity"):
            raise ValueError(
                f"space: 'projected' needs projector kronecker (or identity), got {self.projector!r}"
            )
        try:
            self.damping = float(self.damping)
        except (TypeError, ValueError):
            raise ValueError(f"damping: expected a number > 0, got {self.damping!r}") from None
        if not (math.isfinite(self.damping) and self.damping > 0):
            raise ValueError(f"damping: expected a finite number > 0, got {self.damping!r}")


@dataclass
class EKFACOptions(InfluenceOptions):
    """Options of ``ekfac`` (:class:`InfluenceOptions`)."""


@dataclass
class KFACOptions(InfluenceOptions):
    """Options of ``kfac`` (:class:`InfluenceOptions`)."""


# ---------------------------------------------------------------------------------- GGN passes


def pass_draws(
    seed: int, ids: list[int], p: int, shape: tuple[int, ...], T: int
) -> tuple[Tensor, Tensor, Tensor]:
    """Pass ``p``'s draws for images ``ids``: timesteps ``(B,)`` uniform in ``[0, T)``, noise and
    Monte-Carlo output vectors ``v = sqrt(2/D) z`` ``(B, *shape)``, each seeded by ``(seed, id, p)``
    (independent of the batch an image is in)."""
    D = math.prod(shape)
    ts = [derive_seed(seed, "ggn-t", i, p) % T for i in ids]
    noise = torch.stack(
        [
            noise_for(derive_seed(seed, "ggn-noise"), i, t, p, shape)
            for i, t in zip(ids, ts, strict=True)
        ]
    )
    vecs = []
    for i in ids:
        g = torch.Generator().manual_seed(derive_seed(seed, "ggn-v", i, p))
        vecs.append(torch.randn(shape, generator=g))
    return torch.tensor(ts, dtype=torch.int64), noise, torch.stack(vecs) * math.sqrt(2.0 / D)


def pseudo_grad_rows(
    model: Any,
    layers: KroneckerProjector,
    x0: Tensor,
    t: Tensor,
    noise: Tensor,
    vecs: Tensor,
    labels: Tensor | None,
    space: CurvatureSpace | None = None,
) -> dict[str, tuple[Tensor, Tensor]]:
    """Per layer, inputs ``(B, P, d_in)`` and output pseudo-gradients ``(B, P, d_out)``: the
    gradients of ``sum(eps * v)`` (``E[v v^T]`` = the loss's output Hessian), in ``space``
    (None: the full layer space, on the model's device and dtype)."""
    with layers.capture() as calls, torch.enable_grad(), outputs_in_graph(layers):
        x_t = model.scheduler.add_noise(x0, noise, t)
        eps = model.eps(x_t.detach(), t, labels)
        total = (eps * vecs.to(eps.dtype)).sum()
        if space is None:
            return output_grads(layers, calls, total)
        return space.gradient_rows(layers, calls, total)


def pass_rows(
    model: Any,
    layers: KroneckerProjector,
    train: ImageDataset,
    p: int,
    seed: int,
    batch_size: int,
    space: CurvatureSpace | None = None,
) -> Iterator[dict[str, tuple[Tensor, Tensor]]]:
    """Pass ``p``'s :func:`pseudo_grad_rows` over ``train``, a batch at a time, images in id order
    (so sums do not depend on the data set's order); draws from :func:`pass_draws`."""
    T = int(model.scheduler.config.num_train_timesteps)
    dev = model.device
    labels = data_condition(model, train, slice(None))
    inputs = dataset_inputs(model, train)  # a latent model's VAE latents
    order = torch.argsort(train.ids)
    for s in range(0, len(order), batch_size):
        rows = order[s : s + batch_size]
        ids = [int(i) for i in train.ids[rows].tolist()]
        t, noise, vecs = pass_draws(seed, ids, p, tuple(inputs.shape[1:]), T)
        x0 = inputs[rows].to(dev)
        y = None if labels is None else labels[rows].to(dev)
        yield pseudo_grad_rows(model, layers, x0, t.to(dev), noise.to(x0), vecs.to(x0), y, space)


def ggn_pass(
    model: Any,
    layers: KroneckerProjector,
    train: ImageDataset,
    p: int,
    seed: int,
    batch_size: int,
    bases: Bases = None,
    space: CurvatureSpace | None = None,
) -> dict[str, list[Tensor]]:
    """Pass ``p`` over ``train``. Without ``bases``: per layer ``[A, S]`` means over the images
    (K-FAC-expand normalisation, :mod:`diffattr.attribution.curvature`); with ``bases``:
    ``[lambda]``, the mean ``(Q_S^T G_n Q_A)^2``; in ``space`` (None: the full layer space).
    float64 on :func:`kernel_device`."""
    kdev = kernel_device(model)
    sums: dict[str, list[Tensor]] = {}
    for got in pass_rows(model, layers, train, p, seed, batch_size, space):
        for name, (cols, grads) in got.items():
            if bases is None:
                stats = list(factor_sums(cols, grads))
            else:
                stats = [eigen_sums(cols, grads, *bases[name])]
            stats = [v.to(kdev, torch.float64) for v in stats]
            old = sums.get(name)
            sums[name] = stats if old is None else [o + v for o, v in zip(old, stats, strict=True)]
    return {name: [v / len(train) for v in vals] for name, vals in sums.items()}


def flatten_stats(stats: dict[str, list[Tensor]], layers: KroneckerProjector) -> Tensor:
    """One store row ``(F,)`` float32 on the CPU: every layer's tensors flattened, layer order."""
    return torch.cat([v.flatten() for ly in layers.layers for v in stats[ly.name]]).float().cpu()


def unflatten_stats(
    row: Tensor, layers: KroneckerProjector, shapes: Callable[[str], list[tuple[int, ...]]]
) -> dict[str, list[Tensor]]:
    """Inverse of :func:`flatten_stats` (``shapes(name)``: the layer's tensor shapes)."""
    out: dict[str, list[Tensor]] = {}
    pos = 0
    for ly in layers.layers:
        out[ly.name] = []
        for shp in shapes(ly.name):
            size = math.prod(shp)
            out[ly.name].append(row[pos : pos + size].reshape(shp))
            pos += size
    if pos != row.numel():
        raise ValueError(f"curvature store row has {row.numel()} values, the layers need {pos}")
    return out


def factor_identity(
    model: Any, space: CurvatureSpace, train: ImageDataset, passes: int, seed: int
) -> dict[str, Any]:
    """What decides the factors (compared field by field when a factor store is reopened)."""
    return {
        "what": "kfac-factors",
        "model_hash": model.model_hash(),
        "data_hash": train.data_hash(),
        "n": len(train),
        "layers": [[name, d_out, d_in] for name, (d_out, d_in) in space.dims.items()],
        **space.identity(),
        "factor_passes": passes,
        "seed": seed,
        "ggn": "monte-carlo, one output vector per (image, pass); t uniform in [0, T)",
    }


def curvature_store(
    folder: Path,
    identity: dict[str, Any],
    passes: int,
    row_size: int,
    compute_pass: Callable[[int], Tensor],
    progress: bool,
) -> Tensor:
    """``(passes, row_size)`` float64 rows from the resumable store at ``folder`` (a shard per
    pass: a kill loses at most the pass in progress). Raises ``StoreMismatchError`` naming the
    field when ``folder`` was made with another ``identity``."""
    try:
        store = fill_store(
            folder,
            identity,
            torch.arange(passes),
            shard_size=1,
            compute=lambda sl: torch.stack([compute_pass(p) for p in range(sl.start, sl.stop)]),
            feature_shape=(row_size,),
            progress=progress,
            label=str(identity["what"]),
        )
    except StoreMismatchError as exc:
        # The store's message lists one differing field per line; say it in one line.
        raise StoreMismatchError(" ".join(ln.strip() for ln in str(exc).splitlines())) from None
    return store.features.to(torch.float64)


# ------------------------------------------------------------------------------- query gradients


def query_grad_sums(
    model: Any,
    layers: KroneckerProjector,
    image: Tensor,
    image_id: int,
    label: Tensor | None,
    args: FeaturizeArgs,
    space: CurvatureSpace | None = None,
) -> list[dict[str, Tensor]]:
    """The measurement's per-layer gradients ``(d_out, d_in)`` of one image ``(C, H, W)``,
    summed over the (timestep, draw) samples of ``args`` split into two interleaved halves
    (sample ``j`` in timestep-major order goes to half ``j % 2``, as
    :func:`~diffattr.attribution.featurize.split_halves`); one sum when there is one sample.
    Noise: the featurizer's (:func:`~diffattr.attribution.featurize.row_noise`). In ``space``
    (None: the full layer space). float64 on :func:`kernel_device`."""
    timesteps = args.timesteps.timesteps()
    D = args.num_noise
    t_all = torch.tensor(timesteps, dtype=torch.int64).repeat_interleave(D)
    d_all = torch.arange(D).repeat(len(timesteps))
    n = int(t_all.shape[0])
    halves = 2 if n >= 2 else 1
    dev, kdev = model.device, kernel_device(model)
    ac, betas = scheduler_tables(model, dev, torch.float32)
    out_fn = OUTPUTS[args.output]
    sums: list[dict[str, Tensor]] = [{} for _ in range(halves)]
    for r0 in range(0, n, args.batch_size):
        t, d = t_all[r0 : r0 + args.batch_size], d_all[r0 : r0 + args.batch_size]
        ids = torch.full_like(t, image_id)
        noise = row_noise(ids, t, d, tuple(image.shape), args.seed, args.noise).to(dev)
        x0 = image[None].expand(len(t), *image.shape).to(dev)
        noise = noise.to(x0.dtype)
        y = None if label is None else label[None].expand(len(t), *label.shape).to(dev)
        t_dev = t.to(dev)
        target = prediction_target(model, x0, noise, t_dev)
        with layers.capture() as calls, torch.enable_grad(), outputs_in_graph(layers):
            eps = model.eps(model.scheduler.add_noise(x0, noise, t_dev).detach(), t_dev, y)
            total = out_fn(eps, target, t_dev, ac.to(eps.dtype), betas.to(eps.dtype)).sum()
            if space is None:
                rows = output_grads(layers, calls, total)
            else:
                rows = space.gradient_rows(layers, calls, total)
        which = (torch.arange(r0, r0 + len(t)) % halves).to(dev)
        for name, (cols, grads) in rows.items():
            per_row = sample_grads(cols, grads)
            for h in range(halves):
                part = per_row[which == h].to(kdev, torch.float64).sum(dim=0)
                sums[h][name] = part if name not in sums[h] else sums[h][name] + part
    return sums


def project_layers(
    proj: Any, layers: KroneckerProjector, grads: dict[str, Tensor], unet: torch.nn.Module
) -> Tensor:
    """Project per-layer gradients ``(d_out, d_in)`` like the training features: ``(k,)`` float64.

    ``kronecker``: ``P_out^T g P_in`` per layer, row-major, in layer order (what the projector
    computes from activations, see :mod:`diffattr.attribution.projectors`). Other projectors:
    ``[W | b]`` split back into the parameters' shapes and projected by ``proj.project``."""
    if isinstance(proj, KroneckerProjector):
        blocks = []
        for ly in proj.layers:
            g = grads[ly.name]
            p_in, p_out = proj.matrices(ly, g.device)
            blocks.append((p_out.to(g.dtype).T @ g @ p_in.to(g.dtype)).flatten())
        return torch.cat(blocks)
    params = dict(unet.named_parameters())
    named: dict[str, Tensor] = {}
    for ly in layers.layers:
        g = grads[ly.name]
        w = params[ly.weight_name]
        named[ly.weight_name] = g[:, : w[0].numel()].reshape(1, *w.shape)
        if ly.bias_name is not None:
            named[ly.bias_name] = g[:, -1].reshape(1, -1)
    return proj.project(named)[0].to(torch.float64)


# ------------------------------------------------------------------------------------ the method


class EKFAC(FeatureAttributor):
    """``ekfac``: influence functions with the eigenvalue-corrected K-FAC GGN (module docstring)."""

    name: str = "ekfac"
    corrected: ClassVar[bool] = True
    options: InfluenceOptions

    def __init__(self, model: Any, work_dir: Path | None, options: Any, progress: bool = False):
        super().__init__(model, work_dir, options, progress)
        params = options.params if options.params is not None else default_params(model)
        self.layers = curvature_layers(model.unet, params)
        self.curvature: dict[str, LayerCurvature] = {}

    def train_args(self) -> FeaturizeArgs:
        args = make_featurize_args(self.options, self.model, self.options.output, self.name)
        if args.projector.kind != "kronecker":
            # Other projectors cover every selected parameter; only the factored ones have a
            # preconditioned query gradient, so select exactly those (by full name).
            args = replace(args, params=list(self.layers.covered))
        return args

    def query_args(self) -> FeaturizeArgs:
        return replace(super().query_args(), output=self.options.measurement)

    def projector(self) -> Any:
        """The training features' projector (the same object the featurizer uses)."""
        return build_projector(self.model, self.train_args())[0]

    def space(self) -> CurvatureSpace:
        """The curvature space: the projected layers (``space="projected"`` with the kronecker
        projector), else the full layers."""
        proj = self.projector()
        projected = self.options.space == "projected" and isinstance(proj, KroneckerProjector)
        return CurvatureSpace.of(self.layers, proj if projected else None)

    def build(self, train_feats: Tensor, train: ImageDataset, part: int | None) -> Scorer:
        if part is None:
            self.info["timesteps"] = self.train_args().timesteps.timesteps()
            self.info["query_timesteps"] = self.query_args().timesteps.timesteps()
        return lambda q: dot_scores(train_feats, q)

    def fit(self, train: ImageDataset) -> None:
        """GGN factors (and eigenvalues), then the training gradients (each from its store)."""
        self.check_train(train)
        t0 = time.perf_counter()
        with eval_mode(self.model.unet):
            self.fit_curvature(train, self.space())
        self.timing["curvature_s"] = time.perf_counter() - t0
        super().fit(train)

    def fit_curvature(self, train: ImageDataset, space: CurvatureSpace) -> None:
        """Fit the curvature that :meth:`precondition` applies (and say its damping in ``info``)."""
        self.curvature = self.layer_curvature(train, space)
        damp = [c.damping for c in self.curvature.values()]
        self.info["damping"] = {
            "rule": f"{self.options.damping} x mean eigenvalue, per layer",
            "median": float(np.median(damp)),
        }
        self.info["layers"] = len(self.curvature)

    def precondition(self, grads: dict[str, Tensor]) -> dict[str, Tensor]:
        """``(G + damping)^-1`` applied to per-layer gradients ``(d_out, d_in)`` of the curvature
        space (float64)."""
        return {n: self.curvature[n].precondition(g) for n, g in grads.items()}

    def layer_curvature(
        self, train: ImageDataset, space: CurvatureSpace
    ) -> dict[str, LayerCurvature]:
        """Per layer :class:`LayerCurvature` from the factor (and eigenvalue) stores."""
        o = self.options
        ident = factor_identity(self.model, space, train, o.factor_passes, o.seed)
        folder = self.work.sub(f"influence-factors-{short_hash(ident)}")
        sizes = sum(d_in**2 + d_out**2 for d_out, d_in in space.dims.values())

        def factors(p: int) -> Tensor:
            stats = ggn_pass(self.model, self.layers, train, p, o.seed, o.batch_size, space=space)
            return flatten_stats(stats, self.layers)

        rows = curvature_store(folder, ident, o.factor_passes, sizes, factors, self.progress)
        self.info["factor_store"] = None if self.work.temporary else str(folder)
        mean = unflatten_stats(
            rows.mean(dim=0),
            self.layers,
            lambda n: [(space.dims[n][1],) * 2, (space.dims[n][0],) * 2],
        )
        dev = kernel_device(self.model)
        eig = {n: eigenbasis(A.to(dev), S.to(dev)) for n, (A, S) in mean.items()}
        if not self.corrected:
            return {
                n: LayerCurvature.build(qa, qs, kfac_eigen(ea, es), o.damping)
                for n, (ea, qa, es, qs) in eig.items()
            }
        return self.corrected_curvature(train, space, ident, eig)

    def corrected_curvature(
        self,
        train: ImageDataset,
        space: CurvatureSpace,
        ident: dict[str, Any],
        eig: dict[str, tuple[Tensor, Tensor, Tensor, Tensor]],
    ) -> dict[str, LayerCurvature]:
        """EK-FAC eigenvalues from the same draws as the factors, in their eigenbasis."""
        o = self.options
        ident = {**ident, "what": "ekfac-eigenvalues"}
        folder = self.work.sub(f"influence-eigen-{short_hash(ident)}")
        bases = {n: (qa, qs) for n, (_, qa, _, qs) in eig.items()}
        size = sum(d_in * d_out for d_out, d_in in space.dims.values())

        def eigen(p: int) -> Tensor:
            stats = ggn_pass(
                self.model, self.layers, train, p, o.seed, o.batch_size, bases=bases, space=space
            )
            return flatten_stats(stats, self.layers)

        rows = curvature_store(folder, ident, o.factor_passes, size, eigen, self.progress)
        self.info["eigen_store"] = None if self.work.temporary else str(folder)
        lam = unflatten_stats(rows.mean(dim=0), self.layers, lambda n: [space.dims[n]])
        dev = kernel_device(self.model)
        return {
            n: LayerCurvature.build(qa, qs, lam[n][0].to(dev), o.damping)
            for n, (qa, qs) in bases.items()
        }

    def query_features(self, queries: Queries) -> QueryFeatures:
        """Projected preconditioned measurement gradients ``(m, k)`` and their two halves."""
        args = self.query_args()
        validate_timesteps(
            args.timesteps.timesteps(), int(self.model.scheduler.config.num_train_timesteps)
        )
        labels = query_condition(self.model, queries)
        ids = content_ids(queries.images)
        inputs = model_inputs(self.model, queries.images)  # a latent model's VAE latents
        space = self.space()
        t0 = time.perf_counter()
        full, half_a, half_b = [], [], []
        with eval_mode(self.model.unet):
            for j in tqdm(
                range(len(queries)), desc=f"{self.name} queries", disable=not self.progress
            ):
                y = None if labels is None else labels[j]
                parts = self.one_query(space, inputs[j], int(ids[j]), y, args)
                full.append(parts[0])
                if len(parts) == 3:
                    half_a.append(parts[1])
                    half_b.append(parts[2])
        self.timing["featurize_queries_s"] = time.perf_counter() - t0
        halves = (torch.stack(half_a), torch.stack(half_b)) if half_a else None
        return QueryFeatures(torch.stack(full), halves)

    def one_query(
        self,
        space: CurvatureSpace,
        image: Tensor,
        image_id: int,
        label: Tensor | None,
        args: FeaturizeArgs,
    ) -> list[Tensor]:
        """``[full]`` or ``[full, half 0, half 1]`` features ``(k,)`` float32 of one query.

        Preconditioning and projection are linear, so each half's sum is preconditioned and
        projected once and the full mean is their sum over the sample count."""
        sums = query_grad_sums(self.model, self.layers, image, image_id, label, args, space)
        proj_sums = []
        for s in sums:
            pre = self.precondition(s)
            if space.proj is not None:
                # already projected: the blocks in the features' layout (k_out x k_in, row-major)
                proj_sums.append(torch.cat([pre[ly.name].flatten() for ly in self.layers.layers]))
            else:
                proj_sums.append(
                    project_layers(self.projector(), self.layers, pre, self.model.unet)
                )
        n = len(args.timesteps.timesteps()) * args.num_noise
        if len(proj_sums) == 1:
            return [(proj_sums[0] / n).float().cpu()]
        counts = ((n + 1) // 2, n // 2)
        full = (proj_sums[0] + proj_sums[1]) / n
        return [full.float().cpu()] + [
            (s / c).float().cpu() for s, c in zip(proj_sums, counts, strict=True)
        ]


class KFAC(EKFAC):
    """``kfac``: the same with K-FAC's eigenvalues (products of the factors' eigenvalues)."""

    name: str = "kfac"
    corrected: ClassVar[bool] = False
