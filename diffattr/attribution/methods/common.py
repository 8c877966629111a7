"""What the gradient methods share: options, feature folders, query featurization, the base class.

The common composition is: featurize the training set into a :class:`FeatureStore` inside
``work_dir`` (one subfolder per method and settings, reused when it exists), featurize the queries in
memory with the same settings, and score with a kernel. :class:`FeatureAttributor` implements it;
a method supplies its featurization settings and its kernel.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor
from tqdm.auto import tqdm

from diffattr.attribution.base import Queries, Scores
from diffattr.attribution.conditioning import condition, model_inputs
from diffattr.attribution.featurize import (
    FeatureStore,
    FeaturizeArgs,
    aggregate,
    featurize,
    merge_halves,
    per_step_features,
    split_halves,
)
from diffattr.attribution.gradients import default_params, select_params
from diffattr.attribution.onepass import StoreRequest
from diffattr.attribution.projectors import PROJECTOR_KINDS, ProjectorConfig
from diffattr.attribution.timesteps import TimestepPolicy, check_noise_policy
from diffattr.data.dataset import ImageDataset
from diffattr.repro import derive_seed, to_jsonable

log = logging.getLogger(__name__)


def check_int(value: Any, what: str, low: int = 1) -> None:
    """Refuse anything but an int >= ``low`` (bools included), naming the option."""
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ValueError(f"{what}: expected an int >= {low}, got {value!r}")


@dataclass
class BaseGradOptions:
    """Gradient settings every gradient method shares.

    ``num_noise``: noise draws averaged per timestep (training features). ``noise``: ``shared``
    (every image gets the same noise at a given (seed, timestep, draw), D-TRAK's protocol) or
    ``per-sample`` (independent noise per image). ``projector`` / ``proj_dim`` / ``proj_seed``: the
    random projection of gradients to ``proj_dim`` dimensions (``kronecker``: the fast
    layer-factored one; ``gaussian`` / ``rademacher``: dense; ``identity`` keeps all of them).
    ``params``: fnmatch patterns of the UNet parameters to differentiate (None: all).
    ``batch_size``: gradient rows per call. ``seed``: seeds the noise. ``stability``: also score
    with two independent halves of the (timestep, noise) samples, training and query side alike,
    and report how far their rankings agree (:class:`~diffattr.attribution.base.Stability`);
    the store then keeps the two half means (twice the disk) and the kernel is built three times.
    """

    num_noise: int = 1
    noise: str = "shared"
    projector: str = "kronecker"
    proj_dim: int = 2048
    proj_seed: int = 0
    params: list[str] | None = None
    batch_size: int = 16
    seed: int = 0
    stability: bool = True

    def __post_init__(self) -> None:
        check_int(self.num_noise, "num_noise")
        if not isinstance(self.stability, bool):
            raise ValueError(f"stability: expected true or false, got {self.stability!r}")
        check_int(self.proj_dim, "proj_dim")
        check_int(self.batch_size, "batch_size")
        check_noise_policy(self.noise)
        if self.projector not in PROJECTOR_KINDS:
            raise ValueError(
                f"projector: {self.projector!r} is unknown; expected one of {PROJECTOR_KINDS}"
            )
        if self.params is not None:
            if isinstance(self.params, str):
                self.params = [self.params]
            self.params = [str(p) for p in self.params]


def _as_float(value: Any, what: str) -> float:
    try:
        out = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{what}: expected a number, got {value!r}") from None
    if not np.isfinite(out):
        raise ValueError(f"{what}: expected a finite number, got {value!r}")
    return out


def _check_lambda(lam: float | None, lambda_scale: float) -> None:
    if lam is not None and _as_float(lam, "lam") < 0:
        raise ValueError(f"lam: expected a finite value >= 0 or None, got {lam!r}")
    if _as_float(lambda_scale, "lambda_scale") <= 0:
        raise ValueError(f"lambda_scale: expected > 0, got {lambda_scale!r}")


@dataclass
class GradientOptions(BaseGradOptions):
    """Plus the timesteps: ``timesteps`` evenly spaced ones in ``[t_min, T)``
    (``timestep_kind="uniform"``) or drawn at random (``"random"``); ``timestep_values`` gives an
    explicit list instead. ``t_min`` None: ``T // 10``; ``t_max`` None: ``T`` (else the
    uniform timesteps lie in ``[t_min, t_max)``). A schedule with fewer than ``timesteps``
    timesteps in ``[t_min, T)`` uses all of them.

    Query budget: queries are few, so their features may average more samples than the training
    features: ``query_timesteps`` timesteps (same kind and range; None: ``timesteps``) times
    ``query_num_noise`` draws (None: ``num_noise``). Under shared noise the query's samples include
    the training samples' (timestep, noise) pairs when ``query_timesteps`` is a multiple of
    ``timesteps`` and ``query_num_noise >= num_noise``.

    Why the query budget defaults to the training one and ``timesteps`` to 100: measured on the
    demo model, two noise seeds share 3.6 of the top-10 at 10 timesteps and 7.8 at 100 (d-trak),
    while a query budget above the training budget *lowers* that agreement (100 training / 500
    query timesteps: 5.6 of 10): with shared noise the query and training features see the same
    draws (common random numbers) and their sampling errors largely cancel in the scores; extra
    query-only draws break that. README, "Stability", has the table.
    """

    timesteps: int = 100
    timestep_kind: str = "uniform"
    timestep_values: list[int] | None = None
    t_min: int | None = 0
    t_max: int | None = None
    query_timesteps: int | None = None
    query_num_noise: int | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        check_int(self.timesteps, "timesteps")
        if self.t_min is not None and (
            isinstance(self.t_min, bool) or not isinstance(self.t_min, int) or self.t_min < 0
        ):
            raise ValueError(f"t_min: expected an int >= 0 or null, got {self.t_min!r}")
        if self.t_max is not None:
            check_int(self.t_max, "t_max")
            if self.timestep_kind != "uniform" or self.timestep_values is not None:
                raise ValueError("t_max: only with evenly spaced timesteps (timestep_kind uniform)")
        if self.query_timesteps is not None:
            check_int(self.query_timesteps, "query_timesteps")
        if self.query_num_noise is not None:
            check_int(self.query_num_noise, "query_num_noise")
        if self.timestep_kind not in ("uniform", "random", "list"):
            raise ValueError(
                f"timestep_kind: {self.timestep_kind!r} is unknown; expected uniform, random or list"
            )
        if self.timestep_values is not None:
            self.timestep_values = [int(v) for v in self.timestep_values]
            self.timestep_kind = "list"
        elif self.timestep_kind == "list":
            raise ValueError("timestep_values: timestep_kind 'list' needs timestep_values")
        if self.timestep_kind == "list" and self.query_timesteps is not None:
            raise ValueError("query_timesteps: not available with an explicit timestep_values list")

    def timestep_policy(self, num_train_timesteps: int, query: bool = False) -> TimestepPolicy:
        """The training (or, with ``query``, the query) timesteps."""
        count = self.timesteps
        if query and self.query_timesteps is not None:
            count = self.query_timesteps
        t_min = self.first_timestep(num_train_timesteps)
        if self.t_max is not None:
            return self._band_policy(num_train_timesteps, t_min, count)
        if self.timestep_kind != "list" and 0 < num_train_timesteps - t_min < count:
            # A short schedule (a test model's T = 100) holds fewer timesteps than the default
            # count: every one of them is the most the option can mean.
            log.info(
                "timesteps: %d asked, only %d in [%d, %d); using all of them",
                count,
                num_train_timesteps - t_min,
                t_min,
                num_train_timesteps,
            )
            count = num_train_timesteps - t_min
        return TimestepPolicy(
            kind=self.timestep_kind,
            count=count,
            values=self.timestep_values,
            seed=self.seed,
            num_train_timesteps=num_train_timesteps,
            t_min=t_min,
        )

    def _band_policy(self, T: int, t_min: int, count: int) -> TimestepPolicy:
        """``count`` evenly spaced timesteps in ``[t_min, t_max)``, as an explicit list (so stores
        made without ``t_max`` keep their identities), ``t_min + floor(i (t_max - t_min) /
        count)``: the uniform rule over the narrower band."""
        assert self.t_max is not None
        if not t_min < self.t_max <= T:
            raise ValueError(f"t_max: {self.t_max} is not in ({t_min}, {T}] (t_min, T)")
        span = self.t_max - t_min
        values = sorted({t_min + (i * span) // count for i in range(min(count, span))})
        return TimestepPolicy(
            kind="list", count=len(values), values=values, seed=self.seed, num_train_timesteps=T
        )

    def first_timestep(self, num_train_timesteps: int) -> int:
        """``t_min``, where None means a tenth of the schedule (100 of 1000 timesteps)."""
        return num_train_timesteps // 10 if self.t_min is None else self.t_min

    def draws(self, query: bool = False) -> int:
        """Noise draws per timestep for training (or query) features."""
        if query and self.query_num_noise is not None:
            return self.query_num_noise
        return self.num_noise


@dataclass
class KernelOptions(GradientOptions):
    """``lam``: TRAK ridge (None: ``lambda_scale * trace(Phi^T Phi) / k``, see scoring.py)."""

    lam: float | None = None
    lambda_scale: float = 0.01

    def __post_init__(self) -> None:
        super().__post_init__()
        _check_lambda(self.lam, self.lambda_scale)
        self.lam = None if self.lam is None else float(self.lam)
        self.lambda_scale = float(self.lambda_scale)


def make_featurize_args(
    opts: BaseGradOptions,
    model: Any,
    output: str,
    method: str,
    normalize: bool = False,
    aggregate_how: str | None = None,
    timesteps: list[int] | None = None,
    num_noise: int | None = None,
    query: bool = False,
) -> FeaturizeArgs:
    """The engine's :class:`FeaturizeArgs` for these options: the training budget, or with
    ``query`` the query budget (``timesteps`` / ``num_noise`` override both).

    ``aggregate_how`` None: ``"halves"`` for training features when ``opts.stability`` asks for
    the stability figure and there are two samples to split, else ``"mean"``. The label (store
    name) says what the features are (:func:`feature_label`), not which ``method`` asked: two
    methods with the same settings (trak, grad-dot, grad-cos, ekfac, kfac all use projected loss
    gradients) share one store in a shared work folder."""
    T = int(model.scheduler.config.num_train_timesteps)
    if timesteps is not None:
        policy = TimestepPolicy(
            kind="list", values=[int(t) for t in timesteps], num_train_timesteps=T
        )
    elif isinstance(opts, GradientOptions):
        policy = opts.timestep_policy(T, query=query)
    else:
        raise ValueError(f"{method}: timesteps must be given explicitly for these options")
    if num_noise is None:
        num_noise = opts.draws(query) if isinstance(opts, GradientOptions) else opts.num_noise
    if aggregate_how is None:
        samples = len(policy.timesteps()) * num_noise
        aggregate_how = "halves" if opts.stability and not query and samples >= 2 else "mean"
    return FeaturizeArgs(
        output=output,
        timesteps=policy,
        num_noise=num_noise,
        noise=opts.noise,
        aggregate=aggregate_how,
        normalize=normalize,
        projector=ProjectorConfig(kind=opts.projector, dim=opts.proj_dim, seed=opts.proj_seed),
        params=opts.params if opts.params is not None else default_params(model),
        batch_size=opts.batch_size,
        seed=opts.seed,
        label=feature_label(output, normalize),
    )


def feature_label(output: str, normalize: bool) -> str:
    """The name of a gradient feature store: ``<output>-grads`` (``-unit-grads`` normalised)."""
    return f"{output}-{'unit-' if normalize else ''}grads"


def short_hash(*parts: Any) -> str:
    """10 hex digits of sha256 over the JSON of ``parts`` (folder names)."""
    text = json.dumps(to_jsonable(list(parts)), sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:10]


def content_ids(images: Tensor) -> Tensor:
    """A stable int64 id per image ``(m, C, H, W)`` from its pixels (float32 bytes).

    Seeds a query's noise under the ``per-sample`` policy, so it depends on what the image shows,
    never on its file name or on the other queries scored with it.
    """
    ids = []
    for img in images.detach().to("cpu", torch.float32).contiguous():
        digest = hashlib.sha256(img.numpy().tobytes()).hexdigest()
        ids.append(derive_seed("query", digest) >> 2)
    return torch.tensor(ids, dtype=torch.int64)


def query_condition(model: Any, queries: Queries) -> Tensor | None:
    """The queries' conditioning for ``model``: class labels, prompt token ids or None
    (:func:`~diffattr.attribution.conditioning.condition`)."""
    return condition(model, queries.labels, queries.prompts, len(queries), "queries")


def kernel_device(model: Any) -> torch.device:
    """Where float64 kernel algebra runs: the model's CUDA device, else the CPU (MPS has no
    float64)."""
    dev = torch.device(model.device)
    return dev if dev.type == "cuda" else torch.device("cpu")


class WorkDir:
    """The method's cache folder: ``work_dir`` or a temporary folder deleted with this object."""

    def __init__(self, work_dir: Path | None) -> None:
        self._tmp: tempfile.TemporaryDirectory[str] | None = None
        if work_dir is None:
            self._tmp = tempfile.TemporaryDirectory(prefix="diffattr-attr-")
            self.path = Path(self._tmp.name)
        else:
            self.path = Path(work_dir)
        self.temporary = work_dir is None

    def sub(self, name: str) -> Path:
        return self.path / name


