"""Attribution by unlearning (``unlearn``): unlearn the query, see whose training loss rises.

After Wang et al., "Data Attribution for Text-to-Image Models by Unlearning Synthesized Images"
(NeurIPS 2024), adapted to pixel-space DDPMs:

1. **Fisher** (once per model, on disk): the diagonal of the empirical Fisher of the training
   loss, ``F = mean_i,p g_i,p^2`` over every training image ``i`` and ``fisher_passes`` passes
   ``p``, each pass drawing one (timestep, noise) per image; ``g``: the per-sample gradient of the
   denoising loss. Stored per pass (a resumable store of ``(passes, P)`` rows).
2. **Unlearn** the query ``q`` from a copy of the selected parameters ``theta``: ``steps`` times
   ``theta += (alpha / N) (F + damping * mean(F))^-1 grad L_q(theta)``, where ``L_q`` is the
   query's denoising loss averaged over the evaluation timesteps x ``query_num_noise`` noise draws
   and ``N`` the training-set size (the paper's Newton step; without ``F`` it is plain gradient
   ascent, which the paper found at chance). The paper's ``alpha = 0.01`` is sized for ~10^5
   training images; on a small set it moves the weights by as much as their own size (measured on
   the digits-2 model: step RMS 0.053 against a weight RMS of 0.063), far outside the regime where
   a loss difference measures influence. So by default (``alpha`` None) each step is scaled so
   that its first-order prediction of the query's loss rise is ``rise`` times the query's loss:
   ``alpha / N = rise * L_q / (g^T F^-1 g)``. Rankings do not depend on the scale while the step is
   small, so this only keeps it small, and large enough for float32 loss differences.
3. **Score** of training image ``i`` = its loss under the unlearned model minus its loss under the
   original, both at the same fixed timesteps and the same noises (shared by all images, seeded by
   (seed, t, draw)), so the difference is the model's, not the noise's. Higher = more influential.
   With ``flip`` the max over the image and its horizontal mirror (for models trained with flips).

The original losses are computed once at ``fit`` (cached on disk beside the Fisher), and the
original weights are copied back after each query, bit for bit, so many queries run on one model.

**Stability figure**: the evaluation timesteps are split into two interleaved halves; each half is
a complete unlearning (query gradient from that half's samples, scores on that half's samples) and
the reported score is the mean of the two, so the stability figure costs nothing extra (one
forward pass of the training set per query in total). The query's gradient uses the same
(timestep, noise) pairs as the scores (draw 0 is the scoring noise): common random numbers, as the
gradient methods' shared noise.

Deviations from the paper's code: timesteps on a fixed evenly spaced grid instead of random ones;
``damping`` (the paper divides by ``F`` alone); the unconditional UNet has no cross-attention, so
the parameter subset is one of :data:`PARAM_PRESETS` or fnmatch patterns.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor
from tqdm.auto import tqdm

from diffattr.attribution.base import Queries, Scores
from diffattr.attribution.conditioning import (
    data_condition,
    dataset_inputs,
    model_inputs,
    prediction_target,
)
from diffattr.attribution.gradients import per_sample_grads, select_params
from diffattr.attribution.methods.common import (
    GradientAttributor,
    check_int,
    make_scores,
    query_condition,
    short_hash,
)
from diffattr.attribution.outputs import loss_output
from diffattr.attribution.store import fill_store
from diffattr.attribution.timesteps import noise_for
from diffattr.data.dataset import ImageDataset
from diffattr.diffusion.model import diffusion_loss, eval_mode
from diffattr.diffusion.params import fine_tuned_params
from diffattr.repro import derive_seed, to_jsonable

log = logging.getLogger(__name__)

#: Named parameter subsets (fnmatch patterns over ``unet.named_parameters()``); None = all. With
#: the groups every gradient method knows (``lora``, ``cross-attn-kv``: :data:`PARAM_GROUPS`).
PARAM_PRESETS: dict[str, list[str] | None] = {
    "all": None,
    "attention": ["*attentions.*"],
    "up-blocks": ["up_blocks.*", "conv_norm_out.*", "conv_out.*"],
    "down-blocks": ["conv_in.*", "down_blocks.*"],
    "mid-block": ["mid_block.*"],
    "lora": ["lora"],
    "cross-attn-kv": ["cross-attn-kv"],
}
#: ``params="auto"``: on a fine-tuned model, what the fine-tune changed (its LoRA, or the
#: weights its ``tune`` named: unlearning the query there undoes what the fine-tune learnt; on
#: the customization benchmark, unlearning the keys and values of a model whose every weight was
#: tuned ranked the exemplar 225th / 300th where ``all`` ranked it 1st / 103rd,
#: docs/t2i-evaluation.md); otherwise the cross-attention key and value projections where the
#: UNet has them (a text-to-image model: where the paper unlearns), else the up-blocks (measured
#: best on digits-2).
AUTO_PARAMS = {"cross-attention": "cross-attn-kv", "none": "up-blocks"}


def _check_float(value: Any, what: str, positive: bool) -> float:
    try:
        out = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{what}: expected a number, got {value!r}") from None
    if not np.isfinite(out) or out < 0 or (positive and out == 0):
        raise ValueError(
            f"{what}: expected a finite number {'> 0' if positive else '>= 0'}, got {value!r}"
        )
    return out


@dataclass
class UnlearnOptions:
    """Options of ``unlearn`` (module docstring has the algorithm).

    ``params``: a preset of :data:`PARAM_PRESETS` (``all``, ``attention``, ``up-blocks``,
    ``down-blocks``, ``mid-block``) or a list of fnmatch patterns. ``alpha``: the paper's step
    size (``theta += alpha / N F^-1 g``); None: each step raises the query's loss, to first order,
    by ``rise`` times its value. ``steps``: how many. ``timesteps``: evenly spaced scoring timesteps in
    ``[t_min, T)``; ``num_noise``: scoring noise draws per timestep; ``query_num_noise``: noise
    draws per timestep of the query's gradient (at least ``num_noise``). ``fisher_passes``: passes
    over the training set for the Fisher; ``damping``: added to ``F`` as a fraction of its mean.
    ``flip``: score = max over the image and its mirror. ``batch_size``: rows per forward pass;
    ``grad_batch_size``: rows per per-sample-gradient call (Fisher). ``stability``: split the
    samples into two halves (module docstring); needs at least 2 timesteps.

    Defaults measured on the digits-2 evaluation (README): ``up-blocks`` reached LDS 0.353 / 0.317
    (held-out / generated) against 0.340 / 0.316 for ``all`` at the same cost (the forward pass
    over the training set dominates); 50 timesteps cost 5.7 s per query on one CPU thread; the
    paper's ``alpha = 0.01`` fell to 0.21 / 0.14 on a 12-query pilot where ``rise = 0.05`` gave
    0.42 / 0.31 (``damping`` 1e-3 and 0.1 within 0.01 of each other).
    """

    params: str | list[str] = "auto"
    alpha: float | None = None
    rise: float = 0.05
    steps: int = 1
    timesteps: int = 50
    t_min: int = 0
    num_noise: int = 1
    query_num_noise: int = 4
    fisher_passes: int = 5
    damping: float = 1e-3
    flip: bool = False
    batch_size: int = 256
    grad_batch_size: int = 32
    seed: int = 0
    stability: bool = True

    def __post_init__(self) -> None:
        if isinstance(self.params, str):
            if self.params not in PARAM_PRESETS and self.params != "auto":
                raise ValueError(
                    f"params: {self.params!r} is not a preset ({', '.join(PARAM_PRESETS)}); "
                    "give a list of fnmatch patterns for other subsets"
                )
        elif isinstance(self.params, (list, tuple)) and self.params:
            self.params = [str(p) for p in self.params]
        else:
            raise ValueError(
                f"params: expected a preset name or a pattern list, got {self.params!r}"
            )
        if self.alpha is not None:
            self.alpha = _check_float(self.alpha, "alpha", positive=True)
        self.rise = _check_float(self.rise, "rise", positive=True)
        self.damping = _check_float(self.damping, "damping", positive=False)
        for what, low in (
            ("steps", 1),
            ("timesteps", 1),
            ("t_min", 0),
            ("num_noise", 1),
            ("query_num_noise", 1),
            ("fisher_passes", 1),
            ("batch_size", 1),
            ("grad_batch_size", 1),
        ):
            check_int(getattr(self, what), what, low)
        if not isinstance(self.flip, bool):
            raise ValueError(f"flip: expected true or false, got {self.flip!r}")
        if not isinstance(self.stability, bool):
            raise ValueError(f"stability: expected true or false, got {self.stability!r}")
        if self.query_num_noise < self.num_noise:
            raise ValueError(
                f"query_num_noise: {self.query_num_noise} is below num_noise {self.num_noise}; the "
                "query's gradient must include the scoring noises"
            )

    def patterns(self, model: Any) -> list[str] | None:
        """The fnmatch patterns (or group names) of ``params`` for ``model`` (``auto``: what a
        fine-tune changed, else :data:`AUTO_PARAMS` by the model's kind)."""
        params = self.params
        if params == "auto":
            cross = any(".attn2." in n for n, _ in model.unet.named_parameters())
            tuned = fine_tuned_params(model)
            params = AUTO_PARAMS["cross-attention" if cross else "none"] if tuned is None else tuned
        if isinstance(params, str):
            # A trainer's `tune` may be a group name the presets lack: select_params knows it.
            return PARAM_PRESETS.get(params, [params])
        return list(params)

    def grid(self, num_train_timesteps: int) -> list[int]:
        """The scoring timesteps: ``timesteps`` evenly spaced in ``[t_min, T)`` (all if fewer)."""
        if self.t_min >= num_train_timesteps:
            raise ValueError(
                f"t_min: {self.t_min} is not below the model's T = {num_train_timesteps}"
            )
        span = num_train_timesteps - self.t_min
        count = min(self.timesteps, span)
        return sorted({int(v) for v in self.t_min + np.floor(np.arange(count) * span / count)})


# ------------------------------------------------------------------------------------ the pieces


def shared_noise(seed: int, t: int, draw: int, shape: tuple[int, ...]) -> Tensor:
    """The scoring noise at ``(t, draw)`` ``shape``: the same for every image and both models."""
    return noise_for(seed, 0, t, draw, shape, "shared")


def image_losses(
    model: Any,
    images: Tensor,
    labels: Tensor | None,
    samples: list[tuple[int, int]],
    seed: int,
    batch_size: int,
) -> Tensor:
    """Denoising losses ``(n, len(samples))`` float64 of ``images`` ``(n, C, H, W)`` at each
    ``(t, draw)`` of ``samples`` with the shared noise. Each image's loss is computed in chunks of
    at most ``batch_size`` images of the one sample, so it does not depend on the others' count."""
    n = images.shape[0]
    out = torch.empty(n, len(samples), dtype=torch.float64)
    shape = tuple(images.shape[1:])
    dev = model.device
    with torch.no_grad():
        for j, (t, d) in enumerate(samples):
            noise = shared_noise(seed, t, d, shape).to(dev)
            for s in range(0, n, batch_size):
                x0 = images[s : s + batch_size].to(dev)
                tt = torch.full((x0.shape[0],), t, dtype=torch.int64, device=dev)
                y = None if labels is None else labels[s : s + batch_size].to(dev)
                loss = diffusion_loss(model, x0, tt, noise.expand_as(x0), y)
                out[s : s + x0.shape[0], j] = loss.to(torch.float64).cpu()
    return out


def query_gradient(
    model: Any,
    params: dict[str, torch.nn.Parameter],
    image: Tensor,
    label: Tensor | None,
    samples: list[tuple[int, int]],
    seed: int,
    batch_size: int,
) -> tuple[float, dict[str, Tensor]]:
    """The query's loss averaged over ``samples`` (``(t, draw)`` pairs, shared noise) and its
    gradient with respect to ``params`` (name -> tensor of the parameter's shape)."""
    total = {n: torch.zeros_like(p) for n, p in params.items()}
    everything = dict(model.unet.named_parameters())
    frozen = [p for p in everything.values() if not p.requires_grad]
    for p in frozen:
        p.requires_grad_(True)
    try:
        value = _accumulate(
            model, everything, params, total, image, label, samples, seed, batch_size
        )
    finally:
        for p in frozen:
            p.requires_grad_(False)
    return value, total


def _accumulate(
    model: Any,
    everything: dict[str, torch.nn.Parameter],
    params: dict[str, torch.nn.Parameter],
    total: dict[str, Tensor],
    image: Tensor,
    label: Tensor | None,
    samples: list[tuple[int, int]],
    seed: int,
    batch_size: int,
) -> float:
    """Body of :func:`query_gradient`: adds the gradient into ``total``, returns the loss."""
    dev = model.device
    value = 0.0
    for s in range(0, len(samples), batch_size):
        chunk = samples[s : s + batch_size]
        noise = torch.stack([shared_noise(seed, t, d, tuple(image.shape)) for t, d in chunk])
        tt = torch.tensor([t for t, _ in chunk], dtype=torch.int64, device=dev)
        x0 = image[None].expand(len(chunk), *image.shape).contiguous().to(dev)
        y = None if label is None else label[None].expand(len(chunk), *label.shape).to(dev)
        with torch.enable_grad():
            loss = diffusion_loss(model, x0, tt, noise.to(dev), y).sum() / len(samples)
            # Differentiate every parameter and keep the selected ones: asking autograd for a
            # subset (e.g. the up-blocks, whose GroupNorms then get no input gradient) crashes
            # torch 2.13's CPU backward with a segfault on diffusers' UNet2DModel.
            grads = dict(
                zip(everything, torch.autograd.grad(loss, list(everything.values())), strict=True)
            )
        value += float(loss.detach())
        for n in params:
            total[n] += grads[n]
    return value


def fisher_pass(
    model: Any,
    train: ImageDataset,
    p: int,
    seed: int,
    batch_size: int,
    params: dict[str, torch.nn.Parameter],
) -> Tensor:
    """Pass ``p`` of the diagonal Fisher of ``params``: ``(P,)`` float64, the mean over the
    training images (in id order, so the sum does not depend on the data set's order) of the
    squared per-sample loss gradient of each parameter (flattened in ``params`` order), one
    (timestep, noise) per image drawn from ``(seed, id, p)``. An entry's value does not depend on
    which other parameters are selected."""
    T = int(model.scheduler.config.num_train_timesteps)
    order = torch.argsort(train.ids)
    total = torch.zeros(sum(q.numel() for q in params.values()), dtype=torch.float64)
    labels = data_condition(model, train, slice(None))
    inputs = dataset_inputs(model, train)  # a latent model's VAE latents
    dev = model.device
    for s in range(0, len(order), batch_size):
        rows = order[s : s + batch_size]
        ids = train.ids[rows].tolist()
        ts = [derive_seed(seed, "fisher-t", int(i), p) % T for i in ids]
        noise = torch.stack(
            [
                noise_for(seed, int(i), t, p, tuple(inputs.shape[1:]), "per-sample")
                for i, t in zip(ids, ts, strict=True)
            ]
        ).to(dev)
        x0 = inputs[rows].to(dev)
        tt = torch.tensor(ts, dtype=torch.int64, device=dev)
        x_t = model.scheduler.add_noise(x0, noise, tt)
        y = None if labels is None else labels[rows].to(dev)
        target = prediction_target(model, x0, noise, tt)
        grads = per_sample_grads(model, x_t, tt, target, loss_output, params, y)
        sq = torch.cat(
            [g.reshape(g.shape[0], -1).to(torch.float64).pow(2) for g in grads.values()], 1
        )
        total += sq.sum(dim=0).cpu()
    return total / len(train)


# ------------------------------------------------------------------------------------ the method


class Unlearn(GradientAttributor):
    """``unlearn``: see the module docstring."""

    name: str = "unlearn"
    options: UnlearnOptions

    def _samples(self) -> list[tuple[int, int]]:
        T = int(self.model.scheduler.config.num_train_timesteps)
        grid = self.options.grid(T)
        return [(t, d) for t in grid for d in range(self.options.num_noise)]

    def _halves(self) -> list[list[int]]:
        """Column indices of the scoring samples per half (by timestep), or one group of all."""
        T = int(self.model.scheduler.config.num_train_timesteps)
        grid = self.options.grid(T)
        D = self.options.num_noise
        if not self.options.stability or len(grid) < 2:
            return [list(range(len(grid) * D))]
        return [[i * D + d for i in range(h, len(grid), 2) for d in range(D)] for h in (0, 1)]

    def _identity(self, train: ImageDataset, what: str) -> dict[str, Any]:
        o = self.options
        ident: dict[str, Any] = {
            "what": what,
            "model_hash": self.model.model_hash(),
            "data_hash": train.data_hash(),
            "seed": o.seed,
        }
        if what == "fisher":
            ident["passes"] = o.fisher_passes
            ident["params"] = short_hash(list(self.params))
        else:
            ident.update(samples=self._samples(), flip=o.flip)
        return ident

    def _cached(
        self,
        train: ImageDataset,
        what: str,
        ids: Tensor,
        shape: tuple[int, ...],
        compute: Callable[[slice], Tensor],
    ) -> Tensor:
        """``fisher`` rows or original ``losses`` from their store in the work folder (computed
        and written shard by shard when missing; identity: model, data, seed and samples)."""
        ident = self._identity(train, what)
        folder = self.work.sub(f"unlearn-{what}-{short_hash(ident)}")
        store = fill_store(
            folder,
            ident,
            ids,
            shard_size=1 if what == "fisher" else 256,
            compute=compute,
            feature_shape=shape,
            progress=self.progress,
            label=f"unlearn {what}",
        )
        self.info[f"{what}_store"] = None if self.work.temporary else str(folder)
        return store.features.to(torch.float64)

    def check_options(self) -> None:
        select_params(self.model.unet, self.options.patterns(self.model), presets=PARAM_PRESETS)

    def fit(self, train: ImageDataset) -> None:
        """The Fisher and the original losses of ``train`` (from their stores when present)."""
        self.check_train(train)
        with eval_mode(self.model.unet):
            self._fit(train)

    def _fit(self, train: ImageDataset) -> None:
        o = self.options
        self.params = select_params(self.model.unet, o.patterns(self.model), presets=PARAM_PRESETS)
        sizes = {n: p.numel() for n, p in self.params.items()}
        t0 = time.perf_counter()
        P = sum(sizes.values())
        fisher_rows = self._cached(
            train,
            "fisher",
            torch.arange(o.fisher_passes),
            (P,),
            lambda sl: torch.stack(
                [
                    fisher_pass(
                        self.model, train, p, o.seed, o.grad_batch_size, self.params
                    ).float()
                    for p in range(sl.start, sl.stop)
                ]
            ),
        )
        fisher = fisher_rows.to(torch.float64).mean(dim=0)
        offsets = dict(zip(sizes, np.cumsum([0, *sizes.values()])[:-1].tolist(), strict=True))
        selected = {n: fisher[offsets[n] : offsets[n] + sizes[n]] for n in self.params}
        sel = torch.cat(list(selected.values()))
        damp = o.damping * float(sel.mean())
        if not float(sel.min()) + damp > 0:
            raise ValueError(
                f"unlearn: the Fisher of the selected parameters has zero entries and damping is "
                f"{o.damping}; set damping > 0"
            )
        self.inv_fisher = {
            n: (1.0 / (selected[n] + damp)).reshape(p.shape).to(p.dtype)
            for n, p in self.params.items()
        }
        self.timing["fisher_s"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        samples = self._samples()
        views = 2 if o.flip else 1
        labels = data_condition(self.model, train, slice(None))
        inputs = dataset_inputs(self.model, train)  # a latent model's VAE latents

        def original(sl: slice) -> Tensor:
            imgs = inputs[sl]
            lab = None if labels is None else labels[sl]
            both = [
                image_losses(self.model, v, lab, samples, o.seed, o.batch_size)
                for v in self._views(imgs)
            ]
            return torch.stack(both, dim=1).float()

        self.base_losses = self._cached(train, "losses", train.ids, (views, len(samples)), original)
        self.timing["original_losses_s"] = time.perf_counter() - t0
        self.info["parameters"] = int(sum(p.numel() for p in self.params.values()))
        self.info["timesteps"] = sorted({t for t, _ in samples})
        self.train = train

    def _views(self, images: Tensor) -> list[Tensor]:
        return [images, images.flip(-1)] if self.options.flip else [images]

    def _unlearn(self, image: Tensor, label: Tensor | None, samples: list[tuple[int, int]]) -> None:
        """Move the selected parameters (in place) ``steps`` Newton steps up the query's loss."""
        o = self.options
        train = self.require_fit()
        for _ in range(o.steps):
            loss, g = query_gradient(
                self.model, self.params, image, label, samples, o.seed, o.batch_size
            )
            direction = {n: g[n] * self.inv_fisher[n] for n in self.params}
            if o.alpha is not None:
                step = o.alpha / len(train)
            else:
                curvature = sum(float((g[n] * direction[n]).sum(dtype=torch.float64)) for n in g)
                if not curvature > 0:
                    raise ValueError(
                        "unlearn: the query's loss gradient is zero for the selected parameters; "
                        "choose other params"
                    )
                step = o.rise * loss / curvature
            with torch.no_grad():
                for n, p in self.params.items():
                    p.add_(direction[n], alpha=step)

    def _score_one(self, image: Tensor, label: Tensor | None, train: ImageDataset) -> list[Tensor]:
        """Per half: ``(n,)`` float64 scores of one query."""
        o = self.options
        samples = self._samples()
        labels = data_condition(self.model, train, slice(None))
        inputs = dataset_inputs(self.model, train)
        saved = {n: p.detach().clone() for n, p in self.params.items()}
        out = []
        for cols in self._halves():
            try:
                half = [samples[c] for c in cols]
                timesteps = sorted({t for t, _ in half})
                query_samples = [(t, d) for t in timesteps for d in range(o.query_num_noise)]
                self._unlearn(image, label, query_samples)
                per_view = []
                for v, imgs in enumerate(self._views(inputs)):
                    after = image_losses(self.model, imgs, labels, half, o.seed, o.batch_size)
                    before = self.base_losses[:, v, cols].to(torch.float64)
                    per_view.append((after - before).mean(dim=1))
                out.append(torch.stack(per_view).amax(dim=0))
            finally:  # every half starts from, and the model ends with, the original weights
                with torch.no_grad():
                    for n, p in self.params.items():
                        p.copy_(saved[n])
        return out

    def score(self, queries: Queries) -> Scores:
        train = self.require_fit()
        labels = query_condition(self.model, queries)
        inputs = model_inputs(self.model, queries.images)  # a latent model's VAE latents
        t0 = time.perf_counter()
        per_query = []
        with eval_mode(self.model.unet):
            for j in tqdm(
                range(len(queries)), desc="unlearn", disable=not self.progress, leave=False
            ):
                y = None if labels is None else labels[j]
                per_query.append(self._score_one(inputs[j], y, train))
        halves = [torch.stack([q[h] for q in per_query]) for h in range(len(per_query[0]))]
        values = torch.stack(halves).mean(dim=0)
        self.timing["score_s"] = time.perf_counter() - t0
        self.timing["score_s_per_query"] = self.timing["score_s"] / max(1, len(queries))
        return make_scores(
            self, train, queries, values, halves=halves if len(halves) == 2 else None
        )

    def config(self) -> dict[str, Any]:
        return {
            "options": to_jsonable(self.options),
            "model_hash": self.model.model_hash(),
            **to_jsonable(self.info),
            "timing": dict(self.timing),
        }
