"""ASPL, Alternating Surrogate and Perturbation Learning (Van Le et al., "Anti-DreamBooth: Protecting users from
personalized text-to-image synthesis", ICCV 2023, Algorithm 1; code: VinAIResearch/Anti-DreamBooth, attacks/aspl.py and
attacks/aspl_lora.py).

The perturbation is learnt against a model that is itself being fine-tuned on the images, as a mimic would do. With
theta the surrogate (LoRA adapters by default, or the whole UNet), each round of `round_steps` PGD steps is:
    theta' = a clone of theta, fine-tuned for `surrogate_steps` steps on the clean images;
    `round_steps` PGD steps on x' that raise theta''s denoising loss
        L_sem(x') = mean((eps_theta'(z_t, t, c) - n) ^ 2), z = E(x') a posterior sample, t ~ U{0..999}, n ~ N(0, I)
    (objective minimised by PGD: -L_sem, AdvDM's, through the surrogate);
    theta fine-tuned for `surrogate_steps` steps on the protected images x' as they now are.
The run's `steps` are the PGD steps in all, so there are ceil(steps / round_steps) rounds; the last round's final
fine-tuning of theta is skipped, as it would change nothing in the output. Fine-tuning is SD's denoising loss, one
image per step, AdamW (`mist.engine.finetune`).

Defaults are those of the LoRA variant of the code (attacks/aspl_lora.py): rank 4, learning rate 5e-6, 10 fine-tuning
and 10 PGD steps per round (20 rounds: `--steps 200`). The paper's full-UNet runs (scripts/attack_with_aspl.sh): 3
fine-tuning and 6 PGD steps per round, learning rate 5e-7, 50 rounds; give `--surrogate full --surrogate-lr 5e-7
--surrogate-steps 3 --round-steps 6 --steps 300`. Differences from the code, on purpose: the surrogate's clean images
are the clean versions of the images being protected (the code fine-tunes on a second set of the same person's
photographs), the conditioning is Mist's "a painting" / "a photo" embedding (the code trains "a photo of sks person"
with its text encoder and a prior-preservation term on generated class images; a loaded model here keeps no text
encoder), the LoRA code fine-tunes theta itself on the clean images where Algorithm 1 fine-tunes a clone (done here),
and budget and step size are the run's (the code's: 0.05 of the [-1, 1] range, about 6 levels, in steps of 5e-3 or
1/255, without a random start).

Memory beyond the attack's own: LoRA, two sets of adapters (3.2 MB each at rank 4 on SD v1) and AdamW's state for one;
full UNet, see `mist.engine.finetune` (two float32 copies of the UNet plus AdamW's state: about 17 GB on SD v1).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

from mist.engine.methods import register_method
from mist.engine.methods.base import LossTerms, MethodParams, SurrogateLoss, TileInputs, param
from mist.engine.methods.common import DenoiserMethod, object_prompt_param
from mist.engine.methods.surrogate import (generator, lora_rank_param, options, round_steps_param, surrogate_lr_param,
                                           surrogate_steps_param)

SOURCE = "Anti-DreamBooth's LoRA code"

# ASPL as the paper's script runs it, VinAIResearch/Anti-DreamBooth (commit c97e891) scripts/attack_with_aspl.sh
# l. 28-36: the whole UNet fine-tuned (attacks/aspl.py), 50 rounds (max_train_steps) of 3 fine-tuning steps
# (max_f_train_steps) and 6 PGD steps (max_adv_train_steps): 300 PGD steps; learning rate 5e-7; pgd_alpha 5e-3 and
# pgd_eps 5e-2 on the [-1, 1] scale (attacks/aspl.py normalises to it, l. 366): 0.6375 and 6.375 levels. The attack
# starts from the image itself (aspl.py l. 698-703; no random draw) with a constant step (l. 568-573). Cost: 300 PGD
# steps plus 300 full-UNet fine-tuning steps per batch, and about 17 GB more memory on SD v1 (see above); with
# `--surrogate lora` give `--surrogate-lr 5e-6` too (the preset's 5e-7 is for the whole UNet).
PAPER_PRESET = {"epsilon": 6.375, "step_size": 0.6375, "steps": 300, "start": "image", "step_schedule": "constant",
                "surrogate": "full", "surrogate_lr": 5e-7, "surrogate_steps": 3, "round_steps": 6}


@dataclass(frozen=True)
class ASPLParams(MethodParams):
    surrogate: str = param("lora", "what of the surrogate is fine-tuned: LoRA adapters, or the whole UNet (about 17 GB "
                                   "more memory on SD v1)", choices=("lora", "full"), advanced=True,
                           choice_labels={"lora": "LoRA adapters", "full": "Whole UNet"}, label="Surrogate")
    round_steps: int = round_steps_param(10, SOURCE)
    surrogate_steps: int = surrogate_steps_param(10, SOURCE)
    surrogate_lr: float = surrogate_lr_param(5e-6, "Anti-DreamBooth: 5e-6 for LoRA, 5e-7 for the whole UNet")
    lora_rank: int = lora_rank_param()
    object_prompt: bool = object_prompt_param()


class ASPLLoss(SurrogateLoss):
    """-L_sem through the current clone theta' of the surrogate, which `before_step` trains at each round's start."""

    def __init__(self, method: ASPL, tiles: Sequence[TileInputs]) -> None:
        import torch

        from mist.engine.finetune import Surrogate

        p = method.params
        self.method = method
        self.clean = torch.cat([tile.clean for tile in tiles])
        self.generator = generator(tiles)
        self.theta = Surrogate(method.model, options(p.surrogate, p.lora_rank, p.surrogate_lr), self.generator,
                               method.precision)
        self.current = self.theta  # theta' (before the first round: theta itself, untrained)

    def before_step(self, step: int, x) -> None:
        p, text = self.method.params, self.method.text
        if step % p.round_steps:
            return
        self.current = None  # a full UNet clone is large: let it go before training theta
        if step > 0:
            self.theta.train(x, text, p.surrogate_steps, self.generator)
        self.current = self.theta.clone()
        self.current.train(self.clean, text, p.surrogate_steps, self.generator)

    def __call__(self, x, generators) -> LossTerms:
        from mist.engine import objectives

        method, model = self.method, self.current.model
        latent = objectives.encode(model, x, generators, method.precision)
        semantic = objectives.denoising_loss(model, latent, method.text, generators, method.precision)
        return LossTerms(-semantic, {"semantic": semantic})


@register_method
class ASPL(DenoiserMethod):
    name = "aspl"
    title = "Anti-DreamBooth (ASPL)"
    summary = ("raises the denoising loss of a surrogate that is fine-tuned on the images between rounds of the "
               "attack, as a mimic would fine-tune")
    paper = "Van Le et al., ICCV 2023"
    Params = ASPLParams
    paper_preset = PAPER_PRESET
    trains_surrogate = True

    def prepare(self, tiles: Sequence[TileInputs]) -> ASPLLoss:
        return ASPLLoss(self, tiles)

    def objective_is_a_mean(self) -> bool:
        return True  # the denoising loss alone, as AdvDM's

    def algorithm(self) -> str:
        p = self.params
        what = "LoRA" if p.surrogate == "lora" else "whole-UNet"
        return (f"ASPL (Van Le et al., ICCV 2023), {what} surrogate fine-tuned {p.surrogate_steps} steps every "
                f"{p.round_steps} PGD steps, masked L-inf PGD")
