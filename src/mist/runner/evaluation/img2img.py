"""Image-to-image generation (SDEdit, Meng et al. 2022) on Mist's own model components: what a mimic does with
NovelAI-style img2img, and what DiffPure-style purification does with a low strength and no prompt.

The steps are those of diffusers' `StableDiffusionImg2ImgPipeline` (tests check the two agree on identical weights
and seeds): encode the image (a posterior sample), noise it to the timestep `strength` of the way through the
schedule, denoise it with DDIM (eta 0) under classifier-free guidance, decode. Every random number comes from the
caller's generators, one per image, so the same seed gives a clean and a protected image the same noise.

SD 3.x and Flux (rectified flows) follow diffusers' StableDiffusion3Img2ImgPipeline and FluxImg2ImgPipeline instead:
the latent is moved `strength` of the way along the straight path to the noise, (1 - s) z + s n, at the first of the
remaining steps of the folder's flow-matching Euler schedule (shifted as its scheduler config says; for Flux dev by the
image's size, with Flux's evenly spaced sigmas), then integrated with Euler steps along the predicted velocity. SD 3.x
uses classifier-free guidance as SD 1.x does; Flux none (dev's guidance strength, 3.5, is an input of its
transformer, set at load; schnell is distilled to run without).
"""

from __future__ import annotations

import math
import threading
from dataclasses import dataclass
from typing import Sequence

import torch

from mist.engine.attack import Cancelled

from mist.common.prompts import STYLE_PROMPT
from mist.models import StableDiffusion
from mist.models.components import TRAIN_TIMESTEPS, UNCONDITIONAL_PROMPT
from mist.models.noising import FlowShift, standard_normal

# SD v1's DDIM settings (its scheduler_config.json): the training schedule of `scaled_linear_alphas_cumprod`.
SD_V1_DDIM = dict(num_train_timesteps=TRAIN_TIMESTEPS, beta_start=0.00085, beta_end=0.012,
                  beta_schedule="scaled_linear", clip_sample=False, set_alpha_to_one=False, steps_offset=1,
                  prediction_type="epsilon")


@dataclass(frozen=True)
class Generated:
    """What img2img made of a batch: `images` (N, 3, H, W) in [-1, 1] (clipped) and their final scaled latents
    (N, 4, H/8, W/8), float32 on the CPU."""

    images: torch.Tensor
    latents: torch.Tensor


def ddim_scheduler(prediction_type: str = "epsilon"):
    """A diffusers DDIM scheduler with SD v1's settings, built from the constants above (nothing is downloaded), for a
    model predicting `prediction_type` (SD 2.x and SDXL train on the same schedule; SD 2.x's 768 models predict v)."""
    from diffusers import DDIMScheduler

    return DDIMScheduler(**{**SD_V1_DDIM, "prediction_type": prediction_type})


def img2img(model: StableDiffusion, images: torch.Tensor, strength: float, generators: Sequence[torch.Generator], *,
            steps: int = 50, guidance: float = 7.5, prompt: str = STYLE_PROMPT,
            cancel: threading.Event | None = None) -> Generated:
    """SDEdit `images` (N, 3, H, W) in [-1, 1], H and W multiples of 8, with `model` (its encoder, UNet, decoder and
    the embedding of `prompt`, one of the prompts a model keeps).

    strength: 0..1, how far into the noise schedule the image is pushed (0 gives the decoded posterior sample back,
    1 ignores the image). steps: DDIM steps of the full schedule (`steps * strength` of them run). guidance:
    classifier-free guidance scale (1: the prompt alone, no unconditional branch). generators: one per image; each
    draws that image's posterior sample and then its noise, as diffusers draws them. cancel: once set, `Cancelled`
    is raised before the next DDIM step.
    """
    if not 0.0 <= strength <= 1.0:
        raise ValueError(f"strength: must be between 0 and 1, got {strength}")
    if steps < 1:
        raise ValueError(f"steps: must be at least 1, got {steps}")
    flow = model.arch.prediction_type == "flow"
    scheduler, guidance = _scheduler(model, steps, tuple(images.shape[-2:]), guidance)
    # SD's pipelines round the steps run down, the flow pipelines the steps skipped
    begin = int(steps - steps * strength) if flow else steps - min(int(steps * strength), steps)
    timesteps = scheduler.timesteps[begin * scheduler.order :]
    with torch.no_grad():
        latents = model.encode(images.to(model.device), generators)
        if len(timesteps):
            noise = standard_normal(latents.shape, generators, like=latents)
            if flow:
                scheduler.set_begin_index(begin)
                latents = scheduler.scale_noise(latents, timesteps[:1].repeat(latents.shape[0]), noise)
            else:
                latents = scheduler.add_noise(latents, noise, timesteps[:1].repeat(latents.shape[0]))
        return _denoised(model, scheduler, timesteps, latents, guidance, prompt, cancel)


