"""Counterfactual check: does removing a method's top-k training images change the generation?

For a generated query q and a fraction f, remove the ``k = max(1, round(f * n))`` training images
the method scores highest for q, retrain with the full model's config and seed, and regenerate from
q's **same initial noise** (same sampler, same seed). As a control, remove k random images
(seeded by ``(seed, query, k)``; the same control for every method). A good method changes the
image more than random removal does.

Distances to the original generation ``x`` (both ``(C, H, W)`` in ``[-1, 1]``):

* pixel L2: ``||x' - x||_2`` over all pixels;
* feature: cosine distance ``1 - cos(phi(x'), phi(x))`` with ``phi`` the flattened output of the
  *full* model's UNet mid-block when fed the clean image at timestep ``feature_timestep`` (0 by
  default): a cheap, dependency-free semantic embedding that ignores small pixel shifts better
  than raw pixels.

Each retrained model lives in a folder named by a hash of the removed ids, so identical removals
(two methods agreeing, or a method matching the control) are trained once, and everything resumes.

The summary (:func:`summarize`) gives, per method and fraction, the mean distance over queries with
a bootstrap CI over queries, and the mean *paired* difference to the random control on the same
queries with its CI: the method moves the generation more than chance only where that interval
lies above 0. With a handful of queries the intervals are wide; say so rather than read the means.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from diffattr.attribution.base import Scores
from diffattr.config import ExperimentConfig
from diffattr.evaluation.compare import RANDOM_CONTROL
from diffattr.evaluation.retrain import TrainJob
from diffattr.repro import derive_seed, write_json_atomic
from diffattr.stats import bootstrap_ci

log = logging.getLogger(__name__)

RESULT_FILE = "counterfactual.json"


@dataclass
class Removal:
    """One counterfactual: ``method`` removed ``removed_ids`` for query ``query`` (fraction label)."""

    method: str
    query: str
    fraction: str
    removed_ids: np.ndarray
    job: TrainJob


def fraction_label(frac: float) -> str:
    return f"{frac * 100:g}%"


def removal_count(n_train: int, frac: float) -> int:
    return max(1, min(n_train - 1, int(round(frac * n_train))))


def random_removal(train_ids: np.ndarray, k: int, seed: int, query: str) -> np.ndarray:
    rng = np.random.default_rng(derive_seed(seed, "cf-random", query, k))
    return np.sort(rng.choice(np.asarray(train_ids), size=k, replace=False))


def top_removal(scores: Scores, query: str, k: int) -> np.ndarray:
    row = scores.query_names.index(query)
    order = np.argsort(-scores.values[row], kind="stable")[:k]
    return np.sort(scores.train_ids[order])


def _job(
    base: ExperimentConfig, train_ids: np.ndarray, removed: np.ndarray, models_dir: Path
) -> TrainJob:
    h = hashlib.sha256(np.sort(removed).astype(np.int64).tobytes()).hexdigest()[:16]
    keep = np.setdiff1d(np.asarray(train_ids, dtype=np.int64), removed)
    return TrainJob(f"remove-{h}", base, keep, Path(models_dir) / f"remove-{h}")


def plan_removals(
    base: ExperimentConfig,
    train_ids: np.ndarray,
    scores: dict[str, Scores],
    queries: Sequence[str],
    fractions: Sequence[float],
    random_control: bool,
    seed: int,
    models_dir: Path,
) -> list[Removal]:
    """Every (method or control, query, fraction) removal, with the job that retrains without it."""
    out = []
    n = len(train_ids)
    for q in queries:
        for f in fractions:
            k = removal_count(n, f)
            chosen = {m: top_removal(s, q, k) for m, s in scores.items()}
            if random_control:
                chosen[RANDOM_CONTROL] = random_removal(train_ids, k, seed, q)
            for m, removed in chosen.items():
                job = _job(base, train_ids, removed, models_dir)
                out.append(Removal(m, q, fraction_label(f), removed, job))
    return out


def unique_jobs(removals: Sequence[Removal]) -> list[TrainJob]:
    seen: dict[str, TrainJob] = {}
    for r in removals:
        seen.setdefault(r.job.name, r.job)
    return list(seen.values())


@torch.no_grad()
def midblock_features(
    model: Any, images: torch.Tensor, labels: torch.Tensor | None, t: int
) -> torch.Tensor:
    """Flattened UNet mid-block output ``(n, D)`` for clean ``images`` ``(n, C, H, W)`` at ``t``."""
    grabbed: list[torch.Tensor] = []
    hook = model.unet.mid_block.register_forward_hook(
        lambda _m, _i, out: grabbed.append(out[0] if isinstance(out, tuple) else out)
    )
    try:
        x = images.to(model.device, torch.float32)
        ts = torch.full((x.shape[0],), t, dtype=torch.int64, device=model.device)
        model.eps(x, ts, None if labels is None else labels.to(model.device))
    finally:
        hook.remove()
    return grabbed[-1].flatten(1).float().cpu()


def cosine_distance(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return 1.0 - torch.nn.functional.cosine_similarity(a, b, dim=1)


def pixel_l2(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return (a.float() - b.float()).flatten(1).norm(dim=1)


def regenerate(
    model: Any,
    initial_noise: torch.Tensor,
    label: torch.Tensor | None,
    seed: int,
    sampler: str,
    num_inference_steps: int,
    eta: float,
) -> torch.Tensor:
    """The image ``(C, H, W)`` ``model`` generates from ``initial_noise`` ``(C, H, W)``."""
    from diffattr.diffusion.sampling import sample

    res = sample(
        model,
        1,
        seed,
        sampler=sampler,
        num_inference_steps=num_inference_steps,
        eta=eta,
        class_labels=None if label is None else label.view(1),
        initial_noise=initial_noise[None],
        record_trajectory=False,
    )
    return res.images[0]


def measure(
    removals: Sequence[Removal],
    full_model: Any,
    originals: dict[str, dict[str, Any]],
    sampling: dict[str, Any],
    feature_timestep: int,
    folder: Path,
    device: str | torch.device = "cpu",
    n_boot: int = 1000,
    seed: int = 0,
    level: float = 0.95,
) -> dict[str, Any]:
    """Regenerate each removal's query and measure its distances; writes ``counterfactual.json``.

    ``originals``: query name -> {"image": (C,H,W), "noise": (C,H,W), "label": tensor or None,
    "seed": int}. ``sampling``: {"sampler", "num_inference_steps", "eta"}.
    Returns {"per_removal": [...], "summary": {method: {fraction: cell}}} (see :func:`summarize`;
    ``n_boot`` / ``seed`` / ``level``: its bootstrap).
    """
    from diffattr.diffusion.model import load_model

    cache: dict[tuple[str, str], tuple[float, float]] = {}
    per_removal: list[dict[str, Any]] = []
    full_feats = {
        q: midblock_features(full_model, o["image"][None], _lab(o), feature_timestep)
        for q, o in originals.items()
    }
    by_job: dict[str, list[Removal]] = {}
    for r in removals:
        by_job.setdefault(r.job.name, []).append(r)
    for name, group in by_job.items():
        model = load_model(group[0].job.out_dir, device=device)
        for r in group:
            key = (name, r.query)
            if key not in cache:
                o = originals[r.query]
                img = regenerate(model, o["noise"], o["label"], o["seed"], **sampling)
                feat = midblock_features(full_model, img[None], _lab(o), feature_timestep)
                l2 = float(pixel_l2(img[None], o["image"][None])[0])
                fd = float(cosine_distance(feat, full_feats[r.query])[0])
                cache[key] = (l2, fd)
            l2, fd = cache[key]
            per_removal.append(
                {
                    "method": r.method,
                    "query": r.query,
                    "fraction": r.fraction,
                    "k": int(len(r.removed_ids)),
                    "model": name,
                    "l2": l2,
                    "feature": fd,
                }
            )
    summary = summarize(per_removal, n_boot=n_boot, seed=seed, level=level)
    result = {"per_removal": per_removal, "summary": summary, "feature_timestep": feature_timestep}
    write_json_atomic(Path(folder) / RESULT_FILE, result)
    return result


def summarize(
    per_removal: Sequence[dict[str, Any]], n_boot: int = 1000, seed: int = 0, level: float = 0.95
) -> dict[str, dict[str, dict[str, Any]]]:
    """Per method and fraction: ``n`` queries, the mean ``l2`` / ``feature`` distance with its
    bootstrap CI over queries (``l2_ci``, ``feature_ci``), and, when the random control was run
    for the same queries, the mean paired difference to it (``l2_vs_random``, ``feature_vs_random``)
    with CIs."""
    by: dict[tuple[str, str], dict[str, dict[str, float]]] = {}
    for rec in per_removal:
        by.setdefault((rec["method"], rec["fraction"]), {})[rec["query"]] = rec
    summary: dict[str, dict[str, dict[str, Any]]] = {}
    for (method, frac), recs in by.items():
        queries = sorted(recs)
        cell: dict[str, Any] = {"n": len(queries)}
        control = by.get((RANDOM_CONTROL, frac), {})
        for key in ("l2", "feature"):
            vals = np.array([recs[q][key] for q in queries])
            cell[key] = float(vals.mean())
            cell[f"{key}_ci"] = list(bootstrap_ci(vals, n_boot, seed, level))
            if method != RANDOM_CONTROL and all(q in control for q in queries):
                diff = vals - np.array([control[q][key] for q in queries])
                cell[f"{key}_vs_random"] = float(diff.mean())
                cell[f"{key}_vs_random_ci"] = list(bootstrap_ci(diff, n_boot, seed, level))
        summary.setdefault(method, {})[frac] = cell
    return summary


def _lab(o: dict[str, Any]) -> torch.Tensor | None:
    lab = o.get("label")
    return None if lab is None else lab.view(1)


def load_result(folder: Path) -> dict[str, Any]:
    return json.loads((Path(folder) / RESULT_FILE).read_text())
