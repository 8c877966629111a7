"""DDPM / DDIM sampling that records the whole trajectory.

We step diffusers' ``DDPMScheduler`` / ``DDIMScheduler`` ourselves (no pipeline ``__call__``) so that
the noisy image fed to the UNet and the predicted noise are kept at every step: Journey-TRAK
attributes along exactly this trajectory.

Reproducibility rules (why results never depend on ``batch_size``):

* the initial noise for all ``n`` samples is drawn at once, ``torch.randn((n, C, H, W))`` from a CPU
  generator seeded with ``seed`` (pass ``initial_noise`` to reuse it with another model);
* the fresh noise that DDPM (and DDIM with ``eta > 0``) adds at step ``s`` to sample ``i`` comes from
  its own generator seeded with ``derive_seed(seed, "step-noise", i, s)``, so a sample gets the same
  noise whatever batch it lands in;
* steps are the outer loop and batches the inner one, so every batch sees the same scheduler state.

So ``batch_size`` changes no random draw. The only batch-size effect left is the UNet's own kernel
rounding (CPU/GPU convolutions may sum in another order for another batch size, ~1e-6).
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from diffusers.schedulers.scheduling_ddim import DDIMScheduler
from diffusers.schedulers.scheduling_ddpm import DDPMScheduler
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from diffattr.data.images import make_grid, save_image, save_images
from diffattr.diffusion.model import DiffusionModel, eval_mode
from diffattr.diffusion.trajectory import Trajectory
from diffattr.errors import OptionError
from diffattr.repro import derive_seed, write_json_atomic

log = logging.getLogger(__name__)

SAMPLERS = ("ddim", "ddpm")
TRAJECTORY_FILE = "trajectory.safetensors"
SAMPLE_RECORD = "sample.json"


@dataclass
class SampleResult:
    """Generated images and how they were made.

    ``images``: float32 ``(n, C, H, W)`` in ``[-1, 1]``.
    ``timesteps``: int64 ``(S,)`` scheduler timesteps in sampling order.
    ``xt``: float32 ``(S, n, C, H, W)``, the input of the UNet at each step (``xt[0]`` is the
    initial noise). ``eps``: float32 ``(S, n, C, H, W)``, the predicted noise at each step.
    Both are empty ``(0, n, C, H, W)`` when sampling ran with ``record_trajectory=False``.
    ``class_labels``: int64 ``(n,)`` for a class-conditional model, else ``None``.

    Text-to-image samples (:func:`diffattr.diffusion.t2i_sampling.sample_text_to_image`) also
    keep ``prompts`` (one per image), ``guidance_scale``, ``negative_prompt``, ``base_hash`` and
    ``lora_hash`` (``None`` without a LoRA), and their trajectory is in latent space: ``xt`` /
    ``eps`` are ``(S, n, C, h, w)`` latents and predicted noise, ``latents`` ``(n, C, h, w)`` the
    final latents, ``images`` the decoded ``(n, 3, H, W)`` pixels. All ``None`` for pixel models.
    """

    images: torch.Tensor
    timesteps: torch.Tensor
    xt: torch.Tensor
    eps: torch.Tensor
    seed: int
    sampler: str
    num_inference_steps: int = 0
    eta: float = 0.0
    model_hash: str | None = None
    class_labels: torch.Tensor | None = None
    prompts: list[str] | None = None
    guidance_scale: float | None = None
    negative_prompt: str | None = None
    base_hash: str | None = None
    lora_hash: str | None = None
    latents: torch.Tensor | None = None

    def __len__(self) -> int:
        return int(self.images.shape[0])

    @property
    def names(self) -> list[str]:
        return [f"{i:04d}" for i in range(len(self))]

    def trajectory(self, i: int) -> Trajectory:
        """The trajectory of sample ``i`` (``xt``/``eps`` ``(S, C, H, W)``)."""
        if self.xt.shape[0] == 0:
            raise ValueError("this sample was generated with record_trajectory=False")
        return Trajectory(timesteps=self.timesteps, xt=self.xt[:, i], eps=self.eps[:, i])

    def save(self, folder: str | os.PathLike) -> Path:
        """``0000.png ...``, ``grid.png``, ``trajectory.safetensors`` and ``sample.json``."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        save_images(self.images, folder, [f"{name}.png" for name in self.names])
        save_image(make_grid(self.images), folder / "grid.png")
        tensors = {
            "images": self.images.contiguous(),
            "timesteps": self.timesteps.to(torch.int64).contiguous(),
            "xt": self.xt.contiguous(),
            "eps": self.eps.contiguous(),
        }
        if self.class_labels is not None:
            tensors["class_labels"] = self.class_labels.to(torch.int64).contiguous()
        if self.latents is not None:
            tensors["latents"] = self.latents.to(torch.float32).contiguous()
        tmp = folder / f".{TRAJECTORY_FILE}.tmp{os.getpid()}"
        save_file(tensors, str(tmp))
        os.replace(tmp, folder / TRAJECTORY_FILE)
        meta: dict[str, Any] = {
            "seed": self.seed,
            "sampler": self.sampler,
            "num_inference_steps": self.num_inference_steps,
            "eta": self.eta,
            "model_hash": self.model_hash,
            "n": len(self),
            "image_shape": list(self.images.shape[1:]),
            "names": self.names,
        }
        if self.prompts is not None:  # text-to-image: what made each image
            meta.update(
                kind="text-to-image",
                prompts=list(self.prompts),
                guidance_scale=self.guidance_scale,
                negative_prompt=self.negative_prompt,
                base_hash=self.base_hash,
                lora_hash=self.lora_hash,
                latent_shape=list(self.xt.shape[2:]) if self.xt.shape[0] else None,
                images=[
                    {
                        "name": name,
                        "prompt": prompt,
                        "seed": self.seed,
                        "index": i,
                        "guidance_scale": self.guidance_scale,
                        "num_inference_steps": self.num_inference_steps,
                    }
                    for i, (name, prompt) in enumerate(zip(self.names, self.prompts, strict=True))
                ],
            )
        write_json_atomic(folder / SAMPLE_RECORD, meta)
        return folder

    @classmethod
    def load(cls, folder: str | os.PathLike) -> SampleResult:
        folder = Path(folder)
        for name in (TRAJECTORY_FILE, SAMPLE_RECORD):
            if not (folder / name).exists():
                raise FileNotFoundError(f"{folder / name}: missing; is {folder} a sample folder?")
        try:
            meta = json.loads((folder / SAMPLE_RECORD).read_text())
            tensors = load_file(str(folder / TRAJECTORY_FILE))
        except Exception as exc:
            raise ValueError(f"{folder}: unreadable sample files ({exc})") from exc
        return cls(
            images=tensors["images"],
            timesteps=tensors["timesteps"],
            xt=tensors["xt"],
            eps=tensors["eps"],
            seed=int(meta["seed"]),
            sampler=str(meta["sampler"]),
            num_inference_steps=int(meta.get("num_inference_steps", 0)),
            eta=float(meta.get("eta", 0.0)),
            model_hash=meta.get("model_hash"),
            class_labels=tensors.get("class_labels"),
            prompts=_optional_prompts(meta.get("prompts"), folder, len(tensors["images"])),
            guidance_scale=(
                None if meta.get("guidance_scale") is None else float(meta["guidance_scale"])
            ),
            negative_prompt=meta.get("negative_prompt"),
            base_hash=meta.get("base_hash"),
            lora_hash=meta.get("lora_hash"),
            latents=tensors.get("latents"),
        )


