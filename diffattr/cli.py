"""The ``diffattr`` command line: one small function per command, argparse only.

Heavy imports (torch, diffusers) happen inside the command functions so ``diffattr --help``
answers at once.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

log = logging.getLogger("diffattr")

Command = Callable[[argparse.Namespace], int]


def positive_int(text: str) -> int:
    """argparse type: an integer >= 1 (a bad value is a one-line usage error, no traceback)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {value}")
    return value


# --------------------------------------------------------------------------- shared options
def _add_data_args(p: argparse.ArgumentParser, required: bool = False) -> None:
    p.add_argument(
        "--data",
        required=required,
        default=None,
        help="data set name (see `diffattr data list`); default: the one the model was trained on",
    )
    p.add_argument(
        "--data-root", default=None, help="local folder for cifar10/artbench10/imagefolder"
    )
    p.add_argument("--size", type=int, default=None, help="resize images to SIZE x SIZE")
    p.add_argument("--classes", default=None, help="comma-separated class/style names to keep")
    p.add_argument("--split", default="train", choices=["train", "test"])
    p.add_argument("--limit", type=int, default=None, help="keep the first N images by id")
    p.add_argument(
        "--prompt-template",
        default=None,
        metavar="TEXT",
        help='caption each image from its class, e.g. "a {class} painting" (text-to-image; an '
        "image folder's metadata.jsonl captions win)",
    )


def _data_config(args: argparse.Namespace, model: Any = None):
    """The :class:`~diffattr.config.DataConfig` of the data options (``--data``, ``--size``, ...).

    With ``model`` (``--model``): without ``--data``, or with ``--data`` naming the source the model
    recorded, the recorded settings (root, size, classes, limit, ...) are kept; another ``--data``
    is read at the model's image size. The options the user gives (``--size`` included) override
    both. A source that cannot produce the model's size is a one-line error.
    """
    from diffattr.config import DataConfig

    recorded = None if model is None else _model_data_config(model)
    base = dict(recorded or {})
    model_size = None
    if args.data is not None and args.data != base.get("source"):
        base = {"source": args.data}
        if model is not None:
            from diffattr.attribution.conditioning import pixel_shape

            _, height, width = pixel_shape(model) or model.image_shape
            if height == width:
                base["size"] = model_size = width
    for key, value in (
        ("root", args.data_root),
        ("size", args.size),
        ("split", args.split if args.split != "train" else None),
        ("limit", args.limit),
        ("prompt_template", getattr(args, "prompt_template", None)),
    ):
        if value is not None:
            base[key] = value
    if args.classes:
        base["classes"] = [c.strip() for c in args.classes.split(",") if c.strip()]
    if "source" not in base:
        raise SystemExit("error: --data is required (no data set recorded with the model)")
    if model_size is not None and args.size is None:
        _check_model_size(base["source"], model_size, args)
    return DataConfig(**base)


def _check_model_size(source: str, size: int, args: argparse.Namespace) -> None:
    """A one-line error when ``source`` cannot be read at the model's image ``size``."""
    from diffattr.data.registry import supported_sizes
    from diffattr.errors import UserError

    sizes = supported_sizes(source)
    if sizes is not None and not sizes[0] <= size <= sizes[1]:
        raise UserError(
            f"--data {source}: the model {args.model} takes {size}x{size} images, but {source} "
            f"can be read only at sizes {sizes[0]}..{sizes[1]}; use a data set of the model's "
            "size (or leave out --data to use the data the model was trained on)"
        )


def _model_data_config(model) -> dict[str, Any] | None:
    """The data settings the model recorded (``diffattr.json``'s config), or None."""
    cfg = model.record.get("config") if isinstance(model.record, dict) else None
    return dict(cfg["data"]) if cfg and "data" in cfg else None


def _add_lora_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--lora",
        default=None,
        metavar="PATH",
        help="text-to-image models: a LoRA on top of --model (the safetensors file diffusers' "
        "save_lora_weights writes, or its folder)",
    )


