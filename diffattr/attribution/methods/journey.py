"""Journey-TRAK (Georgiev, Vendrow, Salman, Park, Madry 2023, "The Journey, Not the Destination:
How Data Guides Diffusion Models"; code: MadryLab/journey-TRAK).

Journey-TRAK attributes *each step* of a generation separately. For sampling step ``s`` of the
query's recorded trajectory (timestep ``t_s``, noisy image ``x_{t_s}``, predicted noise
``eps_s``) the model's current guess of the final image is

    x0_hat_s = (x_{t_s} - sqrt(1 - abar_{t_s}) eps_s) / sqrt(abar_{t_s})

clipped to ``[-1, 1]`` when ``clip_x0`` (default; diffusers' ``pred_original_sample`` with
``clip_sample=True`` does the same), and the step's model output is the denoising loss of that
guess re-noised to ``t_s``,
``f_s(theta) = E_eps || eps - eps_theta(sqrt(abar) x0_hat_s + sqrt(1 - abar) eps, t_s) ||^2``,
estimated with ``query_draws`` fresh noise draws (the released code's ``_get_output_scoring``:
``add_noise(x0_hat[t], noise, t)`` then MSE, averaged over ``n_iters`` draws). Training features
for step ``s`` are projected gradients of the training loss *at the same timestep* ``t_s``
(``num_noise`` draws), so each step has its own TRAK kernel:

    per_step[s, q, i] = phi_s(q)^T (Phi_s^T Phi_s + lambda_s I)^{-1} phi_s(z_i)

``Scores.per_step`` holds ``(n_steps, n_queries, n_train)`` with ``Scores.step_timesteps``; the
aggregate ``Scores.values`` is the mean over steps. ``step_stride`` keeps every k-th step of the
trajectory (always including the first) to bound cost.

Differences from the released code: it featurizes training images once with timesteps drawn at
random over the whole range (one feature matrix for all steps), whereas the paper's per-step
attribution (and this implementation) uses training gradients at the step's own timestep.
Training features for a set of step timesteps are computed on the first ``score`` that needs them
(or in ``fit`` when ``trajectory_timesteps`` is given) and cached in ``work_dir``.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from tqdm.auto import tqdm

from diffattr.attribution.base import Queries, Scores, Trajectory
from diffattr.attribution.featurize import FeaturizeArgs, per_step_features, split_halves
from diffattr.attribution.methods.common import (
    BaseGradOptions,
    GradientAttributor,
    QueryFeatures,
    _check_lambda,
    check_int,
    content_ids,
    kernel_device,
    make_featurize_args,
    make_scores,
    query_condition,
    store_folder,
    train_features,
)
from diffattr.attribution.scoring import TrakKernel
from diffattr.data.dataset import ImageDataset
from diffattr.repro import to_jsonable


@dataclass
class JourneyOptions(BaseGradOptions):
    """``step_stride``: use every k-th trajectory step. ``query_draws``: noise draws per step for
    the query output. ``clip_x0``: clip ``x0_hat`` to ``[-1, 1]``. ``trajectory_timesteps``: the
    sampler's full timestep list, to featurize the training set already in ``fit``.
    ``lam`` / ``lambda_scale``: the per-step TRAK ridge (see scoring.py). ``stability``: here the
    two halves split only the query's ``query_draws`` (needs 2 or more), not the training side."""

    step_stride: int = 1
    query_draws: int = 4
    clip_x0: bool = True
    trajectory_timesteps: list[int] | None = None
    lam: float | None = None
    lambda_scale: float = 0.01

    def __post_init__(self) -> None:
        super().__post_init__()
        check_int(self.step_stride, "step_stride")
        check_int(self.query_draws, "query_draws")
        _check_lambda(self.lam, self.lambda_scale)
        self.lam = None if self.lam is None else float(self.lam)
        self.lambda_scale = float(self.lambda_scale)
        if self.trajectory_timesteps is not None:
            self.trajectory_timesteps = [int(t) for t in self.trajectory_timesteps]


def predicted_x0(model: Any, traj: Trajectory, steps: list[int], clip: bool) -> Tensor:
    """``x0_hat`` at the chosen trajectory steps: ``(len(steps), C, H, W)`` float32."""
    abar = model.scheduler.alphas_cumprod.to(torch.float64)
    t = traj.timesteps.to(torch.int64)[steps]
    a = abar[t].reshape(-1, 1, 1, 1)
    xt = traj.xt[steps].to(torch.float64)
    eps = traj.eps[steps].to(torch.float64)
    x0 = (xt - (1.0 - a).sqrt() * eps) / a.sqrt()
    if clip:
        x0 = x0.clamp(-1.0, 1.0)
    return x0.to(torch.float32)


