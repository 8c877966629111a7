"""Typed experiment configuration, read from YAML.

One YAML file describes the data, the UNet, the noise scheduler, training and sampling. Unknown keys
are an error naming the section and key, so a typo never silently falls back to a default.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from diffattr.errors import UserError


class ConfigError(UserError, ValueError):
    """A config file or section that does not match the schema."""


@dataclass
class DataConfig:
    source: str = "digits-2"  # a name from ``diffattr data list``
    root: str | None = None  # local folder for cifar10 / artbench10 / imagefolder
    size: int | None = None  # resize to size x size (None: the source's native size)
    classes: list[str] | None = None  # class (or style) names to keep; None: the source's default
    split: str = "train"
    limit: int | None = None  # keep `limit` images (after class filtering), chosen by `selection`
    # "first": the first `limit` by id; "stratified": a class-balanced random draw seeded by
    # selection_seed (scikit-learn's stratified train_test_split: D-TRAK's CIFAR-2 is seed 42).
    selection: str = "first"
    selection_seed: int = 0
    # Captions (text-to-image training): "a {class} painting" gives every image the prompt with
    # {class} replaced by its class name (underscores as spaces). An imagefolder's metadata.jsonl
    # (Hugging Face convention: file_name + caption_column per line) takes precedence.
    prompt_template: str | None = None
    caption_column: str = "text"


@dataclass
class ModelConfig:
    """Arguments of diffusers' ``UNet2DModel`` (the subset we use)."""

    sample_size: int = 16
    in_channels: int = 1
    out_channels: int = 1
    block_out_channels: list[int] = field(default_factory=lambda: [32, 64, 64])
    layers_per_block: int = 1
    down_block_types: list[str] = field(
        default_factory=lambda: ["DownBlock2D", "AttnDownBlock2D", "DownBlock2D"]
    )
    up_block_types: list[str] = field(
        default_factory=lambda: ["UpBlock2D", "AttnUpBlock2D", "UpBlock2D"]
    )
    norm_num_groups: int = 8
    attention_head_dim: int | None = 8
    dropout: float = 0.0  # resnet blocks
    num_class_embeds: int | None = None  # set for a class-conditional model
    # Less common UNet2DModel settings (diffusers' defaults; D-TRAK's CIFAR model changes them).
    norm_eps: float = 1e-5
    resnet_time_scale_shift: str = "default"  # "scale_shift": time embedding as scale and shift
    freq_shift: int = 0
    flip_sin_to_cos: bool = True
    downsample_padding: int = 1
    # Not a UNet2DModel argument: diffusers builds attention with dropout 0; this sets the
    # attention output dropout after building (D-TRAK sets every Dropout module to 0.1).
    attention_dropout: float = 0.0

    def unet_kwargs(self) -> dict[str, Any]:
        """Keyword arguments for ``UNet2DModel``."""
        kwargs = dataclasses.asdict(self)
        kwargs.pop("attention_dropout")
        return kwargs


@dataclass
class SchedulerConfig:
    """Arguments of diffusers' ``DDPMScheduler``."""

    num_train_timesteps: int = 1000
    beta_schedule: str = "linear"
    beta_start: float = 0.0001
    beta_end: float = 0.02
    prediction_type: str = "epsilon"
    clip_sample: bool = True
    variance_type: str = "fixed_small"


