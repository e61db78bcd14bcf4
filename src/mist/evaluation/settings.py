"""The settings of `mist evaluate`, checked when made (a light module: the command line checks its options before
PyTorch is imported)."""

from __future__ import annotations

import math
from dataclasses import dataclass

from ..prompts import OBJECT_PROMPT, STYLE_PROMPT
from .mimicry import DEFAULT_STRENGTHS
from .purify import DEFAULT_PURIFY, parse_purifications

SSIM_THRESHOLD = 0.8  # protection holds where the two mimicry outputs are less alike than this


@dataclass(frozen=True)
class EvaluationSettings:
    """How `mist evaluate` runs. purify: comma list of purifications (`mist.evaluation.purify`); strengths: img2img
    strengths (0..1); steps: DDIM steps of the full schedule; guidance: classifier-free guidance scale; prompt: "a
    painting" or "a photo"; seed: of every random draw (the same for clean and protected images); method: whose loss
    scores the purified images (None: the method the protected images record, else Mist's); ssim_threshold: below
    it, the mimicry outputs of protected and clean images count as different (the protection holds). lora: also run
    LoRA fine-tuning mimicry (`mimicry.LoraMimicry`) with `lora_steps` training steps of rank `lora_rank` at
    `lora_learning_rate` (the defaults of diffusers' LoRA training scripts: rank 4, 1e-4; 500 steps)."""

    purify: str = DEFAULT_PURIFY
    strengths: tuple[float, ...] = DEFAULT_STRENGTHS
    steps: int = 50
    guidance: float = 7.5
    prompt: str = STYLE_PROMPT
    seed: int = 0
    method: str | None = None
    ssim_threshold: float = SSIM_THRESHOLD
    lora: bool = False
    lora_steps: int = 500
    lora_rank: int = 4
    lora_learning_rate: float = 1e-4

    def __post_init__(self) -> None:
        parse_purifications(self.purify)
        if not all(0 < s <= 1 for s in self.strengths):
            raise ValueError(f"strengths: each must be above 0 and at most 1, got {list(self.strengths)}")
        if self.steps < 1:
            raise ValueError(f"steps: must be at least 1, got {self.steps}")
        if not (math.isfinite(self.guidance) and self.guidance >= 1):
            raise ValueError(f"guidance: must be at least 1, got {self.guidance}")
        if self.prompt not in (STYLE_PROMPT, OBJECT_PROMPT):
            raise ValueError(f"prompt: must be {STYLE_PROMPT!r} or {OBJECT_PROMPT!r}, got {self.prompt!r}")
        if self.lora_steps < 1 or self.lora_rank < 1:
            raise ValueError(f"lora_steps, lora_rank: must be at least 1, got {self.lora_steps}, {self.lora_rank}")
        if not (math.isfinite(self.lora_learning_rate) and self.lora_learning_rate > 0):
            raise ValueError(f"lora_learning_rate: must be above 0, got {self.lora_learning_rate}")
        if not 0 < self.ssim_threshold <= 1:
            raise ValueError(f"ssim_threshold: must be above 0 and at most 1, got {self.ssim_threshold}")
        if self.method is not None:
            from ..methods import get_method

            get_method(self.method)
