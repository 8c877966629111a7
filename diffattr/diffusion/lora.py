"""LoRA adapters on a text-to-image UNet, through peft exactly as diffusers uses them.

* :func:`add_lora` injects peft ``LoraConfig`` layers with ``unet.add_adapter`` (what diffusers'
  ``train_text_to_image_lora.py`` does); the adapter is always named ``"default"``, so parameter
  names are the same in memory and after loading (``...attn1.to_q.lora_A.default.weight``).
* :func:`save_lora` writes ``pytorch_lora_weights.safetensors`` with
  ``StableDiffusionPipeline.save_lora_weights`` (the peft config goes into the file's header, as
  diffusers' own ``save_lora_adapter`` does, so ``lora_alpha`` survives) and ``lora_config.json``
  beside it.
* :func:`load_lora` reads such a file (or diffusers' training script's, or any UNet LoRA that
  ``StableDiffusionPipeline.lora_state_dict`` understands) and injects it with
  ``StableDiffusionPipeline.load_lora_into_unet``; then checks that every weight of the file landed
  in the UNet, so a LoRA for another base model is refused instead of half-loaded.

Only safetensors files are read (never a pickle), and nothing is downloaded.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, cast

import torch

from diffattr.diffusion.model import ModelLoadError
from diffattr.repro import write_json_atomic

LORA_WEIGHT_NAME = "pytorch_lora_weights.safetensors"  # diffusers' LORA_WEIGHT_NAME_SAFE
LORA_CONFIG_NAME = "lora_config.json"
ADAPTER_NAME = "default"
#: Every attention projection of the UNet (self- and cross-attention): D-TRAK's ArtBench setting.
DEFAULT_TARGETS: tuple[str, ...] = ("to_q", "to_k", "to_v", "to_out.0")
#: ``init`` names -> peft's ``init_lora_weights``: "gaussian" (A normal, B = 0: a no-op at first),
#: "kaiming" (peft's default: A Kaiming-uniform, B = 0), "random" (A and B both random: not a
#: no-op, so that gradients of A are not zero; for tests).
INITS: dict[str, str | bool] = {"gaussian": "gaussian", "kaiming": True, "random": False}


class LoraLoadError(ModelLoadError):
    """A LoRA file that is missing, unreadable, or does not fit the base model's UNet."""


def lora_config(
    rank: int,
    alpha: float | None = None,
    targets: Sequence[str] = DEFAULT_TARGETS,
    init: str = "gaussian",
) -> Any:
    """peft ``LoraConfig(r=rank, lora_alpha=alpha or rank, target_modules=targets, ...)``."""
    from peft import LoraConfig

    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
        raise ValueError(f"LoRA rank must be an integer >= 1, got {rank!r}")
    if init not in INITS:
        raise ValueError(f"LoRA init={init!r}; expected one of {sorted(INITS)}")
    if isinstance(targets, str) or not targets:
        raise ValueError(f"LoRA targets must be a non-empty list of module names, got {targets!r}")
    return LoraConfig(
        r=rank,
        lora_alpha=cast(Any, float(rank if alpha is None else alpha)),
        init_lora_weights=INITS[init],  # type: ignore[arg-type]
        target_modules=list(targets),
    )


def add_lora(
    unet: torch.nn.Module,
    rank: int,
    alpha: float | None = None,
    targets: Sequence[str] = DEFAULT_TARGETS,
    init: str = "gaussian",
    seed: int | None = None,
) -> Any:
    """Inject a fresh LoRA adapter (named ``"default"``) into ``unet``; returns its ``LoraConfig``.

    As with peft, only the LoRA weights stay trainable (the base weights get
    ``requires_grad=False``). ``seed``: draw the LoRA initialisation from this seed without
    touching the global RNG (``None``: the global RNG, as peft does).
    """
    config = lora_config(rank, alpha, targets, init)
    if ADAPTER_NAME in (getattr(unet, "peft_config", None) or {}):
        raise ValueError("this UNet already has a LoRA adapter; load a fresh base model first")
    with torch.random.fork_rng(devices=[], enabled=seed is not None):
        if seed is not None:
            torch.manual_seed(seed)
        unet.add_adapter(config, adapter_name=ADAPTER_NAME)  # type: ignore[operator]
    return config


def has_lora(unet: torch.nn.Module) -> bool:
    return ADAPTER_NAME in (getattr(unet, "peft_config", None) or {})


def lora_parameter_names(unet: torch.nn.Module) -> list[str]:
    """Names (as in ``unet.named_parameters()``) of the peft LoRA weights: every ``lora_A`` /
    ``lora_B`` matrix, in module order. Empty when no LoRA is loaded."""
    return [n for n, _ in unet.named_parameters() if ".lora_A." in n or ".lora_B." in n]


