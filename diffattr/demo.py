"""The main job: take the shipped demo model (or train one), generate, attribute, report.

Everything runs offline on a laptop CPU. The model is ``assets/demo-model``: the DDPM that
``diffattr train --config configs/digits2.yaml`` trains on scikit-learn's bundled digits (0s and
1s, 16x16), shipped with its record (config, seed, data hash, model hash) so the demo does not
spend three minutes training it; ``--retrain`` trains it again from the config, ``--config`` trains
another. The demo generates 16 digits, builds each method of :data:`DEMO_METHODS` into its own
attributor folder (``runs/demo/features/<method>``; the gradient methods' features in one pass over
the training set) and writes the copyright report for one generated digit
(``runs/demo/report/``: HTML, PDF, JSON).

``diffattr demo --text-to-image`` (:func:`run_t2i_demo`) does the same for a text-to-image LoRA:
the shipped latent base model ``assets/t2i-digit-styles`` (see
:mod:`diffattr.diffusion.t2i_scratch`), a LoRA that teaches it two new styles
(``configs/t2i-digit-styles-lora.yaml``, trained in ``runs/demo-t2i/lora``), generations with
prompts, and the report of one of them against the LoRA's 200 training images.
"""

from __future__ import annotations

import logging
import shutil
import time
from pathlib import Path
from typing import Any

from diffattr.repro import write_json_atomic
from diffattr.resources import config_path, resource

log = logging.getLogger(__name__)

#: The shipped model: ``assets/demo-model`` (pipeline layout + ``diffattr.json``).
SHIPPED_MODEL = ("assets", "demo-model")
DEFAULT_CONFIG = "digits2.yaml"

# The methods the demo runs and their options. Both place their timesteps in [100, 550)
# (t_min None: T // 10; t_max 550): measured on the shipped model, two noise seeds then share
# 8.25 / 8.38 (d-trak, seed pairs 0-1 / 2-3) and 8.19 / 8.12 (das) of the top-10, against 7.62 /
# 8.31 and 8.31 / 7.88 with the same budgets over [100, 1000) (docs/trust.md), at the same cost.
# The full package defaults (d-trak 225 timesteps, das 125) reach 9 of 10 in about four times the
# featurization. das's timesteps are every second one of d-trak's (100 + floor(5.625 j) against
# 100 + floor(11.25 i)), so the one featurization pass forwards each (image, timestep) once for
# both; batches of 64 rows run about 10% faster than 16 on a CPU.
DEMO_METHODS: dict[str, dict[str, Any]] = {
    "d-trak": {"timesteps": 80, "t_min": None, "t_max": 550, "batch_size": 64},
    "das": {"timesteps": 40, "t_min": None, "t_max": 550, "batch_size": 64},
    "unet-features": {},
    "pixel": {},
}
SHIPPED_T = 1000  # the schedule DEMO_METHODS' t_max is written for


def demo_methods(num_train_timesteps: int) -> dict[str, dict[str, Any]]:
    """:data:`DEMO_METHODS` for a model with this many training timesteps: ``t_max`` scaled from
    the shipped model's 1000 (a model retrained with ``--config`` may use another schedule)."""
    out = {}
    for method, options in DEMO_METHODS.items():
        options = dict(options)
        if options.get("t_max") is not None:
            options["t_max"] = options["t_max"] * num_train_timesteps // SHIPPED_T
        out[method] = options
    return out


QUERY_INDEX = 3  # the query the report explains: generated/0003.png
DEPENDENT = ("features", "generated", "report", "summary.json")


