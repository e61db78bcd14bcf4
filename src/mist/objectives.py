"""Mist v1.2's losses (Liang et al., "Adversarial Example Does Good", ICML 2023; Mist v1.2 code), per image.

textural  L_tex = sum((E(x') - E(y))^2) over all latent elements, y the target pattern image;
semantic  L_sem = mean((eps_theta(z_t, t, c) - n)^2), z = E(x'), t ~ U{0..999}, n ~ N(0, I);
objective (minimised by PGD): textural L_tex, semantic -L_sem, fused L_tex - r * L_sem with r = 10 ** (w + 3).

One encoder pass per evaluation serves both losses. Losses are reduced in float32 whatever the network precision.
Image i of a batch draws all its random numbers (posterior sample, t, n) from generators[i], in that order, so its
result does not depend on the rest of the batch.

Fast mode replaces the semantic gradient with the score-distillation approximation (Xue et al., "Toward effective
protection against diffusion-based mimicry through score distillation", ICLR 2024): with respect to the latent,
(2 / N) * sqrt(alpha_bar_t) * (eps_theta - n), the exact gradient with the UNet's Jacobian replaced by the identity,
so the fused weight keeps its meaning; the UNet then runs forward only, without a graph.
"""

from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass
from typing import Sequence

import torch

from .config import Mode
from .models import StableDiffusion
from .models.components import standard_normal

PRECISION_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
# fp16 represents magnitudes from 6e-8 (6e-5 at full precision) to 65504. The semantic loss is a mean over the N
# latent elements, so its gradient there is 2 / N * (eps - n): about 1e-4 at 512 x 512, and smaller still further
# back through the networks, where fp16 flushes much of it to zero (no sign, so no step). Multiplying semantic mode's
# objective by fused mode's default weight r = 1e4 gives its gradients the size fused mode's semantic part has (about
# 1 at the latent), which fp16 carries; textural and fused gradients are already of that size. Only the gradient's
# signs are used, so a constant scale changes nothing else.
FP16_SEMANTIC_LOSS_SCALE = 1e4


@dataclass(frozen=True)
class LossTerms:
    """Per-image values, each of shape (N,): the two losses (None where the mode does not compute one) and the
    objective that PGD minimises."""

    textural: torch.Tensor | None
    semantic: torch.Tensor | None
    objective: torch.Tensor


def autocast(device: torch.device, precision: str):
    """The autocast context of `precision` (fp32, bf16, fp16) on `device`; none for fp32."""
    if precision == "fp32":
        return nullcontext()
    return torch.autocast(device.type, dtype=PRECISION_DTYPES[precision])


def loss_scale(precision: str, mode: Mode) -> float:
    """The constant the objective is multiplied by before differentiating it (see FP16_SEMANTIC_LOSS_SCALE)."""
    return FP16_SEMANTIC_LOSS_SCALE if precision == "fp16" and mode == "semantic" else 1.0


class MistObjective:
    """The loss of a batch of images x' in [-1, 1] for one mode; call it with one generator per image.

    `target_latent` (N or 1 rows; needed unless mode is semantic) is E(y), computed once per target; `text` (needed
    unless mode is textural) is the CLIP embedding of the prompt, shape (1, 77, D).
    """

    def __init__(self, model: StableDiffusion, mode: Mode, semantic_weight: float,
                 target_latent: torch.Tensor | None, text: torch.Tensor | None, precision: str = "fp32",
                 fast: bool = False) -> None:
        if mode != "semantic" and target_latent is None:
            raise ValueError(f"{mode} mode needs a target latent")
        if mode != "textural" and text is None:
            raise ValueError(f"{mode} mode needs a text embedding")
        self.model = model
        self.mode = mode
        self.semantic_weight = semantic_weight
        self.target_latent = target_latent
        self.text = text
        self.precision = precision
        self.fast = fast

    def __call__(self, x: torch.Tensor, generators: Sequence[torch.Generator]) -> LossTerms:
        with autocast(x.device, self.precision):
            latent = self.model.encode(x, generators).float()
        textural = semantic = None
        if self.mode != "semantic":
            textural = (latent - self.target_latent).pow(2).flatten(1).sum(1)
        if self.mode != "textural":
            semantic = self._semantic(latent, generators)
        if self.mode == "textural":
            objective = textural
        elif self.mode == "semantic":
            objective = -semantic
        else:
            objective = textural - self.semantic_weight * semantic
        return LossTerms(textural, semantic, objective)

    def _semantic(self, latent: torch.Tensor, generators: Sequence[torch.Generator]) -> torch.Tensor:
        count = latent.shape[0]
        timesteps = torch.cat([torch.randint(0, len(self.model.alphas_cumprod), (1,), generator=g)
                               for g in generators]).to(latent.device)
        noise = standard_normal(latent.shape, generators, like=latent)
        alpha_bar = self.model.alphas_cumprod.to(latent.device)[timesteps].view(-1, 1, 1, 1)
        noisy = alpha_bar.sqrt() * latent + (1 - alpha_bar).sqrt() * noise
        text = self.text.expand(count, -1, -1)
        if not self.fast:
            with autocast(latent.device, self.precision):
                predicted = self.model.predict_noise(noisy, timesteps, text)
            return (predicted.float() - noise).pow(2).flatten(1).mean(1)
        with torch.no_grad(), autocast(latent.device, self.precision):
            predicted = self.model.predict_noise(noisy.detach(), timesteps, text).float()
        residual = predicted - noise
        value = residual.pow(2).flatten(1).mean(1)
        gradient = 2.0 / residual[0].numel() * alpha_bar.sqrt() * residual
        # Carries `value` forward and `gradient` backward to the latent (and on through the encoder).
        surrogate = (latent * gradient).flatten(1).sum(1)
        return value + surrogate - surrogate.detach()


@torch.no_grad()
def target_latent(model: StableDiffusion, target: torch.Tensor, generators: Sequence[torch.Generator],
                  precision: str = "fp32") -> torch.Tensor:
    """E(y) for target images y in [-1, 1], in float32 (one posterior sample each, as the textural loss uses)."""
    with autocast(target.device, precision):
        return model.encode(target, generators).float()