def store_folder(
    work: WorkDir, args: FeaturizeArgs, model: Any, data: ImageDataset, tag: str = ""
) -> Path:
    """``<work_dir>/<args.label>[-tag]-<hash>``; the hash covers settings, model and data.

    Including model and data hashes means another model or training subset gets its own folder
    instead of a refusal from the store; leaving the method out means methods that compute the
    same features find one folder.
    """
    # batch_size does not change feature values (the store records it without comparing it).
    settings = {k: v for k, v in dataclasses.asdict(args).items() if k != "batch_size"}
    h = short_hash(args.label, tag, settings, model.model_hash(), data.data_hash())
    return work.sub(f"{args.label}{'-' + tag if tag else ''}-{h}")


def train_features(
    model: Any,
    train: ImageDataset,
    args: FeaturizeArgs,
    folder: Path,
    progress: bool,
) -> Tensor:
    """Training features in ``train.ids`` order, ``(n, k)``, ``(n, S, k)`` or ``(n, 2, k)`` float32.

    Featurizes into ``folder`` (resuming / reusing what is there) via the engine's ``featurize``.
    """
    return store_rows(featurize(model, train, folder, args, progress=progress), train, folder)


def store_rows(store: FeatureStore, train: ImageDataset, folder: Path) -> Tensor:
    """A store's rows (float32) in ``train.ids`` order; names ``folder`` when ids are missing."""
    feats = torch.as_tensor(store.features, dtype=torch.float32)
    ids = torch.as_tensor(np.asarray(store.ids), dtype=torch.int64)
    want = train.ids.to(torch.int64)
    if not torch.equal(ids, want):
        pos = {int(i): j for j, i in enumerate(ids.tolist())}
        missing = [int(i) for i in want.tolist() if int(i) not in pos]
        if missing:
            raise ValueError(f"{folder}: feature store lacks training ids {missing[:5]}")
        feats = feats[torch.tensor([pos[int(i)] for i in want.tolist()])]
    return feats


