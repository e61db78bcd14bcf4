"""The forward process of a diffusion model's training: a clean latent z noised at a random training time, and what
the denoiser is trained to predict there.

One record (`Noised`) covers every family Mist runs or will run: z_t = signal * z + sigma * n with n ~ N(0, I). For SD
1.x, 2.x and XL (DDPM's discrete schedule) t is drawn uniformly from the 1000 training steps, signal = sqrt(alpha_bar_t)
and sigma = sqrt(1 - alpha_bar_t); a flow-matching family (SD 3.x, Flux: z_t = (1 - s) z + s n) is the same record with
signal = 1 - s and sigma = s. The prediction target depends on the parameterisation the model was trained with:
"epsilon" the noise n, "v_prediction" v = signal * n - sigma * z (Salimans & Ho, "Progressive distillation for fast
sampling of diffusion models", ICLR 2022; SD 2.x's 768-pixel models).

Every image draws its own random numbers on the CPU from its own generator, t first and then n, so a result does not
depend on the device or on the rest of the batch.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

PREDICTION_TYPES = ("epsilon", "v_prediction")


def standard_normal(shape: torch.Size | tuple[int, ...], generators: Sequence[torch.Generator],
                    like: torch.Tensor) -> torch.Tensor:
    """N(0, I) noise of `shape` (N, ...), row i drawn on the CPU from generators[i], then moved to `like`'s device and
    dtype: every device and every batch composition gets the same numbers for the same seeds."""
    if len(generators) != shape[0]:
        raise ValueError(f"{len(generators)} generators for a batch of {shape[0]}")
    rows = [torch.randn((1, *shape[1:]), generator=g) for g in generators]
    return torch.cat(rows).to(device=like.device, dtype=like.dtype)


@dataclass(frozen=True)
class Noised:
    """A clean latent `clean` (z) noised at `timesteps` (the denoiser's time input, one per image) with `noise` (n):
    `latent` = z_t = signal * z + sigma * n, `signal` and `sigma` shaped (N, 1, 1, 1)."""

    latent: torch.Tensor
    timesteps: torch.Tensor
    noise: torch.Tensor
    clean: torch.Tensor
    signal: torch.Tensor
    sigma: torch.Tensor


def diffusion_noised(alphas_cumprod: torch.Tensor, latent: torch.Tensor,
                     generators: Sequence[torch.Generator]) -> Noised:
    """DDPM's forward process at t ~ U{0..T-1} (T = len(alphas_cumprod)): signal sqrt(alpha_bar_t), sigma
    sqrt(1 - alpha_bar_t); t and then n drawn from each image's generator."""
    timesteps = torch.cat([torch.randint(0, len(alphas_cumprod), (1,), generator=g)
                           for g in generators]).to(latent.device)
    noise = standard_normal(latent.shape, generators, like=latent)
    alpha_bar = alphas_cumprod.to(latent.device)[timesteps].view(-1, 1, 1, 1)
    signal, sigma = alpha_bar.sqrt(), (1 - alpha_bar).sqrt()
    return Noised(signal * latent + sigma * noise, timesteps, noise, latent, signal, sigma)


def check_prediction_type(kind: str, where: str) -> str:
    """`kind` if Mist knows it; ValueError naming `where` (a file or setting) otherwise."""
    if kind not in PREDICTION_TYPES:
        raise ValueError(f"{where}: prediction type {kind!r}, Mist knows {', '.join(PREDICTION_TYPES)}")
    return kind


def target(kind: str, noised: Noised) -> torch.Tensor:
    """What a denoiser of prediction type `kind` is trained to output at `noised`: n, or v = signal n - sigma z."""
    if kind == "v_prediction":
        return noised.signal * noised.noise - noised.sigma * noised.clean
    return noised.noise


def as_noise(kind: str, prediction: torch.Tensor, noised: Noised) -> torch.Tensor:
    """The noise a prediction of type `kind` implies: the prediction itself for "epsilon"; for v, signal v + sigma z_t
    (with signal^2 + sigma^2 = 1 this is exactly n when v is exact)."""
    if kind == "v_prediction":
        return noised.signal * prediction + noised.sigma * noised.latent
    return prediction
