"""Attributor folders: a method fitted on a training set, kept on disk to attribute new images.

``diffattr featurize`` and the demo write one with :func:`fit_into_folder`: the method's feature
stores plus a ``diffattr.json`` record of kind ``attributor`` holding the method, its complete
options (defaults resolved, so a later change of defaults cannot silently change the method), the
training data config and hash and the model hash. ``diffattr attribute`` reopens it with
:func:`open_folder`, which refuses another model or changed training data.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from diffattr.attribution.base import Attributor
from diffattr.attribution.conditioning import pixel_shape
from diffattr.attribution.ensemble import make_ensemble
from diffattr.attribution.onepass import featurize_for
from diffattr.attribution.registry import make_attributor, make_options
from diffattr.data.dataset import ImageDataset
from diffattr.errors import UserError
from diffattr.repro import MismatchError, open_result_dir, read_record, to_jsonable

log = logging.getLogger(__name__)

ATTRIBUTOR_KIND = "attributor"


def resolved_options(method: str, options: dict[str, Any]) -> dict[str, Any]:
    """Every option of ``method`` (the given ones validated, the rest at their defaults)."""
    return dict(to_jsonable(dataclasses.asdict(make_options(method, **options))))


def fit_into_folder(
    model: Any,
    model_path: str | Path,
    method: str,
    options: dict[str, Any],
    data_config: Any,
    train: ImageDataset,
    out: str | Path,
    progress: bool = True,
) -> Attributor:
    """Fit ``method`` on ``train`` with its stores in ``out`` (resuming / reusing what is there).

    ``data_config``: the :class:`~diffattr.config.DataConfig` that loads ``train`` (recorded so
    :func:`open_folder` can reload it). Raises :class:`~diffattr.repro.MismatchError` when ``out``
    was made with another method, options, data or model.
    """
    return fit_into_folders(
        model, model_path, {method: options}, data_config, train, {method: Path(out)}, progress
    )[method]


def fit_into_folders(
    model: Any,
    model_path: str | Path,
    methods: Mapping[str, Mapping[str, Any]],
    data_config: Any,
    train: ImageDataset,
    folders: Mapping[str, str | Path],
    progress: bool = True,
    accelerator: Any = None,
    ensemble: EnsembleModels | None = None,
) -> dict[str, Attributor]:
    """:func:`fit_into_folder` for several methods (``methods``: name -> options, ``folders``:
    name -> its folder), their gradient feature stores filled in one pass over the training set
    (:func:`~diffattr.attribution.onepass.featurize_for`) before each method fits.

    ``ensemble``: more models of the same training set; each method then scores with ``model``
    and these (:mod:`diffattr.attribution.ensemble`), and its folder records them.

    With an ``accelerator`` of several processes (``accelerate launch`` / ``torchrun``), the
    pass's shards are split between the processes; only the main process then fits the methods
    (the others return an empty dict).
    """
    check_image_shape(model, model_path, train)
    main = accelerator is None or bool(accelerator.is_main_process)
    attributors: dict[str, Attributor] = {}
    # The main process creates (or checks) the folders first, so the others never race.
    for turn in (True, False):
        if turn == main:
            for method, options in methods.items():
                attributors[method] = prepare_folder(
                    model,
                    model_path,
                    method,
                    dict(options),
                    data_config,
                    train,
                    Path(folders[method]),
                    progress,
                    ensemble,
                )
        if accelerator is not None:
            accelerator.wait_for_everyone()
    featurize_for(list(attributors.values()), train, accelerator=accelerator, progress=progress)
    if not main:
        return {}
    for attributor in attributors.values():
        attributor.fit(train)
    return attributors


def check_image_shape(model: Any, model_path: str | Path, train: ImageDataset) -> None:
    """Refuse training images of another shape than the model's, before any folder is written
    (the engine would refuse inside the first shard)."""
    want = pixel_shape(model)
    if want is not None and tuple(train.images.shape[1:]) != tuple(want):
        got, size = "x".join(str(d) for d in train.images.shape[1:]), want[-1]
        raise UserError(
            f"data {train.name!r} gives {got} images but the model {model_path} takes "
            f"{'x'.join(str(d) for d in want)}; load the data at size {size} (diffattr "
            "featurize: --size, or leave out --data to use the model's own data settings)"
        )


def prepare_folder(
    model: Any,
    model_path: str | Path,
    method: str,
    options: dict[str, Any],
    data_config: Any,
    train: ImageDataset,
    out: Path,
    progress: bool = True,
    ensemble: EnsembleModels | None = None,
) -> Attributor:
    """Create (or check) ``method``'s attributor folder ``out`` and return the attributor,
    not yet fitted, working in it. Options that do not fit the model (parameter patterns that
    match nothing) are refused before the folder is written."""
    full = resolved_options(method, options)
    attributor: Any
    if ensemble is None:
        attributor = make_attributor(method, model, work_dir=out, progress=progress, **full)
    else:
        attributor = make_ensemble(
            method,
            [model, *ensemble.models],
            work_dir=out,
            progress=progress,
            norm=ensemble.norm,
            **full,
        )
    for one in getattr(attributor, "members", [attributor]):
        check = getattr(one, "check_options", None)
        if check is not None:
            check()
    identity = {
        "method": method,
        "options": _as_recorded(out, method, full),
        "data": data_config,
        "data_hash": train.data_hash(),
        "model_hash": model.model_hash(),
    }
    extra: dict[str, Any] = {"model_path": str(model_path)}
    if ensemble is not None:
        identity["ensemble"] = {"model_hashes": ensemble.hashes, "norm": ensemble.norm}
        extra["ensemble_paths"] = [str(p) for p in ensemble.paths]
    open_result_dir(out, kind=ATTRIBUTOR_KIND, identity=identity, extra=extra)
    return attributor


def _as_recorded(out: Path, method: str, full: dict[str, Any]) -> dict[str, Any]:
    """``full`` without the options a folder made by an older version does not record and that
    are at their default (options added since, e.g. ``normalize``): the folder holds what those
    defaults give, so it reopens; any other difference is still refused."""
    try:
        recorded = read_record(out).get("identity", {}).get("options")
    except Exception:  # no folder or no record yet: a new folder records every option
        return full
    if not isinstance(recorded, dict):
        return full
    try:
        defaults = resolved_options(method, {})
    except Exception:  # a method with a required option: every option is compared
        return full
    return {k: v for k, v in full.items() if k in recorded or k not in defaults or v != defaults[k]}


@dataclasses.dataclass
class EnsembleModels:
    """The other models of an ensemble (the first is the attributor's own model): loaded
    ``models``, the folders they came from (``paths``) and how scores combine (``norm``)."""

    models: list[Any]
    paths: list[Path]
    norm: str = "z"

    @property
    def hashes(self) -> list[str]:
        return [m.model_hash() for m in self.models]

    @classmethod
    def load(cls, paths: list[str | Path], device: Any, norm: str = "z") -> EnsembleModels:
        from diffattr.diffusion.model import load_model

        return cls([load_model(p, device=device) for p in paths], [Path(p) for p in paths], norm)


def open_folder(
    model: Any, folder: str | Path, progress: bool = True
) -> tuple[Attributor, ImageDataset]:
    """The attributor saved in ``folder`` fitted again for ``model`` (its stores are reused), and
    the training set it attributes to.

    Raises :class:`~diffattr.repro.RecordNotFoundError` for a folder without a record and
    :class:`~diffattr.repro.MismatchError` for another kind of folder, another model or
    training data that changed since.
    """
    from diffattr.config import DataConfig
    from diffattr.data import load_dataset

    folder = Path(folder)
    record = read_record(folder)
    if record.get("kind") != ATTRIBUTOR_KIND:
        raise MismatchError(
            f"{folder} holds a {record.get('kind')!r} result, not features made by "
            "`diffattr featurize` (or the demo's runs/demo/features/<method>)"
        )
    ident = record["identity"]
    if ident["model_hash"] != model.model_hash():
        raise MismatchError(
            f"{folder} was featurized with model hash {ident['model_hash'][:12]}, but the given "
            f"model has hash {model.model_hash()[:12]}; pass the model it was made with"
        )
    train = load_dataset(DataConfig(**ident["data"]))
    if train.data_hash() != ident["data_hash"]:
        raise MismatchError(f"{folder}: the training data changed since featurization")
    attributor: Any
    if "ensemble" in ident:
        members = _ensemble_members(folder, record, model)
        attributor = make_ensemble(
            ident["method"],
            [model, *members.models],
            work_dir=folder,
            progress=progress,
            norm=members.norm,
            **ident["options"],
        )
    else:
        attributor = make_attributor(
            ident["method"], model, work_dir=folder, progress=progress, **ident["options"]
        )
    attributor.fit(train)
    return attributor, train


def _ensemble_members(folder: Path, record: dict[str, Any], model: Any) -> EnsembleModels:
    """The recorded ensemble's other models, each checked against its recorded hash."""
    ens = record["identity"]["ensemble"]
    paths = record.get("extra", {}).get("ensemble_paths") or []
    if len(paths) != len(ens["model_hashes"]):
        raise MismatchError(f"{folder}: the record names {len(paths)} ensemble model folders")
    members = EnsembleModels.load(paths, model.device, ens["norm"])
    for path, want, got in zip(paths, ens["model_hashes"], members.hashes, strict=True):
        if got != want:
            raise MismatchError(
                f"{folder}: ensemble model {path} has hash {got[:12]}, but the features were "
                f"made with {want[:12]}"
            )
    return members