@dataclass
class QueryFeatures:
    """Query features ``full`` ``(m, k)`` (or ``(m, S, k)``) and the same from two independent
    halves of each query's samples (``None`` when there is only one sample to split)."""

    full: Tensor
    halves: tuple[Tensor, Tensor] | None


def featurize_images(
    model: Any,
    images: Tensor,
    labels: Tensor | None,
    timesteps: list[int],
    args: FeaturizeArgs,
    how: str,
    progress: bool = False,
) -> QueryFeatures:
    """In-memory features of ``images`` ``(m, C, H, W)`` (pixels: a latent model's are encoded) or
    ``(m, S, C, H, W)`` (one input per step, already in the model's input space: Journey-TRAK);
    ``labels``: their conditioning (class labels ``(m,)``, token ids ``(m, L)``) or None.

    ``full``: ``(m, k)`` (``how="mean"``) or ``(m, S, k)`` (``"per-step"``), float32 on CPU, plus
    the two halves (:func:`~diffattr.attribution.featurize.split_halves`). Each image is
    featurized alone (its own gradient batches), so its features are bit-identical whatever other
    images, names or positions come with it.
    """
    ids = content_ids(images.reshape(images.shape[0], -1, *images.shape[-2:]))
    full, half_a, half_b = [], [], []
    for j in tqdm(range(images.shape[0]), desc="query features", disable=not progress, leave=False):
        x = images[j : j + 1].to(model.device)
        if x.ndim == 4:  # an image (not a trajectory): in the model's input space
            x = model_inputs(model, x)
        y = None if labels is None else labels[j : j + 1].to(model.device)
        f = per_step_features(model, x, ids[j : j + 1], timesteps, args, y, keep_draws=True)
        f = f.detach().to("cpu", torch.float32)
        full.append(aggregate(f.mean(dim=2), how))
        halves = split_halves(f, how)
        if halves is not None:
            half_a.append(halves[0])
            half_b.append(halves[1])
    both = (torch.cat(half_a), torch.cat(half_b)) if half_a else None
    return QueryFeatures(torch.cat(full), both)