# --------------------------------------------------------------------------- commands
def cmd_train(args: argparse.Namespace) -> int:
    """Train what the config describes: a pixel-space DDPM, or (``kind: text-to-image-lora``) a
    LoRA on a local Stable Diffusion folder."""
    from diffattr.config import LoraExperimentConfig, ScratchConfig, load_train_config
    from diffattr.data import load_dataset

    cfg = load_train_config(args.config)
    if args.seed is not None:
        cfg.seed = args.seed
    if args.steps is not None:
        cfg.train.steps = args.steps
    if args.data_root is not None:
        cfg.data.root = args.data_root
    if args.base_model is not None:
        if not isinstance(cfg, LoraExperimentConfig):
            raise SystemExit(f"error: --base-model: {args.config} trains a pixel-space DDPM")
        cfg.base_model = args.base_model
    train_set = load_dataset(cfg.data)
    log.info(
        "training on %s: %d images of shape %s",
        train_set.name,
        len(train_set),
        train_set.image_shape,
    )
    if isinstance(cfg, ScratchConfig):
        from diffattr.diffusion.t2i_scratch import train_scratch

        folder = train_scratch(cfg, train_set, Path(args.out), progress=not args.quiet)
        log.info("text-to-image model saved in %s (use it as --model %s)", folder, folder)
        return 0
    if isinstance(cfg, LoraExperimentConfig):
        from diffattr.diffusion.lora_trainer import train_lora

        lora = train_lora(
            cfg,
            train_set,
            Path(args.out),
            progress=not args.quiet,
            keep_checkpoints=args.keep_checkpoints,
        )
        log.info(
            "LoRA saved in %s (base %s, model hash %s)",
            args.out,
            cfg.base_model,
            lora.model_hash()[:12],
        )
        return 0
    from diffattr.diffusion.trainer import train_model

    model = train_model(
        cfg,
        train_set,
        Path(args.out),
        progress=not args.quiet,
        keep_checkpoints=args.keep_checkpoints,
    )
    log.info("model saved in %s (hash %s)", args.out, model.model_hash()[:12])
    return 0


def cmd_generate(args: argparse.Namespace) -> int:
    from diffattr.diffusion.model import compute_device, load_model
    from diffattr.diffusion.sampling import sample

    model = load_model(args.model, device=compute_device(), lora=args.lora)
    if getattr(model, "conditional", False):
        return _generate_text_to_image(model, args)
    if args.prompt:
        raise SystemExit(f"error: --prompt: {args.model} is not a text-to-image model")
    labels = None
    if args.class_label is not None:
        import torch

        labels = torch.full((args.n,), int(args.class_label), dtype=torch.int64)
    result = sample(
        model,
        n=args.n,
        seed=args.seed,
        sampler=args.sampler,
        num_inference_steps=args.steps,
        eta=args.eta,
        class_labels=labels,
        progress=not args.quiet,
    )
    result.save(args.out)
    log.info("wrote %d images, grid.png and the trajectory to %s", args.n, args.out)
    return 0


def _generate_text_to_image(model: Any, args: argparse.Namespace) -> int:
    """``--n`` images of every ``--prompt``, each with its prompt, seed and latent trajectory."""
    from diffattr.diffusion.t2i_sampling import sample_text_to_image

    if not args.prompt:
        raise SystemExit(f"error: {args.model} is a text-to-image model: give --prompt TEXT")
    prompts = [p for p in args.prompt for _ in range(args.n)]
    result = sample_text_to_image(
        model,
        prompts,
        seed=args.seed,
        num_inference_steps=args.steps,
        guidance_scale=args.guidance_scale,
        sampler=args.sampler,
        eta=args.eta,
        negative_prompt=args.negative_prompt,
        progress=not args.quiet,
    )
    result.save(args.out)
    log.info(
        "wrote %d images (%d prompt(s)), grid.png and the latent trajectories to %s",
        len(prompts),
        len(args.prompt),
        args.out,
    )
    return 0


def cmd_data(args: argparse.Namespace) -> int:
    from diffattr.data import list_datasets, load_dataset

    if args.action == "list":
        for name, description in list_datasets():
            sys.stdout.write(f"{name:14s} {description}\n")
        return 0
    if args.name is None:
        raise SystemExit(f"error: `diffattr data {args.action}` needs a data set name")
    args.data = args.name
    data = load_dataset(_data_config(args))
    if args.action == "inspect":
        sys.stdout.write(json.dumps(data.describe(), indent=2) + "\n")
        return 0
    from diffattr.data.images import export_dataset

    if not args.out:
        raise SystemExit("error: `diffattr data export` needs --out FOLDER")
    folder = export_dataset(data, Path(args.out))
    log.info("exported %d images to %s", len(data), folder)
    return 0


