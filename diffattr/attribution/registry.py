"""Every attribution method by name, and one factory to build any of them.

``make_attributor("d-trak", model, work_dir, proj_dim=4096)`` builds the method's options dataclass
from the keyword options (unknown names and bad values are refused with the list of valid ones) and
returns an object satisfying :class:`diffattr.attribution.base.Attributor`.

Adding a method: write ``methods/<name>.py`` with an options dataclass and an attributor class
taking ``(model, work_dir, options, progress)``, then add one :class:`AttributorSpec` below. The
shared conformance test (``tests/test_attributor_conformance.py``) covers it automatically.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from diffattr.attribution.base import Attributor
from diffattr.attribution.methods.das import DAS, DASOptions
from diffattr.attribution.methods.dtrak import DTrak, DTrakOptions
from diffattr.attribution.methods.ekfac import EKFAC, KFAC, EKFACOptions, KFACOptions
from diffattr.attribution.methods.embedding import (
    ClipOptions,
    ClipSimilarity,
    DinoOptions,
    DinoSimilarity,
    UNetFeatureOptions,
    UNetFeatureSimilarity,
)
from diffattr.attribution.methods.ggda import GGDA, GGDAOptions
from diffattr.attribution.methods.ggn import GGN, GGNOptions
from diffattr.attribution.methods.journey import JourneyOptions, JourneyTrak
from diffattr.attribution.methods.pixel import PixelCosine, PixelOptions
from diffattr.attribution.methods.tracin import (
    DiffReTrac,
    GradCos,
    GradCosOptions,
    GradDot,
    GradDotOptions,
    ReTracOptions,
    TracIn,
    TracInOptions,
)
from diffattr.attribution.methods.trak import Trak, TrakOptions
from diffattr.attribution.methods.unlearn import Unlearn, UnlearnOptions
from diffattr.errors import OptionError


@dataclass(frozen=True)
class AttributorSpec:
    """One registered method: its name, a one-line description, options type and class."""

    name: str
    description: str
    options: type
    factory: Callable[..., Attributor]

    def option_names(self) -> list[str]:
        return [f.name for f in dataclasses.fields(self.options)]


ATTRIBUTORS: dict[str, AttributorSpec] = {
    spec.name: spec
    for spec in (
        AttributorSpec(
            "trak",
            "TRAK: projected gradients of the denoising loss, averaged over timesteps, TRAK kernel",
            TrakOptions,
            Trak,
        ),
        AttributorSpec(
            "d-trak",
            "D-TRAK: TRAK kernel on gradients of a loss-free output (default: squared noise norm)",
            DTrakOptions,
            DTrak,
        ),
        AttributorSpec(
            "ggda",
            "GGDA: D-TRAK with one feature per training group (class, CSV or k-means) and a "
            "kernel over groups; images share their group's score",
            GGDAOptions,
            GGDA,
        ),
        AttributorSpec(
            "journey-trak",
            "Journey-TRAK: per-sampling-step TRAK along the query's generation trajectory",
            JourneyOptions,
            JourneyTrak,
        ),
        AttributorSpec(
            "das",
            "DAS: TRAK kernel on unit-normalised noise-output gradients, weighted by training residuals",
            DASOptions,
            DAS,
        ),
        AttributorSpec(
            "tracin",
            "Diffusion-TracIn: learning-rate-weighted gradient dot products summed over checkpoints",
            TracInOptions,
            TracIn,
        ),
        AttributorSpec(
            "grad-dot",
            "Gradient dot product <g_query, g_train> of the denoising loss (one model)",
            GradDotOptions,
            GradDot,
        ),
        AttributorSpec(
            "grad-cos",
            "Gradient cosine similarity of the denoising loss (one model)",
            GradCosOptions,
            GradCos,
        ),
        AttributorSpec(
            "diff-retrac",
            "Diffusion-ReTrac: TracIn on per-timestep unit-normalised gradients (removes norm bias)",
            ReTracOptions,
            DiffReTrac,
        ),
        AttributorSpec(
            "unlearn",
            "Attribution by unlearning: Fisher-preconditioned ascent on the query's loss, score = "
            "rise of each training image's loss",
            UnlearnOptions,
            Unlearn,
        ),
        AttributorSpec(
            "ekfac",
            "Influence functions: query gradient preconditioned by the EK-FAC GGN of the training "
            "loss, dotted with training loss gradients",
            EKFACOptions,
            EKFAC,
        ),
        AttributorSpec(
            "kfac",
            "Influence functions with the K-FAC GGN (EK-FAC without the eigenvalue correction)",
            KFACOptions,
            KFAC,
        ),
        AttributorSpec(
            "ggn",
            "Influence functions with the dense Monte-Carlo GGN of the projected gradients (checks "
            "(E)K-FAC's layer-wise Kronecker factorisation)",
            GGNOptions,
            GGN,
        ),
        AttributorSpec(
            "clip",
            "CLIP image-embedding cosine similarity baseline (option model: checkpoint folder/id)",
            ClipOptions,
            ClipSimilarity,
        ),
        AttributorSpec(
            "dino",
            "DINOv2 image-embedding cosine similarity baseline (option model: checkpoint folder/id)",
            DinoOptions,
            DinoSimilarity,
        ),
        AttributorSpec(
            "unet-features",
            "Cosine similarity of the diffusion model's own mid-block features of the noised image",
            UNetFeatureOptions,
            UNetFeatureSimilarity,
        ),
        AttributorSpec(
            "pixel",
            "Raw-pixel cosine similarity baseline (no model gradients)",
            PixelOptions,
            PixelCosine,
        ),
    )
}


def list_attributors() -> list[tuple[str, str]]:
    """``(name, one-line description)`` for every registered method, in registry order."""
    return [(s.name, s.description) for s in ATTRIBUTORS.values()]


def get_spec(name: str) -> AttributorSpec:
    try:
        return ATTRIBUTORS[name]
    except KeyError:
        raise OptionError(
            f"attribution method {name!r} is unknown; valid names: {', '.join(ATTRIBUTORS)}"
        ) from None


def make_options(name: str, **options: Any) -> Any:
    """The options dataclass of method ``name`` built from keyword options (validated)."""
    spec = get_spec(name)
    valid = spec.option_names()
    unknown = sorted(set(options) - set(valid))
    if unknown:
        raise OptionError(
            f"{name}: unknown option(s) {', '.join(unknown)}; valid options: {', '.join(valid)}"
        )
    try:
        return spec.options(**options)
    except (TypeError, ValueError) as exc:
        raise OptionError(f"{name}: invalid option value: {exc}") from exc


def make_attributor(
    name: str,
    model: Any,
    /,
    work_dir: str | os.PathLike | None = None,
    progress: bool = False,
    **options: Any,
) -> Attributor:
    """Build method ``name`` for ``model``.

    ``work_dir``: where the method caches training-set features (a subfolder per method and
    settings); ``None`` keeps them in a temporary folder that lives as long as the attributor.
    ``progress``: show tqdm bars while featurizing. ``options``: fields of the method's options
    dataclass (see ``ATTRIBUTORS[name].options``).
    """
    spec = get_spec(name)
    opts = make_options(name, **options)
    return spec.factory(
        model, None if work_dir is None else Path(work_dir), opts, progress=progress
    )
