"""Sampling a text-to-image model with prompts, recording the latent trajectory.

Like :func:`diffattr.diffusion.sampling.sample` (same seeding rules, same DDIM / DDPM steps built
from the model's own noise schedule), with classifier-free guidance as Stable Diffusion's pipeline
computes it: ``eps_uncond + g * (eps_cond - eps_uncond)`` with the unconditional branch on
``negative_prompt`` (``""``: the empty prompt), and guidance off when ``g <= 1`` (only the
conditional branch runs), as diffusers does.

* one image per prompt: a prompt repeated ``n`` times gives ``n`` images, each from its own row
  of the initial noise ``torch.randn((n, C, h, w))`` drawn from ``seed``;
* the trajectory is recorded in latent space: ``xt[s]`` the latents fed to the UNet at step ``s``,
  ``eps[s]`` the guided predicted noise (converted from the velocity for v-prediction models), so
  Journey-TRAK's ``x0_hat = (x_t - sqrt(1 - abar) eps) / sqrt(abar)`` holds;
* the images are the decoded final latents, in ``[-1, 1]``.
"""

from __future__ import annotations

from typing import Any, cast

import torch

from diffattr.diffusion.model import eval_mode
from diffattr.diffusion.sampling import SampleResult, denoise, make_scheduler, starting_noise
from diffattr.diffusion.text2image import TextToImageModel
from diffattr.errors import OptionError


def _check_prompts(prompts: Any) -> list[str]:
    if isinstance(prompts, str):
        raise OptionError("prompts: pass a list of prompts (one per image), not one string")
    prompts = list(prompts)
    if not prompts:
        raise OptionError("prompts: at least one prompt is needed")
    if not all(isinstance(p, str) for p in prompts):
        raise OptionError("prompts: every prompt must be a string")
    return prompts


@torch.no_grad()
def prompt_embeddings(
    model: TextToImageModel, prompts: list[str], batch_size: int = 64
) -> tuple[torch.Tensor, torch.Tensor]:
    """Text embeddings of the distinct prompts ``(u, L, D)`` (on the model's device) and each
    prompt's row in them ``(len(prompts),)`` int64."""
    distinct = list(dict.fromkeys(prompts))
    row = {p: i for i, p in enumerate(distinct)}
    ids = model.tokenize(distinct)
    with eval_mode(model.text_encoder):
        emb = torch.cat(
            [
                model.text_embeddings(ids[lo : lo + batch_size])
                for lo in range(0, len(distinct), batch_size)
            ]
        )
    return emb, torch.tensor([row[p] for p in prompts], dtype=torch.int64)


@torch.no_grad()
def sample_text_to_image(
    model: TextToImageModel,
    prompts: list[str],
    seed: int,
    num_inference_steps: int = 50,
    guidance_scale: float = 7.5,
    sampler: str = "ddim",
    eta: float = 0.0,
    negative_prompt: str = "",
    progress: bool = False,
    batch_size: int = 16,
    initial_noise: torch.Tensor | None = None,
    record_trajectory: bool = True,
) -> SampleResult:
    """Generate one image per prompt with ``sampler`` ("ddim" or "ddpm") and classifier-free
    guidance ``guidance_scale``, recording the latent trajectory.

    ``initial_noise``: optional ``(n, C, h, w)`` starting latents (by default drawn from
    ``seed``). Same arguments give bit-identical images on the same device; ``batch_size``
    changes no random draw. Returns a :class:`~diffattr.diffusion.sampling.SampleResult` with
    ``prompts``, ``guidance_scale``, ``negative_prompt``, ``base_hash``, ``lora_hash`` and
    ``latents`` set; ``SampleResult.save`` writes them into ``sample.json``.
    """
    prompts = _check_prompts(prompts)
    if not isinstance(negative_prompt, str):
        raise OptionError("negative_prompt must be a string")
    if batch_size < 1:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    g = float(guidance_scale)
    n = len(prompts)
    shape = model.image_shape
    x = starting_noise(seed, n, shape, initial_noise)
    sched = make_scheduler(cast(Any, model), sampler)
    sched.set_timesteps(num_inference_steps)
    guided = g > 1.0  # as StableDiffusionPipeline.do_classifier_free_guidance
    emb, rows = prompt_embeddings(model, prompts)
    uncond = prompt_embeddings(model, [negative_prompt])[0] if guided else None

    def predict(xb: torch.Tensor, tb: torch.Tensor, ids: range) -> tuple[torch.Tensor, ...]:
        cb = emb[rows[ids.start : ids.stop].to(emb.device)]
        if uncond is not None:
            both = model.eps(
                torch.cat([xb, xb]),
                torch.cat([tb, tb]),
                torch.cat([uncond.expand(len(ids), -1, -1), cb]),
            ).float()
            e_uncond, e_cond = both.chunk(2)
            e = e_uncond + g * (e_cond - e_uncond)
        else:
            e = model.eps(xb, tb, cb).float()
        # The trajectory keeps the predicted noise (a v-prediction model's, converted).
        return e, model.predicted_noise(e, xb, tb)

    x, timesteps, xt, eps = denoise(
        model, sched, sampler, x, predict, seed, eta, batch_size, record_trajectory, progress
    )
    images = model.decode_latents(x, batch_size=batch_size)
    return SampleResult(
        images=images,
        timesteps=timesteps,
        xt=xt,
        eps=eps,
        seed=seed,
        sampler=sampler,
        num_inference_steps=num_inference_steps,
        eta=eta,
        model_hash=model.model_hash(),
        prompts=prompts,
        guidance_scale=g,
        negative_prompt=negative_prompt,
        base_hash=model.base_hash(),
        lora_hash=model.lora_hash(),
        latents=x,
    )