@dataclass
class TrainConfig:
    steps: int = 2000
    batch_size: int = 64
    learning_rate: float = 1e-3
    lr_warmup_steps: int = 100
    # "constant": linear warmup, then the full rate; "cosine": warmup, then half a cosine down
    # to 0 at the last step (diffusers' get_cosine_schedule_with_warmup, as in D-TRAK).
    lr_schedule: str = "constant"
    # When set, the run length is this many passes over the training set it is given
    # (steps = epochs * ceil(n / (batch_size * gradient_accumulation_steps))), so retrained subset
    # models get the same number of epochs as the full model (D-TRAK); `steps` is then ignored.
    epochs: int | None = None
    # When set, lr_warmup_steps = ceil(fraction * steps) (D-TRAK: 0.1); else lr_warmup_steps.
    lr_warmup_fraction: float | None = None
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    weight_decay: float = 0.0
    grad_clip: float | None = 1.0
    ema_decay: float | None = None  # e.g. 0.999; the EMA weights are what gets saved
    gradient_accumulation_steps: int = 1
    mixed_precision: str = "no"  # "no" | "fp16" | "bf16" (GPU only)
    checkpoint_every: int = 500
    log_every: int = 100
    random_flip: bool = False
    num_workers: int = 0


@dataclass
class SampleConfig:
    sampler: str = "ddim"  # "ddim" | "ddpm"
    num_inference_steps: int = 50
    eta: float = 0.0