def demo_model(out: Path, config: str | Path | None, retrain: bool, progress: bool) -> Any:
    """The demo's model in ``out/model``: the shipped one (copied there once), or trained from
    ``config`` (the shipped model's config with ``retrain``), resuming a killed training run."""
    from diffattr.config import load_config
    from diffattr.data import load_dataset
    from diffattr.diffusion.model import load_model
    from diffattr.diffusion.trainer import train_model

    folder = out / "model"
    if retrain:
        # Everything made from the old model goes with it (its folders record its hash).
        for name in ("model", *DEPENDENT):
            path = out / name
            if path.is_dir():
                shutil.rmtree(path)
            elif path.exists():
                path.unlink()
    if retrain or config is not None:
        cfg = load_config(config_path(config, DEFAULT_CONFIG))
        train = load_dataset(cfg.data)
        log.info("training on %s: %d images %s", train.name, len(train), train.image_shape)
        t0 = time.perf_counter()
        model = train_model(cfg, train, folder, progress=progress)
        log.info(
            "model trained in %.0f s (hash %s)", time.perf_counter() - t0, model.model_hash()[:12]
        )
        return model
    if not folder.exists():
        shipped = resource(*SHIPPED_MODEL)
        tmp = out / ".model.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.copytree(shipped, tmp)
        tmp.rename(folder)
        log.info("using the shipped demo model %s (copied to %s)", shipped, folder)
    # load_model checks the weights against the model hash in the record.
    return load_model(folder)


def run_demo(
    out: Path,
    config: str | Path | None = None,
    seed: int = 0,
    progress: bool = True,
    retrain: bool = False,
) -> dict[str, Any]:
    """Model, 16 generated digits, the copyright report of one of them with :data:`DEMO_METHODS`.

    Returns the summary that is also written to ``out/summary.json``.
    """
    from diffattr.diffusion.sampling import sample

    t_start = time.perf_counter()
    out.mkdir(parents=True, exist_ok=True)
    model = demo_model(out, config, retrain, progress)
    sample_cfg = model.record.get("config", {}).get("sample", {})
    gen_dir = out / "generated"
    if not (gen_dir / "sample.json").exists():
        generated = sample(
            model,
            n=16,
            seed=seed,
            sampler=sample_cfg.get("sampler", "ddim"),
            num_inference_steps=sample_cfg.get("num_inference_steps", 50),
            eta=sample_cfg.get("eta", 0.0),
            progress=progress,
        )
        generated.save(gen_dir)
        log.info("wrote 16 generated digits and grid.png to %s", gen_dir)
    methods = demo_methods(model.num_train_timesteps)
    result = _report(out, out / "model", methods, "class", seed, progress)
    summary = _summary(result, seed, model, t_start)
    write_json_atomic(out / "summary.json", summary)
    return summary


def next_commands(out: Path, program: str) -> list[str]:
    """The three commands a user runs after the demo: attribute another generated image, write
    the report for it, and featurize more methods (one pass) to compare."""
    image = out / "generated" / "0005.png"
    model = out / "model"
    return [
        f"{program} attribute --model {model} --features {out / 'features' / 'd-trak'} "
        f"--image {image} --top-k 10",
        f"{program} report --model {model} --image {image} --methods d-trak,das,pixel "
        f"--features-root {out / 'features'} --out {out / 'report-0005'}",
        f"{program} featurize --model {model} --method trak,grad-cos --option timesteps=50 "
        f"--out {out / 'features'}",
    ]


T2I_BASE = ("assets", "t2i-digit-styles")
T2I_LORA_CONFIG = "t2i-digit-styles-lora.yaml"
T2I_PROMPTS = [
    f"a {digit} in {style} style"
    for style in ("outline", "dotted")
    for digit in ("zero", "two", "three", "five")
]
# The methods of the text-to-image demo: gradients of the LoRA only (D-TRAK's setting), AbU's
# unlearning of the cross-attention keys and values, and pixels as the near-copy baseline.
T2I_DEMO_METHODS: dict[str, dict[str, Any]] = {
    "d-trak": {"timesteps": 100, "t_min": None, "batch_size": 64},
    "das": {"timesteps": 50, "t_min": None, "batch_size": 64},
    "unlearn": {"params": "cross-attn-kv", "timesteps": 50},
    "pixel": {},
}


