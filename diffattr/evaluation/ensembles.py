"""The models of a model ensemble, trained by the project trainer and kept as their own folders.

Three kinds (:class:`EnsembleSpec`), each a list of model folders whose first ``size`` make an
ensemble of that size, so an ensemble of 2 is the first two members of an ensemble of 8 and their
feature stores are shared:

* ``seeds``: models trained on every training image with other seeds; member 0 is the reference
  model itself (``full_model``), so size 1 is the single-model method.
* ``subsets``: models trained on random subsets of ``alpha`` of the training images (TRAK's and
  D-TRAK's ensemble protocol). The subsets are drawn from a seed of their own, never the ground
  truth's subsets: scoring with the models the ground truth retrained would leak it.
* ``checkpoints``: one more run of the reference config, its final model first, then its last
  ``size - 1`` checkpoints before the end (every ``every`` steps; all kept), newest first. The
  cheapest kind: one training run for any size. (Checkpoints hold the raw weights; with EMA the
  final model is the averaged one.)

Jobs go through :func:`~diffattr.evaluation.retrain.run_jobs`: shared between processes and
resumed after a kill like the retraining ensemble.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from diffattr.attribution.ensemble import NORMS
from diffattr.attribution.methods.common import short_hash
from diffattr.config import ExperimentConfig, resolve_train_length
from diffattr.diffusion.trainer import checkpoint_dirs
from diffattr.errors import OptionError
from diffattr.evaluation.retrain import TrainJob, default_trainer
from diffattr.evaluation.subsets import make_subsets
from diffattr.repro import derive_seed, read_record

KINDS = ("seeds", "subsets", "checkpoints")


@dataclass(frozen=True)
class EnsembleSpec:
    """How to make an ensemble: ``kind`` (one of :data:`KINDS`), ``size`` models, scores
    combined by ``norm`` (see :mod:`diffattr.attribution.ensemble`); ``alpha``: the subsets'
    fraction; ``every``: steps between the kept checkpoints (None: a sixteenth of the run, so
    8 checkpoints span its second half); ``seed``: the subsets' and seeds' draw."""

    kind: str
    size: int
    norm: str = "z"
    alpha: float = 0.5
    every: int | None = None
    seed: int = 0

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise OptionError(f"ensemble.kind: {self.kind!r} is not one of {', '.join(KINDS)}")
        if isinstance(self.size, bool) or not isinstance(self.size, int) or self.size < 1:
            raise OptionError(f"ensemble.size: expected an int >= 1, got {self.size!r}")
        if self.norm not in NORMS:
            raise OptionError(f"ensemble.norm: {self.norm!r} is not one of {', '.join(NORMS)}")
        if not 0.0 < float(self.alpha) <= 1.0:
            raise OptionError(f"ensemble.alpha: expected a fraction in (0, 1], got {self.alpha!r}")
        if self.every is not None and (
            isinstance(self.every, bool) or not isinstance(self.every, int) or self.every < 1
        ):
            raise OptionError(f"ensemble.every: expected an int >= 1 or null, got {self.every!r}")

    @classmethod
    def from_dict(cls, raw: Any, where: str) -> EnsembleSpec:
        if not isinstance(raw, dict):
            raise OptionError(f"{where}: expected a mapping with kind and size, got {raw!r}")
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(raw) - names)
        if unknown:
            raise OptionError(
                f"{where}: unknown key(s) {', '.join(unknown)}; valid: {', '.join(sorted(names))}"
            )
        try:
            return cls(**raw)
        except TypeError as exc:
            raise OptionError(f"{where}: {exc}") from None
        except OptionError as exc:
            raise OptionError(f"{where}: {exc}") from None

    def folder_name(self) -> str:
        """The members' folder: what decides the models (not ``size`` nor ``norm``)."""
        return f"{self.kind}-{short_hash(self.kind, self.alpha, self.every, self.seed)}"


def checkpoint_every(spec: EnsembleSpec, exp: ExperimentConfig, n_train: int) -> int:
    steps = resolve_train_length(exp, n_train).train.steps
    return spec.every if spec.every is not None else max(1, math.ceil(steps / 16))


def ensemble_jobs(
    spec: EnsembleSpec, exp: ExperimentConfig, train_ids: np.ndarray, folder: Path
) -> list[TrainJob]:
    """The models to train for an ensemble of ``spec.size`` (``folder``: the kind's folder)."""
    ids = np.asarray(train_ids, dtype=np.int64)
    if spec.kind == "seeds":
        return [
            TrainJob(
                f"member-{i:03d}",
                dataclasses.replace(exp, seed=derive_seed(exp.seed, "ensemble-seed", i) % 2**31),
                ids,
                folder / f"member-{i:03d}",
            )
            for i in range(1, spec.size)
        ]
    if spec.kind == "subsets":
        draw = derive_seed(spec.seed, "ensemble-subsets") % 2**31
        subsets = make_subsets(ids, spec.size, spec.alpha, draw)
        return [
            TrainJob(
                f"member-{i:03d}",
                dataclasses.replace(
                    exp, seed=derive_seed(exp.seed, "ensemble-subset", spec.seed, i) % 2**31
                ),
                subsets.ids(i),
                folder / f"member-{i:03d}",
            )
            for i in range(spec.size)
        ]
    every = checkpoint_every(spec, exp, len(ids))
    cfg = dataclasses.replace(exp, train=dataclasses.replace(exp.train, checkpoint_every=every))
    return [TrainJob("run", cfg, ids, folder / "run")]


def job_trainer(spec: EnsembleSpec) -> Any:
    """The trainer of ``spec``'s jobs (checkpoints: every checkpoint kept)."""
    if spec.kind == "checkpoints":
        return functools.partial(default_trainer(), keep_checkpoints=True)
    return None


def member_folders(spec: EnsembleSpec, folder: Path, reference: Path) -> list[Path]:
    """The ``spec.size`` model folders of the ensemble, member 0 first (``seeds``: ``reference``,
    the full model; ``checkpoints``: the run's final model). Call it once the jobs are trained.
    Raises :class:`ValueError` when the run kept too few checkpoints."""
    if spec.kind == "seeds":
        return [reference] + [folder / f"member-{i:03d}" for i in range(1, spec.size)]
    if spec.kind == "subsets":
        return [folder / f"member-{i:03d}" for i in range(spec.size)]
    run = folder / "run"
    final = int(read_record(run)["steps"])
    # A checkpoint at the final step holds the final model's weights: the model stands for it.
    earlier = [path for step, path in reversed(checkpoint_dirs(run)) if step < final]
    if len(earlier) < spec.size - 1:
        raise ValueError(
            f"{run}: {len(earlier)} checkpoints before its final model, the ensemble asks for "
            f"{spec.size - 1}; a smaller ensemble.every keeps more"
        )
    return [run, *earlier[: spec.size - 1]]
