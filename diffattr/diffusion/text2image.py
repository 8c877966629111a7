"""The text-to-image latent diffusion model kind: a Stable Diffusion folder, optionally with a LoRA.

A local ``StableDiffusionPipeline.save_pretrained`` folder (SD 1.x and 2.x, epsilon and
v-prediction) is read component by component, never downloaded::

    model_index.json        (StableDiffusionPipeline)
    unet/                   UNet2DConditionModel
    vae/                    AutoencoderKL
    text_encoder/           CLIPTextModel
    tokenizer/              CLIPTokenizer
    scheduler/              the folder's own scheduler config (PNDM, DDIM, ...): its noise
                            schedule and prediction type become a DDPMScheduler

plus, optionally, a LoRA on the UNet (the safetensors file of diffusers' ``save_lora_weights``,
loaded through peft as diffusers does: :mod:`diffattr.diffusion.lora`).

The UNet works on VAE latents: :meth:`TextToImageModel.encode_images` turns pixels into latents as
D-TRAK does (the posterior's mode times the scaling factor), and :meth:`TextToImageModel.eps`
runs the text encoder on token ids inside (``text_encoder(ids)[0]`` as the UNet's
``encoder_hidden_states``), so "the loss of this image with this prompt" is one call.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import torch
from diffusers.schedulers.scheduling_ddpm import DDPMScheduler

from diffattr.diffusion.model import ModelLoadError, eval_mode
from diffattr.errors import ConditioningError
from diffattr.repro import RECORD_NAME, state_dict_hash

log = logging.getLogger(__name__)

MODEL_KIND = "text-to-image-model"
SUPPORTED_PIPELINES = ("StableDiffusionPipeline",)
PREDICTION_TYPES = ("epsilon", "v_prediction")
#: component folder -> the classes model_index.json may name for it
COMPONENTS: dict[str, tuple[str, ...]] = {
    "unet": ("UNet2DConditionModel",),
    "vae": ("AutoencoderKL",),
    "text_encoder": ("CLIPTextModel",),
    "tokenizer": ("CLIPTokenizer", "CLIPTokenizerFast"),
    "scheduler": (),  # any scheduler: its config is converted to DDPMScheduler
}
CONFIG_FILES = {
    "unet": "config.json",
    "vae": "config.json",
    "text_encoder": "config.json",
    "scheduler": "scheduler_config.json",
}
DIFFUSERS_WEIGHTS = ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin")
TRANSFORMERS_WEIGHTS = ("model.safetensors", "pytorch_model.bin")


class TextToImageLoadError(ModelLoadError):
    """A folder that is not a supported text-to-image pipeline (the message names what is wrong)."""


def _is_lora_key(name: str) -> bool:
    return ".lora_" in name


@dataclass
class TextToImageModel:
    """A text-conditional latent diffusion model: UNet (with peft LoRA layers when a LoRA is
    loaded), VAE, CLIP text encoder and tokenizer, and the noise schedule it was trained with.

    ``scheduler``: ``DDPMScheduler.from_config`` of the folder's own scheduler config (betas,
    number of timesteps and prediction type kept). ``record``: the folder's ``diffattr.json``
    (the LoRA's, when a LoRA with a record is loaded), else ``{"source": path}``.
    ``base_path``: the pipeline folder; ``lora_path``: the LoRA file loaded, or ``None``.
    """

    unet: Any  # diffusers UNet2DConditionModel
    vae: Any  # diffusers AutoencoderKL
    text_encoder: Any  # transformers CLIPTextModel
    tokenizer: Any  # transformers CLIPTokenizer
    scheduler: DDPMScheduler
    record: dict[str, Any] = field(default_factory=dict)
    base_path: Path = field(default_factory=Path)
    lora_path: Path | None = None
    _hash_memo: dict[str, tuple[tuple[Any, ...], str]] = field(
        default_factory=dict, init=False, repr=False, compare=False
    )

    # ------------------------------------------------------------------------------ identity

    def _tensors(self, part: str) -> list[torch.Tensor]:
        if part == "unet":
            named = list(self.unet.named_parameters()) + list(self.unet.named_buffers())
            return [t for n, t in named if not _is_lora_key(n)]
        if part == "lora":
            return [t for n, t in self.unet.named_parameters() if _is_lora_key(n)]
        module = getattr(self, part)
        return list(module.parameters()) + list(module.buffers())

    def _part_hash(self, part: str) -> str:
        if part == "unet":
            state = {
                k.replace(".base_layer.", "."): v
                for k, v in self.unet.state_dict().items()
                if not _is_lora_key(k)
            }
            return state_dict_hash(state)
        if part == "lora":
            from diffattr.diffusion.lora import lora_state_dict, lora_summary

            h = hashlib.sha256(state_dict_hash(lora_state_dict(self.unet)).encode())
            summary = lora_summary(self.unet)
            scaling = {k: summary[k] for k in ("rank", "alpha", "rank_pattern", "alpha_pattern")}
            cfg = self.unet.peft_config["default"]
            scaling.update(use_rslora=bool(cfg.use_rslora), use_dora=bool(cfg.use_dora))
            h.update(json.dumps(scaling, sort_keys=True).encode())
            return h.hexdigest()
        return state_dict_hash(getattr(self, part))

    def _memo(self, part: str) -> str:
        """The hash of ``part``, remembered while its tensors are the same objects in the same
        state (no in-place change, cast or move since; :meth:`refresh_hash` forgets)."""
        tensors = self._tensors(part)
        state = _tensor_states(tensors)
        hit = self._hash_memo.get(part)
        if state is not None and hit is not None and hit[0] == state:
            return hit[1]
        digest = self._part_hash(part)
        if state is not None:
            self._hash_memo[part] = (state, digest)
        return digest

    def refresh_hash(self) -> None:
        """Forget the remembered hashes (call after changing weights through ``.data``)."""
        self._hash_memo.clear()

    @property
    def has_lora(self) -> bool:
        from diffattr.diffusion.lora import has_lora

        return has_lora(self.unet)

    def base_hash(self) -> str:
        """sha256 over the base model's UNet (LoRA layers left out), text encoder and VAE."""
        h = hashlib.sha256(b"text-to-image")
        for part in ("unet", "text_encoder", "vae"):
            h.update(f"\0{part}\0{self._memo(part)}".encode())
        return h.hexdigest()

    def lora_hash(self) -> str | None:
        """sha256 over the LoRA weights and their scaling (rank, alpha); ``None`` without LoRA."""
        return self._memo("lora") if self.has_lora else None

    def model_hash(self) -> str:
        """sha256 over everything that decides an attribution: the base hash without a LoRA,
        else the base and LoRA hashes together. Remembered (seconds on a 1 GB model)."""
        lora = self.lora_hash()
        if lora is None:
            return self.base_hash()
        return hashlib.sha256(f"{self.base_hash()}\0lora\0{lora}".encode()).hexdigest()

    # ------------------------------------------------------------------------------ placement

    def to(self, device: str | torch.device) -> TextToImageModel:
        # Moving changes no weight: the remembered hashes that were valid stay valid.
        valid = {}
        for part, (state, digest) in self._hash_memo.items():
            if _tensor_states(self._tensors(part)) == state:
                valid[part] = digest
        for module in (self.unet, self.vae, self.text_encoder):
            torch.nn.Module.to(module, device)
        for part, digest in valid.items():
            now = _tensor_states(self._tensors(part))
            if now is not None:
                self._hash_memo[part] = (now, digest)
        return self

    @property
    def device(self) -> torch.device:
        return next(self.unet.parameters()).device

    # ------------------------------------------------------------------------------ shapes

    @property
    def vae_scale_factor(self) -> int:
        return 2 ** (len(self.vae.config["block_out_channels"]) - 1)

    @property
    def image_shape(self) -> tuple[int, int, int]:
        """``(C, h, w)`` of the LATENTS the UNet takes (its configured sample size)."""
        size = self.unet.config["sample_size"]
        h, w = (size, size) if isinstance(size, int) else (int(size[0]), int(size[1]))
        return int(self.unet.config["in_channels"]), int(h), int(w)

    @property
    def pixel_shape(self) -> tuple[int, int, int]:
        """``(3, H, W)`` of the images: the latent size times the VAE's scale factor."""
        _, h, w = self.image_shape
        f = self.vae_scale_factor
        return int(self.vae.config["in_channels"]), h * f, w * f

    @property
    def num_classes(self) -> int | None:
        return None

    #: The UNet works on the images' VAE latents (:meth:`inputs`).
    inputs_are_latents = True

    def inputs(self, images: torch.Tensor) -> torch.Tensor:
        """The UNet's inputs for images ``(n, 3, H, W)`` in ``[-1, 1]``: their latents
        ``(n, C, h, w)`` float32 (:meth:`encode_images`, D-TRAK's posterior mode), on the
        images' device."""
        return self.encode_images(images).float()

    def inputs_key(self) -> str:
        """What decides :meth:`inputs`: the VAE's weights (cache key for encoded data sets)."""
        return self._memo("vae")

    def condition(
        self,
        labels: torch.Tensor | None,
        texts: Sequence[str] | None,
        n: int,
        what: str,
    ) -> torch.Tensor:
        """The conditioning of ``n`` images (``what`` names them in errors): the token ids
        ``(n, L)`` of their texts (training images' captions, queries' prompts; ``""`` is the
        unconditional prompt). Class labels are not used."""
        if texts is None:
            raise ConditioningError(
                f"{what}: the model is text-conditional and these images have no "
                f"{'prompts' if 'quer' in what else 'captions'}; give each its text (queries: "
                "--prompt, or an image made by `diffattr generate`; training images: captions in "
                "metadata.jsonl or a prompt template), or an empty prompt to attribute "
                "unconditionally (--unconditional)"
            )
        if len(texts) != n:
            raise ConditioningError(f"{what}: {len(texts)} texts for {n} images")
        return self.tokenize(list(texts))

    @property
    def conditional(self) -> bool:
        return True

    @property
    def prediction_type(self) -> str:
        """``"epsilon"`` or ``"v_prediction"``: what the UNet predicts."""
        return str(self.scheduler.config["prediction_type"])

    @property
    def num_train_timesteps(self) -> int:
        return int(self.scheduler.config["num_train_timesteps"])

    # ------------------------------------------------------------------------------ text

    @property
    def max_length(self) -> int:
        return int(self.tokenizer.model_max_length)

    def tokenize(self, prompts: Sequence[str]) -> torch.Tensor:
        """Token ids ``(B, L)`` int64 (CPU), padded to the tokenizer's ``model_max_length`` and
        truncated to it, as Stable Diffusion's pipeline does."""
        if isinstance(prompts, str):
            prompts = [prompts]
        prompts = list(prompts)
        if not all(isinstance(p, str) for p in prompts):
            raise ValueError("tokenize: prompts must be strings")
        ids = self.tokenizer(
            prompts,
            padding="max_length",
            max_length=self.max_length,
            truncation=True,
            return_tensors="pt",
        ).input_ids
        return ids.to(torch.int64)

    def text_embeddings(self, cond: torch.Tensor) -> torch.Tensor:
        """``text_encoder(ids)[0]`` ``(B, L, D)`` for token ids ``(B, L)`` int64; a float tensor
        ``(B, L, D)`` is taken as embeddings already computed and returned as is."""
        if cond.is_floating_point():
            if cond.dim() != 3:
                raise ValueError(f"text embeddings must be (B, L, D), got {tuple(cond.shape)}")
            return cond
        if cond.dim() != 2:
            raise ValueError(f"token ids must be (B, L) int64, got shape {tuple(cond.shape)}")
        return self.text_encoder(cond.to(self.device))[0]

    # ------------------------------------------------------------------------------ denoising

    def eps(
        self, x_t: torch.Tensor, t: torch.Tensor, cond: torch.Tensor | None = None
    ) -> torch.Tensor:
        """The UNet's native prediction ``(B, C, h, w)`` (noise for epsilon models, velocity for
        v-prediction ones) for latents ``x_t`` ``(B, C, h, w)`` at ``t`` ``(B,)`` int64 given
        ``cond``: token ids ``(B, L)`` int64 from :meth:`tokenize` (the text encoder runs inside)
        or text embeddings ``(B, L, D)`` from :meth:`text_embeddings`."""
        if cond is None:
            raise ValueError(
                "this model is text-conditional: pass prompts (token ids from model.tokenize)"
            )
        hidden = self.text_embeddings(cond)
        if hidden.shape[0] != x_t.shape[0]:
            raise ValueError(
                f"cond has {hidden.shape[0]} rows for a batch of {x_t.shape[0]} latents"
            )
        return self.unet(x_t, t, encoder_hidden_states=hidden.to(x_t.dtype)).sample

    def target(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """What the UNet is trained to predict for ``x_t = add_noise(x0, noise, t)``: ``noise``
        (epsilon) or ``scheduler.get_velocity(x0, noise, t)`` (v-prediction)."""
        if self.prediction_type == "v_prediction":
            return self.scheduler.get_velocity(x0, noise, cast(torch.IntTensor, t))
        return noise

    def predicted_noise(
        self, model_output: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor
    ) -> torch.Tensor:
        """The noise implied by a native prediction: the output itself for epsilon models,
        ``sqrt(abar_t) v + sqrt(1 - abar_t) x_t`` for v-prediction ones."""
        if self.prediction_type != "v_prediction":
            return model_output
        abar = self.scheduler.alphas_cumprod.to(device=x_t.device, dtype=torch.float64)
        a = abar[t.to(x_t.device)].reshape(-1, *([1] * (x_t.dim() - 1)))
        out = a.sqrt() * model_output.double() + (1.0 - a).sqrt() * x_t.double()
        return out.to(model_output.dtype)

    # ------------------------------------------------------------------------------ latents

    @torch.no_grad()
    def encode_images(self, pixels: torch.Tensor, batch_size: int = 16) -> torch.Tensor:
        """Latents ``(B, C, h, w)`` float32 of images ``(B, 3, H, W)`` in ``[-1, 1]``:
        ``vae.encode(x).latent_dist.mode() * scaling_factor`` (D-TRAK's choice), on the input's
        device."""
        if pixels.dim() != 4 or pixels.shape[1] != self.pixel_shape[0]:
            raise ValueError(
                f"encode_images: expected (B, {self.pixel_shape[0]}, H, W) images, "
                f"got {tuple(pixels.shape)}"
            )
        f = self.vae_scale_factor
        if pixels.shape[2] % f or pixels.shape[3] % f:
            raise ValueError(f"encode_images: image sides must be multiples of {f}")
        scale = float(self.vae.config["scaling_factor"])
        dtype = next(self.vae.parameters()).dtype
        out = []
        with eval_mode(self.vae):
            for lo in range(0, pixels.shape[0], batch_size):
                x = pixels[lo : lo + batch_size].to(self.device, dtype)
                lat = self.vae.encode(x).latent_dist.mode() * scale
                out.append(lat.float().to(pixels.device))
        return torch.cat(out) if out else pixels.new_empty((0, *self.image_shape))

    @torch.no_grad()
    def decode_latents(self, latents: torch.Tensor, batch_size: int = 16) -> torch.Tensor:
        """Images ``(B, 3, H, W)`` float32 in ``[-1, 1]`` (clamped) of latents ``(B, C, h, w)``,
        on the input's device."""
        if latents.dim() != 4 or latents.shape[1] != self.image_shape[0]:
            raise ValueError(
                f"decode_latents: expected (B, {self.image_shape[0]}, h, w) latents, "
                f"got {tuple(latents.shape)}"
            )
        scale = float(self.vae.config["scaling_factor"])
        dtype = next(self.vae.parameters()).dtype
        out = []
        with eval_mode(self.vae):
            for lo in range(0, latents.shape[0], batch_size):
                z = latents[lo : lo + batch_size].to(self.device, dtype)
                x = self.vae.decode(z / scale).sample
                out.append(x.float().clamp(-1.0, 1.0).to(latents.device))
        return torch.cat(out) if out else latents.new_empty((0, *self.pixel_shape))


def _tensor_states(tensors: list[torch.Tensor]) -> tuple[Any, ...] | None:
    """Identity and state of each tensor (``None`` for inference tensors: never remembered)."""
    try:
        return tuple(
            (id(t), t._version, t.data_ptr(), t.dtype, tuple(t.shape), t.stride()) for t in tensors
        )
    except RuntimeError:
        return None


# ------------------------------------------------------------------------------------- loading


def _read_json(path: Path, what: str) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise TextToImageLoadError(f"{path}: could not read {what} ({exc})") from exc
    if not isinstance(data, dict):
        raise TextToImageLoadError(f"{path}: {what} is not a JSON object")
    return data


def is_text_to_image_folder(path: str | os.PathLike) -> bool:
    """Whether ``path/model_index.json`` names a pipeline other than a pixel-space DDPM one, or
    ``path/unet`` holds a ``UNet2DConditionModel`` (such folders go to
    :func:`load_text_to_image`, which accepts them or says what is wrong)."""
    index = Path(path) / "model_index.json"
    if not index.is_file():
        try:
            unet = json.loads((Path(path) / "unet" / "config.json").read_text())
        except (OSError, json.JSONDecodeError):
            return False
        return isinstance(unet, dict) and unet.get("_class_name") == "UNet2DConditionModel"
    try:
        data = json.loads(index.read_text())
    except (OSError, json.JSONDecodeError):
        return False
    if not isinstance(data, dict):
        return False
    unet = data.get("unet")
    unet_cls = unet[1] if isinstance(unet, list) and len(unet) == 2 else None
    return data.get("_class_name") not in ("DDPMPipeline", "DDIMPipeline") and (
        unet_cls != "UNet2DModel"
    )


def check_pipeline_folder(path: Path) -> dict[str, Any]:
    """The folder's ``model_index.json`` after checking that every part of a supported
    pipeline is there; raises :class:`TextToImageLoadError` naming the first problem."""
    if not path.is_dir():
        raise TextToImageLoadError(f"{path}: model folder not found")
    index_path = path / "model_index.json"
    if not index_path.is_file():
        raise TextToImageLoadError(
            f"{path}: no model_index.json: not a diffusers pipeline folder "
            "(StableDiffusionPipeline.save_pretrained layout expected)"
        )
    index = _read_json(index_path, "model_index.json")
    cls = index.get("_class_name")
    if cls not in SUPPORTED_PIPELINES:
        raise TextToImageLoadError(
            f"{index_path}: model_index.json says {cls}: only "
            f"{' / '.join(SUPPORTED_PIPELINES)} folders are supported"
        )
    for name, classes in COMPONENTS.items():
        entry = index.get(name)
        if not (isinstance(entry, list) and len(entry) == 2 and entry[1]):
            raise TextToImageLoadError(f"{index_path}: no {name} component listed")
        if classes and entry[1] not in classes:
            raise TextToImageLoadError(
                f"{index_path}: {name} is a {entry[1]}; expected {' or '.join(classes)}"
            )
        folder = path / name
        if not folder.is_dir():
            raise TextToImageLoadError(f"{path}: no {name}/ folder")
        config = CONFIG_FILES.get(name)
        if config is not None and not (folder / config).is_file():
            raise TextToImageLoadError(f"{folder}: no {config}")
    unet_cfg = _read_json(path / "unet" / "config.json", "the UNet config")
    if unet_cfg.get("_class_name") != "UNet2DConditionModel":
        raise TextToImageLoadError(
            f"{path / 'unet' / 'config.json'}: _class_name is {unet_cfg.get('_class_name')!r}; "
            "expected UNet2DConditionModel"
        )
    return index


def load_scheduler_config(path: Path) -> DDPMScheduler:
    """``DDPMScheduler.from_config`` of ``path/scheduler/scheduler_config.json`` (any scheduler
    class; betas, timesteps, prediction type and offsets kept). A config without ``clip_sample``
    (PNDM, Euler, ...: they never clip) gets ``clip_sample=False``: clipping latents to [-1, 1]
    would be wrong."""
    cfg_path = path / "scheduler" / "scheduler_config.json"
    config = _read_json(cfg_path, "the scheduler config")
    kind = config.get("prediction_type", "epsilon")
    if kind not in PREDICTION_TYPES:
        raise TextToImageLoadError(
            f"{cfg_path}: scheduler prediction_type {kind!r} is not supported "
            f"(only {' and '.join(PREDICTION_TYPES)})"
        )
    clean = {k: v for k, v in config.items() if not k.startswith("_")}
    clean.setdefault("clip_sample", False)
    try:
        return DDPMScheduler.from_config(clean)
    except Exception as exc:
        raise TextToImageLoadError(f"{cfg_path}: not a usable scheduler config ({exc})") from exc


def _weights_kwargs(folder: Path, names: tuple[str, ...]) -> dict[str, Any]:
    """``{}`` when a standard weights file is there, ``{"variant": "fp16"}`` when only the fp16
    variant is; raises naming the folder when there are no weights."""
    if any((folder / n).is_file() for n in names):
        return {}
    for n in names:
        stem, ext = n.rsplit(".", 1)
        if (folder / f"{stem}.fp16.{ext}").is_file():
            return {"variant": "fp16"}
    if any(folder.glob("*.safetensors.index.json")) or any(folder.glob("*.bin.index.json")):
        return {}  # sharded weights
    raise TextToImageLoadError(f"{folder}: no weights file; expected one of {', '.join(names)}")


def _load_part(name: str, folder: Path, load: Callable[..., Any], **kwargs: Any) -> Any:
    from transformers.utils import logging as tlog

    bars = tlog.is_progress_bar_enabled()
    tlog.disable_progress_bar()
    try:
        return load(str(folder), local_files_only=True, **kwargs)
    except Exception as exc:  # OSError / ValueError / RuntimeError / SafetensorError ...
        msg = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        raise TextToImageLoadError(
            f"{folder}: could not load the {name} ({type(exc).__name__}: {msg})"
        ) from exc
    finally:
        if bars:
            tlog.enable_progress_bar()


def load_text_to_image(
    path: str | os.PathLike,
    lora: str | os.PathLike | None = None,
    device: str | torch.device = "cpu",
) -> TextToImageModel:
    """Open a local ``StableDiffusionPipeline`` folder (never downloads), with an optional LoRA
    (a ``save_lora_weights`` safetensors file, or the folder holding
    ``pytorch_lora_weights.safetensors``).

    Raises :class:`TextToImageLoadError` (a :class:`~diffattr.errors.UserError`) naming the first
    missing or unsupported part, and :class:`~diffattr.diffusion.lora.LoraLoadError` naming the
    LoRA file when it does not fit. When the folder's ``diffattr.json`` (or the LoRA's) records
    ``model_hash`` / ``base_hash`` / ``lora_hash``, the weights are checked against them.
    """
    from diffusers.models.autoencoders.autoencoder_kl import AutoencoderKL
    from diffusers.models.unets.unet_2d_condition import UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    from diffattr.diffusion.lora import load_lora

    path = Path(path)
    check_pipeline_folder(path)
    scheduler = load_scheduler_config(path)
    unet = _load_part(
        "UNet",
        path / "unet",
        UNet2DConditionModel.from_pretrained,
        low_cpu_mem_usage=False,
        **_weights_kwargs(path / "unet", DIFFUSERS_WEIGHTS),
    )
    vae = _load_part(
        "VAE",
        path / "vae",
        AutoencoderKL.from_pretrained,
        low_cpu_mem_usage=False,
        **_weights_kwargs(path / "vae", DIFFUSERS_WEIGHTS),
    )
    text_encoder = _load_part(
        "text encoder",
        path / "text_encoder",
        CLIPTextModel.from_pretrained,
        **_weights_kwargs(path / "text_encoder", TRANSFORMERS_WEIGHTS),
    )
    tokenizer = _load_part("tokenizer", path / "tokenizer", CLIPTokenizer.from_pretrained)
    for name, module in (("UNet", unet), ("VAE", vae), ("text encoder", text_encoder)):
        if not isinstance(module, torch.nn.Module):
            raise TextToImageLoadError(f"{path}: the {name} did not load as a torch module")
    _check_fit(path, unet, vae, text_encoder, tokenizer)
    unet.eval()
    vae.eval().requires_grad_(False)
    text_encoder.eval().requires_grad_(False)

    record_path = path / RECORD_NAME
    base_record = (
        _read_json(record_path, RECORD_NAME) if record_path.is_file() else {"source": str(path)}
    )
    record, lora_file, lora_record = base_record, None, None
    if lora is not None:
        lora_file = load_lora(unet, lora)
        if (lora_file.parent / RECORD_NAME).is_file():
            lora_record = _read_json(lora_file.parent / RECORD_NAME, RECORD_NAME)
            record = lora_record
    model = TextToImageModel(
        unet=unet,
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        scheduler=scheduler,
        record=record,
        base_path=path,
        lora_path=lora_file,
    )
    # The base folder's record describes the base model alone; a LoRA's record the whole.
    _verify_record(base_record, record_path, {"base_hash": model.base_hash})
    if lora_file is None:
        _verify_record(base_record, record_path, {"model_hash": model.model_hash})
    else:
        _verify_record(base_record, record_path, {"model_hash": model.base_hash})
    if lora_record is not None and lora_file is not None:
        _verify_record(
            lora_record,
            lora_file.parent / RECORD_NAME,
            {
                "base_hash": model.base_hash,
                "lora_hash": model.lora_hash,
                "model_hash": model.model_hash,
            },
        )
    return model.to(device)


def _check_fit(path: Path, unet: Any, vae: Any, text_encoder: Any, tokenizer: Any) -> None:
    """The components must fit together (a folder assembled from two models fails here, not in
    the middle of a featurization)."""
    cross = unet.config["cross_attention_dim"]
    hidden = int(text_encoder.config.hidden_size)
    if isinstance(cross, int) and cross != hidden:
        raise TextToImageLoadError(
            f"{path}: the UNet's cross_attention_dim is {cross} but the text encoder's "
            f"hidden_size is {hidden}"
        )
    if int(unet.config["in_channels"]) != int(vae.config["latent_channels"]):
        raise TextToImageLoadError(
            f"{path}: the UNet takes {unet.config['in_channels']} channels but the VAE's "
            f"latents have {vae.config['latent_channels']}"
        )
    max_len = getattr(tokenizer, "model_max_length", None)
    positions = int(text_encoder.config.max_position_embeddings)
    if not isinstance(max_len, int) or max_len < 1 or max_len > positions:
        raise TextToImageLoadError(
            f"{path / 'tokenizer'}: model_max_length {max_len!r} does not fit the text "
            f"encoder's {positions} positions"
        )


def _verify_record(
    record: dict[str, Any], where: Path, checks: dict[str, Callable[[], str | None]]
) -> None:
    for key, compute in checks.items():
        want = record.get(key)
        if isinstance(want, str) and want != compute():
            raise TextToImageLoadError(
                f"{where}: the weights do not match its {key} (modified or corrupt files, or a "
                "LoRA trained on another base model)"
            )
