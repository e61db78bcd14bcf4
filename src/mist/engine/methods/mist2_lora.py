"""Mist-v2's full loop (Zheng et al., "Understanding and Improving Adversarial Attacks on Latent Diffusion Model",
2023; code: psyker-team/mist-v2, attacks/mist.py): its target-UNet attack (`mist2`) run against a LoRA surrogate that
is fine-tuned on the protected images between rounds.

Each round is `round_steps` PGD steps on `mist2`'s objective (target-UNet loss, or the fused one with `--fused`) with
the noise predicted by the surrogate's UNet, then `surrogate_steps` steps of LoRA fine-tuning on the images as they now
are (SD's denoising loss, one image per step, AdamW; `mist.engine.finetune`). The adapters start at zero (B = 0), so the
first round attacks the model itself; they persist from round to round, each round with a fresh optimiser, as in the
code. The run's `steps` are the PGD steps in all: ceil(steps / round_steps) rounds; no fine-tuning follows the last.

Defaults are the code's (attacks/mist.py's arguments): 30 PGD steps and 10 fine-tuning steps per round, LoRA rank 4,
learning rate 1e-4 (its 5 rounds: `--steps 150`). Differences from the code, on purpose: no prior-preservation term
(the code adds one on generated class images with weight 0.1), the conditioning is Mist's "a painting" / "a photo"
embedding (the code's "a picture"), the encoder is the model's own (not a surrogate's), and budget and step size are
the run's. Memory beyond `mist2`'s: the adapters (3.2 MB at rank 4 on SD v1) and their AdamW state.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

from mist.engine.methods import register_method
from mist.engine.methods.base import Loss, LossTerms, SurrogateLoss, TileInputs
from mist.engine.methods.mist2 import Mist2, Mist2Params
from mist.engine.methods.surrogate import (generator, lora_rank_param, options, round_steps_param, surrogate_lr_param,
                                           surrogate_steps_param)

SOURCE = "Mist-v2"


@dataclass(frozen=True)
class Mist2LoRAParams(Mist2Params):
    round_steps: int = round_steps_param(30, SOURCE)
    surrogate_steps: int = surrogate_steps_param(10, SOURCE)
    surrogate_lr: float = surrogate_lr_param(1e-4, "Mist-v2: 1e-4")
    lora_rank: int = lora_rank_param()


class Mist2LoRALoss(SurrogateLoss):
    """mist2's loss through the LoRA surrogate, which `before_step` fine-tunes on x' after each round."""

    def __init__(self, method: Mist2LoRA, tiles: Sequence[TileInputs]) -> None:
        from mist.engine.finetune import Surrogate

        p = method.params
        self.method = method
        self.generator = generator(tiles)
        self.surrogate = Surrogate(method.model, options("lora", p.lora_rank, p.surrogate_lr), self.generator,
                                   method.precision)
        self.loss: Loss = method.loss_through(self.surrogate.model, method.target_latents(tiles))

    def before_step(self, step: int, x) -> None:
        p = self.method.params
        if step > 0 and step % p.round_steps == 0:
            self.surrogate.train(x, self.method.text, p.surrogate_steps, self.generator)

    def __call__(self, x, generators) -> LossTerms:
        return self.loss(x, generators)


@register_method
class Mist2LoRA(Mist2):
    name = "mist2-lora"
    title = "Mist-v2 (LoRA surrogate)"
    summary = ("Mist-v2's target-UNet attack against a LoRA surrogate fine-tuned on the images between rounds")
    paper = "Zheng et al., 2023; Mist-v2"
    Params = Mist2LoRAParams
    trains_surrogate = True

    def prepare(self, tiles: Sequence[TileInputs]) -> Mist2LoRALoss:
        return Mist2LoRALoss(self, tiles)

    def algorithm(self) -> str:
        p = self.params
        loss = "fused loss" if p.fused else "target-UNet loss"
        return (f"Mist-v2 {loss} (Zheng et al., 2023), masked L-inf PGD, LoRA surrogate (rank {p.lora_rank}) "
                f"fine-tuned {p.surrogate_steps} steps every {p.round_steps} PGD steps")
