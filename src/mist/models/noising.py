"""The forward process of a diffusion model's training: a clean latent z noised at a random training time, and what
the denoiser is trained to predict there.

One record (`Noised`) covers every family Mist runs or will run: z_t = signal * z + sigma * n with n ~ N(0, I). For SD
1.x, 2.x and XL (DDPM's discrete schedule) t is drawn uniformly from the 1000 training steps, signal = sqrt(alpha_bar_t)
and sigma = sqrt(1 - alpha_bar_t); a flow-matching family (SD 3.x, Flux: z_t = (1 - s) z + s n) is the same record with
signal = 1 - s and sigma = s. The prediction target depends on the parameterisation the model was trained with:
"epsilon" the noise n, "v_prediction" v = signal * n - sigma * z (Salimans & Ho, "Progressive distillation for fast
sampling of diffusion models", ICLR 2022; SD 2.x's 768-pixel models), "flow" the velocity n - z that a rectified
flow is trained to predict (SD 3.x, Flux; `flow_noised` says how their training time is drawn).

Every image draws its own random numbers on the CPU from its own generator, t first and then n, so a result does not
depend on the device or on the rest of the batch.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import math

import torch

PREDICTION_TYPES = ("epsilon", "v_prediction", "flow")
FLOW_TIMESTEP_SCALE = 1000.0  # SD 3.x's and Flux's transformers take the noise level s as the time s * 1000


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


@dataclass(frozen=True)
class FlowShift:
    """How a flow-matching model's noise level s is bent towards noise, from its scheduler config (diffusers'
    FlowMatchEulerDiscreteScheduler keys): a fixed `shift` k, s = k u / (1 + (k - 1) u) (SD 3 medium and 3.5: 3.0;
    Flux schnell: 1.0, no shift), or with `use_dynamic_shifting` (Flux dev) a shift that grows with the number of
    image tokens L: mu = base_shift + (max_shift - base_shift) (L - base_image_seq_len) / (max_image_seq_len -
    base_image_seq_len), s = e^mu / (e^mu + 1 / u - 1), i.e. the same formula with k = e^mu."""

    shift: float = 1.0
    dynamic: bool = False
    base_shift: float = 0.5
    max_shift: float = 1.15
    base_tokens: int = 256
    max_tokens: int = 4096

    @classmethod
    def of(cls, config: dict) -> FlowShift:
        """The shift a scheduler config (scheduler_config.json's dict) states; diffusers' defaults where silent."""
        return cls(float(config.get("shift", 1.0)), bool(config.get("use_dynamic_shifting", False)),
                   float(config.get("base_shift") or 0.5), float(config.get("max_shift") or 1.15),
                   int(config.get("base_image_seq_len", 256)), int(config.get("max_image_seq_len", 4096)))

    def factor(self, tokens: int) -> float:
        """k for an image of `tokens` 2 x 2 latent patches."""
        if not self.dynamic:
            return self.shift
        slope = (self.max_shift - self.base_shift) / (self.max_tokens - self.base_tokens)
        return math.exp(self.base_shift + slope * (tokens - self.base_tokens))


def flow_noised(shift: FlowShift, latent: torch.Tensor, generators: Sequence[torch.Generator]) -> Noised:
    """Rectified flow's forward process: z_s = (1 - s) z + s n, so signal 1 - s and sigma s, the time input s * 1000.

    s is drawn as SD 3.x was trained (Esser et al., "Scaling rectified flow transformers for high-resolution image
    synthesis", ICML 2024, whose logit-normal sampling with m = 0, s = 1 is also the default `logit_normal` weighting
    of diffusers' SD 3 training scripts): u = sigmoid(x), x ~ N(0, 1), one per image from its generator, then shifted
    by the model's scheduler (`FlowShift`: 3.0 for SD 3 medium and 3.5, the resolution-dependent shift for Flux dev,
    none for schnell), as diffusers' training scripts read their sigmas off the shifted schedule. Black Forest Labs
    did not publish Flux's training draw; the same logit-normal u with Flux's own shift is the closest published
    choice. s is kept continuous (diffusers' scripts round it to one of 1000 steps, which changes nothing that
    matters to an attack)."""
    tokens = (latent.shape[-2] // 2) * (latent.shape[-1] // 2)
    k = shift.factor(tokens)
    u = torch.sigmoid(torch.cat([torch.randn((1,), generator=g) for g in generators]))
    s = (k * u / (1 + (k - 1) * u)).to(latent.device)
    noise = standard_normal(latent.shape, generators, like=latent)
    sigma = s.view(-1, 1, 1, 1).to(latent.dtype)
    return Noised((1 - sigma) * latent + sigma * noise, s * FLOW_TIMESTEP_SCALE, noise, latent, 1 - sigma, sigma)


def check_prediction_type(kind: str, where: str) -> str:
    """`kind` if Mist knows it; ValueError naming `where` (a file or setting) otherwise."""
    if kind not in PREDICTION_TYPES:
        raise ValueError(f"{where}: prediction type {kind!r}, Mist knows {', '.join(PREDICTION_TYPES)}")
    return kind


def target(kind: str, noised: Noised) -> torch.Tensor:
    """What a denoiser of prediction type `kind` is trained to output at `noised`: n, v = signal n - sigma z, or the
    flow's velocity n - z (dz_s / ds)."""
    if kind == "flow":
        return noised.noise - noised.clean
    if kind == "v_prediction":
        return noised.signal * noised.noise - noised.sigma * noised.clean
    return noised.noise


def as_noise(kind: str, prediction: torch.Tensor, noised: Noised) -> torch.Tensor:
    """The noise a prediction of type `kind` implies: the prediction itself for "epsilon"; for v, signal v + sigma z_t
    (with signal^2 + sigma^2 = 1 this is exactly n when v is exact); for a flow's velocity u, z_s + (1 - s) u (with
    z_s = z + s (n - z), exactly n when u = n - z)."""
    if kind == "flow":
        return noised.latent + noised.signal * prediction
    if kind == "v_prediction":
        return noised.signal * prediction + noised.sigma * noised.latent
    return prediction
