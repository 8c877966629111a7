"""Ground truth for LDS: each retrained model's diffusion loss on each query.

The measured model output (as in D-TRAK / DAS) is the query's denoising loss averaged over a fixed
set of timesteps (evenly spaced over ``[0, T-1]``) and fixed noises. The noise of query ``name`` at
timestep ``t``, draw ``d`` is ``randn((C, H, W))`` from a generator seeded with
``derive_seed(seed, "gt-noise", name, t, d)``: it is shared by every model, so only the model
differs between the rows being correlated.

Each model's losses are one shard (``losses/<model>.safetensors``), written atomically, so a kill
loses at most the shards in flight. :func:`assemble` stacks the shards into ``losses_per_seed``
``(M, S, Q)`` and their mean over seeds ``losses`` ``(M, Q)``.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.numpy import load_file, save_file
from tqdm.auto import tqdm

from diffattr.attribution.base import Queries
from diffattr.evaluation.retrain import ProcessInfo, TrainJob, my_jobs, wait_until
from diffattr.repro import derive_seed, write_json_atomic

log = logging.getLogger(__name__)

GT_FILE = "ground_truth.safetensors"
GT_META = "ground_truth.json"


@dataclass
class GroundTruthSpec:
    """Which (timestep, noise) pairs the loss is averaged over."""

    timesteps: list[int]
    noise_draws: int = 1
    seed: int = 0
    batch_size: int = 256


def evenly_spaced_timesteps(count: int, num_train_timesteps: int) -> list[int]:
    """``count`` distinct timesteps evenly spread over ``[0, T-1]`` (all of them when count == T)."""
    if not 1 <= count <= num_train_timesteps:
        raise ValueError(f"timestep count must be in [1, {num_train_timesteps}], got {count}")
    if count == 1:
        return [num_train_timesteps // 2]
    return sorted({int(round(v)) for v in np.linspace(0, num_train_timesteps - 1, count)})


def gt_noise(
    seed: int, names: list[str], t: int, draw: int, shape: tuple[int, int, int]
) -> torch.Tensor:
    """The fixed noise ``(n, C, H, W)`` for timestep ``t``, draw ``draw`` of the named queries.

    Each query's noise depends only on ``(seed, name, t, draw)``, not on which other queries are
    measured alongside it.
    """
    out = torch.empty((len(names), *shape))
    for i, name in enumerate(names):
        g = torch.Generator().manual_seed(derive_seed(seed, "gt-noise", name, t, draw))
        out[i] = torch.randn(shape, generator=g)
    return out


@torch.no_grad()
def query_losses(
    model: Any, queries: Queries, spec: GroundTruthSpec, progress: bool = False
) -> np.ndarray:
    """Mean diffusion loss per query ``(Q,)`` float64 over ``spec``'s (timestep, noise) pairs."""
    from diffattr.attribution.conditioning import condition, model_inputs
    from diffattr.diffusion.model import diffusion_loss, eval_mode

    device = model.device
    # The model's own inputs (a latent model's VAE latents) and conditioning (class labels, or
    # the prompts' token ids): the loss is the one the model was trained on.
    images = model_inputs(model, queries.images.to(device, torch.float32)).cpu()
    n = images.shape[0]
    shape = (int(images.shape[1]), int(images.shape[2]), int(images.shape[3]))
    labels = condition(model, queries.labels, queries.prompts, n, "ground truth queries")
    combos = [(t, d) for t in spec.timesteps for d in range(spec.noise_draws)]
    total = torch.zeros(n, dtype=torch.float64)
    # Pack several (t, d) combos into one forward pass when there are few queries.
    per_batch = max(1, spec.batch_size // n)
    q_chunk = min(n, spec.batch_size)
    with eval_mode(model.unet):
        for lo in tqdm(range(0, len(combos), per_batch), disable=not progress, desc="ground truth"):
            group = combos[lo : lo + per_batch]
            noise = torch.cat([gt_noise(spec.seed, queries.names, t, d, shape) for t, d in group])
            ts = torch.cat([torch.full((n,), t, dtype=torch.int64) for t, _ in group])
            x0 = images.repeat(len(group), 1, 1, 1)
            lab = (
                None
                if labels is None
                else labels.cpu().repeat(len(group), *([1] * (labels.ndim - 1)))
            )
            for a in range(0, x0.shape[0], q_chunk):
                b = a + q_chunk
                loss = diffusion_loss(
                    model,
                    x0[a:b].to(device),
                    ts[a:b].to(device),
                    noise[a:b].to(device),
                    None if lab is None else lab[a:b].to(device),
                )
                idx = torch.arange(a, min(b, x0.shape[0])) % n
                total.index_add_(0, idx, loss.double().cpu())
    return (total / len(combos)).numpy()


def shard_path(folder: Path, job: TrainJob) -> Path:
    return Path(folder) / "losses" / f"{job.name}.safetensors"


def compute_shards(
    jobs: Sequence[TrainJob],
    queries: Queries,
    spec: GroundTruthSpec,
    folder: Path,
    proc: ProcessInfo | None = None,
    device: str | torch.device | None = None,
    progress: bool = True,
) -> list[str]:
    """Compute this process's missing shards (jobs ``r::W``); names of the shards written."""
    from diffattr.diffusion.model import load_model

    proc = proc or ProcessInfo()
    if device is None:
        local = int(os.environ.get("LOCAL_RANK", "0"))
        device = f"cuda:{local}" if torch.cuda.is_available() else "cpu"
    todo = [j for j in my_jobs(jobs, proc) if not shard_path(folder, j).exists()]
    written = []
    for job in tqdm(todo, disable=not progress, desc=f"ground truth[{proc.index}]"):
        model = load_model(job.out_dir, device=device)
        losses = query_losses(model, queries, spec)
        path = shard_path(folder, job)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
        save_file(
            {"losses": losses.astype(np.float64)},
            str(tmp),
            metadata={
                "model_hash": model.model_hash(),
                "model": job.name,
            },
        )
        os.replace(tmp, path)
        written.append(job.name)
    return written


@dataclass
class GroundTruth:
    """``losses``: ``(M, Q)`` mean over seeds; ``losses_per_seed``: ``(M, S, Q)``."""

    losses: np.ndarray
    losses_per_seed: np.ndarray
    query_names: list[str]
    spec: GroundTruthSpec

    def save(self, folder: Path) -> Path:
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        tmp = folder / f".{GT_FILE}.tmp{os.getpid()}"
        save_file({"losses": self.losses, "losses_per_seed": self.losses_per_seed}, str(tmp))
        os.replace(tmp, folder / GT_FILE)
        write_json_atomic(
            folder / GT_META,
            {
                "query_names": self.query_names,
                "spec": asdict(self.spec),
                "shape": {
                    "subsets": self.losses_per_seed.shape[0],
                    "seeds": self.losses_per_seed.shape[1],
                    "queries": self.losses_per_seed.shape[2],
                },
                "output": "diffusion loss averaged over spec.timesteps x spec.noise_draws",
            },
        )
        return folder

    @classmethod
    def load(cls, folder: Path) -> GroundTruth:
        folder = Path(folder)
        for name in (GT_FILE, GT_META):
            if not (folder / name).exists():
                raise FileNotFoundError(f"{folder / name}: missing; ground truth not assembled")
        t = load_file(str(folder / GT_FILE))
        meta = json.loads((folder / GT_META).read_text())
        return cls(
            losses=t["losses"],
            losses_per_seed=t["losses_per_seed"],
            query_names=list(meta["query_names"]),
            spec=GroundTruthSpec(**meta["spec"]),
        )


def assemble(
    jobs: Sequence[TrainJob],
    num_subsets: int,
    seeds_per_subset: int,
    query_names: list[str],
    spec: GroundTruthSpec,
    folder: Path,
) -> GroundTruth:
    """Stack the shards of ``jobs`` (subset-major, as made by ``subset_jobs``) and save them."""
    if len(jobs) != num_subsets * seeds_per_subset:
        raise ValueError(f"{len(jobs)} jobs for {num_subsets} subsets x {seeds_per_subset} seeds")
    per_seed = np.zeros((num_subsets, seeds_per_subset, len(query_names)), dtype=np.float64)
    for k, job in enumerate(jobs):
        path = shard_path(folder, job)
        if not path.exists():
            raise FileNotFoundError(f"{path}: ground-truth shard missing")
        losses = load_file(str(path))["losses"]
        if losses.shape != (len(query_names),):
            raise ValueError(f"{path}: {losses.shape[0]} losses for {len(query_names)} queries")
        per_seed[k // seeds_per_subset, k % seeds_per_subset] = losses
    gt = GroundTruth(per_seed.mean(axis=1), per_seed, list(query_names), spec)
    gt.save(folder)
    return gt


def ground_truth(
    jobs: Sequence[TrainJob],
    num_subsets: int,
    seeds_per_subset: int,
    queries: Queries,
    spec: GroundTruthSpec,
    folder: Path,
    proc: ProcessInfo | None = None,
    progress: bool = True,
) -> GroundTruth:
    """Compute this process's shards, wait for the others' shards, assemble (process 0 saves)."""
    proc = proc or ProcessInfo()
    folder = Path(folder)
    if (folder / GT_FILE).exists() and (folder / GT_META).exists():
        return GroundTruth.load(folder)
    compute_shards(jobs, queries, spec, folder, proc, progress=progress)
    wait_until(
        lambda: all(shard_path(folder, j).exists() for j in jobs),
        f"{len(jobs)} ground-truth shards",
    )
    if proc.index == 0:
        return assemble(jobs, num_subsets, seeds_per_subset, queries.names, spec, folder)
    wait_until(lambda: (folder / GT_META).exists(), "the assembled ground truth")
    return GroundTruth.load(folder)
