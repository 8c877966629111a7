"""``diffattr report``: attribute one image with several methods and write report.html / .pdf /
.json into one folder.

Order of work: everything that can be refused cheaply (method names, image, eval folder) is
checked before any attributor is opened or built.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from diffattr.attribution.base import DEFAULT_TOP_K, Scores
from diffattr.attribution.conditioning import pixel_shape
from diffattr.errors import UserError
from diffattr.report import content as C
from diffattr.report.agreement import agreement
from diffattr.report.groups import BOOTSTRAP_DRAWS, make_groups, method_groups
from diffattr.report.inputs import (
    EMBEDDING_METHODS,
    TRAJECTORY_METHODS,
    MethodRun,
    build_missing,
    check_same_training_set,
    load_query,
    model_data_config,
    open_method,
    parse_methods,
    train_features,
    training_sources,
)
from diffattr.report.journey import journey_png, journey_series
from diffattr.report.nearcopy import DEFAULT_QUANTILE, near_copy
from diffattr.report.quality import quality
from diffattr.report.render import find_chromium, png_base64, render_html, write_pdf
from diffattr.repro import write_json_atomic

log = logging.getLogger(__name__)

TEMPLATE = "report.html.j2"


@dataclass
class ReportRequest:
    """What ``diffattr report`` was asked for (see ``diffattr report --help``)."""

    model: Path
    image: Path
    methods: str | list[str]
    out: Path
    groups: str = "class"
    features_root: Path | None = None
    eval_dir: Path | None = None
    top_k: int = DEFAULT_TOP_K
    seed: int = 0
    quantile: float = DEFAULT_QUANTILE
    bootstrap: int = BOOTSTRAP_DRAWS
    pdf: bool = True
    progress: bool = True
    # method -> options for the folders that are built here (a folder that exists must have been
    # made with them); methods not named get their defaults.
    options: dict[str, dict[str, Any]] = field(default_factory=dict)
    # A text-to-image model: the LoRA on top of ``model``, and the image's prompt when it was not
    # made by `diffattr generate` ("" attributes it unconditionally).
    lora: Path | None = None
    prompt: str | None = None


@dataclass
class ReportResult:
    html: Path
    json: Path
    pdf: Path | None
    content: dict[str, Any]


class Timer:
    """Seconds per named section (``report.json`` -> ``timing``)."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}
        self.start = time.perf_counter()

    @contextlib.contextmanager
    def __call__(self, name: str) -> Iterator[None]:
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - t0

    def total(self) -> float:
        return time.perf_counter() - self.start


def _check_request(req: ReportRequest) -> list[str]:
    methods = req.methods if isinstance(req.methods, list) else parse_methods(req.methods)
    for m in methods:
        parse_methods(m)
    if not req.image.is_file():
        raise UserError(f"{req.image}: image file not found")
    if req.eval_dir is not None and not (req.eval_dir / "results.json").is_file():
        raise UserError(
            f"--eval {req.eval_dir}: no results.json; is it a `diffattr evaluate` folder?"
        )
    if req.top_k < 1:
        raise UserError(f"--top-k: expected an integer >= 1, got {req.top_k}")
    if not 0.0 < req.quantile < 0.5:
        raise UserError(f"near-copy quantile must be in (0, 0.5), got {req.quantile}")
    return methods


def _open_all(req, model, queries, methods, timer) -> tuple[list[MethodRun], dict[str, str]]:
    """Open (or build) each method's folder; trajectory methods without a trajectory are skipped
    with their reason."""
    root = req.features_root or (req.model.parent / "features")
    cache: dict[str, Any] = {}

    def loader() -> tuple[Any, Any]:
        if "train" not in cache:
            from diffattr.data import load_dataset

            cfg = model_data_config(model)
            cache["train"] = (cfg, load_dataset(cfg))
        return cache["train"]

    runs, skipped = [], {}
    usable = []
    for name in methods:
        if name in TRAJECTORY_METHODS and queries.trajectories is None:
            skipped[name] = (
                "needs the image's generation trajectory: attribute an image written by "
                "`diffattr generate` (its folder holds sample.json and trajectory.safetensors)"
            )
            continue
        usable.append(name)
    # Missing folders are built together: one featurization pass for their gradient stores.
    with timer("build"):
        built = build_missing(
            model, req.model, {m: root / m for m in usable}, loader, req.progress, req.options
        )
    for name in usable:
        with timer(f"open:{name}"):
            runs.append(
                open_method(
                    model,
                    req.model,
                    name,
                    root / name,
                    loader,
                    req.progress,
                    built.get(name),
                    req.options.get(name),
                )
            )
    if not runs:
        raise UserError("no method could attribute this image: " + "; ".join(skipped.values()))
    check_same_training_set(runs)
    return runs, skipped


