"""Typed evaluation config, read from YAML.

An evaluation YAML names (or inlines) the experiment whose full model is attributed, then says how
the retraining ground truth is built and which methods are judged::

    experiment: ../digits2.yaml        # a path (relative to this file, then to the cwd) or a mapping
    experiment_overrides:              # deep-merged onto the experiment (e.g. fewer steps)
      train: {steps: 300}
    subsets: {num_subsets: 64, alpha: 0.5, seeds_per_subset: 1, seed: 0}
    queries: {held_out: 32, generated: 32, seed: 0}
    ground_truth: {timesteps: 100, noise_draws: 1, seed: 0}
    methods: {trak: {...options passed to make_attributor...}, pixel: {}}
    counterfactual: {enabled: true, queries: 2, fractions: [0.01, 0.05, 0.1]}
    group_subsets: {enabled: true, groups: {kmeans: 20, seed: 0}, num_subsets: 16, alpha: 0.5}
    lds: {bootstrap: 1000, seed: 0, level: 0.95}
    workers: 1                         # processes (torchrun); each takes a share of the models
    stack_models: 1                    # models a process trains at once (torch.func stacking)

A text-to-image evaluation (LDS by LoRA retraining, D-TRAK's ArtBench protocol) names a LoRA
fine-tune as its experiment (``kind: text-to-image-lora``): the base model stays fixed, the LoRA is
retrained on every subset. ``base`` (a path or mapping of a ``kind: text-to-image-scratch``
config) trains the base model here first, in ``out/base``; the experiment then says
``base_model: base``. ``customization`` adds the customization benchmark
(:mod:`diffattr.evaluation.customization`).

Unknown keys are an error naming the section and key.
"""

from __future__ import annotations

import copy
import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from diffattr.config import (
    ConfigError,
    ExperimentConfig,
    LoraExperimentConfig,
    ScratchConfig,
    config_from_dict,
    is_lora_config,
    load_config,
    lora_config_from_dict,
    scratch_config_from_dict,
)
from diffattr.evaluation.ensembles import EnsembleSpec

#: ``experiment.base_model`` of a LoRA experiment whose base the ``base`` section trains.
BASE_MARKER = "base"


@dataclass
class SubsetsConfig:
    """The ``num_subsets`` random training subsets of fraction ``alpha`` (D-TRAK: 64, 0.5)."""

    num_subsets: int = 64
    alpha: float = 0.5
    seeds_per_subset: int = 1  # models trained per subset (papers: 3); their outputs are averaged
    seed: int = 0
    stratify: bool = False  # every subset keeps each class's share (D-TRAK); needs labels


@dataclass
class QueriesConfig:
    """Held-out queries come from the data's test split; generated ones from the full model."""

    held_out: int = 32  # images drawn (seeded) from ``held_out_split``; 0 disables
    generated: int = 32  # images sampled from the full model; 0 disables
    seed: int = 0  # selection seed for held-out, initial-noise seed for generated
    held_out_split: str = "test"
    sampler: str | None = None  # None: the experiment's sample.sampler
    num_inference_steps: int | None = None  # None: the experiment's sample.num_inference_steps
    # Held-out draw class-stratified, scikit-learn's split with random_state=seed (D-TRAK: 42).
    stratify: bool = False
    # Text-to-image: the prompts generated queries use (None: captions of the training images,
    # drawn with ``seed``), and the classifier-free guidance (1: the conditional model alone).
    prompts: list[str] | None = None
    guidance_scale: float = 1.0


@dataclass
class GroundTruthConfig:
    """The measured model output: the query's diffusion loss averaged over fixed (t, noise) pairs."""

    timesteps: int = 100  # evenly spaced over [0, T-1]; up to T (=all 1000)
    noise_draws: int = 1  # noises per timestep
    seed: int = 0
    batch_size: int = 256  # (query, timestep) pairs per forward pass


