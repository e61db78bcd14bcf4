"""Mist v1.2 (Liang et al., "Adversarial Example Does Good: Preventing Painting Imitation from Diffusion Models via
Adversarial Examples", ICML 2023; Mist v1.2's code), the default method.

textural  L_tex = sum((E(x') - E(y))^2) over all latent elements, y the target pattern image;
semantic  L_sem = mean((eps_theta(z_t, t, c) - n)^2), z = E(x'), t ~ U{0..999}, n ~ N(0, I), c the prompt's embedding;
objective (minimised by PGD): textural L_tex, semantic -L_sem, fused L_tex - r * L_sem with r = 10 ** (w + 3).

One encoder pass per evaluation serves both losses; E(y) is computed once per tile. Fast mode replaces the semantic
gradient with the score-distillation approximation (Xue et al., ICLR 2024; `mist.engine.objectives.score_distillation`),
so the fused weight keeps its meaning and the UNet runs forward only.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from mist.engine.methods import register_method
from mist.engine.methods.base import Loss, LossTerms, MethodParams, TileInputs, param
from mist.engine.methods.common import (DenoiserMethod, mist_target, object_prompt_param, prompt, target_or,
                                       target_param)

MODES = ("textural", "semantic", "fused")
# Mist v1.2's numeric --mode codes (its README's table swaps 0 and 1; this is what its code ran).
MODE_CODES = {0: "semantic", 1: "textural", 2: "fused"}


@dataclass(frozen=True)
class MistParams(MethodParams):
    mode: str = param("fused", "textural pulls toward the target pattern; semantic confuses the denoiser; fused: both",
                      choices=MODES, label="Mode",
                      choice_labels={"textural": "Textural", "semantic": "Semantic", "fused": "Fused"})
    fused_weight: float = param(1.0, "fused mode: the semantic loss counts 10**(w+3) times", short="-w", low=-3,
                                high=10, slider=(0, 5, 0.1), advanced=True,
                                label="Balance of the two methods (fused weight)")
    fast: bool = param(False, "score-distillation semantic gradient (Xue et al. 2024): the UNet runs forward only, "
                              "about twice as fast; a different method from Mist's exact one",
                       advanced=True, label="Fast mode (a different, faster method)")
    target: Path | None = target_param("target pattern image for the textural loss (default: Mist's own)")
    object_prompt: bool = object_prompt_param()

    @property
    def semantic_weight(self) -> float:
        """r in the fused objective textural - r * semantic: 10 ** (fused_weight + 3)."""
        return 10.0 ** (self.fused_weight + 3)

    @property
    def prompt(self) -> str:
        return prompt(self.object_prompt)


@register_method
class Mist(DenoiserMethod):
    name = "mist"
    title = "Mist v1.2"
    summary = ("pulls the image's latent toward a target pattern (textural) and raises the denoising loss (semantic); "
               "the default")
    paper = "Liang et al., ICML 2023; Mist v1.2"
    Params = MistParams
    # Mist v1.2 is its paper's code (mist-project/mist, commit 7bd1aef, mist_v3.py l. 152: epsilon 16, steps 100, alpha
    # 1 in levels; l. 255: advertorch's LinfPGDAttack, random start, constant step): its defaults are its preset.
    paper_preset = {}

    @classmethod
    def parts_for(cls, params: MistParams) -> frozenset[str]:
        """Textural mode runs the VAE encoder alone (so it also runs on families whose denoiser Mist cannot load)."""
        return frozenset({"encoder"}) if params.mode == "textural" else super().parts_for(params)

    def conditioning(self) -> str | None:
        return self.params.prompt if self.params.mode != "textural" else None  # textural mode runs no UNet

    def target_image(self):
        if self.params.mode == "semantic":
            return None
        return target_or(self.params.target, mist_target)

    def prepare(self, tiles: Sequence[TileInputs]) -> Loss:
        import torch

        from mist.engine import objectives

        p, model, precision, text = self.params, self.model, self.precision, self.text
        targets = None
        if p.mode != "semantic":  # E(y) per tile, with a posterior sample of the tile's own "target" stream
            targets = torch.cat([objectives.target_latent(model, tile.target, [torch.Generator().manual_seed(
                tile.seed("target"))], precision) for tile in tiles])
        semantic_loss = objectives.score_distillation if p.fast else objectives.denoising_loss

        def loss(x, generators) -> LossTerms:
            latent = objectives.encode(model, x, generators, precision)
            terms = {}
            if p.mode != "semantic":
                terms["textural"] = objectives.squared_distance(latent, targets)
            if p.mode != "textural":
                terms["semantic"] = semantic_loss(model, latent, text, generators, precision)
            if p.mode == "textural":
                objective = terms["textural"]
            elif p.mode == "semantic":
                objective = -terms["semantic"]
            else:
                objective = terms["textural"] - p.semantic_weight * terms["semantic"]
            return LossTerms(objective, terms)

        return loss

    def objective_is_a_mean(self) -> bool:
        return self.params.mode == "semantic"  # textural and fused objectives have gradients of about 1

    def algorithm(self) -> str:
        if self.params.fast:
            return ("Mist v1.2 masked L-inf PGD with the score-distillation semantic gradient (fast mode; Xue et al., "
                    "ICLR 2024), not Mist's exact method")
        return "Mist v1.2 masked L-inf PGD (textural / semantic / fused)"