class GradientAttributor:
    """State every gradient method keeps: model, options, work folder, fitted training set,
    timings. Subclasses set ``name`` and implement ``fit`` / ``score`` / ``config``."""

    name: str = "gradient"

    def __init__(self, model: Any, work_dir: Path | None, options: Any, progress: bool = False):
        self.model = model
        self.options = options
        self.progress = progress
        self.work = WorkDir(work_dir)
        self.train: ImageDataset | None = None
        self.timing: dict[str, float] = {}
        self.info: dict[str, Any] = {}

    def check_options(self) -> None:
        """Refuse what can only be checked against the model (the ``params`` patterns), before
        a folder is written for these options."""
        params = getattr(self.options, "params", None)
        if params is not None:
            select_params(self.model.unet, params)

    def check_train(self, train: ImageDataset) -> None:
        if len(train) == 0:
            raise ValueError(f"{self.name}: empty training set")

    def require_fit(self) -> ImageDataset:
        if self.train is None:
            raise RuntimeError(f"{self.name}: call fit(train) before score(queries)")
        return self.train


Scorer = Callable[[Tensor], Tensor]


def train_parts(
    feats: Tensor, args: FeaturizeArgs, samples: int | None = None
) -> tuple[Tensor, list[Tensor] | None]:
    """Training features as ``(full (n, k), [half 0, half 1] or None)`` from a store read with
    ``args`` (``"halves"`` stores keep the two half means; the full mean is derived from the
    ``samples`` each item averaged, default every (timestep, draw) of ``args``)."""
    if args.aggregate != "halves":
        return feats, None
    if samples is None:
        samples = len(args.timesteps.timesteps()) * args.num_noise
    return merge_halves(feats, samples), [feats[:, 0], feats[:, 1]]