def cmd_methods(args: argparse.Namespace) -> int:
    from diffattr.attribution.registry import list_attributors

    for name, description in list_attributors():
        sys.stdout.write(f"{name:14s} {description}\n")
    return 0


def _parse_options(pairs: Sequence[str]) -> dict[str, Any]:
    """``key=value`` pairs; values parsed as JSON when they parse (numbers, lists, bools)."""
    out: dict[str, Any] = {}
    for pair in pairs:
        if "=" not in pair:
            raise SystemExit(f"error: --option expects key=value, got {pair!r}")
        key, raw = pair.split("=", 1)
        try:
            out[key.strip().replace("-", "_")] = json.loads(raw)
        except json.JSONDecodeError:
            out[key.strip().replace("-", "_")] = raw
    return out


SHORTCUT_OPTIONS = ("timesteps", "proj_dim", "projector", "output", "batch_size", "seed")


def method_options(
    methods: Sequence[str], pairs: Sequence[str], flags: dict[str, Any]
) -> dict[str, dict[str, Any]]:
    """Each method's options from ``--option`` pairs and the shortcut flags (``flags``).

    ``key=value`` goes to every listed method that has option ``key`` (with one method, to that
    method, whose own check names the valid options); ``method:key=value`` to that method only.
    """
    from diffattr.attribution.registry import get_spec

    specs = {m: get_spec(m) for m in methods}
    out: dict[str, dict[str, Any]] = {m: {} for m in methods}
    items: list[tuple[str | None, str, Any]] = []
    for pair in pairs:
        prefix, _, rest = pair.partition(":") if _method_prefixed(pair) else ("", "", pair)
        for key, value in _parse_options([rest]).items():
            items.append((prefix or None, key, value))
    items += [(None, key, value) for key, value in flags.items()]
    for target, key, value in items:
        if target is not None:
            if target not in specs:
                raise SystemExit(
                    f"error: --option {target}:{key}=...: {target!r} is not one of the methods "
                    f"given ({', '.join(methods)})"
                )
            out[target][key] = value
            continue
        having = [m for m in methods if key in specs[m].option_names()]
        if len(methods) == 1:
            having = list(methods)
        if not having:
            raise SystemExit(
                f"error: option {key!r}: none of the methods {', '.join(methods)} has it "
                "(see `diffattr methods`; METHOD:KEY=VALUE gives an option to one method)"
            )
        for m in having:
            out[m].setdefault(key, value)
    return out


def _method_prefixed(pair: str) -> bool:
    """``method:key=value`` (a colon before the ``=``, after a method-like name)."""
    head = pair.split("=", 1)[0]
    return ":" in head and head.split(":", 1)[0].replace("-", "").isalnum()


def _process_group() -> Any:
    """accelerate's ``PartialState`` inside a ``torchrun`` / ``accelerate launch`` group of
    several processes (one torch thread each on a CPU), else None."""
    import os

    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return None
    import torch
    from accelerate import PartialState

    if not torch.cuda.is_available():
        torch.set_num_threads(1)
    return PartialState(cpu=not torch.cuda.is_available())


def cmd_featurize(args: argparse.Namespace) -> int:
    from diffattr.attribution.saved import fit_into_folders
    from diffattr.data import load_dataset
    from diffattr.diffusion.model import compute_device, load_model

    methods = list(dict.fromkeys(m.strip() for m in args.method.split(",") if m.strip()))
    if not methods:
        raise SystemExit("error: --method names no method")
    flags = {k: getattr(args, k) for k in SHORTCUT_OPTIONS if getattr(args, k) is not None}
    options = method_options(methods, args.option or [], flags)
    model = load_model(args.model, device=compute_device(), lora=args.lora)
    data_cfg = _data_config(args, model)
    train = load_dataset(data_cfg)
    out = Path(args.out)
    # One method: --out is its folder; several: one folder per method inside --out.
    folders = {m: out if len(methods) == 1 else out / m for m in methods}
    state = _process_group()
    if state is not None:
        model.to(state.device)
    ensemble = None
    if args.ensemble:
        from diffattr.attribution.saved import EnsembleModels

        paths = [p.strip() for p in args.ensemble.split(",") if p.strip()]
        ensemble = EnsembleModels.load(paths, model.device, args.ensemble_norm)
    fit_into_folders(
        model,
        args.model,
        options,
        data_cfg,
        train,
        folders,
        progress=not args.quiet,
        accelerator=state,
        ensemble=ensemble,
    )
    if state is None or state.is_main_process:
        for m in methods:
            log.info("featurized %d training images with %s into %s", len(train), m, folders[m])
    return 0


