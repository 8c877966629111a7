"""The customization benchmark (Wang et al., ICCV 2023, "Evaluating Data Attribution for
Text-to-Image Models"): ground truth by construction, no retraining ensemble.

For each configured set, the base model is fine-tuned on a few *exemplar* images under a new
word (Custom Diffusion tunes the cross-attention keys and values; ``tune`` says what trains here),
then generates with prompts that use the word. Those generations were made by the exemplars, so
a method should rank them first among a *pool* of other training images (the base model's own
training data, as LAION is for Stable Diffusion). Per query: Recall@K, the share of the exemplars
in the method's top K, and average precision over the whole ranking; reported as means over
queries with bootstrap intervals.

Every step keeps its results and is skipped when they exist, so a killed run resumes:
``out/customization/<set>/{model, queries, scores/<method>}`` and ``results.json``. The pool, the
exemplars and their captions, the customized model and its queries have their identity in each
set's folder; a changed setting is refused there rather than mixed in.
"""

from __future__ import annotations

import dataclasses
import logging
import string
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import numpy as np
import torch

from diffattr.attribution.base import Queries, Scores
from diffattr.config import ConfigError, DataConfig, LoraExperimentConfig, TrainConfig
from diffattr.data.dataset import DataError, ImageDataset
from diffattr.repro import derive_seed, open_result_dir, read_record, write_json_atomic
from diffattr.stats import bootstrap_ci

log = logging.getLogger(__name__)

FOLDER = "customization"
RECALL_AT = (5, 10)


@dataclass
class SetResult:
    """One method on the queries of every set: per-query Recall@K and average precision."""

    method: str
    recall: dict[int, list[float]] = field(default_factory=dict)
    ap: list[float] = field(default_factory=list)
    per_set: dict[str, dict[str, float]] = field(default_factory=dict)
    fit_seconds: float = 0.0
    score_seconds: float = 0.0
    error: str | None = None


def check_customization(cfg: Any, where: str) -> None:
    """One-line errors for a ``customization`` section that cannot run."""
    c = cfg.customization
    if not cfg.text_to_image:
        raise ConfigError(f"{where}: needs a text-to-image experiment (kind: text-to-image-lora)")
    if not c.sets:
        raise ConfigError(f"{where}.sets: at least one set of exemplars is required")
    names = set()
    for i, s in enumerate(c.sets):
        here = f"{where}.sets[{i}]"
        if not isinstance(s, dict):
            raise ConfigError(f"{here}: expected a mapping (name, style, exemplars, token)")
        known = {f.name for f in dataclasses.fields(_SetSpec)}
        unknown = sorted(set(s) - known)
        if unknown:
            raise ConfigError(f"{here}: unknown key(s) {unknown}; known keys: {sorted(known)}")
        spec = _SetSpec(**s)
        if not spec.name or not spec.style:
            raise ConfigError(f"{here}: name and style are required")
        if spec.name in names:
            raise ConfigError(f"{here}.name: {spec.name!r} is used twice")
        names.add(spec.name)
        if not isinstance(spec.exemplars, int) or spec.exemplars < 1:
            raise ConfigError(f"{here}.exemplars: expected an integer >= 1")
        if spec.prompts_from not in (None, "pool", "exemplars"):
            raise ConfigError(f"{here}.prompts_from: expected pool or exemplars")
        if not spec.token or not spec.token.isalnum():
            raise ConfigError(f"{here}.token: expected one word, got {spec.token!r}")
    fields = {f for _, f, _, _ in string.Formatter().parse(c.caption) if f}
    if "token" not in fields:
        raise ConfigError(f"{where}.caption: {c.caption!r} must contain {{token}}")
    if c.prompts_from not in ("pool", "exemplars"):
        raise ConfigError(f"{where}.prompts_from: {c.prompts_from!r}; expected pool or exemplars")
    for key in ("pool_size", "queries_per_set", "num_inference_steps"):
        if not isinstance(getattr(c, key), int) or getattr(c, key) < 1:
            raise ConfigError(f"{where}.{key}: expected an integer >= 1")
    _train_config(c, where)
    unknown = sorted(set(c.data) - {f.name for f in dataclasses.fields(DataConfig)})
    if unknown:
        raise ConfigError(f"{where}.data: unknown key(s) {unknown}")