def run_t2i_demo(
    out: Path, config: str | Path | None = None, seed: int = 0, progress: bool = True
) -> dict[str, Any]:
    """LoRA on the shipped text-to-image base, 8 prompted generations, the copyright report of
    one of them with :data:`T2I_DEMO_METHODS`. Returns the summary (also ``out/summary.json``)."""
    import dataclasses

    from diffattr.config import LoraExperimentConfig, load_train_config
    from diffattr.data import load_dataset
    from diffattr.diffusion.lora_trainer import train_lora
    from diffattr.diffusion.t2i_sampling import sample_text_to_image

    t_start = time.perf_counter()
    out.mkdir(parents=True, exist_ok=True)
    cfg = load_train_config(config_path(config, T2I_LORA_CONFIG))
    if not isinstance(cfg, LoraExperimentConfig):
        raise ValueError(f"{config}: --text-to-image needs a kind: text-to-image-lora config")
    if config is None:  # the shipped base, wherever the package is run from
        cfg = dataclasses.replace(cfg, base_model=str(resource(*T2I_BASE)))
    train = load_dataset(cfg.data)
    model = train_lora(cfg, train, out / "lora", progress=progress)
    gen_dir = out / "generated"
    if not (gen_dir / "sample.json").exists():
        sample_text_to_image(
            model, T2I_PROMPTS, seed=seed, guidance_scale=1.0, progress=progress
        ).save(gen_dir)
        log.info("wrote %d generated images and grid.png to %s", len(T2I_PROMPTS), gen_dir)
    result = _report(out, out / "lora", T2I_DEMO_METHODS, "style", seed, progress)
    summary = _summary(result, seed, model, t_start)
    summary["prompt"] = T2I_PROMPTS[QUERY_INDEX]
    write_json_atomic(out / "summary.json", summary)
    return summary


def _report(
    out: Path,
    model_dir: Path,
    methods: dict[str, dict[str, Any]],
    groups: str,
    seed: int,
    progress: bool,
) -> Any:
    """The copyright report of generated image :data:`QUERY_INDEX` in ``out/report``, the
    methods' folders in ``out/features`` (built there in one pass when missing)."""
    from diffattr.report import ReportRequest, write_report
    from diffattr.report.render import find_chromium

    drop_stale_folders(out / "features", methods)
    return write_report(
        ReportRequest(
            model=model_dir,
            image=out / "generated" / f"{QUERY_INDEX:04d}.png",
            methods=list(methods),
            out=out / "report",
            groups=groups,
            features_root=out / "features",
            seed=seed,
            pdf=find_chromium() is not None,
            progress=progress,
            options=methods,
        )
    )


def drop_stale_folders(root: Path, methods: dict[str, dict[str, Any]]) -> None:
    """Remove the demo's own method folders under ``root`` that an older demo made with other
    options (the report refuses a folder whose options differ), so they are rebuilt."""
    from diffattr.report.inputs import check_folder_options
    from diffattr.repro import MismatchError

    for method, options in methods.items():
        folder = root / method
        if not folder.is_dir():
            continue
        try:
            check_folder_options(folder, method, options)
        except MismatchError as exc:
            log.info("rebuilding %s: %s", folder, str(exc).split(" (", 1)[0])
            shutil.rmtree(folder)


def _summary(result: Any, seed: int, model: Any, t_start: float) -> dict[str, Any]:
    content = result.content
    return {
        "query": content["query"]["path"],
        "seed": seed,
        "model_hash": model.model_hash(),
        "data_hash": content["provenance"]["data"]["hash"],
        "near_copy": content["near_copy"]["verdict"],
        "methods": {
            m["name"]: {
                "top5": [(t["id"], t["score"]) for t in m["top"][:5]],
                "stability": m["stability"]["text"],
            }
            for m in content["methods"]
        },
        "report": {
            "html": str(result.html),
            "pdf": None if result.pdf is None else str(result.pdf),
            "json": str(result.json),
        },
        "seconds": round(time.perf_counter() - t_start, 1),
    }


def next_t2i_commands(out: Path, program: str) -> list[str]:
    """The three commands after the text-to-image demo: attribute another generation, report on
    it, and attribute an image of your own with a prompt."""
    image = out / "generated" / "0005.png"
    model = out / "lora"
    return [
        f"{program} attribute --model {model} --features {out / 'features' / 'd-trak'} "
        f"--image {image} --top-k 10",
        f"{program} report --model {model} --image {image} --methods d-trak,unlearn,pixel "
        f"--features-root {out / 'features'} --groups style --out {out / 'report-0005'}",
        f"{program} generate --model {model} --prompt 'a seven in dotted style' --n 4 "
        f"--out {out / 'generated-7'}",
    ]
