"""What a report starts from: the query image, and one fitted attributor per method.

Each method's attributor comes from its folder ``<features root>/<method>`` (``diffattr
featurize`` or the demo wrote it); a missing folder is built with the method's default options via
:func:`~diffattr.attribution.saved.fit_into_folder`. All methods must attribute to the same
training set, or their rankings could not be compared.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from diffattr.attribution.base import Attributor, Queries
from diffattr.attribution.registry import get_spec
from diffattr.attribution.saved import fit_into_folders, open_folder, resolved_options
from diffattr.data.dataset import DataError, ImageDataset
from diffattr.data.imagefolder import imagefolder_files
from diffattr.errors import UserError
from diffattr.repro import MismatchError, read_record

log = logging.getLogger(__name__)

TRAJECTORY_METHODS = frozenset({"journey-trak"})  # need the query's generation trajectory
EMBEDDING_METHODS = ("clip", "dino", "unet-features")  # their score is an embedding cosine


@dataclass
class MethodRun:
    """One method's fitted attributor, the folder it lives in and its ``diffattr.json`` record."""

    name: str
    folder: Path
    attributor: Attributor
    train: ImageDataset
    record: dict[str, Any]
    built: bool
    open_seconds: float
    timing: dict[str, float] = field(default_factory=dict)


def parse_methods(text: str) -> list[str]:
    """Comma-separated method names, each checked against the registry (unknown: one-line error)."""
    names = [m.strip() for m in text.split(",") if m.strip()]
    if not names:
        raise UserError("--methods: give at least one method, e.g. d-trak,das,pixel")
    for name in names:
        # A method that scores groups (an image's score is its group's share) would list
        # arbitrary members of the top group as its top images.
        if getattr(get_spec(name).factory, "scores_groups", False):
            raise UserError(
                f"--methods: {name} scores groups, not images, so it has no top images to show; "
                "the report's group shares come from the per-image methods (README, group LDS)"
            )
    return list(dict.fromkeys(names))


def load_query(path: Path, shape: tuple[int, int, int], prompt: str | None = None) -> Queries:
    """The query image (must have the model's shape), with its trajectory (and a text-to-image
    model's prompt) when it was written by ``diffattr generate`` (a ``sample.json`` beside it and
    a numbered ``NNNN.png`` name); ``prompt`` replaces the saved one."""
    from diffattr.data.images import load_image
    from diffattr.diffusion.sampling import SampleResult

    if not path.is_file():
        raise DataError(f"{path}: image file not found")
    image = load_image(path, shape)
    trajectories, prompts = None, None
    if (path.parent / "sample.json").exists() and path.stem.isdigit():
        saved = SampleResult.load(path.parent)
        index = int(path.stem)
        if path.name == f"{index:04d}.png" and index < saved.images.shape[0]:
            trajectories = [saved.trajectory(index)]
            if saved.prompts is not None:
                prompts = [saved.prompts[index]]
    if prompt is not None:
        prompts = [prompt]
    return Queries(
        images=image[None], names=[path.name], trajectories=trajectories, prompts=prompts
    )


def model_data_config(model: Any) -> Any:
    """The DataConfig the model was trained on (to build a missing attributor folder)."""
    from diffattr.config import DataConfig

    cfg = model.record.get("config") if isinstance(model.record, dict) else None
    if not cfg or "data" not in cfg:
        raise UserError(
            "the model records no training data, so missing feature folders cannot be built; "
            "featurize each method first with `diffattr featurize --data ...`"
        )
    return DataConfig(**cfg["data"])


def build_missing(
    model: Any,
    model_path: Path,
    folders: dict[str, Path],
    train_loader: Any,
    progress: bool,
    options: dict[str, dict[str, Any]] | None = None,
) -> dict[str, Attributor]:
    """Build the methods' folders that do not exist yet (with ``options[method]``, else the
    defaults), their gradient features in one pass over the training set; returns the fitted
    attributors by method."""
    missing = {m: f for m, f in folders.items() if not f.exists()}
    if not missing:
        return {}
    options = options or {}
    log.info("no feature folder for %s; building them", ", ".join(missing))
    data_cfg, train = train_loader()
    return fit_into_folders(
        model,
        model_path,
        {m: options.get(m, {}) for m in missing},
        data_cfg,
        train,
        missing,
        progress,
    )


def open_method(
    model: Any,
    model_path: Path,
    method: str,
    folder: Path,
    train_loader: Any,
    progress: bool,
    built: Attributor | None = None,
    options: dict[str, Any] | None = None,
) -> MethodRun:
    """Reopen ``folder`` for ``method``, or build it (``options``, else the defaults) when it
    does not exist.

    ``train_loader``: a callable returning ``(data_config, train)`` (loaded once, on demand);
    ``built``: the attributor :func:`build_missing` just fitted in ``folder``; ``options``: an
    existing folder must have been made with them (else :class:`MismatchError`)."""
    t0 = time.perf_counter()
    if built is None and not folder.exists():
        built = build_missing(
            model, model_path, {method: folder}, train_loader, progress, {method: options or {}}
        )[method]
    if built is None and options:
        check_folder_options(folder, method, options)
    if built is not None:
        attributor, train = built, train_loader()[1]
    else:
        attributor, train = open_folder(model, folder, progress=progress)
    record = read_record(folder)
    if record["identity"]["method"] != method:
        raise MismatchError(
            f"{folder} holds features of {record['identity']['method']!r}, not {method!r}"
        )
    return MethodRun(
        method, folder, attributor, train, record, built is not None, time.perf_counter() - t0
    )


def check_folder_options(folder: Path, method: str, options: dict[str, Any]) -> None:
    """Refuse ``folder`` when it holds ``method`` made with other ``options`` than asked."""
    record = read_record(folder)
    made = record.get("identity", {}).get("options", {})
    want = resolved_options(method, options)
    differ = sorted(k for k in want if made.get(k) != want[k])
    if record.get("identity", {}).get("method") == method and differ:
        raise MismatchError(
            f"{folder} holds {method} made with other options ("
            + ", ".join(f"{k}: {made.get(k)!r}, asked {want[k]!r}" for k in differ[:5])
            + "); use another --features-root or remove the folder"
        )


def check_same_training_set(runs: list[MethodRun]) -> None:
    """Every method must attribute to one training set (same data hash)."""
    first = runs[0]
    for run in runs[1:]:
        if run.record["identity"]["data_hash"] != first.record["identity"]["data_hash"]:
            raise MismatchError(
                f"{run.folder} was featurized on other training data than {first.folder}; "
                "a report compares methods on one training set"
            )


def training_sources(data_config: dict[str, Any], train: ImageDataset) -> dict[int, str]:
    """Training id -> where the image came from: its file for an image folder, else
    ``<data set>:<id>``."""
    sources = {int(i): f"{train.name}:{int(i)}" for i in train.ids.tolist()}
    if data_config.get("source") != "imagefolder" or not data_config.get("root"):
        return sources
    try:
        files = imagefolder_files(data_config["root"], data_config["split"])
    except (DataError, OSError) as exc:
        log.warning("could not list the training files (%s); naming images by id", exc)
        return sources
    return {i: files.get(i, s) for i, s in sources.items()}


def train_features(run: MethodRun) -> torch.Tensor | None:
    """An embedding method's training embeddings ``(n, d)`` (None for other methods)."""
    feats = getattr(run.attributor, "train_full", None)
    return feats if isinstance(feats, torch.Tensor) else None
