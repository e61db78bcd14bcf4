"""Mist-v2's target-UNet loss (Zheng et al., "Understanding and Improving Adversarial Attacks on Latent Diffusion
Model", 2023; code: psyker-team/mist-v2, attacks/mist.py), without its surrogate fine-tuning loop.

z = s * mu(x'), the scaled mean of the encoder's posterior (no sample drawn, as the code encodes with
`latent_dist.mean`), z_t = sqrt(a_t) z + sqrt(1 - a_t) n with t ~ U{0..999}, n ~ N(0, I), and E(y) a posterior
sample of the target pattern y (scaled, as the code's target latent):
    target_unet       L_u = mean((eps_theta(z_t, t, c) - E(y))^2)     the code's default mode, "lunet"
    noise_alignment   L_a = sum(eps_theta(z_t, t, c) * n)             its "fused" mode
    latent_distance   L_z = mean((z - E(y))^2)                        its "fused" mode
objective (minimised by PGD): L_u, which pushes the UNet's noise prediction toward the target's latent; with `fused`,
L_a - w * L_z (w = 100 in the code), exactly as the code's fused mode computes it: it lowers the prediction's
alignment with the true noise and *raises* the latent's distance from the target (the code subtracts 100 times
LatentAttack's loss, which is itself -L_z, and ascends).

Random numbers per image, from its generator: t, then n; E(y) draws its sample from the tile's "target" stream. The
default target is the code's data/MIST.png (tiled "MIST" lettering, shipped as assets/mist_v2_target.png). The
prompt is Mist's "a painting" (the code's default is "a picture", a prompt Mist does not carry; `--object` gives
"a photo"). The code's budget is 8/255 of the [-1, 1] range (4 levels) with steps of 0.005 (0.64 levels), 5 x 30
steps between fine-tuning rounds, from the image itself; here budget and steps are the run's settings (the code's with
`--preset paper`).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Sequence

from mist.engine.methods import register_method
from mist.engine.methods.base import Loss, LossTerms, MethodParams, TileInputs, param
from mist.engine.methods.common import DenoiserMethod, mist_v2_target, object_prompt_param, target_or, target_param

if TYPE_CHECKING:
    import torch

    from mist.models import StableDiffusion


# Mist-v2 as psyker-team/mist-v2 (commit ed195b9) runs it, attacks/mist.py: pgd_eps 8/255 and pgd_alpha 0.005 on
# the [-1, 1] scale (l. 80-81; images normalised to [-1, 1], l. 268): 4 and 0.6375 levels; 5 rounds of 30 PGD steps
# (l. 70, 72: 150 steps); the attack starts from the image itself (l. 801, the perturbed data begin as the clean
# data's copy; no random draw in pgd_attack, l. 526-640) with a constant step (l. 630-634); mode "lunet" (l. 89), the
# target-UNet loss. mist2-lora takes the same (its rounds are the code's too).
PAPER_PRESET = {"epsilon": 4, "step_size": 0.6375, "steps": 150, "start": "image", "step_schedule": "constant",
                "fused": False}


@dataclass(frozen=True)
class Mist2Params(MethodParams):
    fused: bool = param(False, "Mist-v2's fused mode: lower the prediction's alignment with the true noise and raise "
                               "the latent's distance from the target, instead of the target-UNet loss",
                        label="Fused (Mist-v2)")
    latent_weight: float = param(100.0, "fused mode: weight of the latent-distance term (Mist-v2's 1e2)", low=0,
                                 high=1e6, label="Latent weight")
    target: Path | None = target_param("target pattern the UNet's noise prediction is pushed toward (default: "
                                       "Mist-v2's)")
    object_prompt: bool = object_prompt_param()


@register_method
class Mist2(DenoiserMethod):
    name = "mist2"
    title = "Mist-v2 (target UNet)"
    summary = "pushes the UNet's noise prediction on the image toward the target pattern's latent"
    paper = "Zheng et al., 2023; Mist-v2"
    Params = Mist2Params
    paper_preset = PAPER_PRESET

    def target_image(self):
        return target_or(self.params.target, mist_v2_target)

    def prepare(self, tiles: Sequence[TileInputs]) -> Loss:
        return self.loss_through(self.model, self.target_latents(tiles))

    def target_latents(self, tiles: Sequence[TileInputs]) -> torch.Tensor:
        """E(y) of each tile's target (N, 4, h, w), a posterior sample drawn from the tile's "target" stream."""
        import torch

        from mist.engine import objectives

        return torch.cat([objectives.target_latent(self.model, tile.target, [torch.Generator().manual_seed(
            tile.seed("target"))], self.precision) for tile in tiles])

    def loss_through(self, denoiser: StableDiffusion, targets: torch.Tensor) -> Loss:
        """The loss with the noise predicted by `denoiser`'s UNet (this method's model, or a surrogate of it), the
        image encoded by this method's model."""
        from mist.engine import objectives

        p, model, precision, text = self.params, self.model, self.precision, self.text

        def loss(x, generators) -> LossTerms:
            latent = model.scale_latent(objectives.posterior(model, x, precision)[0])
            noised = model.noised(latent, generators)
            # the noise the denoiser predicts (its v converted, for a v-prediction model)
            prediction = denoiser.as_noise(objectives.predict(denoiser, noised.latent, noised.timesteps, text,
                                                              precision), noised)
            if not p.fused:
                target_unet = (prediction - targets).pow(2).flatten(1).mean(1)
                return LossTerms(target_unet, {"target_unet": target_unet})
            alignment = (prediction * noised.noise).flatten(1).sum(1)
            distance = (latent - targets).pow(2).flatten(1).mean(1)
            return LossTerms(alignment - p.latent_weight * distance,
                             {"noise_alignment": alignment, "latent_distance": distance})

        return loss

    def objective_is_a_mean(self) -> bool:
        return not self.params.fused  # the target-UNet loss is a mean; the fused objective's sum needs no scale

    def algorithm(self) -> str:
        loss = "fused loss" if self.params.fused else "target-UNet loss"
        return f"Mist-v2 {loss} (Zheng et al., 2023), masked L-inf PGD, without surrogate fine-tuning"