@dataclass
class CounterfactualConfig:
    """Remove a method's top-k for a generated query, retrain, regenerate from the same noise."""

    enabled: bool = False
    queries: int = 2  # the first `queries` generated queries are used
    fractions: list[float] = field(default_factory=lambda: [0.01, 0.05, 0.1])
    random_control: bool = True  # also remove k random images (same k) as the control
    methods: list[str] | None = None  # methods to check (None: every evaluated method)
    seed: int = 0  # seed of the random control's choice
    feature_timestep: int = 0  # timestep at which the full model's mid-block features are taken


@dataclass
class GroupSubsetsConfig:
    """Group-level LDS (GGDA): retrain on subsets that keep ``alpha`` of the groups, whole.

    ``groups``: "class", a data grouping name, ``{csv: path}`` (relative to the eval YAML, then
    the cwd) or ``{kmeans: K, seed: 0}`` (see :mod:`diffattr.data.groups`). Not part of the
    evaluation's identity: its results live in ``out/group_subsets`` under their own identity,
    so group LDS can be added to a finished evaluation.
    """

    enabled: bool = False
    groups: Any = "class"
    num_subsets: int = 16
    alpha: float = 0.5
    seeds_per_subset: int = 1
    seed: int = 0


@dataclass
class CustomizationConfig:
    """The customization benchmark (Wang et al., ICCV 2023): see
    :mod:`diffattr.evaluation.customization`."""

    enabled: bool = False
    data: dict[str, Any] = field(default_factory=dict)  # DataConfig of exemplars and pool
    pool_classes: list[str] | None = None  # the pool's styles (None: the base's training data)
    pool_size: int = 300
    # Each: {name, style (the data class the exemplars come from), exemplars (how many), token
    # (the new word), seed, prompts_from (overrides the section's)}.
    sets: list[dict[str, Any]] = field(default_factory=list)
    caption: str = "a {digit} in {token} style"  # exemplar captions and query prompts
    tune: Any = "cross-attn-kv"  # what the customization trains (Custom Diffusion: K and V)
    train: dict[str, Any] = field(default_factory=dict)  # TrainConfig of the customization
    queries_per_set: int = 8
    # Query prompts: "pool" puts the new word on other content (the captions' other fields
    # from pool images: a new digit in the learnt style); "exemplars" asks for the exemplars'
    # own captions again (what the customization was taught).
    prompts_from: str = "pool"
    methods: list[str] | None = None  # None: every evaluated method
    num_inference_steps: int = 50
    guidance_scale: float = 1.0


@dataclass
class LDSConfig:
    bootstrap: int = 1000  # bootstrap resamples over queries for the CI
    seed: int = 0
    level: float = 0.95


@dataclass
class EvalConfig:
    experiment: ExperimentConfig | LoraExperimentConfig
    base: ScratchConfig | None = None  # a base model trained here (text-to-image)
    customization: CustomizationConfig = field(default_factory=CustomizationConfig)
    subsets: SubsetsConfig = field(default_factory=SubsetsConfig)
    queries: QueriesConfig = field(default_factory=QueriesConfig)
    ground_truth: GroundTruthConfig = field(default_factory=GroundTruthConfig)
    methods: dict[str, dict[str, Any]] = field(default_factory=dict)
    counterfactual: CounterfactualConfig = field(default_factory=CounterfactualConfig)
    lds: LDSConfig = field(default_factory=LDSConfig)
    group_subsets: GroupSubsetsConfig = field(default_factory=GroupSubsetsConfig)
    workers: int = 1
    stack_models: int = 1  # retrained models per process trained together (1: one by one)
    source: str | None = None  # the YAML file it came from

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d.pop("source")
        return d

    def identity(self) -> dict[str, Any]:
        """What decides an evaluation's results (not methods, processes or stacking).

        Keys added after evaluations were first written are left out while at their defaults,
        so older result folders still reopen.
        """
        from diffattr.config import drop_later_defaults, identity_dict, lora_identity_dict

        d = {k: v for k, v in self.to_dict().items() if k not in NOT_IDENTITY}
        if isinstance(self.experiment, LoraExperimentConfig):
            d["experiment"] = lora_identity_dict(self.experiment)
        else:
            d["experiment"] = identity_dict(self.experiment)
        if d["base"] is None:  # added later: pixel evaluations' identities stay as they were
            d.pop("base")
        return drop_later_defaults(d, _ADDED_LATER, _SECTIONS)

    @property
    def text_to_image(self) -> bool:
        return isinstance(self.experiment, LoraExperimentConfig)

    def method_options(self, name: str) -> dict[str, Any]:
        """The entry ``methods.<name>`` as written (a copy)."""
        return copy.deepcopy(self.methods.get(name) or {})

    def method_spec(self, name: str) -> tuple[str, dict[str, Any], list[float] | None]:
        """``(registered method, its options, lambda grid or None)`` of entry ``name``.

        An entry may be a label for a registered method (``method: d-trak``), so one method can
        be evaluated with several settings; ``lambda_grid`` is the harness's, not the method's.
        """
        options = self.method_options(name)
        method = str(options.pop("method", name))
        grid = lambda_grid(options.pop("lambda_grid", None), f"methods.{name}")
        options.pop("ensemble", None)
        return method, options, grid

    def method_ensemble(self, name: str) -> EnsembleSpec | None:
        """The entry's ``ensemble:`` (the harness's, not the method's: which models score), or
        None for a single-model method."""
        raw = self.method_options(name).get("ensemble")
        if raw is None:
            return None
        return EnsembleSpec.from_dict(raw, f"methods.{name}.ensemble")