def _scheduler(model: StableDiffusion, steps: int, size: tuple[int, int], guidance: float) -> tuple[object, float]:
    """The sampler for `model` with its `steps` timesteps set for pictures of `size` (height, width), and the
    classifier-free guidance scale it runs with: `guidance`, or 1 (none) for Flux."""
    if model.arch.prediction_type != "flow":
        scheduler = ddim_scheduler(model.arch.prediction_type)
        scheduler.set_timesteps(steps, device=model.device)
        return scheduler, guidance
    scheduler = flow_scheduler(model, (size[0] // 16) * (size[1] // 16), steps)
    return scheduler, guidance if model.arch.family == "sd3" else 1.0


def flow_scheduler(model: StableDiffusion, tokens: int, steps: int):
    """diffusers' flow-matching Euler scheduler from an SD 3.x or Flux model's scheduler config, its `steps` timesteps
    set as that family's img2img pipeline sets them (`tokens`: the image's 2 x 2 latent patches, for Flux dev's
    shift; Flux's sigmas evenly spaced from 1 to 1 / steps)."""
    import numpy as np
    from diffusers import FlowMatchEulerDiscreteScheduler

    scheduler = FlowMatchEulerDiscreteScheduler.from_config(model.arch.schedule)
    shift = FlowShift.of(model.arch.schedule)
    sigmas = np.linspace(1.0, 1 / steps, steps) if model.arch.family == "flux" else None
    scheduler.set_timesteps(steps, device=model.device, sigmas=sigmas,
                            mu=math.log(shift.factor(tokens)) if shift.dynamic else None)
    return scheduler


def txt2img(model: StableDiffusion, size: tuple[int, int], generators: Sequence[torch.Generator], *,
            steps: int = 50, guidance: float = 7.5, prompt: str = STYLE_PROMPT,
            cancel: threading.Event | None = None) -> Generated:
    """Text-to-image sampling, as a mimic samples a fine-tuned model: one image of `size` (height, width in pixels,
    multiples of 8; 16 for SD 3.x and Flux) per generator, from pure Gaussian noise (nothing of any input image), DDIM
    (or for a flow its Euler steps) over all `steps`."""
    if steps < 1:
        raise ValueError(f"steps: must be at least 1, got {steps}")
    scheduler, guidance = _scheduler(model, steps, size, guidance)
    height, width = size
    shape = (len(generators), model.arch.vae["latent_channels"], height // 8, width // 8)
    with torch.no_grad():
        latents = standard_normal(shape, generators, like=model.alphas_cumprod.float())
        latents = latents * getattr(scheduler, "init_noise_sigma", 1.0)
        return _denoised(model, scheduler, scheduler.timesteps, latents, guidance, prompt, cancel)


def _denoised(model: StableDiffusion, scheduler, timesteps, latents: torch.Tensor, guidance: float,
              prompt: str, cancel: threading.Event | None) -> Generated:
    """DDIM (eta 0), or for a flow the Euler steps along its velocity, from `latents` over `timesteps` under
    classifier-free guidance, then decoded."""
    flow = model.arch.prediction_type == "flow"
    text = model.conditioning(prompt).batched(latents.shape[0])
    guided = guidance > 1.0
    if guided:
        text = model.conditioning(UNCONDITIONAL_PROMPT).batched(latents.shape[0]).joined(text)
    for t in timesteps:
        if cancel is not None and cancel.is_set():
            raise Cancelled
        both = torch.cat([latents, latents]) if guided else latents
        noise_pred = model.denoise(both if flow else scheduler.scale_model_input(both, t), t, text).float()
        if guided:
            unconditional, conditional = noise_pred.chunk(2)
            noise_pred = unconditional + guidance * (conditional - unconditional)
        latents = scheduler.step(noise_pred, t, latents, **({} if flow else {"eta": 0.0})).prev_sample
    pictures = model.decode(latents).clamp(-1.0, 1.0)
    return Generated(pictures.cpu(), latents.float().cpu())