def lora_state_dict(unet: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The LoRA weights in peft / diffusers file naming (``...to_q.lora_A.weight``)."""
    from peft.utils import get_peft_model_state_dict

    if not has_lora(unet):
        raise ValueError("this UNet has no LoRA adapter")
    return get_peft_model_state_dict(unet, adapter_name=ADAPTER_NAME)


def lora_config_dict(unet: torch.nn.Module) -> dict[str, Any]:
    """The adapter's peft config as plain JSON (sets as sorted lists)."""
    config = cast(Any, unet).peft_config[ADAPTER_NAME].to_dict()
    return json.loads(json.dumps(config, default=_jsonable, sort_keys=True))


def lora_summary(unet: torch.nn.Module) -> dict[str, Any]:
    """rank, alpha, targets and init of the loaded adapter (what a record keeps)."""
    cfg = cast(Any, unet).peft_config[ADAPTER_NAME]
    targets = cfg.target_modules
    init = next((k for k, v in INITS.items() if v == cfg.init_lora_weights), None)
    return {
        "rank": int(cfg.r),
        "alpha": float(cfg.lora_alpha),
        "targets": sorted(targets) if isinstance(targets, (set, list, tuple)) else targets,
        "init": init,
        "rank_pattern": dict(cfg.rank_pattern or {}),
        "alpha_pattern": dict(cfg.alpha_pattern or {}),
    }


def _jsonable(obj: Any) -> Any:
    if isinstance(obj, (set, frozenset)):
        return sorted(obj, key=str)
    return str(obj)


def save_lora(model_or_unet: Any, folder: str | os.PathLike) -> Path:
    """Write the UNet's LoRA into ``folder``; returns the ``pytorch_lora_weights.safetensors`` path.

    The file is what ``StableDiffusionPipeline.save_lora_weights`` writes (so diffusers'
    ``pipe.load_lora_weights(folder)`` reads it), with the peft config in its header; the same
    config and a summary (rank, alpha, targets, init) go to ``lora_config.json`` beside it.
    """
    from diffusers import StableDiffusionPipeline

    unet = getattr(model_or_unet, "unet", model_or_unet)
    if not has_lora(unet):
        raise ValueError("save_lora: this UNet has no LoRA adapter")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    weights = {k: v.detach().to("cpu").contiguous() for k, v in lora_state_dict(unet).items()}
    StableDiffusionPipeline.save_lora_weights(
        str(folder),
        unet_lora_layers=weights,  # type: ignore[arg-type]
        weight_name=LORA_WEIGHT_NAME,
        safe_serialization=True,
        unet_lora_adapter_metadata=lora_config_dict(unet),
    )
    write_json_atomic(
        folder / LORA_CONFIG_NAME,
        {**lora_summary(unet), "weights": LORA_WEIGHT_NAME, "peft_config": lora_config_dict(unet)},
    )
    return folder / LORA_WEIGHT_NAME


def resolve_lora_file(path: str | os.PathLike) -> Path:
    """``path`` itself (a ``.safetensors`` file) or ``path/pytorch_lora_weights.safetensors``."""
    path = Path(path)
    if path.is_dir():
        cand = path / LORA_WEIGHT_NAME
        if not cand.is_file():
            found = sorted(p.name for p in path.glob("*.safetensors"))
            hint = f" (it holds {', '.join(found)}: pass the file)" if found else ""
            raise LoraLoadError(f"{path}: LoRA folder without {LORA_WEIGHT_NAME}{hint}")
        return cand
    if not path.is_file():
        raise LoraLoadError(f"{path}: LoRA file not found")
    if path.suffix != ".safetensors":
        raise LoraLoadError(f"{path}: a LoRA must be a .safetensors file (pickles are not read)")
    return path


def read_lora_file(file: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any] | None]:
    """The raw state dict of a LoRA safetensors file and diffusers' adapter metadata (or None)."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    try:
        state = load_file(str(file), device="cpu")
        with safe_open(str(file), framework="pt") as f:
            header = f.metadata() or {}
        raw = header.get("lora_adapter_metadata")
        metadata = json.loads(raw) if raw else None
    except Exception as exc:  # SafetensorError, OSError, JSONDecodeError
        raise LoraLoadError(f"{file}: not a readable LoRA safetensors file ({exc})") from exc
    if metadata is not None and not isinstance(metadata, dict):
        raise LoraLoadError(f"{file}: its lora_adapter_metadata header is not a JSON object")
    return state, metadata


def load_lora(unet: torch.nn.Module, path: str | os.PathLike) -> Path:
    """Load the LoRA at ``path`` (file or folder) into ``unet`` as adapter ``"default"``, through
    ``StableDiffusionPipeline.lora_state_dict`` + ``load_lora_into_unet`` as diffusers' own
    ``load_lora_weights`` does; returns the file read.

    Raises :class:`LoraLoadError` (one line, naming the file) when the file is unreadable, holds
    no UNet LoRA weights, holds text-encoder LoRA weights (not supported), or does not fit
    ``unet`` (a layer it names is missing or has another shape).
    """
    from diffusers import StableDiffusionPipeline
    from diffusers.utils import convert_unet_state_dict_to_peft

    file = resolve_lora_file(path)
    raw, metadata = read_lora_file(file)
    if not raw:
        raise LoraLoadError(f"{file}: the LoRA file holds no weights")
    if has_lora(unet):
        raise ValueError("load_lora: this UNet already has a LoRA adapter")
    try:
        state, alphas = StableDiffusionPipeline.lora_state_dict(dict(raw))  # type: ignore[misc]
    except Exception as exc:
        raise LoraLoadError(f"{file}: not a diffusers LoRA file ({exc})") from exc
    if any(k.startswith("text_encoder.") for k in state):
        raise LoraLoadError(
            f"{file}: holds text-encoder LoRA weights; only UNet LoRAs are supported"
        )
    if not all("lora" in k for k in state):
        raise LoraLoadError(f"{file}: not a LoRA file (weight names without 'lora')")
    expected = {k.removeprefix("unet."): v for k, v in state.items() if k.startswith("unet.")}
    if not expected:
        raise LoraLoadError(f"{file}: no UNet LoRA weights (keys must start with 'unet.')")
    if metadata is not None:
        metadata = {k: v for k, v in metadata.items() if k.startswith("unet.")} or None
    if "lora_A" not in next(iter(expected)):
        expected = convert_unet_state_dict_to_peft(expected)
    try:
        # diffusers logs the errors and unplaced weights that we report below, in one line
        with _quiet("diffusers.loaders.peft"), _quiet("diffusers.utils.peft_utils"):
            StableDiffusionPipeline.load_lora_into_unet(
                state, alphas, unet, adapter_name=ADAPTER_NAME, metadata=metadata
            )
    except Exception as exc:  # peft: ValueError (no target found), RuntimeError (size mismatch)
        _drop_adapter(unet)
        raise LoraLoadError(
            f"{file}: this LoRA does not fit the base model's UNet ({_reason(exc)})"
        ) from exc
    _check_loaded(unet, file, expected)
    return file


def _check_loaded(unet: torch.nn.Module, file: Path, expected: dict[str, torch.Tensor]) -> None:
    """Every weight of the file must be in the UNet's adapter, with the same value; peft only
    warns about weights it could not place."""
    if not has_lora(unet):
        raise LoraLoadError(f"{file}: no layer of the base model's UNet matches this LoRA")
    got = lora_state_dict(unet)
    missing = sorted(set(expected) - set(got))
    extra = sorted(set(got) - set(expected))
    bad = [
        k
        for k in sorted(set(expected) & set(got))
        if expected[k].shape != got[k].shape
        or not torch.equal(expected[k].to(got[k].dtype), got[k].detach().cpu())
    ]
    if missing or extra or bad:
        _drop_adapter(unet)
        what = (
            f"{len(missing)} of its {len(expected)} weights have no matching layer"
            f" (e.g. {missing[0]})"
            if missing
            else f"layer {extra[0]} got no weights"
            if extra
            else f"weight {bad[0]} did not load as stored"
        )
        raise LoraLoadError(f"{file}: this LoRA does not fit the base model's UNet: {what}")


def _reason(exc: Exception) -> str:
    """One line out of a (possibly multi-line) load error: the first size mismatch, if any."""
    lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
    for ln in lines:
        if ln.startswith("size mismatch"):
            return ln
    return lines[0] if lines else type(exc).__name__


@contextlib.contextmanager
def _quiet(name: str) -> Iterator[None]:
    logger = logging.getLogger(name)
    level = logger.level
    logger.setLevel(logging.CRITICAL + 1)
    try:
        yield
    finally:
        logger.setLevel(level)


def _drop_adapter(unet: torch.nn.Module) -> None:
    if has_lora(unet):
        with contextlib.suppress(Exception):  # best effort: the caller discards the model anyway
            unet.delete_adapters([ADAPTER_NAME])  # type: ignore[operator]