class JourneyTrak(GradientAttributor):
    """``journey-trak``: per-step TRAK along each query's sampling trajectory."""

    name: str = "journey-trak"
    options: JourneyOptions

    def __init__(
        self, model: Any, work_dir: Path | None, options: JourneyOptions, progress: bool = False
    ) -> None:
        super().__init__(model, work_dir, options, progress)
        self._kernels: dict[tuple[int, ...], list[TrakKernel]] = {}
        self._last_lambdas: list[float] = []

    def step_indices(self, n_steps: int) -> list[int]:
        return list(range(0, n_steps, self.options.step_stride))

    def train_args(self, timesteps: list[int]) -> FeaturizeArgs:
        return make_featurize_args(
            self.options,
            self.model,
            "loss",
            self.name,
            aggregate_how="per-step",
            timesteps=timesteps,
        )

    def query_args(self, timesteps: list[int]) -> FeaturizeArgs:
        return make_featurize_args(
            self.options,
            self.model,
            "loss",
            self.name,
            aggregate_how="per-step",
            timesteps=timesteps,
            num_noise=self.options.query_draws,
        )

    def kernels_for(self, timesteps: list[int]) -> list[TrakKernel]:
        """One TRAK kernel per step timestep (training features featurized on first use)."""
        train = self.require_fit()
        key = tuple(timesteps)
        if key not in self._kernels:
            args = self.train_args(timesteps)
            folder = store_folder(self.work, args, self.model, train, tag="per-step")
            t0 = time.perf_counter()
            feats = train_features(self.model, train, args, folder, self.progress)  # (n, S, k)
            self.timing["featurize_train_s"] = (
                self.timing.get("featurize_train_s", 0.0) + time.perf_counter() - t0
            )
            o = self.options
            self._kernels[key] = [
                TrakKernel(
                    feats[:, s],
                    lam=o.lam,
                    lambda_scale=o.lambda_scale,
                    device=kernel_device(self.model),
                )
                for s in range(feats.shape[1])
            ]
        return self._kernels[key]

    def fit(self, train: ImageDataset) -> None:
        self.check_train(train)
        self.train = train
        self._kernels = {}
        ts = self.options.trajectory_timesteps
        if ts is not None:
            self.kernels_for([ts[i] for i in self.step_indices(len(ts))])

    def _query_steps(self, queries: Queries) -> tuple[list[int], list[int]]:
        """(trajectory step indices, their timesteps), identical for every query."""
        if queries.trajectories is None or any(t is None for t in queries.trajectories):
            raise ValueError(
                "journey-trak needs each query's sampling trajectory (x_t and predicted noise at "
                "every step); attribute images made by `diffattr generate`, which saves it, and "
                "load them with their trajectories"
            )
        first = queries.trajectories[0].timesteps.to(torch.int64)
        for name, traj in zip(queries.names, queries.trajectories, strict=True):
            ts = traj.timesteps.to(torch.int64)
            if not torch.equal(ts, first):
                raise ValueError(
                    f"journey-trak: query {name!r} was sampled with other timesteps than "
                    f"{queries.names[0]!r}; score queries from one sampler setting together"
                )
            s_n = int(ts.shape[0])
            if traj.xt.shape[0] != s_n or traj.eps.shape[0] != s_n:
                raise ValueError(
                    f"journey-trak: trajectory of {name!r} has {s_n} timesteps but xt/eps have "
                    f"{traj.xt.shape[0]}/{traj.eps.shape[0]} steps"
                )
        steps = self.step_indices(int(first.shape[0]))
        return steps, [int(first[i]) for i in steps]

    def query_features(
        self, queries: Queries, steps: list[int], timesteps: list[int]
    ) -> QueryFeatures:
        """``(m, S, k)`` per-step query features (and the halves of their ``query_draws``)."""
        assert queries.trajectories is not None
        args = self.query_args(timesteps)
        ids = content_ids(queries.images)
        labels = query_condition(self.model, queries)
        # Latents are not bounded to [-1, 1] like pixels: clipping x0_hat applies to pixels only.
        clip = self.options.clip_x0 and not getattr(self.model, "inputs_are_latents", False)
        out, half_a, half_b = [], [], []
        trajs = enumerate(queries.trajectories)
        for j, traj in tqdm(
            trajs,
            total=len(queries),
            desc="journey query features",
            disable=not self.progress,
            leave=False,
        ):
            x0 = predicted_x0(self.model, traj, steps, clip)[None]
            y = None if labels is None else labels[j : j + 1].to(self.model.device)
            f = (
                per_step_features(
                    self.model, x0.to(self.model.device), ids[j : j + 1], timesteps, args, y, True
                )
                .detach()
                .to("cpu", torch.float32)
            )
            out.append(f.mean(dim=2))
            halves = split_halves(f, "per-step")
            if halves is not None:
                half_a.append(halves[0])
                half_b.append(halves[1])
        both = (torch.cat(half_a), torch.cat(half_b)) if half_a else None
        return QueryFeatures(torch.cat(out), both)

    def score(self, queries: Queries) -> Scores:
        train = self.require_fit()
        steps, timesteps = self._query_steps(queries)
        kernels = self.kernels_for(timesteps)
        t0 = time.perf_counter()
        q = self.query_features(queries, steps, timesteps)
        t1 = time.perf_counter()

        def per_step_scores(feats: Tensor) -> Tensor:  # (m, S, k) -> (S, m, n)
            return torch.stack([kernels[s].scores(feats[:, s]) for s in range(len(timesteps))])

        per_step = per_step_scores(q.full)
        halves = None
        if q.halves is not None and self.options.stability:
            halves = [per_step_scores(h).to(torch.float64).mean(dim=0) for h in q.halves]
        self.timing["featurize_queries_s"] = t1 - t0
        self.timing["score_s"] = time.perf_counter() - t1
        self._last_lambdas = [k.lam for k in kernels]
        values = per_step.to(torch.float64).mean(dim=0)
        return make_scores(
            self,
            train,
            queries,
            values,
            per_step=per_step,
            step_timesteps=torch.tensor(timesteps, dtype=torch.int64),
            halves=halves,
        )

    def config(self) -> dict[str, Any]:
        return {
            "options": to_jsonable(self.options),
            "lambdas": list(self._last_lambdas),
            "timing": dict(self.timing),
        }
