"""Score distillation: SDS(+), SDS(-) and SDST (Xue et al., "Toward Effective Protection against Diffusion-Based
Mimicry through Score Distillation", ICLR 2024; code: xavihart/Diff-Protect).

The denoising loss L_sem = mean((eps_theta(z_t, t, c) - n)^2) (z = E(x') a posterior sample, t ~ U{0..999},
n ~ N(0, I)) is raised (sign +) or lowered (sign -) with the score-distillation gradient: at the latent it is
(eps_theta - n) itself, the UNet's Jacobian left out, so the UNet runs forward only (about half the cost of AdvDM).
The paper found SDS(-) the stronger and cheaper protection, so `-` is the default (as in the code's base.yaml).
SDST adds Mist's textural term L_tex = sum((z - E(y))^2), y the target pattern (by default the code's, the "MIST"
lettering Mist-v2 uses too: assets/mist_v2_target.png), with the SDS gradient weighted w times (the code's
target_rate, default 5):
    objective (minimised by PGD)  sign +: -L_sds          sign -: +L_sds
    SDST                          sign +: L_tex - w L_sds  sign -: L_tex + w L_sds
where L_sds's value is L_sem and its latent gradient (eps_theta - n) as in the code (`objectives.score_distillation`
with `unit=True`); only the gradient's signs drive PGD, so the objective's printed value is indicative.

One encoder pass serves both terms (the code encodes twice, with two posterior samples). Random numbers per image, from
its generator: the posterior sample, then t, then n; E(y) draws its sample from the tile's "target" stream. The prompt
is Mist's "a painting" (the code's default is "a photo": `--object`); budget and steps are the run's settings (the
code's defaults, 16 levels and 100 steps of 1 level, are Mist's; the code starts from the image: `--preset paper`).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from mist.engine.methods import register_method
from mist.engine.methods.base import Loss, LossTerms, MethodParams, TileInputs, param
from mist.engine.methods.common import DenoiserMethod, mist_v2_target, object_prompt_param, target_or, target_param

SIGNS = ("-", "+")

# SDS as xavihart/Diff-Protect (commit ac5ffdb) runs it: epsilon 16, steps 100, alpha 1 in levels
# (configs/attack/base.yaml l. 2, 3, 8; code/diff_mist.py l. 220-221 turn them into [-1, 1] units), sign "-"
# (base.yaml l. 9); no random start (code/attacks.py l. 170 random_start=False, l. 183-187; diff_mist.py l. 293 keeps
# it) and a constant step (attacks.py l. 209). Mist's defaults but for the start.
PAPER_PRESET = {"epsilon": 16, "step_size": 1, "steps": 100, "start": "image", "step_schedule": "constant",
                "sign": "-"}


@dataclass(frozen=True)
class SDSParams(MethodParams):
    sign: str = param("-", "-: lower the denoising loss (SDS-, the paper's strongest); +: raise it (SDS+)",
                      choices=SIGNS, label="Sign")
    textural: bool = param(False, "also pull the image's latent toward the target pattern (SDST)",
                           label="Textural target (SDST)")
    sds_weight: float = param(5.0, "SDST: the SDS gradient counts this many times against the textural one "
                                   "(Diff-Protect's target_rate)", low=0, high=1e6, label="SDS weight")
    target: Path | None = target_param("SDST's target pattern (default: Mist-v2's, as Xue et al.'s code)")
    object_prompt: bool = object_prompt_param()


@register_method
class SDS(DenoiserMethod):
    name = "sds"
    title = "Score distillation (SDS)"
    summary = ("lowers (or raises) the denoising loss with the score-distillation gradient: the UNet runs forward "
               "only; optional textural target (SDST)")
    paper = "Xue et al., ICLR 2024"
    Params = SDSParams
    paper_preset = PAPER_PRESET

    def target_image(self):
        return target_or(self.params.target, mist_v2_target) if self.params.textural else None

    def prepare(self, tiles: Sequence[TileInputs]) -> Loss:
        import torch

        from mist.engine import objectives

        p, model, precision, text = self.params, self.model, self.precision, self.text
        direction = 1.0 if p.sign == "+" else -1.0  # +1: raise the denoising loss
        targets = None
        if p.textural:
            targets = torch.cat([objectives.target_latent(model, tile.target, [torch.Generator().manual_seed(
                tile.seed("target"))], precision) for tile in tiles])

        def loss(x, generators) -> LossTerms:
            latent = objectives.encode(model, x, generators, precision)
            sds = objectives.score_distillation(model, latent, text, generators, precision, unit=True)
            if targets is None:
                return LossTerms(-direction * sds, {"sds": sds})
            textural = objectives.squared_distance(latent, targets)
            return LossTerms(textural - direction * p.sds_weight * sds, {"textural": textural, "sds": sds})

        return loss

    def algorithm(self) -> str:
        variant = f"SDS({self.params.sign})" + ("T" if self.params.textural else "")
        return f"{variant} (Xue et al., ICLR 2024), masked L-inf PGD with the score-distillation gradient"
