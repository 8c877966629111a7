"""Benchmark gradient featurization: diffattr dense vs Kronecker projection (+ traker / dattri).

For each model (random weights) and projection dimension ``k`` this prints training-image
featurizations per second (each image differentiated at ``--steps`` timesteps), seconds per
(image, timestep), that cost relative to one plain training forward+backward of one image, and the
peak memory growth during featurization (CUDA: ``torch.cuda.max_memory_allocated``; CPU: growth of
the process's peak RSS, ``resource.getrusage``; every row runs in a fresh subprocess so peaks do not
leak between rows).

Models: the UNets of ``digits-2`` (configs/digits2.yaml: 1x16x16, channels 32/64/64, 1.1M
parameters) and ``cifar-2`` (configs/cifar2.yaml: D-TRAK's 3x32x32 UNet, channels
128/256/256/256, 2 layers per block, attention at 16x16, 38.3M parameters); ``--quick`` uses the
tiny 8x8 test UNet and small ``k``.

Baselines: ``traker`` (PyPI "traker": its FunctionalGradientComputer + BasicProjector, or
CudaProjector when fast_jl is available) and ``dattri`` (vmap per-sample gradients +
``dattri.func.projection.random_project``) featurize the same model, timesteps and ``k``. They are
never installed into the project venv; make a scratch venv that sees the project's packages and
pass its python with ``--baseline-python``::

    python3.11 -m venv /tmp/bench-venv
    echo "import site; site.addsitedir('$PWD/.venv/lib/python3.11/site-packages')" \\
        > /tmp/bench-venv/lib/python3.11/site-packages/_main_venv.pth
    /tmp/bench-venv/bin/pip install --no-deps traker==0.3.2 dattri==0.3.0
    .venv/bin/python scripts/bench_featurize.py --baseline-python /tmp/bench-venv/bin/python

Rows whose package cannot be imported print ``not available: <reason>``.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from diffattr.testing import TINY_UNET

ROOT = Path(__file__).resolve().parents[1]

# The UNet of each model name: the tiny test network, or the model section of a shipped config.
CONFIGS = {"digits-2": "configs/digits2.yaml", "cifar-2": "configs/cifar2.yaml"}


def unet_kwargs(name: str) -> dict[str, Any]:
    if name == "tiny":
        return dict(TINY_UNET)
    from diffattr.config import load_config

    return load_config(ROOT / CONFIGS[name]).model.unet_kwargs()


# ------------------------------------------------------------------------- one measurement (child)


def _build(spec: dict[str, Any]):
    import torch
    from diffusers import DDPMScheduler, UNet2DModel

    from diffattr.diffusion.model import DiffusionModel

    torch.manual_seed(0)
    unet = UNet2DModel(**unet_kwargs(spec["model"])).to(spec["device"])
    model = DiffusionModel(unet=unet, scheduler=DDPMScheduler())
    c, h, w = model.image_shape
    g = torch.Generator().manual_seed(1)
    x0 = (torch.rand(spec["n"], c, h, w, generator=g) * 2 - 1).to(spec["device"])
    timesteps = [(i * 1000) // spec["steps"] for i in range(spec["steps"])]
    return model, x0, timesteps


def _rss_now_kb() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") // 1024


class _Mem:
    """Peak memory growth (MiB) between ``start`` and ``stop``."""

    def __init__(self, device: str) -> None:
        import torch

        self.cuda = device.startswith("cuda")
        self.torch = torch

    def start(self) -> None:
        if self.cuda:
            self.torch.cuda.synchronize()
            self.torch.cuda.reset_peak_memory_stats()
            self.base = self.torch.cuda.memory_allocated()
        else:
            self.base = _rss_now_kb() * 1024

    def stop(self) -> float:
        if self.cuda:
            self.torch.cuda.synchronize()
            peak = self.torch.cuda.max_memory_allocated()
        else:
            peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        return max(0.0, (peak - self.base) / 2**20)


def _sync(device: str) -> None:
    import torch

    if device.startswith("cuda"):
        torch.cuda.synchronize()


def _run_train(spec: dict[str, Any]) -> dict[str, Any]:
    """Seconds per image of one plain training forward+backward (batch ``n``, mean loss)."""
    import torch

    from diffattr.diffusion.model import diffusion_loss

    model, x0, _ = _build(spec)
    g = torch.Generator().manual_seed(2)
    t = torch.randint(0, 1000, (x0.shape[0],), generator=g).to(x0.device)
    noise = torch.randn(x0.shape, generator=g).to(x0.device)

    def step() -> None:
        model.unet.zero_grad(set_to_none=True)
        diffusion_loss(model, x0, t, noise).mean().backward()

    step()
    _sync(spec["device"])
    reps = spec.get("reps", 3)
    t0 = time.perf_counter()
    for _ in range(reps):
        step()
    _sync(spec["device"])
    return {"s_per_image": (time.perf_counter() - t0) / reps / x0.shape[0]}


def _run_diffattr(spec: dict[str, Any]) -> dict[str, Any]:
    import torch

    from diffattr.attribution.featurize import FeaturizeArgs, build_projector, per_step_features
    from diffattr.attribution.projectors import ProjectorConfig

    model, x0, timesteps = _build(spec)
    args = FeaturizeArgs(
        projector=ProjectorConfig(kind=spec["kind"], dim=spec["k"]),
        batch_size=spec["batch_size"],
    )
    ids = torch.arange(x0.shape[0])
    mem = _Mem(spec["device"])
    mem.start()
    proj, _ = build_projector(model, args)
    per_step_features(model, x0[:1], ids[:1], timesteps[:1], args)  # warm-up (not timed)
    _sync(spec["device"])
    t0 = time.perf_counter()
    feats = per_step_features(model, x0, ids, timesteps, args)
    _sync(spec["device"])
    return {"seconds": time.perf_counter() - t0, "peak_mib": mem.stop(), "k": int(feats.shape[-1])}


def _baseline_batches(model, x0, timesteps, batch_size):
    """(x_t, noise, t) row batches in (image, timestep) order, noise as diffattr draws it."""
    import torch

    from diffattr.attribution.timesteps import noise_for

    rows = [(b, t) for b in range(x0.shape[0]) for t in timesteps]
    for r0 in range(0, len(rows), batch_size):
        chunk = rows[r0 : r0 + batch_size]
        xb = x0[[b for b, _ in chunk]]
        tb = torch.tensor([t for _, t in chunk], device=x0.device)
        nb = torch.stack([noise_for(0, b, t, 0, tuple(x0.shape[1:])) for b, t in chunk]).to(
            x0.device
        )
        yield model.scheduler.add_noise(xb, nb, tb), nb, tb


def _run_traker(spec: dict[str, Any]) -> dict[str, Any]:
    import torch
    from trak.gradient_computers import FunctionalGradientComputer
    from trak.modelout_functions import AbstractModelOutput
    from trak.projectors import BasicProjector, ProjectionType

    from diffattr.attribution.gradients import vmap_friendly_attention

    class DiffusionLoss(AbstractModelOutput):
        def __init__(self) -> None:
            super().__init__()

        def get_output(self, model, weights, buffers, x_t, noise, t):  # one sample
            out = torch.func.functional_call(model, (weights, buffers), (x_t[None], t[None])).sample
            return ((out - noise[None]) ** 2).mean()

        def get_out_to_loss_grad(self, model, weights, buffers, batch):
            return torch.ones(batch[0].shape[0], 1, device=batch[0].device)

    model, x0, timesteps = _build(spec)
    p = sum(q.numel() for q in model.unet.parameters())
    dev = torch.device(spec["device"])
    mem = _Mem(spec["device"])
    mem.start()
    projector: Any = None
    if dev.type == "cuda":
        try:
            from trak.projectors import CudaProjector

            projector = CudaProjector(p, spec["k"], 0, ProjectionType.rademacher, dev, 32)
        except Exception:  # fast_jl missing: traker itself falls back the same way
            projector = None
    if projector is None:
        projector = BasicProjector(p, spec["k"], 0, ProjectionType.normal, dev)
    comp = FunctionalGradientComputer(model.unet, DiffusionLoss(), p, torch.float32, dev)
    with vmap_friendly_attention(model.unet):
        batches = list(_baseline_batches(model, x0, timesteps, spec["batch_size"]))
        warm = tuple(b[:1] for b in batches[0])
        projector.project(comp.compute_per_sample_grad(warm), 0)  # warm-up (not timed)
        _sync(spec["device"])
        t0 = time.perf_counter()
        for batch in batches:
            projector.project(comp.compute_per_sample_grad(batch), 0)
        _sync(spec["device"])
    return {"seconds": time.perf_counter() - t0, "peak_mib": mem.stop(), "k": spec["k"]}


def _run_dattri(spec: dict[str, Any]) -> dict[str, Any]:
    import torch
    from dattri.func.projection import random_project

    from diffattr.attribution.gradients import vmap_friendly_attention

    model, x0, timesteps = _build(spec)
    params = {n: q.detach() for n, q in model.unet.named_parameters()}

    def loss(prm, x_t, noise, t):
        out = torch.func.functional_call(model.unet, prm, (x_t[None], t[None])).sample
        return ((out - noise[None]) ** 2).mean()

    per_sample = torch.func.vmap(torch.func.grad(loss), in_dims=(None, 0, 0, 0))
    mem = _Mem(spec["device"])
    mem.start()
    proj = None
    with vmap_friendly_attention(model.unet), torch.no_grad():
        batches = list(_baseline_batches(model, x0, timesteps, spec["batch_size"]))
        t0 = None
        for i, batch in enumerate([tuple(b[:1] for b in batches[0]), *batches]):
            if i == 1:
                _sync(spec["device"])
                t0 = time.perf_counter()
            g = per_sample(params, *batch)
            flat = torch.cat([v.reshape(v.shape[0], -1) for v in g.values()], dim=1)
            if proj is None:
                proj = random_project(
                    flat,
                    flat.shape[0],
                    spec["k"],
                    32,
                    proj_seed=0,
                    proj_type="normal",
                    device=spec["device"],
                )
            proj(flat, ensemble_id=0)
        _sync(spec["device"])
    assert t0 is not None
    return {"seconds": time.perf_counter() - t0, "peak_mib": mem.stop(), "k": spec["k"]}


def _run_store(spec: dict[str, Any]) -> dict[str, Any]:
    """The real store-writing path (``featurize``: shards, manifest) on ``n`` images."""
    import tempfile

    import torch

    from diffattr.attribution.featurize import FeaturizeArgs, featurize
    from diffattr.attribution.projectors import ProjectorConfig
    from diffattr.attribution.timesteps import TimestepPolicy
    from diffattr.data.dataset import ImageDataset

    model, x0, _ = _build(spec)
    data = ImageDataset("bench", x0.cpu(), torch.arange(x0.shape[0]))
    args = FeaturizeArgs(
        timesteps=TimestepPolicy(kind="uniform", count=spec["steps"]),
        projector=ProjectorConfig(kind=spec["kind"], dim=spec["k"]),
        batch_size=spec["batch_size"],
        shard_size=spec.get("shard_size", 64),
    )
    with tempfile.TemporaryDirectory() as tmp:
        mem = _Mem(spec["device"])
        mem.start()
        t0 = time.perf_counter()
        featurize(model, data, Path(tmp) / "store", args, progress=False)
        _sync(spec["device"])
        seconds = time.perf_counter() - t0
        peak = mem.stop()
        disk = sum(f.stat().st_size for f in Path(tmp).rglob("*") if f.is_file())
    return {"seconds": seconds, "peak_mib": peak, "disk_mib": disk / 2**20}


FAMILY = ("trak", "d-trak", "das", "grad-dot", "grad-cos", "diff-retrac")

# Stable Diffusion 1.5's published UNet configuration (runwayml/stable-diffusion-v1-5, unet/
# config.json), at 32x32 latents (256 px images, D-TRAK's ArtBench setting); random weights.
SD15_UNET: dict[str, Any] = {
    "sample_size": 32,
    "in_channels": 4,
    "out_channels": 4,
    "block_out_channels": [320, 640, 1280, 1280],
    "layers_per_block": 2,
    "down_block_types": [
        "CrossAttnDownBlock2D",
        "CrossAttnDownBlock2D",
        "CrossAttnDownBlock2D",
        "DownBlock2D",
    ],
    "up_block_types": [
        "UpBlock2D",
        "CrossAttnUpBlock2D",
        "CrossAttnUpBlock2D",
        "CrossAttnUpBlock2D",
    ],
    "cross_attention_dim": 768,
    "attention_head_dim": 8,
    "norm_num_groups": 32,
}
TEXT_TOKENS = 77  # CLIP's prompt length


class _LoraUNet:
    """SD 1.5's UNet with a LoRA (rank ``rank`` on the attention projections, trained-like:
    both factors random) and random text embeddings standing in for the prompts: what the
    featurizer and a LoRA training step see (``eps`` takes the embeddings directly)."""

    def __init__(self, spec: dict[str, Any]) -> None:
        import torch
        from diffusers import DDPMScheduler, UNet2DConditionModel

        from diffattr.diffusion.lora import add_lora

        torch.manual_seed(0)
        kwargs = dict(SD15_UNET)
        if spec.get("small"):  # --quick: the same layout, a few channels
            kwargs.update(block_out_channels=[32, 64, 64, 64], cross_attention_dim=32)
        self.unet = UNet2DConditionModel(**kwargs).to(spec["device"]).eval()
        add_lora(self.unet, spec["rank"], init="random", seed=0)
        self.scheduler = DDPMScheduler(
            beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear"
        )
        self.image_shape = (4, kwargs["sample_size"], kwargs["sample_size"])
        g = torch.Generator().manual_seed(1)
        n = spec["n"]
        self.x0 = torch.randn(n, *self.image_shape, generator=g).to(spec["device"])
        self.cond = torch.randn(n, TEXT_TOKENS, kwargs["cross_attention_dim"], generator=g).to(
            spec["device"]
        )

    @property
    def device(self):
        return next(self.unet.parameters()).device

    def eps(self, x_t, t, cond):
        return self.unet(x_t, t, encoder_hidden_states=cond).sample


def _run_t2i(spec: dict[str, Any]) -> dict[str, Any]:
    """One LoRA training step per image (``part="train"``) or LoRA-only Kronecker featurization
    (``part="featurize"``) of SD 1.5's UNet: seconds per image (per (image, timestep))."""
    import torch

    from diffattr.attribution.featurize import FeaturizeArgs, build_projector, per_step_features
    from diffattr.attribution.projectors import ProjectorConfig

    mem = _Mem(spec["device"])
    mem.start()
    m = _LoraUNet(spec)
    n = spec["n"]
    if spec["part"] == "train":
        params = [p for p in m.unet.parameters() if p.requires_grad]
        g = torch.Generator().manual_seed(2)
        t = torch.randint(0, 1000, (n,), generator=g).to(m.device)
        noise = torch.randn(m.x0.shape, generator=g).to(m.device)

        def step() -> None:
            for p in params:
                p.grad = None
            x_t = m.scheduler.add_noise(m.x0, noise, t)
            loss = (m.eps(x_t, t, m.cond) - noise).pow(2).mean()
            loss.backward()

        step()
        _sync(spec["device"])
        t0 = time.perf_counter()
        step()
        _sync(spec["device"])
        return {"seconds": (time.perf_counter() - t0) / n, "peak_mib": mem.stop()}
    args = FeaturizeArgs(
        output="square",
        projector=ProjectorConfig(kind="kronecker", dim=spec["k"]),
        params=["lora"],
        batch_size=spec["batch_size"],
    )
    timesteps = [(i * 1000) // spec["steps"] for i in range(spec["steps"])]
    ids = torch.arange(n)
    proj, _ = build_projector(m, args)
    per_step_features(m, m.x0[:1], ids[:1], timesteps[:1], args, m.cond[:1])  # warm-up
    _sync(spec["device"])
    t0 = time.perf_counter()
    per_step_features(m, m.x0, ids, timesteps, args, m.cond)
    _sync(spec["device"])
    seconds = time.perf_counter() - t0
    return {"seconds": seconds / (n * spec["steps"]), "peak_mib": mem.stop(), "k": proj.dim}


def _run_methods(spec: dict[str, Any]) -> dict[str, Any]:
    """Fit ``spec["methods"]`` on ``n`` images from scratch in one work folder: their gradient
    stores in one pass (:func:`featurize_for`), then each method's fit (DAS's residuals, the
    kernels). Every method at the common budget ``steps`` timesteps from t = 0."""
    import tempfile

    import torch

    from diffattr.attribution.onepass import featurize_for
    from diffattr.attribution.registry import make_attributor
    from diffattr.data.dataset import ImageDataset

    model, x0, _ = _build(spec)
    data = ImageDataset("bench", x0.cpu(), torch.arange(x0.shape[0]))
    options = {
        "timesteps": spec["steps"],
        "t_min": 0,
        "proj_dim": spec["k"],
        "batch_size": spec["batch_size"],
    }
    with tempfile.TemporaryDirectory() as tmp:
        mem = _Mem(spec["device"])
        mem.start()
        t0 = time.perf_counter()
        methods = [make_attributor(m, model, work_dir=tmp, **options) for m in spec["methods"]]
        featurize_for(methods, data, progress=False)
        t1 = time.perf_counter()
        for m in methods:
            m.fit(data)
        _sync(spec["device"])
        seconds = time.perf_counter() - t0
        peak = mem.stop()
    return {"seconds": seconds, "pass_seconds": t1 - t0, "peak_mib": peak}


RUNNERS = {
    "t2i": _run_t2i,
    "methods": _run_methods,
    "train": _run_train,
    "diffattr": _run_diffattr,
    "traker": _run_traker,
    "dattri": _run_dattri,
    "store": _run_store,
}


def run_one(spec: dict[str, Any]) -> dict[str, Any]:
    import torch

    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    return RUNNERS[spec["impl"]](spec)


# ------------------------------------------------------------------------------ driver (parent)


def _child(python: str, spec: dict[str, Any], timeout: float) -> dict[str, Any]:
    """Run one measurement in a fresh interpreter; ``{"error": ...}`` when it fails."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    cmd = [python, str(Path(__file__).resolve()), "--run-one", json.dumps(spec)]
    try:
        res = subprocess.run(
            cmd, capture_output=True, text=True, timeout=timeout, env=env, cwd=ROOT
        )
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout:.0f} s"}
    for line in reversed(res.stdout.splitlines()):
        if line.startswith("RESULT "):
            return json.loads(line[len("RESULT ") :])
    tail = (res.stderr.strip().splitlines() or ["no output"])[-1]
    return {"error": tail[:160]}


def _probe(python: str, module: str) -> str | None:
    """None when ``python`` can import ``module``, else the reason."""
    try:
        res = subprocess.run(
            [python, "-c", f"import {module}"], capture_output=True, text=True, timeout=120
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"{python}: {exc}"
    if res.returncode != 0:
        return (res.stderr.strip().splitlines() or ["import failed"])[-1][:120]
    return None


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="tiny UNet, small k, few images")
    ap.add_argument("--models", default="digits-2,cifar-2")
    ap.add_argument("--dims", default="2048,4096")
    ap.add_argument("--n", type=int, default=8, help="training images per measurement")
    ap.add_argument("--steps", type=int, default=10, help="timesteps per image")
    ap.add_argument("--batch-size", type=int, default=16, help="(image, timestep) rows per call")
    ap.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available)")
    ap.add_argument("--baseline-python", default=None, help="python of a venv with traker/dattri")
    ap.add_argument("--timeout", type=float, default=1800.0, help="seconds per row")
    ap.add_argument(
        "--memory",
        default=None,
        metavar="N1,N2,...",
        help="instead: peak memory of writing a feature store of N1, N2, ... images (digits-2 "
        "model, Kronecker, first of --dims), to show it does not grow with the training set",
    )
    ap.add_argument(
        "--family",
        action="store_true",
        help="instead: fit the TRAK family (trak, d-trak, das, grad-dot, grad-cos, diff-retrac) "
        "at a common budget, each method alone and all together in one pass (first of --dims)",
    )
    ap.add_argument(
        "--t2i",
        action="store_true",
        help="instead: Stable Diffusion 1.5's UNet (random weights, 32x32 latents) with a LoRA "
        "(--rank): LoRA-only Kronecker featurization against one LoRA training step",
    )
    ap.add_argument("--rank", type=int, default=128, help="--t2i: LoRA rank")
    ap.add_argument("--run-one", default=None, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.run_one:
        print("RESULT " + json.dumps(run_one(json.loads(a.run_one))), flush=True)
        return 0

    import torch

    device = a.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if a.memory:
        return memory_table(a, device)
    if a.family:
        return family_table(a, device)
    if a.t2i:
        return t2i_table(a, device)
    models = ["tiny"] if a.quick else a.models.split(",")
    dims = [64, 128] if a.quick else [int(d) for d in a.dims.split(",")]
    n, steps = (4, 2) if a.quick else (a.n, a.steps)
    base = {"n": n, "steps": steps, "batch_size": a.batch_size, "device": device}
    bpy = a.baseline_python or sys.executable
    print(
        f"device {device}; {n} images x {steps} timesteps per row; batch {a.batch_size} rows; "
        f"torch threads {os.environ.get('OMP_NUM_THREADS', 'default')}"
    )
    header = f"{'model':9} {'method':22} {'k':>5} {'img/s':>9} {'s/(img,t)':>10} {'x train f+b':>11} {'peak MiB':>9}"
    print(header)
    print("-" * len(header))
    for m in models:
        train = _child(sys.executable, {**base, "model": m, "impl": "train"}, a.timeout)
        s_train = train.get("s_per_image")
        print(
            f"{m:9} {'train fwd+bwd (1 img)':22} {'':>5} "
            + (
                f"{1 / s_train:9.2f} {s_train:10.4f} {1.0:11.2f}"
                if s_train
                else f"not available: {train.get('error')}"
            )
        )
        rows: list[tuple[str, str, dict[str, Any]]] = [
            ("diffattr dense", "python", {"impl": "diffattr", "kind": "gaussian"}),
            ("diffattr kronecker", "python", {"impl": "diffattr", "kind": "kronecker"}),
            ("traker (TRAK)", "baseline", {"impl": "traker"}),
            ("dattri (TRAK)", "baseline", {"impl": "dattri"}),
        ]
        reasons = {
            impl: _probe(bpy, mod)
            for impl, mod in (("traker", "trak"), ("dattri", "dattri.func.projection"))
        }
        for k in dims:
            for label, where, extra in rows:
                if where == "baseline" and reasons[extra["impl"]] is not None:
                    print(f"{m:9} {label:22} {k:>5} not available: {reasons[extra['impl']]}")
                    continue
                py = bpy if where == "baseline" else sys.executable
                r = _child(py, {**base, **extra, "model": m, "k": k}, a.timeout)
                if "error" in r:
                    print(f"{m:9} {label:22} {k:>5} not available: {r['error']}")
                    continue
                per = r["seconds"] / (n * steps)
                rel = f"{per / s_train:11.2f}" if s_train else f"{'-':>11}"
                kk = r.get("k", k)
                print(
                    f"{m:9} {label:22} {kk:>5} {n / r['seconds']:9.3f} {per:10.4f} {rel} {r['peak_mib']:9.1f}"
                )
            sys.stdout.flush()
    print(
        "img/s: training images featurized per second (all timesteps); x train f+b: seconds per "
        "(image, timestep) over seconds per image of one plain training forward+backward."
    )
    return 0


def memory_table(a: argparse.Namespace, device: str) -> int:
    """Peak memory of ``featurize`` into a store against the number of training images."""
    model = "tiny" if a.quick else a.models.split(",")[0]
    k = 64 if a.quick else int(a.dims.split(",")[0])
    print(f"device {device}; model {model}; Kronecker k={k}; {a.steps} timesteps; shards of 64")
    head = f"{'images':>7} {'seconds':>9} {'peak MiB':>9} {'store MiB':>10}"
    print(head)
    print("-" * len(head))
    for n in (int(v) for v in a.memory.split(",")):
        spec = {"model": model, "n": n, "steps": a.steps, "batch_size": a.batch_size}
        r = _child(
            sys.executable,
            {**spec, "device": device, "impl": "store", "kind": "kronecker", "k": k},
            a.timeout,
        )
        if "error" in r:
            print(f"{n:>7} not available: {r['error']}")
            continue
        print(f"{n:>7} {r['seconds']:9.1f} {r['peak_mib']:9.1f} {r['disk_mib']:10.2f}")
        sys.stdout.flush()
    print("peak MiB: growth of peak memory while featurizing; store MiB: the store on disk.")
    return 0


def t2i_table(a: argparse.Namespace, device: str) -> int:
    """The text-to-image row: seconds per (image, timestep) of LoRA-only featurization over
    seconds per image of one LoRA training step, and peak memory, each in a fresh process."""
    # The Kronecker projection needs k >= its number of layers (256 LoRA matrices in SD 1.5).
    k = 512 if a.quick else int(a.dims.split(",")[0])
    n, steps = (2, 2) if a.quick else (a.n, a.steps)
    spec = {"n": n, "steps": steps, "batch_size": a.batch_size, "device": device, "k": k}
    spec.update(rank=4 if a.quick else a.rank, small=a.quick, impl="t2i")
    print(
        f"device {device}; SD 1.5 UNet{' (quick: 32-64 channels)' if a.quick else ''}, 32x32 "
        f"latents, LoRA rank {spec['rank']} on to_q/to_k/to_v/to_out.0; {n} images x {steps} "
        f"timesteps; Kronecker k={k}; torch threads {os.environ.get('OMP_NUM_THREADS', 'default')}"
    )
    train = _child(sys.executable, {**spec, "part": "train"}, a.timeout)
    feat = _child(sys.executable, {**spec, "part": "featurize"}, a.timeout)
    head = f"{'what':44} {'s':>9} {'x train step':>12} {'peak MiB':>9}"
    print(head)
    print("-" * len(head))
    for label, r in (
        ("LoRA training step (1 image)", train),
        ("LoRA-only featurization (1 image, 1 t)", feat),
    ):
        if "error" in r:
            print(f"{label:44} not available: {r['error']}")
            continue
        rel = r["seconds"] / train["seconds"] if "seconds" in train else float("nan")
        print(f"{label:44} {r['seconds']:9.3f} {rel:12.2f} {r['peak_mib']:9.0f}")
    print(
        "s: seconds per image (training step, batch of all images) or per (image, timestep) "
        "(featurization, output 'square', LoRA parameters only)."
    )
    return 0


def family_table(a: argparse.Namespace, device: str) -> int:
    """Seconds to fit each TRAK-family method alone and all of them in one pass (one row per
    model), each measurement in a fresh process; the pass's cost is given as a ratio to das's."""
    models = ["tiny"] if a.quick else a.models.split(",")
    k = 64 if a.quick else int(a.dims.split(",")[0])
    n, steps = (4, 2) if a.quick else (a.n, a.steps)
    print(
        f"device {device}; {n} images x {steps} timesteps from t = 0 (every method); Kronecker "
        f"k={k}; batch {a.batch_size}; torch threads {os.environ.get('OMP_NUM_THREADS', 'default')}"
    )
    head = f"{'model':9} {'methods':44} {'fit s':>8} {'pass s':>8} {'x das':>6} {'peak MiB':>9}"
    print(head)
    print("-" * len(head))
    for m in models:
        base = {"model": m, "n": n, "steps": steps, "batch_size": a.batch_size, "k": k}
        base.update(device=device, impl="methods")
        alone: dict[str, float] = {}
        for label, methods in [*((x, [x]) for x in FAMILY), ("together (one pass)", list(FAMILY))]:
            r = _child(sys.executable, {**base, "methods": methods}, a.timeout)
            if "error" in r:
                print(f"{m:9} {label:44} not available: {r['error']}")
                continue
            if len(methods) == 1:
                alone[label] = r["seconds"]
            das = alone.get("das")
            ratio = f"{r['seconds'] / das:6.2f}" if das else f"{'-':>6}"
            print(
                f"{m:9} {label:44} {r['seconds']:8.1f} {r['pass_seconds']:8.1f} {ratio} "
                f"{r['peak_mib']:9.1f}"
            )
            sys.stdout.flush()
        if len(alone) == len(FAMILY):
            total = sum(alone.values())
            print(
                f"{m:9} {'sum of the six alone':44} {total:8.1f} {'-':>8} "
                f"{total / alone['das']:6.2f} {'-':>9}"
            )
    print(
        "fit s: featurizing the images (all stores) and fitting the method(s), wall; pass s: the "
        "featurization pass alone; x das: fit s over das's alone, measured in the same run."
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