# group_subsets: its own identity in out/group_subsets (see GroupSubsetsConfig).
# customization: its own identities in out/customization (see the module).
NOT_IDENTITY = ("methods", "workers", "stack_models", "group_subsets", "customization")
# Keys added after evaluations were first written (see EvalConfig.identity).
_ADDED_LATER: dict[str, tuple[str, ...]] = {
    "subsets": ("stratify",),
    "queries": ("stratify", "prompts", "guidance_scale"),
}

_SECTIONS: dict[str, type] = {
    "subsets": SubsetsConfig,
    "queries": QueriesConfig,
    "ground_truth": GroundTruthConfig,
    "counterfactual": CounterfactualConfig,
    "lds": LDSConfig,
    "group_subsets": GroupSubsetsConfig,
    "customization": CustomizationConfig,
}
_TOP_KEYS = {
    "base",
    "experiment",
    "experiment_overrides",
    "methods",
    "workers",
    "stack_models",
    *_SECTIONS,
}


def _section(cls: type, values: Any, where: str) -> Any:
    if values is None:
        return cls()
    if not isinstance(values, dict):
        raise ConfigError(f"{where}: expected a mapping, got {type(values).__name__}")
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {unknown}; known keys: {sorted(known)}")
    return cls(**values)


def deep_merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    """``base`` with ``over`` merged in (nested mappings merged, everything else replaced)."""
    out = copy.deepcopy(base)
    for k, v in over.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = deep_merge(out[k], v)
        else:
            out[k] = copy.deepcopy(v)
    return out


def _find(path: str, folder: Path | None, where: str, what: str) -> Path:
    """A config path, relative to the eval YAML's folder, then to the cwd."""
    candidates = [Path(path)] if Path(path).is_absolute() else []
    if not candidates:
        candidates = ([folder / path] if folder else []) + [Path(path)]
    found = next((p for p in candidates if p.exists()), None)
    if found is None:
        raise ConfigError(
            f"{where}: {what} config {path!r} not found (looked at "
            f"{', '.join(str(p) for p in candidates)})"
        )
    return found


def _base(values: dict[str, Any], where: str, folder: Path | None) -> ScratchConfig | None:
    base = values.get("base")
    if base is None:
        return None
    if isinstance(base, str):
        base = yaml.safe_load(_find(base, folder, f"{where}.base", "base model").read_text())
    return scratch_config_from_dict(base, where=f"{where}.base")