@dataclass
class _SetSpec:
    name: str = ""
    style: str = ""
    exemplars: int = 4
    token: str = "sks"
    seed: int = 0
    prompts_from: str | None = None  # None: the section's ``prompts_from``


def _train_config(c: Any, where: str) -> TrainConfig:
    known = {f.name for f in dataclasses.fields(TrainConfig)}
    unknown = sorted(set(c.train) - known)
    if unknown:
        raise ConfigError(f"{where}.train: unknown key(s) {unknown}; known keys: {sorted(known)}")
    return TrainConfig(**c.train)


def _data_config(c: Any, base: DataConfig, **over: Any) -> DataConfig:
    values = {**dataclasses.asdict(base), **c.data, **over}
    return DataConfig(**values)


def _caption(template: str, token: str, data: ImageDataset, row: int) -> str:
    """``template`` with ``{token}`` and the image's groups (``{digit}``, ``{style}``...)."""
    fields = {k: v[row] for k, v in data.groups.items()}
    if data.class_names is not None and data.labels is not None:
        fields.setdefault("class", data.class_names[int(data.labels[row])])
    try:
        return template.format(token=token, **fields)
    except KeyError as exc:
        raise DataError(
            f"customization.caption: {template!r} names {exc}, which {data.name} does not have "
            f"(fields: token, {', '.join(sorted(fields))})"
        ) from None


def exemplar_set(c: Any, base: DataConfig, spec: _SetSpec) -> ImageDataset:
    """The ``spec.exemplars`` images of ``spec.style`` (training split, drawn with the set's
    seed), captioned with the new token."""
    from diffattr.data import load_dataset

    data = load_dataset(
        _data_config(c, base, classes=[spec.style], split="train", limit=None, prompt_template=None)
    )
    if len(data) < spec.exemplars:
        raise DataError(
            f"customization set {spec.name!r}: style {spec.style!r} has {len(data)} images, "
            f"{spec.exemplars} exemplars asked"
        )
    rng = np.random.default_rng(derive_seed(spec.seed, "exemplars", spec.name))
    rows = np.sort(rng.choice(len(data), size=spec.exemplars, replace=False))
    ex = data.select_ids(data.ids[torch.as_tensor(rows)], name=f"exemplars[{spec.name}]")
    ex.captions = [_caption(c.caption, spec.token, ex, i) for i in range(len(ex))]
    return ex


def base_training_data(cfg: Any, base_model: str) -> DataConfig:
    """The data the base model was trained on: the ``base`` section's, or the one its record
    names (a model trained by diffattr); else the experiment's (set ``pool_classes``)."""
    if cfg.base is not None:
        return cfg.base.data
    try:
        data = read_record(base_model).get("config", {}).get("data")
    except (FileNotFoundError, ValueError):
        data = None
    if isinstance(data, dict):
        known = {f.name for f in dataclasses.fields(DataConfig)}
        return DataConfig(**{k: v for k, v in data.items() if k in known})
    return cfg.experiment.data


def pool_set(c: Any, base_data: DataConfig) -> ImageDataset:
    """The pool the exemplars hide in: ``pool_size`` images of the base model's training data
    (``pool_classes`` to choose other styles), class-balanced, with their own captions."""
    from diffattr.data import load_dataset

    over: dict[str, Any] = {"split": "train", "limit": c.pool_size, "selection": "stratified"}
    if c.pool_classes is not None:
        over["classes"] = list(c.pool_classes)
    return load_dataset(_data_config(c, base_data, **over))


def concat(a: ImageDataset, b: ImageDataset, name: str) -> ImageDataset:
    """``a`` then ``b`` as one set (ids must not overlap; groups kept where both have them)."""
    if a.image_shape != b.image_shape:
        raise DataError(f"{name}: images {a.image_shape} and {b.image_shape} differ in shape")
    shared = set(a.groups) & set(b.groups)
    caps = None
    if a.captions is not None and b.captions is not None:
        caps = a.captions + b.captions
    return ImageDataset(
        name=name,
        images=torch.cat([a.images, b.images]),
        ids=torch.cat([a.ids, b.ids]),
        groups={k: list(a.groups[k]) + list(b.groups[k]) for k in sorted(shared)},
        captions=caps,
    )