def _optional_prompts(value: Any, folder: Path, n: int) -> list[str] | None:
    if value is None:
        return None
    if not isinstance(value, list) or not all(isinstance(p, str) for p in value):
        raise ValueError(f"{folder / SAMPLE_RECORD}: 'prompts' must be a list of strings")
    if len(value) != n:
        raise ValueError(f"{folder / SAMPLE_RECORD}: {len(value)} prompts for {n} images")
    return list(value)


def make_scheduler(model: DiffusionModel, sampler: str) -> DDPMScheduler | DDIMScheduler:
    """A fresh sampling scheduler sharing the model's noise schedule."""
    if sampler == "ddpm":
        return DDPMScheduler.from_config(model.scheduler.config)
    if sampler == "ddim":
        return DDIMScheduler.from_config(model.scheduler.config)
    raise ValueError(f"sampler={sampler!r}; expected one of {SAMPLERS}")


def initial_noise_for(seed: int, n: int, shape: tuple[int, int, int]) -> torch.Tensor:
    """The starting noise ``(n, C, H, W)`` that :func:`sample` draws for ``seed``."""
    return torch.randn((n, *shape), generator=torch.Generator().manual_seed(seed))


def step_noise(seed: int, sample_ids: range, step: int, shape: tuple[int, ...]) -> torch.Tensor:
    """Fresh noise ``(len(sample_ids), C, H, W)`` for these samples at sampling step ``step``."""
    out = [
        torch.randn(
            (1, *shape),
            generator=torch.Generator().manual_seed(derive_seed(seed, "step-noise", i, step)),
        )
        for i in sample_ids
    ]
    return torch.cat(out)


def _labels_for(model: DiffusionModel, n: int, class_labels) -> torch.Tensor | None:
    if model.num_classes is None:
        return None
    if class_labels is None:
        raise ValueError(
            f"class-conditional model ({model.num_classes} classes): pass class_labels"
        )
    labels = torch.as_tensor(class_labels, dtype=torch.int64).flatten()
    if labels.numel() == 1:
        labels = labels.expand(n).clone()
    if labels.shape != (n,):
        raise ValueError(f"class_labels: expected one label or {n}, got {labels.numel()}")
    if int(labels.min()) < 0 or int(labels.max()) >= model.num_classes:
        raise ValueError(f"class_labels must lie in [0, {model.num_classes})")
    return labels