def _experiment(
    values: dict[str, Any], where: str, folder: Path | None
) -> ExperimentConfig | LoraExperimentConfig:
    exp = values.get("experiment")
    if isinstance(exp, str):
        found = _find(exp, folder, where, "experiment")
        raw = yaml.safe_load(found.read_text()) or {}
        if isinstance(raw, dict) and is_lora_config(raw, str(found)):
            base = raw
        else:
            base = dataclasses.asdict(load_config(found))
    elif isinstance(exp, dict):
        base = exp
    elif exp is None:
        raise ConfigError(f"{where}: 'experiment' is required (a config path or a mapping)")
    else:
        raise ConfigError(f"{where}.experiment: expected a path or a mapping, got {exp!r}")
    over = values.get("experiment_overrides") or {}
    if not isinstance(over, dict):
        raise ConfigError(f"{where}.experiment_overrides: expected a mapping")
    merged = deep_merge(base, over)
    if is_lora_config(merged, f"{where}.experiment"):
        if values.get("base") is not None and not merged.get("base_model"):
            merged["base_model"] = BASE_MARKER
        cfg = lora_config_from_dict(merged, where=f"{where}.experiment")
        if cfg.base_model == BASE_MARKER and values.get("base") is None:
            raise ConfigError(
                f"{where}.experiment.base_model: {BASE_MARKER!r} names the model the 'base' "
                "section trains, and there is no 'base' section"
            )
        return cfg
    return config_from_dict(merged, where=f"{where}.experiment")


def lambda_grid(values: Any, where: str) -> list[float] | None:
    """A method's ``lambda_grid`` option as floats (None when absent); bad values named."""
    if values is None:
        return None
    if not isinstance(values, list) or not values:
        raise ConfigError(f"{where}.lambda_grid: expected a non-empty list of numbers")
    try:
        grid = [float(v) for v in values]
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"{where}.lambda_grid: {values!r} is not a list of numbers") from exc
    if any(not math.isfinite(v) or v <= 0 for v in grid):
        raise ConfigError(f"{where}.lambda_grid: values must be finite and > 0, got {grid}")
    return grid


def _validate(cfg: EvalConfig, where: str) -> None:
    for name, opts in cfg.methods.items():
        lambda_grid(opts.get("lambda_grid"), f"{where}.methods.{name}")
        if not isinstance(opts.get("method", name), str):
            raise ConfigError(f"{where}.methods.{name}.method: expected a method name")
    s = cfg.subsets
    if s.num_subsets < 2:
        raise ConfigError(f"{where}.subsets.num_subsets: need at least 2, got {s.num_subsets}")
    if not 0.0 < s.alpha <= 1.0:
        raise ConfigError(f"{where}.subsets.alpha: must be in (0, 1], got {s.alpha}")
    if s.seeds_per_subset < 1:
        raise ConfigError(f"{where}.subsets.seeds_per_subset: must be >= 1")
    q = cfg.queries
    if q.held_out < 0 or q.generated < 0 or q.held_out + q.generated == 0:
        raise ConfigError(f"{where}.queries: need held_out + generated > 0 (both >= 0)")
    g = cfg.ground_truth
    T = num_train_timesteps(cfg)
    if not 1 <= g.timesteps <= T:
        raise ConfigError(f"{where}.ground_truth.timesteps: must be in [1, {T}], got {g.timesteps}")
    if g.noise_draws < 1 or g.batch_size < 1:
        raise ConfigError(f"{where}.ground_truth: noise_draws and batch_size must be >= 1")
    c = cfg.counterfactual
    if c.enabled:
        if not c.fractions or any(not 0.0 < f < 1.0 for f in c.fractions):
            raise ConfigError(f"{where}.counterfactual.fractions: each must be in (0, 1)")
        if c.queries < 1 or c.queries > q.generated:
            raise ConfigError(
                f"{where}.counterfactual.queries: must be in [1, queries.generated={q.generated}]"
            )
    if cfg.text_to_image and c.enabled:
        raise ConfigError(
            f"{where}.counterfactual: not available for text-to-image evaluations yet (set "
            "enabled: false)"
        )
    if cfg.customization.enabled:
        from diffattr.evaluation.customization import check_customization

        check_customization(cfg, f"{where}.customization")
    if not 0.0 < cfg.lds.level < 1.0 or cfg.lds.bootstrap < 1:
        raise ConfigError(f"{where}.lds: level in (0, 1) and bootstrap >= 1 required")
    _validate_groups(cfg.group_subsets, f"{where}.group_subsets")


