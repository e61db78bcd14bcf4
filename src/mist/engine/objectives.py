"""The differentiable pieces protection methods are made of, in one place: encoding an image into SD's latent space,
distances between latents, the diffusion model's denoising loss and its score-distillation approximation, for every
family whose denoiser Mist runs (the model says how it noises, what it predicts and how it is conditioned).

Every piece runs the networks in the run's precision (autocast) and returns float32 values, one per image of the batch.
Image i of a batch draws its random numbers (posterior sample, then t, then n) from generators[i], in that order, so its
result does not depend on the rest of the batch. The methods (`mist.engine.methods`) compose these pieces into their
losses.
"""

from __future__ import annotations

from contextlib import nullcontext
from typing import Sequence

import torch

from mist.models import StableDiffusion
from mist.models.conditioning import Conditioning

PRECISION_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
# fp16 represents magnitudes from 6e-8 (6e-5 at full precision) to 65504. The denoising loss is a mean over the N
# latent elements, so its gradient there is 2 / N * (eps - n): about 1e-4 at 512 x 512, and smaller still further
# back through the networks, where fp16 flushes much of it to zero (no sign, so no step). Multiplying an objective made
# of the denoising loss alone by Mist's default fused weight r = 1e4 gives its gradients the size fused mode's semantic
# part has (about 1 at the latent), which fp16 carries. Only the gradient's signs are used, so a constant scale changes
# nothing else.
FP16_DENOISING_LOSS_SCALE = 1e4


def autocast(device: torch.device, precision: str):
    """The autocast context of `precision` (fp32, bf16, fp16) on `device`; none for fp32."""
    if precision == "fp32":
        return nullcontext()
    return torch.autocast(device.type, dtype=PRECISION_DTYPES[precision])


def encode(model: StableDiffusion, x: torch.Tensor, generators: Sequence[torch.Generator],
           precision: str) -> torch.Tensor:
    """z = E(x): a scaled sample of the VAE encoder's posterior for images `x` in [-1, 1], float32."""
    with autocast(x.device, precision):
        return model.encode(x, generators).float()


def posterior(model: StableDiffusion, x: torch.Tensor, precision: str) -> tuple[torch.Tensor, torch.Tensor]:
    """The mean and log-variance of the VAE encoder's diagonal-Gaussian posterior for `x` in [-1, 1] (unscaled),
    float32; no random draw."""
    with autocast(x.device, precision):
        return model.posterior(x)


def vae_round_trip(model: StableDiffusion, x: torch.Tensor, precision: str) -> torch.Tensor:
    """D(mean of E(x)): what the VAE decoder makes of the encoder's posterior mean for `x` in [-1, 1], float32, not
    clipped; differentiable, no random draw. Needs the model's decoder."""
    with autocast(x.device, precision):
        mean, _ = model.posterior(x)
        return model.decode(model.scale_latent(mean)).float()


@torch.no_grad()
def target_latent(model: StableDiffusion, target: torch.Tensor, generators: Sequence[torch.Generator],
                  precision: str = "fp32") -> torch.Tensor:
    """E(y) for target images y in [-1, 1], in float32 (one posterior sample each, as the textural loss uses)."""
    return encode(model, target, generators, precision)


def squared_distance(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """sum((a - b) ** 2) per image: Mist's textural loss between latents."""
    return (a - b).pow(2).flatten(1).sum(1)


def predict(model: StableDiffusion, noisy: torch.Tensor, timesteps: torch.Tensor,
            conditioning: Conditioning | torch.Tensor, precision: str) -> torch.Tensor:
    """The denoiser's prediction for z_t (the noise, or v for a v-prediction model) in float32, `conditioning` (one
    row, or a bare (1, 77, D) tensor of token states) shared by the batch."""
    with autocast(noisy.device, precision):
        return model.denoise(noisy, timesteps, Conditioning.of(conditioning).batched(noisy.shape[0])).float()


def denoising_loss(model: StableDiffusion, latent: torch.Tensor, conditioning: Conditioning | torch.Tensor,
                   generators: Sequence[torch.Generator], precision: str) -> torch.Tensor:
    """L_sem = mean((prediction(z_t, t, c) - target) ** 2) per image, differentiable through the UNet: the diffusion
    model's own training loss (Mist's semantic loss, AdvDM's objective). The target is the noise n for SD 1.x, SDXL
    and SD 2.x's 512-pixel models, v = sqrt(alpha_bar_t) n - sqrt(1 - alpha_bar_t) z for v-prediction models."""
    noised = model.noised(latent, generators)
    prediction = predict(model, noised.latent, noised.timesteps, conditioning, precision)
    return (prediction - model.target(noised)).pow(2).flatten(1).mean(1)


def score_distillation(model: StableDiffusion, latent: torch.Tensor, conditioning: Conditioning | torch.Tensor,
                       generators: Sequence[torch.Generator], precision: str, *, unit: bool = False) -> torch.Tensor:
    """L_sem per image with the score-distillation gradient (Xue et al., "Toward effective protection against
    diffusion-based mimicry through score distillation", ICLR 2024): its value is the denoising loss, its gradient
    with respect to the latent (2 / N) * sqrt(alpha_bar_t) * (eps_hat - n), the exact gradient of the noise-prediction
    loss with the UNet's Jacobian replaced by the identity. The UNet runs forward only, without a graph. `unit`: the
    latent gradient is (eps_hat - n) itself, without the factor (2 / N) * sqrt(alpha_bar_t), as Xue et al.'s code
    applies it (the scale matters where the term is weighted against another one, as in their SDST).

    eps_hat is the noise the prediction implies (`StableDiffusion.as_noise`): the prediction itself for a noise
    predictor; for a v-prediction model sqrt(alpha_bar_t) v_hat + sqrt(1 - alpha_bar_t) z_t, so that
    eps_hat - n = sqrt(alpha_bar_t) (v_hat - v). The score (the gradient of the log density that SDS distils) is
    -(eps_hat) / sqrt(1 - alpha_bar_t) whatever the parameterisation, so the step direction means the same thing for
    both kinds of model; differentiating the v loss itself with an identity Jacobian would instead add a term from the
    target's own dependence on z and weight the times differently (by sqrt(alpha_bar_t) + sqrt(1 - alpha_bar_t))."""
    noised = model.noised(latent, generators)
    with torch.no_grad():
        prediction = predict(model, noised.latent.detach(), noised.timesteps, conditioning, precision)
        value = (prediction - model.target(noised)).pow(2).flatten(1).mean(1)
        residual = model.as_noise(prediction, noised) - noised.noise
    gradient = residual if unit else 2.0 / residual[0].numel() * noised.signal * residual
    # Carries `value` forward and `gradient` backward to the latent (and on through the encoder).
    surrogate = (latent * gradient).flatten(1).sum(1)
    return value + surrogate - surrogate.detach()