def _load_queries(args: argparse.Namespace, shape: tuple[int, int, int]):
    """Queries from --image FILE or --images FOLDER; trajectories (and a text-to-image model's
    prompts) attached when saved beside them by `diffattr generate`; ``--prompt`` /
    ``--unconditional`` give every image one prompt (``""``)."""
    queries = _read_queries(args, shape)
    if args.prompt is not None or args.unconditional:
        if args.prompt is not None and args.unconditional:
            raise SystemExit("error: give --prompt TEXT or --unconditional, not both")
        text = "" if args.unconditional else args.prompt
        queries.prompts = [text] * len(queries)
    return queries


def _read_queries(args: argparse.Namespace, shape: tuple[int, int, int]):
    import torch

    from diffattr.attribution.base import Queries
    from diffattr.data.images import load_image, load_image_folder
    from diffattr.diffusion.sampling import SampleResult

    if bool(args.image) == bool(args.images):
        raise SystemExit("error: give exactly one of --image FILE or --images FOLDER")
    folder = Path(args.images) if args.images else Path(args.image).parent
    # A folder written by `diffattr generate` also holds grid.png and the trajectories: its
    # queries are exactly the numbered samples, each with the trajectory that produced it.
    saved = SampleResult.load(folder) if (folder / "sample.json").exists() else None
    by_name = {} if saved is None else {f"{i:04d}.png": i for i in range(saved.images.shape[0])}
    if args.image:
        names = [Path(args.image).name]
    elif saved is not None:
        names = sorted(by_name)
    else:
        images, names = load_image_folder(folder, shape)
        return Queries(images=images, names=names)
    images = torch.stack([load_image(folder / n, shape) for n in names])
    trajectories, prompts = None, None
    if saved is not None and all(n in by_name for n in names):
        trajectories = [saved.trajectory(by_name[n]) for n in names]
        if saved.prompts is not None:
            prompts = [saved.prompts[by_name[n]] for n in names]
    return Queries(images=images, names=names, trajectories=trajectories, prompts=prompts)


def cmd_attribute(args: argparse.Namespace) -> int:
    from diffattr.attribution.base import describe_stability
    from diffattr.attribution.saved import open_folder
    from diffattr.diffusion.model import compute_device, load_model

    model = load_model(args.model, device=compute_device(), lora=args.lora)
    from diffattr.attribution.conditioning import pixel_shape

    queries = _load_queries(args, pixel_shape(model) or model.image_shape)
    attributor, _ = open_folder(model, args.features, progress=not args.quiet)
    scores = attributor.score(queries)
    k = args.top_k
    if getattr(attributor, "scores_groups", False):  # its images tie within a group
        groups = attributor.groups  # type: ignore[attr-defined]
        _print_top_groups(scores.per_group(groups), groups, k)
    else:
        stability = scores.stability(k)
        for q, (name, row) in enumerate(zip(scores.query_names, scores.top_k(k), strict=True)):
            sys.stdout.write(f"{name}: top-{k} training images by {scores.method}\n")
            for rank, (train_id, value) in enumerate(row, 1):
                sys.stdout.write(f"  {rank:3d}. id {train_id:6d}  score {value:+.5g}\n")
            sys.stdout.write(f"  {describe_stability(stability, q)}\n")
    if args.out:
        scores.save(args.out, top_k=k)
        log.info("scores (%d x %d) written to %s", *scores.values.shape, args.out)
    return 0


def _print_top_groups(scores: Any, groups: Any, k: int) -> None:
    """Per query, the top-``k`` groups of group-level ``scores`` with names, sizes, stability."""
    from diffattr.attribution.base import describe_stability

    k = min(k, groups.num_groups)
    sizes = groups.sizes()
    stability = scores.stability(k)
    for q, (name, row) in enumerate(zip(scores.query_names, scores.top_k(k), strict=True)):
        sys.stdout.write(f"{name}: top-{k} of {groups.num_groups} groups by {scores.method}\n")
        for rank, (g, value) in enumerate(row, 1):
            label = f"{groups.names[g]} ({sizes[g]} images)"
            sys.stdout.write(f"  {rank:3d}. {label:<28s} score {value:+.5g}\n")
        sys.stdout.write(f"  {describe_stability(stability, q)}\n")