def query_prompts(c: Any, spec: _SetSpec, pool: ImageDataset, ex: ImageDataset) -> list[str]:
    """``queries_per_set`` prompts with the token: the exemplars' captions cycled
    (``prompts_from: exemplars``), or the other fields of pool images drawn with the set's seed
    (so queries ask for the new concept on varied content)."""
    if (spec.prompts_from or c.prompts_from) == "exemplars":
        assert ex.captions is not None
        return [ex.captions[i % len(ex)] for i in range(c.queries_per_set)]
    rng = np.random.default_rng(derive_seed(spec.seed, "prompts", spec.name))
    rows = rng.choice(len(pool), size=c.queries_per_set, replace=c.queries_per_set > len(pool))
    return [_caption(c.caption, spec.token, pool, int(r)) for r in rows]


def ranking_metrics(values: np.ndarray, relevant: np.ndarray) -> tuple[dict[int, float], float]:
    """Recall@K (share of the relevant columns in the top K) and average precision of one
    query's scores ``values`` ``(n_train,)`` against the bool mask ``relevant``. Ties are
    broken against the relevant images (a constant score earns nothing)."""
    order = np.lexsort((relevant.astype(np.int64), -values))  # ties: non-relevant first
    hits = relevant[order]
    n_rel = int(relevant.sum())
    recall = {k: float(hits[:k].sum() / n_rel) for k in RECALL_AT}
    ranks = np.flatnonzero(hits) + 1  # 1-based positions of the relevant images
    ap = float(np.mean(np.arange(1, n_rel + 1) / ranks))
    return recall, ap


def _customize(
    cfg: Any, base_model: str, spec: _SetSpec, ex: ImageDataset, folder: Path, progress: bool
) -> Any:
    from diffattr.diffusion.lora_trainer import train_lora
    from diffattr.evaluation.retrain import LocalAccelerator

    c = cfg.customization
    train = _train_config(c, "customization")
    run = LoraExperimentConfig(
        seed=derive_seed(spec.seed, "customize", spec.name) % (2**31),
        base_model=base_model,
        tune=c.tune,
        data=_data_config(c, cfg.experiment.data, classes=[spec.style]),
        train=train,
    )
    accelerator = LocalAccelerator(train.mixed_precision, train.gradient_accumulation_steps)
    return train_lora(run, ex, folder, progress=progress, accelerator=cast(Any, accelerator))


def _queries(
    c: Any, model: Any, spec: _SetSpec, pool: ImageDataset, ex: ImageDataset, folder: Path
) -> Queries:
    from diffattr.diffusion.sampling import SampleResult
    from diffattr.diffusion.t2i_sampling import sample_text_to_image

    if not (folder / "sample.json").exists():
        sample_text_to_image(
            model,
            query_prompts(c, spec, pool, ex),
            seed=derive_seed(spec.seed, "queries", spec.name) % (2**31),
            num_inference_steps=c.num_inference_steps,
            guidance_scale=c.guidance_scale,
        ).save(folder)
    res = SampleResult.load(folder)
    return Queries(
        images=res.images,
        names=[f"{spec.name}:{n}" for n in res.names],
        trajectories=[res.trajectory(i) for i in range(len(res))],
        prompts=res.prompts,
    )


def _score(
    name: str, cfg: Any, model: Any, data: ImageDataset, queries: Queries, folder: Path
) -> tuple[Scores, float, float]:
    """Fit ``name`` on pool + exemplars with the customized model and score the queries (kept
    in ``folder``, reused when there)."""
    from diffattr.attribution.registry import make_attributor

    # The entry as written and the customized model decide the scores (the harness's rule):
    # another entry under the same name is refused, not silently served old scores.
    open_result_dir(
        folder,
        "eval-customization-scores",
        {"method": name, "options": cfg.method_options(name), "model_hash": model.model_hash()},
    )
    timing = folder / "timing.json"
    if timing.exists() and (folder / "scores.json").exists():
        import json

        t = json.loads(timing.read_text())
        return Scores.load(folder), t["fit_seconds"], t["score_seconds"]
    method, options, _ = cfg.method_spec(name)
    attributor = make_attributor(method, model, work_dir=folder.parent.parent / "work", **options)
    t0 = time.perf_counter()
    attributor.fit(data)
    fit_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    scores = attributor.score(queries)
    score_s = time.perf_counter() - t0
    scores.save(folder)
    write_json_atomic(timing, {"fit_seconds": fit_s, "score_seconds": score_s})
    return scores, fit_s, score_s


