"""The main job: train (or reuse) a small DDPM on digits, generate, attribute, report.

Everything runs offline on a laptop CPU: the data is scikit-learn's bundled digits. Each method
runs with the options in :data:`DEMO_METHODS` (fewer timesteps than the defaults, for time) and its
features are kept as attributor folders (``runs/demo/features/<method>``), so a user can
attribute their own image afterwards with ``diffattr attribute --model runs/demo/model
--features ...``.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from diffattr.data.dataset import ImageDataset
from diffattr.data.images import load_image
from diffattr.report.render import png_base64, render_html
from diffattr.repro import write_json_atomic
from diffattr.resources import config_path

log = logging.getLogger(__name__)

# Methods the demo runs. The defaults (d-trak 225 timesteps, das 125) reach 9 of the top-10
# shared by two noise seeds but featurize for ~10 minutes each on a 2-core CPU; the demo takes the
# best trade-off measured (README, "Trust"): ~8.3 of 10 at a third to a fifth of the time.
DEMO_METHODS: dict[str, dict[str, Any]] = {
    "d-trak": {"timesteps": 75},
    "das": {"timesteps": 50},
    "unet-features": {},
    "pixel": {},
}
QUERY_INDEX = 3  # the example query, gen/0003.png


@dataclass
class MethodResult:
    name: str
    description: str
    top: list[dict[str, Any]]
    fit_seconds: float
    score_seconds: float
    stability: str


def label_name(data: ImageDataset, row: int) -> str | None:
    """The class name of image ``row`` (its index as text when the set names no classes)."""
    if data.labels is None:
        return None
    index = int(data.labels[row])
    return data.class_names[index] if data.class_names else str(index)


def render_report(context: dict[str, Any], out: Path) -> Path:
    """Render the demo's quick report with the report package's renderer (autoescape on)."""
    out.write_text(render_html("demo_report.html.j2", context))
    return out


def write_demo_report(out: Path, methods: list[str] | None = None, progress: bool = True) -> Path:
    """The copyright report (``diffattr report``) for the demo's query digit, from the demo's own
    feature folders; returns the path of ``report.html`` (``out/report/``)."""
    from diffattr.report import ReportRequest, write_report
    from diffattr.report.render import find_chromium

    result = write_report(
        ReportRequest(
            model=out / "model",
            image=out / "generated" / f"{QUERY_INDEX:04d}.png",
            methods=list(methods or DEMO_METHODS),
            out=out / "report",
            groups="class",
            features_root=out / "features",
            pdf=find_chromium() is not None,
            progress=progress,
        )
    )
    return result.html


def run_demo(
    out: Path, config: str | Path | None = None, seed: int = 0, progress: bool = True
) -> dict[str, Any]:
    """Train/reuse, generate 16 digits, attribute one with several methods, write a report.

    Returns the summary that is also written to ``out/summary.json``.
    """
    from diffattr.attribution.base import Queries, describe_stability
    from diffattr.attribution.registry import ATTRIBUTORS
    from diffattr.attribution.saved import fit_into_folder
    from diffattr.config import load_config
    from diffattr.data import load_dataset
    from diffattr.diffusion.sampling import sample
    from diffattr.diffusion.trainer import train_model

    out.mkdir(parents=True, exist_ok=True)
    cfg = load_config(config_path(config, "digits2.yaml"))
    train = load_dataset(cfg.data)
    log.info("data %s: %d training images %s", train.name, len(train), train.image_shape)

    t0 = time.perf_counter()
    model = train_model(cfg, train, out / "model", progress=progress)
    log.info("model ready in %.0f s (hash %s)", time.perf_counter() - t0, model.model_hash()[:12])

    generated = sample(
        model,
        n=16,
        seed=seed,
        sampler=cfg.sample.sampler,
        num_inference_steps=cfg.sample.num_inference_steps,
        eta=cfg.sample.eta,
        progress=progress,
    )
    generated.save(out / "generated")
    log.info("wrote 16 generated digits and grid.png to %s", out / "generated")

    q = QUERY_INDEX
    # The query is the PNG as saved (8-bit), so the report shows exactly what
    # `diffattr attribute --image runs/demo/generated/0003.png` gives for that file.
    saved_query = load_image(out / "generated" / f"{q:04d}.png", model.image_shape)
    queries = Queries(
        images=saved_query[None],
        names=[f"generated/{q:04d}.png"],
        trajectories=[generated.trajectory(q)],
    )
    results: list[MethodResult] = []
    lines = []
    for name, options in DEMO_METHODS.items():
        t0 = time.perf_counter()
        attributor = fit_into_folder(
            model, out / "model", name, options, cfg.data, train, out / "features" / name, progress
        )
        t1 = time.perf_counter()
        scores = attributor.score(queries)
        t2 = time.perf_counter()
        scores.save(out / "scores" / name)
        top = scores.top_k(5)[0]
        stability = describe_stability(scores.stability(5), 0)
        lines.append(
            f"{name:8s} top-5 training ids: "
            + ", ".join(f"{i} ({s:+.3g})" for i, s in top)
            + f"; {stability}"
        )
        pos = {int(i): k for k, i in enumerate(train.ids.tolist())}
        results.append(
            MethodResult(
                name=name,
                description=ATTRIBUTORS[name].description,
                top=[
                    {
                        "id": tid,
                        "score": s,
                        "label": label_name(train, pos[tid]),
                        "png": png_base64(train.images[pos[tid]]),
                    }
                    for tid, s in top
                ],
                fit_seconds=t1 - t0,
                score_seconds=t2 - t1,
                stability=stability,
            )
        )
    for line in lines:
        log.info("%s", line)
    summary = {
        "query": queries.names[0],
        "seed": seed,
        "config": cfg.to_dict(),
        "model_hash": model.model_hash(),
        "data_hash": train.data_hash(),
        "methods": {
            r.name: {"top5": [(t["id"], t["score"]) for t in r.top], "stability": r.stability}
            for r in results
        },
    }
    write_json_atomic(out / "summary.json", summary)
    report = render_report(
        {
            "query_name": queries.names[0],
            "model_path": str(out / "model"),
            "features_path": str(out / "features"),
            "model_hash": summary["model_hash"],
            "seed": seed,
            "query_png": png_base64(queries.images[0]),
            "methods": results,
            "data_name": train.name,
            "n_train": len(train),
            "data_hash": summary["data_hash"],
        },
        out / "report.html",
    )
    log.info("report: %s", report)
    summary["copyright_report"] = str(write_demo_report(out, progress=progress))
    write_json_atomic(out / "summary.json", summary)
    return summary


def embedding_hint(out: Path) -> str:
    """How to add the clip / dino baselines, which need a checkpoint the demo cannot download."""
    return (
        f"add clip / dino with a local checkpoint: diffattr featurize --model {out / 'model'} "
        f"--method clip --option model=/path/to/clip-vit-base-patch32 --out "
        f"{out / 'features' / 'clip'} (dino: --method dino --option model=/path/to/dinov2-small), "
        f"then diffattr attribute --model {out / 'model'} --features {out / 'features' / 'clip'} "
        f"--image {out / 'generated' / f'{QUERY_INDEX:04d}.png'}"
    )