def num_train_timesteps(cfg: EvalConfig) -> int:
    """T of the evaluated model's scheduler (a text-to-image base's is read when it is trained
    here or exists; Stable Diffusion's 1000 otherwise)."""
    exp = cfg.experiment
    if isinstance(exp, ExperimentConfig):
        return exp.scheduler.num_train_timesteps
    if cfg.base is not None:
        return cfg.base.num_train_timesteps
    sched = Path(exp.base_model) / "scheduler" / "scheduler_config.json"
    if sched.is_file():
        import json

        return int(json.loads(sched.read_text()).get("num_train_timesteps", 1000))
    return 1000


def _validate_groups(g: GroupSubsetsConfig, where: str) -> None:
    from diffattr.data.groups import parse_group_spec
    from diffattr.errors import UserError

    try:
        parse_group_spec(g.groups, f"{where}.groups")
    except UserError as exc:
        raise ConfigError(str(exc)) from None
    if g.num_subsets < 2:
        raise ConfigError(f"{where}.num_subsets: need at least 2, got {g.num_subsets}")
    if not 0.0 < g.alpha < 1.0:
        raise ConfigError(f"{where}.alpha: must be in (0, 1), got {g.alpha}")
    if g.seeds_per_subset < 1:
        raise ConfigError(f"{where}.seeds_per_subset: must be >= 1")


def _resolve_group_csv(g: GroupSubsetsConfig, folder: Path | None) -> None:
    """A relative ``groups: {csv: path}`` is read relative to the eval YAML when it exists there."""
    path = g.groups.get("csv") if isinstance(g.groups, dict) else None
    if isinstance(path, str) and folder is not None and (folder / path).exists():
        g.groups = {**g.groups, "csv": str(folder / path)}


def eval_config_from_dict(
    values: dict[str, Any], where: str = "eval", folder: Path | None = None
) -> EvalConfig:
    if not isinstance(values, dict):
        raise ConfigError(f"{where}: expected a mapping at the top level")
    unknown = sorted(set(values) - _TOP_KEYS)
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {unknown}; known keys: {sorted(_TOP_KEYS)}")
    methods = values.get("methods") or {}
    if not isinstance(methods, dict):
        raise ConfigError(f"{where}.methods: expected a mapping method -> options")
    for name, opts in methods.items():
        if opts is not None and not isinstance(opts, dict):
            raise ConfigError(
                f"{where}.methods.{name}: expected a mapping of options, got {opts!r}"
            )
    workers = _positive(values, "workers", where)
    stack_models = _positive(values, "stack_models", where)
    cf = values.get("counterfactual") or {}
    if isinstance(cf, dict) and isinstance(cf.get("fractions"), list):
        cf["fractions"] = [float(v) for v in cf["fractions"]]
    cfg = EvalConfig(
        experiment=_experiment(values, where, folder),
        base=_base(values, where, folder),
        methods={str(k): dict(v or {}) for k, v in methods.items()},
        workers=workers,
        stack_models=stack_models,
        **{k: _section(cls, values.get(k), f"{where}.{k}") for k, cls in _SECTIONS.items()},
    )
    cfg.subsets.alpha = float(cfg.subsets.alpha)
    cfg.group_subsets.alpha = float(cfg.group_subsets.alpha)
    _resolve_group_csv(cfg.group_subsets, folder)
    _validate(cfg, where)
    return cfg


def _positive(values: dict[str, Any], key: str, where: str) -> int:
    v = values.get(key, 1)
    if not isinstance(v, int) or isinstance(v, bool) or v < 1:
        raise ConfigError(f"{where}.{key}: expected an integer >= 1, got {v!r}")
    return v


def load_eval_config(path: str | Path) -> EvalConfig:
    """Read an :class:`EvalConfig` (clear errors naming the file and key)."""
    path = Path(path)
    if not path.exists():
        raise ConfigError(f"{path}: eval config file not found")
    try:
        values = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML ({exc})") from exc
    cfg = eval_config_from_dict(values, where=str(path), folder=path.parent)
    cfg.source = str(path)
    return cfg