class FeatureAttributor(GradientAttributor):
    """Featurize train into a store, featurize queries in memory, score with a kernel.

    Subclasses set ``name`` and implement :meth:`train_args` and :meth:`build` (a scorer from
    training features); :meth:`query_args` defaults to the training settings with the query
    budget. With ``options.stability`` the store keeps two half-sample means and :meth:`build`
    also makes a scorer per half, so every score comes with its stability figure.
    """

    name: str = "feature"

    # -- hooks
    def train_args(self) -> FeaturizeArgs:
        raise NotImplementedError

    def query_args(self) -> FeaturizeArgs:
        """The query budget: the training settings with the options' query timesteps / draws."""
        args = dataclasses.replace(self.train_args(), aggregate="mean")
        opts = self.options
        if not isinstance(opts, GradientOptions):
            return args
        T = int(self.model.scheduler.config.num_train_timesteps)
        return dataclasses.replace(
            args, timesteps=opts.timestep_policy(T, query=True), num_noise=opts.draws(query=True)
        )

    def build(self, train_feats: Tensor, train: ImageDataset, part: int | None) -> Scorer:
        """A scorer ``(m, k) -> (m, n)`` from training features ``(n, k)`` of all samples
        (``part`` None) or of half ``part`` (0 or 1) of them."""
        raise NotImplementedError

    def store_requests(self, train: ImageDataset) -> list[StoreRequest]:
        """The gradient feature stores :meth:`fit` reads (its store folder and settings), so
        several methods can be featurized in one pass
        (:func:`~diffattr.attribution.onepass.featurize_for`) before they fit."""
        args = self.train_args()
        return [StoreRequest(args, store_folder(self.work, args, self.model, train))]

    # -- protocol
    def training_features(
        self, train: ImageDataset, args: FeaturizeArgs
    ) -> tuple[Tensor, Path, int | None]:
        """The training features from their store (built when missing), the store folder and
        the samples each feature averages (None: every (timestep, draw) of ``args``)."""
        folder = store_folder(self.work, args, self.model, train)
        return train_features(self.model, train, args, folder, self.progress), folder, None

    def fit(self, train: ImageDataset) -> None:
        """Featurize ``train`` (or reuse its store) and build the kernel(s)."""
        self.check_train(train)
        args = self.train_args()
        t0 = time.perf_counter()
        feats, folder, samples = self.training_features(train, args)
        self.store_dir = folder
        self.timing["featurize_train_s"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        full, halves = train_parts(feats, args, samples)
        self.scorer = self.build(full, train, None)
        self.half_scorers = (
            None if halves is None else [self.build(h, train, i) for i, h in enumerate(halves)]
        )
        self.timing["prepare_s"] = time.perf_counter() - t0
        self.info["store"] = None if self.work.temporary else str(folder)
        self.train = train

    def query_features(self, queries: Queries) -> QueryFeatures:
        """``(m, k)`` query features and halves (timed in ``timing["featurize_queries_s"]``)."""
        args = self.query_args()
        t0 = time.perf_counter()
        q = featurize_images(
            self.model,
            queries.images,
            query_condition(self.model, queries),
            args.timesteps.timesteps(),
            args,
            "mean",
            progress=self.progress,
        )
        self.timing["featurize_queries_s"] = time.perf_counter() - t0
        return q

    def score(self, queries: Queries) -> Scores:
        train = self.require_fit()
        q = self.query_features(queries)
        t0 = time.perf_counter()
        values = self.scorer(q.full)
        halves = None
        if self.half_scorers is not None and q.halves is not None:
            halves = [f(h) for f, h in zip(self.half_scorers, q.halves, strict=True)]
        self.timing["score_s"] = time.perf_counter() - t0
        return make_scores(self, train, queries, values, halves=halves)

    def config(self) -> dict[str, Any]:
        """Options + what was derived (lambda, timesteps) + timing, all JSON-able."""
        return {
            "options": to_jsonable(self.options),
            "model_hash": self.model.model_hash(),
            **to_jsonable(self.info),
            "timing": dict(self.timing),
        }


def make_scores(
    method: Any,
    train: ImageDataset,
    queries: Queries,
    values: Tensor | np.ndarray,
    per_step: Tensor | np.ndarray | None = None,
    step_timesteps: Tensor | np.ndarray | None = None,
    halves: list[Tensor] | None = None,
) -> Scores:
    """A :class:`Scores` with columns in ``train.ids`` order and the method's config.

    ``halves``: the two half-budget score tables ``(m, n)`` each (the stability figure)."""
    return Scores(
        values=np.asarray(torch.as_tensor(values, dtype=torch.float32).cpu().numpy()),
        train_ids=train.ids.cpu().numpy(),
        query_names=list(queries.names),
        method=method.name,
        config=method.config(),
        per_step=None
        if per_step is None
        else np.asarray(torch.as_tensor(per_step, dtype=torch.float32).cpu().numpy()),
        step_timesteps=None
        if step_timesteps is None
        else np.asarray(torch.as_tensor(step_timesteps, dtype=torch.int64).cpu().numpy()),
        halves=None
        if halves is None
        else np.stack([torch.as_tensor(h, dtype=torch.float32).cpu().numpy() for h in halves]),
    )