def run_customization(
    cfg: Any, base_model: str, methods: list[str], out: Path, progress: bool = True
) -> dict[str, Any]:
    """Every set's customized model, queries and each method's scores; the summary per method
    (written to ``out/customization/results.json`` and returned)."""
    c = cfg.customization
    root = out / FOLDER
    pool = pool_set(c, base_training_data(cfg, base_model))
    wanted = list(c.methods) if c.methods else list(methods)
    results = {m: SetResult(m) for m in wanted}
    for raw in c.sets:
        spec = _SetSpec(**raw)
        folder = root / spec.name
        ex = exemplar_set(c, cfg.experiment.data, spec)
        if set(ex.ids.tolist()) & set(pool.ids.tolist()):
            raise DataError(f"customization set {spec.name!r}: exemplars are also in the pool")
        data = concat(pool, ex, f"pool+{spec.name}")
        open_result_dir(
            folder,
            "eval-customization-set",
            {
                "set": dataclasses.asdict(spec),
                "caption": c.caption,
                "tune": c.tune,
                "train": c.train,
                "data_hash": data.data_hash(),
                "queries": {
                    "n": c.queries_per_set,
                    "prompts_from": c.prompts_from,
                    "steps": c.num_inference_steps,
                    "guidance": c.guidance_scale,
                },
            },
        )
        model = _customize(cfg, base_model, spec, ex, folder / "model", progress)
        queries = _queries(c, model, spec, pool, ex, folder / "queries")
        relevant = np.isin(data.ids.numpy(), ex.ids.numpy())
        for m in wanted:
            res = results[m]
            try:
                scores, fit_s, score_s = _score(m, cfg, model, data, queries, folder / "scores" / m)
            except Exception as exc:
                log.error("customization %s / %s failed:\n%s", spec.name, m, traceback.format_exc())
                res.error = f"{type(exc).__name__}: {exc}".splitlines()[0]
                continue
            col = np.isin(scores.train_ids, data.ids.numpy()[relevant])
            recalls, aps = [], []
            for row in scores.values:
                r, ap = ranking_metrics(row, col)
                recalls.append(r)
                aps.append(ap)
            for k in RECALL_AT:
                res.recall.setdefault(k, []).extend(r[k] for r in recalls)
            res.ap.extend(aps)
            res.per_set[spec.name] = {
                "recall@10": float(np.mean([r[10] for r in recalls])),
                "mAP": float(np.mean(aps)),
            }
            res.fit_seconds += fit_s
            res.score_seconds += score_s
    summary = {m: _summary(r, cfg) for m, r in results.items()}
    write_json_atomic(root / "results.json", {"pool_size": len(pool), "methods": summary})
    return summary


def _summary(r: SetResult, cfg: Any) -> dict[str, Any]:
    if r.error is not None and not r.ap:
        return {"error": r.error}
    b = cfg.lds

    def stat(values: list[float]) -> dict[str, float]:
        lo, hi = bootstrap_ci(np.asarray(values), b.bootstrap, b.seed, b.level)
        return {"mean": float(np.mean(values)), "lo": lo, "hi": hi}

    out: dict[str, Any] = {f"recall@{k}": stat(v) for k, v in r.recall.items()}
    out["mAP"] = stat(r.ap)
    out["per_set"] = r.per_set
    out["queries"] = len(r.ap)
    out["fit_seconds"] = r.fit_seconds
    out["score_seconds"] = r.score_seconds
    if r.error is not None:
        out["error"] = r.error
    return out


def summary_lines(summary: dict[str, Any]) -> list[str]:
    """The customization table (markdown lines) for ``comparison.md``."""
    lines = [
        "",
        "## Customization benchmark (exemplars ranked among the pool)",
        "",
        "| method | Recall@10 | mAP | queries | fit s |",
        "|---|---|---|---|---|",
    ]
    for m, s in summary.items():
        if "error" in s and "mAP" not in s:
            lines.append(f"| {m} | failed: {s['error']} | | | |")
            continue
        r, a = s["recall@10"], s["mAP"]
        lines.append(
            f"| {m} | {r['mean']:.3f} [{r['lo']:.3f}, {r['hi']:.3f}] | "
            f"{a['mean']:.3f} [{a['lo']:.3f}, {a['hi']:.3f}] | {s['queries']} | "
            f"{s['fit_seconds']:.1f} |"
        )
    return lines
