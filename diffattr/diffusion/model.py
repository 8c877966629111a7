"""The diffusion model type: a diffusers ``UNet2DModel`` plus its ``DDPMScheduler``.

Models are saved in the standard diffusers pipeline layout so any diffusers tool can open them::

    model_index.json        (DDPMPipeline)
    unet/config.json        unet/diffusion_pytorch_model.safetensors
    scheduler/scheduler_config.json
    diffattr.json           our record: config, seed, data hash, model hash, steps, ...

:func:`load_model` also opens a user's plain local diffusers folder, either in that pipeline layout or
flat (``config.json`` + weights + ``scheduler_config.json`` in one folder, as the
``google/ddpm-cifar10-32`` repository is laid out). Nothing is ever downloaded.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import shutil
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import torch
from diffusers.models.unets.unet_2d import UNet2DModel
from diffusers.pipelines.ddpm.pipeline_ddpm import DDPMPipeline
from diffusers.schedulers.scheduling_ddpm import DDPMScheduler
from safetensors.torch import load_file

from diffattr.config import ConfigError, ExperimentConfig, config_from_dict
from diffattr.errors import ConditioningError, UserError
from diffattr.repro import RECORD_NAME, derive_seed, state_dict_hash, write_json_atomic

log = logging.getLogger(__name__)

MODEL_KIND = "diffusion-model"
CHECKPOINT_WEIGHTS = "unet.safetensors"  # raw weights inside a trainer checkpoint folder
WEIGHT_NAMES = ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin")


class ModelLoadError(UserError, ValueError):
    """A model folder that is missing, incomplete, corrupt or not a UNet2DModel diffusion model."""


@dataclass
class DiffusionModel:
    """A noise-prediction UNet with the noise schedule it was trained with.

    ``record``: what made the model (config, seed, data hash, steps, ...), as read from or written to
    ``diffattr.json``; empty for a plain diffusers folder.
    """

    unet: UNet2DModel
    scheduler: DDPMScheduler
    record: dict[str, Any] = field(default_factory=dict)

    def model_hash(self) -> str:
        """sha256 of the UNet's state dict (see :func:`diffattr.repro.state_dict_hash`)."""
        return state_dict_hash(self.unet)

    def to(self, device: str | torch.device) -> DiffusionModel:
        cast(torch.nn.Module, self.unet).to(device)
        return self

    @property
    def device(self) -> torch.device:
        return next(self.unet.parameters()).device

    @property
    def image_shape(self) -> tuple[int, int, int]:
        """``(C, H, W)`` of the images the UNet takes."""
        size = self.unet.config["sample_size"]
        h, w = (size, size) if isinstance(size, int) else (int(size[0]), int(size[1]))
        return int(self.unet.config["in_channels"]), int(h), int(w)

    @property
    def num_classes(self) -> int | None:
        """Number of classes of a class-conditional model; ``None`` when unconditional."""
        n = self.unet.config["num_class_embeds"]
        return None if n is None else int(n)

    #: The UNet works on the images themselves (a latent model's on their VAE latents).
    inputs_are_latents = False

    @property
    def pixel_shape(self) -> tuple[int, int, int]:
        """``(C, H, W)`` of the images a user gives: the UNet's own input shape."""
        return self.image_shape

    def inputs(self, images: torch.Tensor) -> torch.Tensor:
        """The UNet's inputs for ``images`` ``(n, C, H, W)``: the images themselves."""
        return images

    def condition(
        self,
        labels: torch.Tensor | None,
        texts: Sequence[str] | None,
        n: int,
        what: str,
    ) -> torch.Tensor | None:
        """The conditioning of ``n`` images (``what`` names them in errors): their class labels
        ``(n,)`` for a class-conditional model, None for an unconditional one (texts are
        ignored: a pixel-space DDPM has no text input)."""
        if self.num_classes is None:
            return None
        if labels is None:
            raise ConditioningError(
                f"{what}: the model is class-conditional; the images need labels"
            )
        if labels.shape != (n,):
            raise ConditioningError(
                f"{what}: labels must have shape ({n},), got {tuple(labels.shape)}"
            )
        return labels.to(torch.int64)

    @property
    def num_train_timesteps(self) -> int:
        return int(self.scheduler.config["num_train_timesteps"])

    def eps(
        self,
        x_t: torch.Tensor,
        t: torch.Tensor,
        class_labels: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Predicted noise ``(B, C, H, W)`` for noisy images ``x_t`` ``(B, C, H, W)`` at ``t`` ``(B,)``.

        ``class_labels`` ``(B,)`` int64 is required by a class-conditional model and ignored by an
        unconditional one (so queries that carry labels work with either).
        """
        if self.num_classes is None:
            class_labels = None
        elif class_labels is None:
            raise ValueError(
                f"this model is class-conditional ({self.num_classes} classes): pass class_labels"
            )
        return self.unet(x_t, t, class_labels=class_labels).sample

    def target(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """What the UNet is trained to predict for ``x_t = add_noise(x0, noise, t)``: the noise
        (pixel models are epsilon-prediction only)."""
        return noise


@contextlib.contextmanager
def eval_mode(unet: torch.nn.Module) -> Iterator[None]:
    """Dropout off (and back on after, if it was on): an attribution must not depend on dropout."""
    was_training = unet.training
    unet.eval()
    try:
        yield
    finally:
        unet.train(was_training)


@contextlib.contextmanager
def vmap_friendly_attention(unet: torch.nn.Module) -> Iterator[None]:
    """Temporarily give every diffusers ``Attention`` layer the classic processor; restore after.

    The classic ``AttnProcessor`` computes the same attention with ``baddbmm`` + softmax, which
    vmap batches; the default SDPA processor would fall back to a per-sample loop under vmap.
    """
    from diffusers.models.attention_processor import Attention, AttnProcessor

    saved = [(m, m.processor) for m in unet.modules() if isinstance(m, Attention)]
    try:
        for m, _ in saved:
            m.set_processor(AttnProcessor())
        yield
    finally:
        for m, proc in saved:
            m.set_processor(proc)


def diffusion_loss(
    model: Any,
    x0: torch.Tensor,
    t: torch.Tensor,
    noise: torch.Tensor,
    class_labels: torch.Tensor | None = None,
) -> torch.Tensor:
    """Per-sample training loss ``(B,)``: mean over the input's entries of the squared error of
    the model's prediction at ``x_t`` against its target (``model.target``: the noise, or a
    v-prediction model's velocity). Works for any model kind (a text-to-image model's
    ``class_labels`` are its prompts' token ids).

    ``x0``, ``noise``: ``(B, C, H, W)``; ``t``: ``(B,)`` int64; ``x_t`` is the forward-noised ``x0``.
    Computed in float32 even when the UNet runs in half precision.
    """
    x_t = model.scheduler.add_noise(x0, noise, cast(torch.IntTensor, t))
    pred = model.eps(x_t, t, class_labels).float()
    return (pred - model.target(x0, noise, t).float()).pow(2).flatten(1).mean(dim=1)


def denoising_loss(
    predict: Callable[..., torch.Tensor],
    scheduler: DDPMScheduler,
    x0: torch.Tensor,
    t: torch.Tensor,
    noise: torch.Tensor,
    class_labels: torch.Tensor | None = None,
) -> torch.Tensor:
    """:func:`diffusion_loss` for any noise predictor ``predict(x_t, t, class_labels)``.

    The trainer passes its (possibly DDP-wrapped) UNet's forward here, so training and attribution
    use one definition of the loss.
    """
    x_t = scheduler.add_noise(x0, noise, cast(torch.IntTensor, t))
    pred = predict(x_t, t, class_labels).float()
    return (pred - noise.float()).pow(2).flatten(1).mean(dim=1)


# --------------------------------------------------------------------------------------- building


def _check_prediction_type(scheduler: DDPMScheduler, where: str) -> None:
    # Every featurizer and sampler here reads the UNet output as predicted noise.
    kind = scheduler.config["prediction_type"]
    if kind != "epsilon":
        raise ModelLoadError(
            f"{where}: prediction_type={kind!r}; diffattr supports epsilon-prediction models only"
        )


def build_model(cfg: ExperimentConfig) -> DiffusionModel:
    """A randomly initialised model from ``cfg.model`` / ``cfg.scheduler``, seeded by ``cfg.seed``.

    The global torch RNG is left untouched (initialisation runs in a forked RNG state).
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(derive_seed(cfg.seed, "unet-init"))
        try:
            unet = UNet2DModel(**cfg.model.unet_kwargs())
        except (ValueError, TypeError, AssertionError) as exc:
            raise ConfigError(f"model: these UNet2DModel settings are invalid ({exc})") from exc
    if cfg.model.attention_dropout:
        set_attention_dropout(unet, cfg.model.attention_dropout)
    try:
        scheduler = DDPMScheduler(**dataclasses.asdict(cfg.scheduler))
    except (ValueError, TypeError, NotImplementedError) as exc:
        raise ConfigError(f"scheduler: invalid DDPMScheduler settings ({exc})") from exc
    _check_prediction_type(scheduler, "scheduler")
    record = {"config": cfg.to_dict(), "seed": cfg.seed, "steps": 0}
    return DiffusionModel(unet=unet, scheduler=scheduler, record=record)


def set_attention_dropout(unet: torch.nn.Module, p: float) -> None:
    """Set the dropout probability of every attention layer's output dropout to ``p``."""
    from diffusers.models.attention_processor import Attention

    for module in unet.modules():
        if isinstance(module, Attention):
            for sub in module.modules():
                if isinstance(sub, torch.nn.Dropout):
                    sub.p = p


def count_parameters(model: DiffusionModel | torch.nn.Module) -> int:
    unet = model.unet if isinstance(model, DiffusionModel) else model
    return sum(p.numel() for p in unet.parameters())


# ---------------------------------------------------------------------------------------- saving


def save_model(model: DiffusionModel, path: str | os.PathLike, record: dict | None = None) -> Path:
    """Write ``model`` to folder ``path`` in the diffusers pipeline layout plus ``diffattr.json``.

    The pipeline files are written to a temporary sibling folder first and moved in, and the record
    goes last, so a kill never leaves a folder that looks complete but is not. Other files already in
    ``path`` (e.g. a trainer's ``checkpoints/``) are kept. ``record`` entries are added to
    ``model.record``; ``model_hash`` is always recomputed.
    """
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".{path.name}.saving{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    unet = model.unet
    DDPMPipeline(unet=unet, scheduler=model.scheduler).save_pretrained(  # type: ignore[arg-type]
        str(tmp), safe_serialization=True
    )
    for name in ("unet", "scheduler", "model_index.json"):
        dest = path / name
        if dest.is_dir():
            shutil.rmtree(dest)
        os.replace(tmp / name, dest)
    shutil.rmtree(tmp, ignore_errors=True)
    full = {**model.record, **(record or {}), "model_hash": model.model_hash()}
    full.setdefault("kind", MODEL_KIND)
    model.record = full
    write_json_atomic(path / RECORD_NAME, full)
    return path


# --------------------------------------------------------------------------------------- loading


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ModelLoadError(f"{path}: could not read JSON ({exc})") from exc
    if not isinstance(data, dict):
        raise ModelLoadError(f"{path}: expected a JSON object")
    return data


def _find_unet_dir(path: Path) -> Path:
    """``path/unet`` for a pipeline folder, ``path`` itself for a flat model folder."""
    if (path / "unet" / "config.json").exists():
        return path / "unet"
    if (path / "config.json").exists():
        return path
    raise ModelLoadError(
        f"{path}: not a diffusers model folder: expected unet/config.json (pipeline layout) or "
        "config.json (flat layout)"
    )


def _load_unet(unet_dir: Path) -> UNet2DModel:
    config_path = unet_dir / "config.json"
    config = _read_json(config_path)
    cls_name = config.get("_class_name")
    if cls_name != "UNet2DModel":
        raise ModelLoadError(
            f"{config_path}: _class_name is {cls_name!r}; diffattr loads UNet2DModel models only"
        )
    weights = [unet_dir / n for n in WEIGHT_NAMES if (unet_dir / n).exists()]
    if not weights:
        raise ModelLoadError(
            f"{unet_dir}: no weights file; expected one of {', '.join(WEIGHT_NAMES)}"
        )
    try:
        # from_pretrained (local only) also converts the old attention key names of early
        # diffusers checkpoints such as ddpm-cifar10-32; .bin files go through weights_only loading.
        unet = UNet2DModel.from_pretrained(
            str(unet_dir), local_files_only=True, low_cpu_mem_usage=False
        )
    except Exception as exc:  # diffusers raises OSError/ValueError/RuntimeError/SafetensorError
        raise ModelLoadError(
            f"{weights[0]}: could not load the UNet weights ({type(exc).__name__}: {exc})"
        ) from exc
    return unet


def _load_scheduler(path: Path) -> DDPMScheduler:
    """DDPMScheduler from ``scheduler/scheduler_config.json`` or a flat ``scheduler_config.json``.

    A config written for another scheduler class (DDIM, PNDM, ...) shares the beta schedule fields,
    so it is converted with ``DDPMScheduler.from_config``. A folder without any scheduler config gets
    the DDPM default (1000 linear steps, betas 1e-4..0.02), with a warning.
    """
    for cand in (path / "scheduler" / "scheduler_config.json", path / "scheduler_config.json"):
        if cand.exists():
            config = _read_json(cand)
            cls_name = config.get("_class_name", "?")
            if cls_name != "DDPMScheduler":
                log.info("%s: converting a %s config to DDPMScheduler", cand, cls_name)
            # Very old configs (GaussianDDPMScheduler) call the step count "timesteps".
            if "num_train_timesteps" not in config and isinstance(config.get("timesteps"), int):
                config["num_train_timesteps"] = config["timesteps"]
            clean = {k: v for k, v in config.items() if not k.startswith("_")}
            try:
                scheduler = DDPMScheduler.from_config(clean)
            except Exception as exc:
                raise ModelLoadError(f"{cand}: not a usable scheduler config ({exc})") from exc
            _check_prediction_type(scheduler, str(cand))
            return scheduler
    log.warning("%s: no scheduler config found; using the default DDPM schedule", path)
    return DDPMScheduler()


def compute_device() -> torch.device:
    """Where this process computes: its CUDA device (``cuda:LOCAL_RANK`` inside a torchrun /
    accelerate group) when CUDA is available, else the CPU."""
    if torch.cuda.is_available():
        return torch.device(f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}")
    return torch.device("cpu")


def load_model(
    path: str | os.PathLike,
    device: str | torch.device = "cpu",
    lora: str | os.PathLike | None = None,
) -> Any:  # DiffusionModel | TextToImageModel: Any until every caller takes both
    """Open a model saved by :func:`save_model` or a local diffusers folder (never downloads).

    ``path`` may also be a trainer checkpoint, ``<run>/checkpoints/step-XXXXXX`` (its raw, non-EMA
    weights with the run's config), e.g. for TracIn over training checkpoints.

    A text-to-image pipeline folder (``model_index.json`` naming ``StableDiffusionPipeline``, or
    any pipeline other than a pixel-space DDPM one, which is then refused with a message) opens
    as a :class:`~diffattr.diffusion.text2image.TextToImageModel`, with the LoRA ``lora`` on its
    UNet if given; ``lora`` on a pixel-space model is an error. A finished LoRA run of ``diffattr
    train`` opens as its recorded base model with that LoRA.

    Raises :class:`ModelLoadError` naming the file for a missing folder, missing or corrupt
    weights, or a config that is not a ``UNet2DModel``.
    """
    path = Path(path)
    if not path.is_dir():
        raise ModelLoadError(f"{path}: model folder not found")
    from diffattr.diffusion.lora_trainer import is_lora_trained
    from diffattr.diffusion.text2image import is_text_to_image_folder, load_text_to_image

    if is_text_to_image_folder(path):
        return load_text_to_image(path, lora=lora, device=device)
    if is_lora_trained(path):
        # A LoRA run of `diffattr train`: its base model (recorded) with this LoRA on it.
        if lora is not None:
            raise ModelLoadError(
                f"{path} is a trained LoRA; give --model its base model or omit --lora"
            )
        base = _read_json(path / RECORD_NAME)["base_model"]
        return load_text_to_image(base, lora=path, device=device)
    if lora is not None:
        raise ModelLoadError(
            f"{path}: a LoRA ({lora}) needs a text-to-image (StableDiffusionPipeline) model; "
            "this is a pixel-space UNet2DModel folder"
        )
    if (path / CHECKPOINT_WEIGHTS).exists() and (path / "state.json").exists():
        return _load_trainer_checkpoint(path).to(device)
    unet = _load_unet(_find_unet_dir(path))
    scheduler = _load_scheduler(path)
    record_path = path / RECORD_NAME
    record = _read_json(record_path) if record_path.exists() else {"source": str(path)}
    unet.eval()
    model = DiffusionModel(unet=unet, scheduler=scheduler, record=record)
    expected = record.get("model_hash")
    if expected is not None and expected != model.model_hash():
        raise ModelLoadError(
            f"{path}: weights do not match the model_hash in {RECORD_NAME} (modified or corrupt)"
        )
    return model.to(device)


def _load_trainer_checkpoint(ckpt: Path) -> DiffusionModel:
    """A trainer checkpoint folder: raw weights + the config in the run's ``diffattr.json``."""
    run_record = ckpt.parent.parent / RECORD_NAME
    if not run_record.exists():
        raise ModelLoadError(f"{ckpt}: checkpoint without its run record {run_record}")
    record = _read_json(run_record)
    config = record.get("config") or record.get("identity", {}).get("config")
    if not isinstance(config, dict):
        raise ModelLoadError(f"{run_record}: no config recorded for checkpoint {ckpt.name}")
    model = build_model(config_from_dict(config, where=str(run_record)))
    weights = ckpt / CHECKPOINT_WEIGHTS
    try:
        model.unet.load_state_dict(load_file(str(weights)))
        step = int(_read_json(ckpt / "state.json")["step"])
    except Exception as exc:
        raise ModelLoadError(f"{weights}: could not load checkpoint weights ({exc})") from exc
    model.unet.eval()
    model.record = {"source": str(ckpt), "config": config, "steps": step, "weights": "raw"}
    return model