@torch.no_grad()
def sample(
    model: DiffusionModel,
    n: int,
    seed: int,
    sampler: str = "ddim",
    num_inference_steps: int = 50,
    eta: float = 0.0,
    class_labels: torch.Tensor | int | None = None,
    batch_size: int = 64,
    initial_noise: torch.Tensor | None = None,
    progress: bool = False,
    record_trajectory: bool = True,
) -> SampleResult:
    """Generate ``n`` images with ``sampler`` ("ddim" or "ddpm") and record the trajectory.

    ``initial_noise``: optional ``(n, C, H, W)`` starting noise (e.g. ``result.xt[0]`` of another
    model's run, for counterfactual comparisons); by default it is drawn from ``seed``.
    ``record_trajectory=False`` keeps memory flat for long DDPM chains (``xt``/``eps`` left empty).
    Same arguments give bit-identical images on the same device. ``batch_size`` never changes a
    random draw; only the UNet's own float kernels may round differently per batch size (~1e-6).
    """
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise OptionError(f"n: the number of images must be an integer >= 1, got {n!r}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    shape = model.image_shape
    x = starting_noise(seed, n, shape, initial_noise)
    labels = _labels_for(model, n, class_labels)
    sched = make_scheduler(model, sampler)
    sched.set_timesteps(num_inference_steps)
    device = model.device

    def predict(xb: torch.Tensor, tb: torch.Tensor, rows: range) -> tuple[torch.Tensor, ...]:
        lb = None if labels is None else labels[rows.start : rows.stop].to(device)
        e = model.eps(xb, tb, lb).float()
        return e, e

    x, timesteps, xt, eps = denoise(
        model, sched, sampler, x, predict, seed, eta, batch_size, record_trajectory, progress
    )
    return SampleResult(
        images=x.clamp(-1.0, 1.0),
        timesteps=timesteps,
        xt=xt,
        eps=eps,
        seed=seed,
        sampler=sampler,
        num_inference_steps=num_inference_steps,
        eta=eta,
        model_hash=model.model_hash(),
        class_labels=labels,
    )


def starting_noise(
    seed: int, n: int, shape: tuple[int, int, int], initial_noise: torch.Tensor | None
) -> torch.Tensor:
    """The ``(n, *shape)`` float32 CPU noise a sampler starts from: ``initial_noise`` (checked)
    when given, else drawn from ``seed``."""
    if initial_noise is None:
        return initial_noise_for(seed, n, shape)
    x = initial_noise.detach().to("cpu", torch.float32).clone()
    if tuple(x.shape) != (n, *shape):
        raise ValueError(f"initial_noise: expected shape {(n, *shape)}, got {tuple(x.shape)}")
    return x


def denoise(
    model: Any,
    sched: Any,
    sampler: str,
    x: torch.Tensor,
    predict: Callable[[torch.Tensor, torch.Tensor, range], tuple[torch.Tensor, ...]],
    seed: int,
    eta: float,
    batch_size: int,
    record_trajectory: bool,
    progress: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The sampling loop shared by every model kind: ``x`` ``(n, ...)`` (the initial noise, on
    the CPU) stepped through ``sched``'s timesteps in batches of ``batch_size`` rows.

    ``predict(x_batch, t_batch, rows)`` returns the prediction the scheduler steps with and the
    predicted noise to record for the trajectory (the same tensor for an epsilon model without
    guidance). Returns the final ``x``, the timesteps ``(S,)`` and the trajectory ``xt`` / ``eps``
    ``(S, n, ...)`` (empty ``(0, n, ...)`` without ``record_trajectory``)."""
    timesteps = sched.timesteps.to(torch.int64).cpu()
    n, shape = x.shape[0], tuple(x.shape[1:])
    kept = len(timesteps) if record_trajectory else 0
    xt = torch.empty((kept, n, *shape))
    eps = torch.empty((kept, n, *shape))
    device = model.device
    with eval_mode(model.unet):
        for s, t in enumerate(tqdm(timesteps.tolist(), disable=not progress, desc=sampler)):
            x_next = torch.empty_like(x)
            for lo in range(0, n, batch_size):
                ids = range(lo, min(n, lo + batch_size))
                xb = x[lo : ids.stop].to(device)
                tb = torch.full((len(ids),), t, dtype=torch.int64, device=device)
                e, recorded = predict(xb, tb, ids)
                if record_trajectory:
                    xt[s, lo : ids.stop] = xb.cpu()
                    eps[s, lo : ids.stop] = recorded.float().cpu()
                x_next[lo : ids.stop] = _step(sched, sampler, e, t, xb, eta, seed, ids, s).cpu()
            x = x_next
    return x, timesteps, xt, eps


def _step(sched, sampler: str, e, t: int, xb, eta: float, seed: int, ids: range, s: int):
    """One scheduler step for a batch; fresh noise comes from per-(sample, step) generators."""
    if sampler == "ddpm":
        gens = [torch.Generator().manual_seed(derive_seed(seed, "step-noise", i, s)) for i in ids]
        return sched.step(e, t, xb, generator=gens).prev_sample
    noise = None
    if eta > 0:
        noise = step_noise(seed, ids, s, tuple(xb.shape[1:])).to(xb.device)
    return sched.step(e, t, xb, eta=eta, variance_noise=noise).prev_sample
