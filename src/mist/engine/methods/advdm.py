"""AdvDM (Liang et al., "Adversarial Example Does Good: Preventing Painting Imitation from Diffusion Models via
Adversarial Examples", ICML 2023) and its opposite-sign variant AdvDM(-) (Xue et al., "Toward Effective Protection
against Diffusion-Based Mimicry through Score Distillation", ICLR 2024, whose code runs it as `mode=advdm g_mode=-`).

L_sem = mean((eps_theta(z_t, t, c) - n)^2), z = E(x') a posterior sample, t ~ U{0..999}, n ~ N(0, I), c the prompt's
embedding (the diffusion model's training loss, exact gradient through the UNet and the encoder);
objective (minimised by PGD): `advdm` -L_sem (the denoising loss is raised), `advdm-` +L_sem (it is lowered).

Random numbers per image, from its generator: the posterior sample, then t, then n. Defaults: the prompt is Mist's
"a painting" (Xue et al.'s code conditions on "a photo": `--object`); budget and steps are the run's settings, and
Mist's defaults (16 levels, 100 steps of 1 level) are those of Xue et al.'s code (configs/attack/base.yaml).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Sequence

from mist.engine.methods import register_method
from mist.engine.methods.base import Loss, LossTerms, MethodParams, TileInputs
from mist.engine.methods.common import DenoiserMethod, object_prompt_param


@dataclass(frozen=True)
class AdvDMParams(MethodParams):
    object_prompt: bool = object_prompt_param()


@register_method
class AdvDM(DenoiserMethod):
    name = "advdm"
    title = "AdvDM"
    summary = "raises the diffusion model's denoising loss on the image (the semantic loss alone)"
    paper = "Liang et al., ICML 2023"
    Params = AdvDMParams
    # AdvDM's code is Mist's semantic mode, and Xue et al.'s runs AdvDM(-) through the same advertorch attack
    # (xavihart/Diff-Protect code/diff_mist.py l. 284) with Mist's 16 levels, 100 steps of 1 (configs/attack/base.yaml):
    # the defaults are the papers' presets (prompts aside: Mist's are kept).
    paper_preset = {}
    # +1: PGD raises the denoising loss; -1: it lowers it.
    direction: ClassVar[float] = 1.0

    def prepare(self, tiles: Sequence[TileInputs]) -> Loss:
        from mist.engine import objectives

        model, precision, text, direction = self.model, self.precision, self.text, self.direction

        def loss(x, generators) -> LossTerms:
            latent = objectives.encode(model, x, generators, precision)
            semantic = objectives.denoising_loss(model, latent, text, generators, precision)
            return LossTerms(-direction * semantic, {"semantic": semantic})

        return loss

    def objective_is_a_mean(self) -> bool:
        return True  # a denoising-loss mean alone, as Mist's semantic mode


@register_method
class AdvDMMinus(AdvDM):
    name = "advdm-"
    title = "AdvDM(-)"
    summary = "lowers the diffusion model's denoising loss on the image (AdvDM with the opposite sign)"
    paper = "Xue et al., ICLR 2024"
    direction = -1.0