@dataclass
class ExperimentConfig:
    seed: int = 0
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    sample: SampleConfig = field(default_factory=SampleConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


LORA_KIND = "text-to-image-lora"
#: The attention projections LoRA adapts by default: every self- and cross-attention's query, key,
#: value and output projection (D-TRAK's ArtBench setting; diffusers' LoRA training script).
DEFAULT_LORA_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")
LORA_INITS = ("gaussian", "kaiming", "random")  # diffattr.diffusion.lora.INITS


@dataclass
class LoraSettings:
    """The LoRA adapter added to the UNet (peft ``LoraConfig``)."""

    rank: int = 128
    alpha: float | None = None  # LoRA scale = alpha / rank; None: alpha = rank (scale 1)
    # peft target_modules: module-name suffixes (``to_q``) or full names (``...attn2.to_k``).
    targets: list[str] = field(default_factory=lambda: list(DEFAULT_LORA_TARGETS))
    # peft init_lora_weights: "gaussian" (A normal, B = 0: starts as the base model; diffusers'
    # script), "kaiming" (peft's default, B = 0), "random" (A and B random: for tests).
    init: str = "gaussian"


@dataclass
class LoraExperimentConfig:
    """LoRA fine-tuning of a local Stable-Diffusion-layout folder (YAML ``kind: text-to-image-lora``).

    ``base_model``: a ``StableDiffusionPipeline.save_pretrained`` folder (never downloaded). Only
    the LoRA weights train; the data must have captions (``data.prompt_template`` or an image
    folder's ``metadata.jsonl``). ``train`` is the pixel trainer's section (``ema_decay`` is not
    supported here).
    """

    kind: str = LORA_KIND
    seed: int = 0
    base_model: str = ""
    # What trains: "lora" (a peft LoRA, saved as a LoRA file), or UNet weights in place, named
    # as a gradient method's ``params`` (a group such as "cross-attn-kv", Custom Diffusion's
    # choice, or "all"; or fnmatch patterns), saved as a whole pipeline folder.
    tune: str | list[str] = "lora"
    lora: LoraSettings = field(default_factory=LoraSettings)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


SCRATCH_KIND = "text-to-image-scratch"


@dataclass
class ScratchVae:
    """The ``AutoencoderKL`` (one 2x downsampling per block after the first) and its training."""

    block_out_channels: list[int] = field(default_factory=lambda: [32, 64])
    latent_channels: int = 4
    norm_num_groups: int = 8
    steps: int = 600
    batch_size: int = 64
    learning_rate: float = 1e-3
    kl_weight: float = 1e-6  # Stable Diffusion's VAE: a small KL term, mostly an autoencoder
    # Changes to the model's ``data`` for the VAE's training set, e.g. ``{classes: null}``: every
    # style. An autoencoder only reconstructs what it saw: a VAE fit to the base's styles alone
    # cannot represent the new styles a LoRA learns later (SD's VAE saw a broad distribution).
    data: dict[str, Any] = field(default_factory=dict)


@dataclass
class ScratchText:
    """The frozen, seeded random CLIP text encoder and its tokenizer's length."""

    hidden_size: int = 32  # also the UNet's cross_attention_dim
    layers: int = 2
    heads: int = 2
    max_length: int = 16
    # Words the tokenizer gets besides the captions' (new tokens for later customizations).
    extra_words: list[str] = field(default_factory=list)


@dataclass
class ScratchUNet:
    """The ``UNet2DConditionModel``: cross-attention in every block but the lowest."""

    block_out_channels: list[int] = field(default_factory=lambda: [32, 64])
    layers_per_block: int = 1
    attention_head_dim: int = 8
    norm_num_groups: int = 8


@dataclass
class ScratchConfig:
    """A small text-to-image latent model trained from scratch (YAML ``kind:
    text-to-image-scratch``; see :mod:`diffattr.diffusion.t2i_scratch`). ``train`` is the UNet's
    run (every weight tuned from the random init)."""

    kind: str = SCRATCH_KIND
    seed: int = 0
    num_train_timesteps: int = 1000
    prediction_type: str = "epsilon"
    data: DataConfig = field(default_factory=DataConfig)
    vae: ScratchVae = field(default_factory=ScratchVae)
    text: ScratchText = field(default_factory=ScratchText)
    unet: ScratchUNet = field(default_factory=ScratchUNet)
    train: TrainConfig = field(default_factory=TrainConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def scratch_config_from_dict(values: dict[str, Any], where: str = "config") -> ScratchConfig:
    """A :class:`ScratchConfig` from its YAML mapping; every bad field is one line."""
    if not isinstance(values, dict):
        raise ConfigError(f"{where}: expected a mapping, got {type(values).__name__}")
    cfg = _build(ScratchConfig, {"kind": SCRATCH_KIND, **values}, where)
    if cfg.kind != SCRATCH_KIND:
        raise ConfigError(f"{where}: kind={cfg.kind!r}; expected {SCRATCH_KIND!r}")
    _coerce_floats((cfg.train, cfg.vae), where)
    _check_train(cfg.train, where)
    if cfg.prediction_type not in ("epsilon", "v_prediction"):
        raise ConfigError(
            f"{where}: prediction_type={cfg.prediction_type!r}; expected epsilon or v_prediction"
        )
    for section, key in (("vae", "block_out_channels"), ("unet", "block_out_channels")):
        chans = getattr(getattr(cfg, section), key)
        if (
            not isinstance(chans, list)
            or not chans
            or not all(isinstance(c, int) and c > 0 for c in chans)
        ):
            raise ConfigError(f"{where}: {section}.{key}={chans!r}; expected positive integers")
    if cfg.train.ema_decay is not None:
        raise ConfigError(f"{where}: train.ema_decay: not supported for this model kind")
    check_data_captions(cfg.data, where)
    return cfg


def _build(cls: type, values: Any, where: str) -> Any:
    if values is None:
        return cls()
    if not isinstance(values, dict):
        raise ConfigError(f"{where}: expected a mapping, got {type(values).__name__}")
    known = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - set(known))
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {unknown}; known keys: {sorted(known)}")
    kwargs = {}
    for name, value in values.items():
        sub = _SECTIONS.get((cls, name))
        kwargs[name] = _build(sub, value, f"{where}.{name}") if sub else value
    return cls(**kwargs)


_SECTIONS: dict[tuple[type, str], type] = {
    (ExperimentConfig, "data"): DataConfig,
    (ExperimentConfig, "model"): ModelConfig,
    (ExperimentConfig, "scheduler"): SchedulerConfig,
    (ExperimentConfig, "train"): TrainConfig,
    (ExperimentConfig, "sample"): SampleConfig,
    (LoraExperimentConfig, "lora"): LoraSettings,
    (LoraExperimentConfig, "data"): DataConfig,
    (LoraExperimentConfig, "train"): TrainConfig,
    (ScratchConfig, "data"): DataConfig,
    (ScratchConfig, "vae"): ScratchVae,
    (ScratchConfig, "text"): ScratchText,
    (ScratchConfig, "unet"): ScratchUNet,
    (ScratchConfig, "train"): TrainConfig,
}


def _coerce_floats(sections: tuple[Any, ...], where: str) -> None:
    # YAML reads 1e-3 as a string; coerce the float fields that users write that way.
    for section in sections:
        for f in dataclasses.fields(section):
            v = getattr(section, f.name)
            if isinstance(v, str) and f.type in ("float", "float | None"):
                try:
                    setattr(section, f.name, float(v))
                except ValueError as exc:
                    raise ConfigError(f"{where}: {f.name}={v!r} is not a number") from exc


def config_from_dict(values: dict[str, Any], where: str = "config") -> ExperimentConfig:
    if isinstance(values, dict) and is_lora_config(values, where):
        raise ConfigError(
            f"{where}: a {LORA_KIND} config (LoRA fine-tuning of a text-to-image model); "
            "this needs a pixel-space DDPM config (`diffattr train` reads both)"
        )
    cfg = _build(ExperimentConfig, values, where)
    _coerce_floats((cfg.train, cfg.scheduler, cfg.sample, cfg.model), where)
    _check_train(cfg.train, where)
    check_data_captions(cfg.data, where)
    return cfg


def is_lora_config(values: dict[str, Any], where: str = "config") -> bool:
    """True for the YAML mapping of a :class:`LoraExperimentConfig` (``kind: text-to-image-lora``,
    or a ``base_model`` key without a ``kind``); an unknown ``kind`` is a :class:`ConfigError`."""
    kind = values.get("kind")
    if kind is None:
        return "base_model" in values
    if kind == SCRATCH_KIND:
        return False
    if kind != LORA_KIND:
        raise ConfigError(
            f"{where}: kind: unknown config kind {kind!r}; known: [{LORA_KIND!r}, {SCRATCH_KIND!r}] "
            "(leave kind out for a pixel-space DDPM config)"
        )
    return True


def lora_config_from_dict(values: dict[str, Any], where: str = "config") -> LoraExperimentConfig:
    """A :class:`LoraExperimentConfig` from its YAML mapping; every bad field is one line."""
    if not isinstance(values, dict):
        raise ConfigError(f"{where}: expected a mapping, got {type(values).__name__}")
    cfg = _build(LoraExperimentConfig, {"kind": LORA_KIND, **values}, where)
    _coerce_floats((cfg.train, cfg.lora), where)
    if cfg.kind != LORA_KIND:
        raise ConfigError(f"{where}: kind={cfg.kind!r}; expected {LORA_KIND!r}")
    if not isinstance(cfg.base_model, str) or not cfg.base_model:
        raise ConfigError(
            f"{where}: base_model: the local Stable Diffusion folder to fine-tune is required "
            "(a StableDiffusionPipeline.save_pretrained folder)"
        )
    if isinstance(cfg.seed, bool) or not isinstance(cfg.seed, int):
        raise ConfigError(f"{where}: seed={cfg.seed!r}; expected an integer")
    _check_lora(cfg.lora, where)
    _check_tune(cfg.tune, where)
    _check_train(cfg.train, where)
    if cfg.train.ema_decay is not None:
        raise ConfigError(
            f"{where}: train.ema_decay={cfg.train.ema_decay!r}; LoRA fine-tuning keeps no EMA "
            "weights (leave it out)"
        )
    check_data_captions(cfg.data, where)
    return cfg


def _check_lora(lora: LoraSettings, where: str) -> None:
    if isinstance(lora.rank, bool) or not isinstance(lora.rank, int) or lora.rank < 1:
        raise ConfigError(f"{where}: lora.rank={lora.rank!r}; expected an integer >= 1")
    a = lora.alpha
    if a is not None and (isinstance(a, bool) or not isinstance(a, int | float) or not a > 0):
        raise ConfigError(f"{where}: lora.alpha={a!r}; expected a number > 0 or null (= rank)")
    if lora.init not in LORA_INITS:
        raise ConfigError(f"{where}: lora.init={lora.init!r}; expected one of {list(LORA_INITS)}")
    t = lora.targets
    if (
        isinstance(t, str)
        or not isinstance(t, list)
        or not t
        or not all(isinstance(x, str) and x for x in t)
    ):
        raise ConfigError(
            f"{where}: lora.targets={t!r}; expected a non-empty list of module names, e.g. "
            f"{list(DEFAULT_LORA_TARGETS)}"
        )


def _check_tune(tune: Any, where: str) -> None:
    ok = (isinstance(tune, str) and tune) or (
        isinstance(tune, list) and tune and all(isinstance(x, str) and x for x in tune)
    )
    if not ok:
        raise ConfigError(
            f"{where}: tune={tune!r}; expected 'lora', a parameter group ('cross-attn-kv', "
            "'all') or a list of fnmatch patterns over the UNet's parameter names"
        )


LR_SCHEDULES = ("constant", "cosine")

# Keys added after results were first written. Left out of identities while at their defaults,
# so folders made before the keys existed (trained models, evaluations) still reopen.
_ADDED_LATER: dict[str, tuple[str, ...]] = {
    "data": ("selection", "selection_seed", "prompt_template", "caption_column"),
    "model": (
        "norm_eps",
        "resnet_time_scale_shift",
        "freq_shift",
        "flip_sin_to_cos",
        "downsample_padding",
        "attention_dropout",
    ),
    "train": ("lr_schedule", "epochs", "lr_warmup_fraction", "adam_beta1", "adam_beta2"),
}
_SECTION_TYPES: dict[str, type] = {"data": DataConfig, "model": ModelConfig, "train": TrainConfig}


def drop_later_defaults(
    d: dict[str, Any], added_later: dict[str, tuple[str, ...]], types: dict[str, type]
) -> dict[str, Any]:
    """Remove from each ``d[section]`` the ``added_later`` keys whose value is the default of
    that section's dataclass (``types[section]``); returns ``d``, changed in place."""
    for section, keys in added_later.items():
        defaults = types[section]()
        for key in keys:
            if d[section][key] == getattr(defaults, key):
                d[section].pop(key)
    return d


def identity_dict(cfg: ExperimentConfig) -> dict[str, Any]:
    """``cfg.to_dict()`` for result identities: later-added keys left out while at their defaults."""
    return drop_later_defaults(cfg.to_dict(), _ADDED_LATER, _SECTION_TYPES)


def lora_identity_dict(cfg: LoraExperimentConfig) -> dict[str, Any]:
    """``cfg.to_dict()`` for result identities, with the same later-added data / train keys left
    out while at their defaults as :func:`identity_dict`."""
    added = {k: _ADDED_LATER[k] for k in ("data", "train")}
    d = drop_later_defaults(cfg.to_dict(), added, _SECTION_TYPES)
    if d["tune"] == "lora":  # added later: LoRA runs made before it still reopen
        d.pop("tune")
    else:  # the LoRA section says nothing about a run that tunes weights in place
        d.pop("lora")
    return d


def _check_train(t: TrainConfig, where: str) -> None:
    for key in ("steps", "batch_size", "gradient_accumulation_steps"):
        v = getattr(t, key)
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ConfigError(f"{where}: train.{key}={v!r}; expected an integer >= 1")
    # 0 turns logging / checkpointing off.
    for key in ("lr_warmup_steps", "num_workers", "checkpoint_every", "log_every"):
        v = getattr(t, key)
        if isinstance(v, bool) or not isinstance(v, int) or v < 0:
            raise ConfigError(f"{where}: train.{key}={v!r}; expected an integer >= 0")
    if not isinstance(t.learning_rate, (int, float)) or not t.learning_rate > 0:
        raise ConfigError(
            f"{where}: train.learning_rate={t.learning_rate!r}; expected a number > 0"
        )
    if t.lr_schedule not in LR_SCHEDULES:
        raise ConfigError(
            f"{where}: train.lr_schedule={t.lr_schedule!r}; expected one of {list(LR_SCHEDULES)}"
        )
    if t.epochs is not None and (not isinstance(t.epochs, int) or t.epochs < 1):
        raise ConfigError(f"{where}: train.epochs={t.epochs!r}; expected an integer >= 1 or null")
    f = t.lr_warmup_fraction
    if f is not None and not 0.0 <= f < 1.0:
        raise ConfigError(f"{where}: train.lr_warmup_fraction={f!r}; expected a value in [0, 1)")


PROMPT_CLASS_FIELD = "{class}"


def check_data_captions(d: DataConfig, where: str = "data") -> None:
    """``data.prompt_template`` must be a string holding ``{class}``; ``data.caption_column`` a
    non-empty string."""
    t = d.prompt_template
    if t is not None and (not isinstance(t, str) or PROMPT_CLASS_FIELD not in t):
        raise ConfigError(
            f"{where}: data.prompt_template={t!r}; expected a string containing "
            f"{PROMPT_CLASS_FIELD}, e.g. 'a {{class}} painting'"
        )
    c = d.caption_column
    if not isinstance(c, str) or not c:
        raise ConfigError(f"{where}: data.caption_column={c!r}; expected a non-empty string")


def resolve_train_length(cfg: ExperimentConfig, n_train: int) -> ExperimentConfig:
    """``cfg`` with ``train.steps`` / ``train.lr_warmup_steps`` made concrete for ``n_train`` images.

    Applies ``train.epochs`` and ``train.lr_warmup_fraction`` (then clears them); a config without
    them is returned unchanged.
    """
    t = cfg.train
    if t.epochs is None and t.lr_warmup_fraction is None:
        return cfg
    steps = t.steps
    if t.epochs is not None:
        if n_train < 1:
            raise ConfigError("train.epochs: the training set is empty")
        per_epoch = math.ceil(math.ceil(n_train / t.batch_size) / t.gradient_accumulation_steps)
        steps = t.epochs * per_epoch
    warmup = t.lr_warmup_steps
    if t.lr_warmup_fraction is not None:
        warmup = math.ceil(t.lr_warmup_fraction * steps)
    train = dataclasses.replace(
        t, steps=steps, lr_warmup_steps=warmup, epochs=None, lr_warmup_fraction=None
    )
    return dataclasses.replace(cfg, train=train)


def _read_yaml(path: Path) -> Any:
    if not path.exists():
        raise ConfigError(f"{path}: config file not found")
    try:
        return yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML ({exc})") from exc


def load_config(path: str | Path) -> ExperimentConfig:
    """Read an :class:`ExperimentConfig` from a YAML file (clear errors for missing/bad files).

    A LoRA fine-tuning config is refused here; :func:`load_train_config` reads either kind.
    """
    path = Path(path)
    return config_from_dict(_read_yaml(path), where=str(path))


def load_train_config(
    path: str | Path,
) -> ExperimentConfig | LoraExperimentConfig | ScratchConfig:
    """Read what ``diffattr train`` trains: a pixel-space :class:`ExperimentConfig`, a
    :class:`LoraExperimentConfig` when the YAML says ``kind: text-to-image-lora`` (or has a
    ``base_model``), or a :class:`ScratchConfig` (``kind: text-to-image-scratch``)."""
    path = Path(path)
    values = _read_yaml(path)
    if isinstance(values, dict) and values.get("kind") == SCRATCH_KIND:
        return scratch_config_from_dict(values, where=str(path))
    if isinstance(values, dict) and is_lora_config(values, str(path)):
        return lora_config_from_dict(values, where=str(path))
    return config_from_dict(values, where=str(path))
