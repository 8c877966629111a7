"""Diffusion models: loading/saving (diffusers layout), trajectory-recording sampling, training."""

from __future__ import annotations

from diffattr.diffusion.model import (
    DiffusionModel,
    ModelLoadError,
    build_model,
    count_parameters,
    diffusion_loss,
    load_model,
    save_model,
)
from diffattr.diffusion.sampling import SampleResult, sample
from diffattr.diffusion.trainer import is_trained, train_model

__all__ = [
    "DiffusionModel",
    "ModelLoadError",
    "SampleResult",
    "build_model",
    "count_parameters",
    "diffusion_loss",
    "is_trained",
    "load_model",
    "sample",
    "save_model",
    "train_model",
]