def build_content(req: ReportRequest) -> tuple[dict[str, Any], dict[str, Any]]:
    """The report dict (``report.json``) and the extra render context (images as base64)."""
    from diffattr.diffusion.model import compute_device, load_model

    timer = Timer()
    methods = _check_request(req)
    with timer("load"):
        model = load_model(req.model, device=compute_device(), lora=req.lora)
        queries = load_query(req.image, pixel_shape(model) or model.image_shape, req.prompt)
    runs, skipped = _open_all(req, model, queries, methods, timer)
    train = runs[0].train
    ids = train.ids.numpy()
    row_of = {int(i): r for r, i in enumerate(ids.tolist())}
    scores: dict[str, Scores] = {}
    for run in runs:
        with timer(f"score:{run.name}"):
            scores[run.name] = run.attributor.score(queries)
            if not np.array_equal(scores[run.name].train_ids, ids):
                raise UserError(f"{run.name}: scores are not in training-set order")
    k = min(req.top_k, len(train))
    embeds = {
        r.name: feats
        for r in runs
        if r.name in EMBEDDING_METHODS and (feats := train_features(r)) is not None
    }
    with timer("near_copy"):
        nc = near_copy(
            train.images,
            ids,
            queries.images[0],
            {m: (f, scores[m].values[0]) for m, f in embeds.items()},
            quantile=req.quantile,
            seed=req.seed,
        )
    with timer("agreement"):
        agree = agreement(
            {m: s.values[0] for m, s in scores.items()},
            {m: [t for t, _ in s.top_k(k)[0]] for m, s in scores.items()},
            k,
        )
    with timer("groups"):
        first_embed = next(iter(embeds.items()), None)
        groups = make_groups(
            req.groups,
            train,
            None if first_embed is None else (first_embed[0], first_embed[1].numpy()),
            req.seed,
        )
        tables = {
            m: method_groups(
                s.values[0],
                None if s.halves is None else s.halves[:, 0],
                groups,
                draws=req.bootstrap,
                seed=req.seed,
            )
            for m, s in scores.items()
        }
    sources = training_sources(runs[0].record["identity"]["data"], train)
    with timer("journey"):
        journey, journey_b64 = None, None
        for m, s in scores.items():
            if s.per_step is not None and s.step_timesteps is not None:
                journey = {"method": m, **journey_series(s.per_step[:, 0], s.step_timesteps, ids)}
                journey_b64 = journey_png(journey)
                break
    with timer("quality"):
        qual = quality(req.eval_dir, model, [r.name for r in runs])
    for id_row in (nc["closest"], agree["likely_sources"]):
        for row in id_row:
            row["source"] = sources[row["id"]]
            row["group"] = groups.of(row_of[row["id"]])
    report: dict[str, Any] = {
        "schema_version": C.SCHEMA_VERSION,
        "query": {
            "path": str(req.image),
            "name": queries.names[0],
            "has_trajectory": queries.trajectories is not None,
            "prompt": None if queries.prompts is None else queries.prompts[0],
            "image_shape": list(pixel_shape(model) or model.image_shape),
        },
        "top_k": k,
        "methods": [
            C.method_section(r, scores[r.name], k, sources, groups, row_of, tables[r.name])
            for r in runs
        ],
        "skipped_methods": [{"method": m, "reason": why} for m, why in skipped.items()],
        "near_copy": nc,
        "agreement": agree,
        "groups": C.group_summary(groups, req.bootstrap),
        "journey": journey,
        "quality": qual,
        "summary": {"what_scores_estimate": C.WHAT_SCORES_ESTIMATE},
        "caveats": C.CAVEATS,
        "provenance": C.provenance(model, str(req.model), runs, train, req.seed),
        "timing": {name: round(sec, 3) for name, sec in timer.seconds.items()},
    }
    shown = {t["id"] for m in report["methods"] for t in m["top"]}
    shown |= {c["id"] for c in nc["closest"]} | {r["id"] for r in agree["likely_sources"]}
    extra = {
        "query_png": png_base64(queries.images[0]),
        "images": {tid: png_base64(train.images[row_of[tid]]) for tid in sorted(shown)},
        "journey_png": journey_b64,
    }
    return C.clean(report), extra


def write_report(req: ReportRequest) -> ReportResult:
    """Build the report and write ``report.html``, ``report.pdf`` (unless ``req.pdf`` is False
    or Chromium is missing: then a warning) and ``report.json`` into ``req.out``."""
    t0 = time.perf_counter()
    report, extra = build_content(req)
    out = Path(req.out)
    out.mkdir(parents=True, exist_ok=True)
    t1 = time.perf_counter()
    html = out / "report.html"
    html.write_text(render_html(TEMPLATE, {"r": report, **extra}), encoding="utf-8")
    report["timing"]["render_html"] = round(time.perf_counter() - t1, 3)
    pdf: Path | None = None
    report["outputs"] = {"html": html.name, "pdf": None, "pdf_note": None}
    if req.pdf and find_chromium() is None:
        report["outputs"]["pdf_note"] = "no PDF: Chromium not found (apt-get install chromium)"
        log.warning("%s", report["outputs"]["pdf_note"])
    elif req.pdf:
        t2 = time.perf_counter()
        pdf = write_pdf(html, out / "report.pdf")
        report["outputs"]["pdf"] = pdf.name
        report["timing"]["render_pdf"] = round(time.perf_counter() - t2, 3)
    report["timing"]["total"] = round(time.perf_counter() - t0, 3)
    path = out / "report.json"
    write_json_atomic(path, report)
    return ReportResult(html=html, json=path, pdf=pdf, content=report)