def cmd_evaluate(args: argparse.Namespace) -> int:
    import os

    from diffattr.evaluation.harness import evaluate, launch

    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    out = Path(args.out)
    if "WORLD_SIZE" in os.environ:  # already one process of a torchrun / accelerate launch group
        evaluate(args.config, methods, out, progress=not args.quiet)
    else:  # start the config's (or --workers) torchrun workers, one thread each on CPU
        launch(args.config, methods, out, workers=args.workers, progress=not args.quiet)
    table = out / "comparison.md"
    if table.exists():
        sys.stdout.write(table.read_text())
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from diffattr.report import ReportRequest, write_report

    result = write_report(
        ReportRequest(
            model=Path(args.model),
            image=Path(args.image),
            methods=args.methods,
            out=Path(args.out),
            groups=args.groups,
            features_root=None if args.features_root is None else Path(args.features_root),
            eval_dir=None if args.eval is None else Path(args.eval),
            top_k=args.top_k,
            seed=args.seed,
            pdf=not args.no_pdf,
            progress=not args.quiet,
            lora=None if args.lora is None else Path(args.lora),
            prompt="" if args.unconditional else args.prompt,
        )
    )
    nc = result.content["near_copy"]
    sys.stdout.write(f"near copy: {nc['verdict']}\n")
    for path in (result.html, result.pdf, result.json):
        if path is not None:
            sys.stdout.write(f"report: {path}\n")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from diffattr.demo import next_commands, next_t2i_commands, run_demo, run_t2i_demo

    if args.text_to_image:
        if args.retrain:
            raise SystemExit("error: --retrain: the text-to-image demo always trains its LoRA")
        out = Path(args.out if args.out is not None else "runs/demo-t2i")
        summary = run_t2i_demo(out, config=args.config, seed=args.seed, progress=not args.quiet)
        sys.stdout.write(f"prompt: {summary['prompt']}\n")
        _print_summary(summary, next_t2i_commands(out, program_name()))
        return 0
    out = Path(args.out if args.out is not None else "runs/demo")
    summary = run_demo(
        out, config=args.config, seed=args.seed, progress=not args.quiet, retrain=args.retrain
    )
    _print_summary(summary, next_commands(out, program_name()))
    return 0


def _print_summary(summary: dict[str, Any], commands: list[str]) -> None:
    sys.stdout.write(f"query {summary['query']}: top-5 training images (id, score) per method\n")
    for method, result in summary["methods"].items():
        row = ", ".join(f"{tid} ({score:+.4g})" for tid, score in result["top5"])
        sys.stdout.write(f"  {method:13s} {row}\n")
        sys.stdout.write(f"  {'':13s} {result['stability']}\n")
    sys.stdout.write(f"near copy: {summary['near_copy']}\n")
    report = summary["report"]
    sys.stdout.write(f"copyright report: {report['html']}\n")
    if report["pdf"]:
        sys.stdout.write(f"                  {report['pdf']}\n")
    sys.stdout.write(f"                  {report['json']}\n")
    sys.stdout.write(f"done in {summary['seconds']:.0f} s. Next:\n")
    for command in commands:
        sys.stdout.write(f"  {command}\n")


def program_name() -> str:
    """How the user can call this program again: the ``diffattr`` script that is running (relative
    to the working directory when inside it, e.g. ``.venv/bin/diffattr``), else ``diffattr``."""
    import os

    exe = Path(sys.argv[0])
    if exe.name != "diffattr":
        return "diffattr"
    try:
        return str(exe.resolve().relative_to(Path.cwd().resolve()))
    except ValueError:
        return str(exe) if os.sep in str(exe) else "diffattr"


