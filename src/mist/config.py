"""ProtectConfig: every setting that shapes a protected image, validated once, in the units users know.

Strength and step size are given in 0..255 pixel levels as in Mist v1.2; the engine works on images in [-1, 1], so
`radius` and `step` convert them (one level is 2 / 255 there).
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal

Mode = Literal["textural", "semantic", "fused"]
Precision = Literal["auto", "fp32", "bf16", "fp16"]
MODES: tuple[Mode, ...] = ("textural", "semantic", "fused")
PRECISIONS: tuple[Precision, ...] = ("auto", "fp32", "bf16", "fp16")
# Mist v1.2's numeric --mode codes (its README's table swaps 0 and 1; this is what its code ran).
MODE_CODES: dict[int, Mode] = {0: "semantic", 1: "textural", 2: "fused"}
STYLE_PROMPT = "a painting"
OBJECT_PROMPT = "a photo"


@dataclass(frozen=True)
class ProtectConfig:
    """Settings of one protection run (Mist v1.2 defaults).

    mode: textural pulls the image's latent toward the target pattern's; semantic raises the diffusion model's
        denoising loss; fused does both (objective: textural - 10 ** (fused_weight + 3) * semantic).
    epsilon: L-infinity budget in pixel levels (0..255). step_size: PGD step in pixel levels. steps: PGD iterations.
    input_size: side of the square the image is resized to, or of its shorter side with keep_aspect.
    block_num: the image is protected as block_num x block_num tiles (low-VRAM mode at 2).
    mask: image whose pure-white (255) pixels mark the region to protect; None protects everything.
    target: target pattern image for the textural loss; None uses the pattern shipped with Mist.
    object_prompt: condition on "a photo" (an object) instead of "a painting" (a style).
    precision: arithmetic of the networks' forward and backward passes (autocast, and weights stored in that type);
        losses are always float32. "auto" picks per device (see `mist.device.resolve_precision`).
    fast: replace the exact semantic gradient by the score-distillation approximation (Xue et al., ICLR 2024): the
        UNet runs forward only. A different method from Mist's exact one, about twice as fast in fused mode.
    """

    mode: Mode = "fused"
    epsilon: float = 16
    steps: int = 100
    step_size: float = 1
    input_size: int = 512
    fused_weight: float = 1
    block_num: int = 1
    keep_aspect: bool = False
    mask: Path | None = None
    target: Path | None = None
    object_prompt: bool = False
    seed: int = 23
    precision: Precision = "auto"
    fast: bool = False
    original_size: bool = False

    def __post_init__(self) -> None:
        for name in ("mask", "target"):
            value = getattr(self, name)
            if value is not None and not isinstance(value, Path):
                object.__setattr__(self, name, Path(value))
        problems = list(self._problems())
        if problems:
            raise ValueError(problems[0])

    def _problems(self):
        if self.mode not in MODES:
            yield f"mode: must be one of {', '.join(MODES)}, got {self.mode!r}"
        if not _is_number(self.epsilon) or not 0 <= self.epsilon <= 255:
            yield f"epsilon: must be between 0 and 255 (pixel levels), got {self.epsilon!r}"
        if not _is_int(self.steps) or self.steps < 0:
            yield f"steps: must be a whole number >= 0, got {self.steps!r}"
        if not _is_number(self.step_size) or not 0 < self.step_size <= 255:
            yield f"step_size: must be above 0 and at most 255 (pixel levels), got {self.step_size!r}"
        if not _is_int(self.block_num) or self.block_num < 1:
            yield f"block_num: must be a whole number >= 1, got {self.block_num!r}"
        elif not _is_int(self.input_size) or self.input_size < 8 * self.block_num:
            yield f"input_size: must be a whole number >= {8 * self.block_num}, got {self.input_size!r}"
        elif not self.keep_aspect and self.input_size % (8 * self.block_num):
            yield (f"input_size: {self.input_size} is not divisible by 8 x block_num = {8 * self.block_num} "
                   f"(try {self.input_size // (8 * self.block_num) * 8 * self.block_num})")
        if not _is_number(self.fused_weight) or not -3 <= self.fused_weight <= 10:
            yield f"fused_weight: must be a number between -3 and 10, got {self.fused_weight!r}"
        if not _is_int(self.seed):
            yield f"seed: must be a whole number, got {self.seed!r}"
        if self.precision not in PRECISIONS:
            yield f"precision: must be one of {', '.join(PRECISIONS)}, got {self.precision!r}"
        for name in ("mask", "target"):
            path = getattr(self, name)
            if path is not None and not path.is_file():
                yield f"{name}: {path}: no such file"

    @property
    def radius(self) -> float:
        """epsilon in [-1, 1] image units."""
        return self.epsilon / 255 * 2

    @property
    def step(self) -> float:
        """step_size in [-1, 1] image units."""
        return self.step_size / 255 * 2

    @property
    def semantic_weight(self) -> float:
        """r in the fused objective textural - r * semantic: 10 ** (fused_weight + 3)."""
        return 10.0 ** (self.fused_weight + 3)

    @property
    def prompt(self) -> str:
        return OBJECT_PROMPT if self.object_prompt else STYLE_PROMPT

    def to_json(self) -> str:
        """The settings as canonical JSON (paths as strings), recorded in every output."""
        values = asdict(self)
        for name in ("mask", "target"):
            values[name] = None if values[name] is None else str(values[name])
        return json.dumps(values, sort_keys=True, ensure_ascii=False)


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: object) -> bool:
    return (isinstance(value, (int, float)) and not isinstance(value, bool)) and math.isfinite(value)