# --------------------------------------------------------------------------- parser
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="diffattr",
        description="Which training images made this generated image? Data attribution for "
        "diffusion models.",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    parser.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    p = sub.add_parser(
        "train", help="train a DDPM, or a LoRA on a text-to-image model, from a YAML config"
    )
    p.add_argument("--config", required=True, help="experiment YAML, e.g. configs/digits2.yaml")
    p.add_argument(
        "--out", required=True, help="model folder (diffusers layout); resumes if present"
    )
    p.add_argument("--seed", type=int, default=None, help="override the config's seed")
    p.add_argument("--steps", type=positive_int, default=None, help="override train.steps")
    p.add_argument("--data-root", default=None, help="override data.root")
    p.add_argument(
        "--base-model",
        default=None,
        metavar="PATH",
        help="override base_model (a LoRA config: the local Stable Diffusion folder)",
    )
    p.add_argument(
        "--keep-checkpoints",
        action="store_true",
        help="keep every checkpoint (TracIn scores over them: --option checkpoints=[...])",
    )
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("generate", help="sample images (PNG + grid + trajectory) from a model")
    p.add_argument(
        "--model", required=True, help="model folder (ours or a diffusers DDPM pipeline)"
    )
    p.add_argument("--n", type=positive_int, default=16, help="number of images")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--sampler", default="ddim", choices=["ddim", "ddpm"])
    p.add_argument("--steps", type=positive_int, default=50, help="sampling steps")
    p.add_argument("--eta", type=float, default=0.0, help="DDIM eta (0: deterministic)")
    p.add_argument("--class-label", type=int, default=None, help="class for conditional models")
    p.add_argument(
        "--prompt",
        action="append",
        default=None,
        metavar="TEXT",
        help="text-to-image models: a prompt (repeat for several; --n images of each)",
    )
    p.add_argument(
        "--guidance-scale",
        type=float,
        default=7.5,
        help="classifier-free guidance (text-to-image; <= 1: the conditional branch only)",
    )
    p.add_argument("--negative-prompt", default="", help="the unconditional branch's prompt")
    _add_lora_arg(p)
    p.add_argument("--out", required=True, help="output folder")
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("data", help="list, inspect or export a data set")
    p.add_argument("action", choices=["list", "inspect", "export"])
    p.add_argument("name", nargs="?", default=None, help="data set name (inspect/export)")
    p.add_argument(
        "--data-root", default=None, help="local folder for cifar10/artbench10/imagefolder"
    )
    p.add_argument("--size", type=int, default=None)
    p.add_argument("--classes", default=None, help="comma-separated class/style names")
    p.add_argument("--split", default="train", choices=["train", "test"])
    p.add_argument("--limit", type=int, default=None)
    p.add_argument(
        "--prompt-template",
        default=None,
        metavar="TEXT",
        help='caption each image from its class, e.g. "a {class} painting"',
    )
    p.add_argument("--out", default=None, help="export folder")
    p.set_defaults(func=cmd_data, data=None)

    p = sub.add_parser("methods", help="list the attribution methods")
    p.set_defaults(func=cmd_methods)

    p = sub.add_parser(
        "featurize", help="featurize the training set for one or several attribution methods"
    )
    p.add_argument("--model", required=True)
    _add_data_args(p)
    p.add_argument(
        "--method",
        required=True,
        help="a method, or several comma-separated (one pass over the data for all of their "
        "gradient features); see `diffattr methods`",
    )
    p.add_argument(
        "--out",
        required=True,
        help="the method's folder; with several methods, a folder holding one per method "
        "(OUT/<method>); resumes if present",
    )
    p.add_argument(
        "--timesteps",
        type=positive_int,
        default=None,
        help="number of timesteps K (default: the method's own; 100, d-trak 225, das 125)",
    )
    p.add_argument("--proj-dim", type=positive_int, default=None, help="projection dimension k")
    p.add_argument("--projector", default=None, help="gaussian | rademacher | kronecker | identity")
    p.add_argument("--output", default=None, help="output function (d-trak): square, loss, ...")
    p.add_argument("--batch-size", type=positive_int, default=None)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument(
        "--option",
        action="append",
        metavar="[METHOD:]KEY=VALUE",
        help="a method option, for every listed method that has it (METHOD:KEY=VALUE: for one)",
    )
    p.add_argument(
        "--ensemble",
        default=None,
        metavar="FOLDER[,FOLDER...]",
        help="more models of the same training set (e.g. `diffattr train --seed N` runs): each "
        "method scores with --model and these, scores standardised per query and averaged",
    )
    p.add_argument(
        "--ensemble-norm",
        default="z",
        choices=["z", "none"],
        help="z: standardise each model's scores per query before averaging (default); none: "
        "average the raw scores (TRAK's sum)",
    )
    _add_lora_arg(p)
    p.set_defaults(func=cmd_featurize)

    p = sub.add_parser("attribute", help="score generated images against the training set")
    p.add_argument("--model", required=True)
    p.add_argument("--features", required=True, help="folder written by `diffattr featurize`")
    p.add_argument("--image", default=None, help="one query image (PNG)")
    p.add_argument("--images", default=None, help="a folder of query images")
    p.add_argument(
        "--top-k", type=positive_int, default=10, help="training images listed per query"
    )
    p.add_argument("--out", default=None, help="write scores.safetensors + top_k.csv here")
    p.add_argument(
        "--prompt",
        default=None,
        metavar="TEXT",
        help="text-to-image models: the prompt of every query image (images made by `diffattr "
        "generate` carry their own)",
    )
    p.add_argument(
        "--unconditional",
        action="store_true",
        help="text-to-image models: attribute with the empty prompt",
    )
    _add_lora_arg(p)
    p.set_defaults(func=cmd_attribute)

    p = sub.add_parser("evaluate", help="LDS / counterfactual evaluation against retraining")
    p.add_argument("--config", required=True, help="e.g. configs/eval/digits2.yaml")
    p.add_argument("--methods", required=True, help="comma-separated, e.g. trak,d-trak,pixel")
    p.add_argument("--out", required=True, help="evaluation folder (resumes if present)")
    p.add_argument(
        "--workers",
        type=positive_int,
        default=None,
        help="processes (default: the config's `workers`)",
    )
    p.set_defaults(func=cmd_evaluate)

    p = sub.add_parser(
        "report", help="copyright report for one image: html + pdf + json, several methods"
    )
    p.add_argument("--model", required=True)
    p.add_argument("--image", required=True, help="the image to explain (PNG of the model's size)")
    p.add_argument(
        "--methods", required=True, help="comma-separated, e.g. d-trak,das,pixel,unet-features"
    )
    p.add_argument("--out", required=True, help="report folder")
    p.add_argument(
        "--groups",
        default="class",
        help="class | csv:PATH (id,group rows) | kmeans:K (default: class)",
    )
    p.add_argument(
        "--features-root",
        default=None,
        help="one attributor folder per method, DIR/<method>; missing ones are built "
        "(default: <model>/../features)",
    )
    p.add_argument("--eval", default=None, help="evaluation folder (diffattr evaluate) for LDS")
    p.add_argument(
        "--prompt",
        default=None,
        metavar="TEXT",
        help="text-to-image models: the image's prompt (an image made by `diffattr generate` "
        "carries its own)",
    )
    p.add_argument(
        "--unconditional", action="store_true", help="text-to-image models: the empty prompt"
    )
    _add_lora_arg(p)
    p.add_argument("--top-k", type=positive_int, default=10, help="training images per method")
    p.add_argument("--seed", type=int, default=0, help="bootstrap / pair-sample / k-means seed")
    p.add_argument("--no-pdf", action="store_true", help="skip report.pdf (needs Chromium)")
    p.set_defaults(func=cmd_report)

    p = sub.add_parser(
        "demo", help="the shipped digits DDPM (or a retrained one): generate, attribute, report"
    )
    p.add_argument("--out", default=None, help="default runs/demo (runs/demo-t2i)")
    p.add_argument(
        "--text-to-image",
        action="store_true",
        help="the text-to-image demo: a LoRA on the shipped latent base model, prompted "
        "generations, the report of one (--config: another LoRA config)",
    )
    p.add_argument(
        "--retrain",
        action="store_true",
        help="train the demo model again from its config instead of using the shipped one "
        "(replaces OUT's model and everything made from it)",
    )
    p.add_argument(
        "--config",
        default=None,
        help="train the model from this experiment YAML instead (default with --retrain: "
        "configs/digits2.yaml)",
    )
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=cmd_demo)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    from diffattr.errors import UserError

    try:
        return int(args.func(args) or 0)
    except UserError as exc:
        log.error("%s", exc)
        return 2


if __name__ == "__main__":
    sys.exit(main())
