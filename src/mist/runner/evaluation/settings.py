"""The settings of `mist evaluate`, checked when made (a light module: the command line checks its options before
PyTorch is imported)."""

from __future__ import annotations

import math
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Mapping

from mist.runner.flags import fields_as_flags, typed_value

from mist.common.files import file_problem
from mist.common.prompts import OBJECT_PROMPT, STYLE_PROMPT
from mist.runner.evaluation.mimicry import DEFAULT_STRENGTHS
from mist.runner.evaluation.purify import DEFAULT_PURIFY, X4_UPSCALER_REPOSITORY, parse_purifications

# SD's schedule has 1000 training timesteps and DDIM offsets its first one by 1 past the step spacing: 1000 steps
# would ask for timestep 1000, past the schedule's end.
MAX_DDIM_STEPS = 999


@dataclass(frozen=True)
class EvaluationSettings:
    """How `mist evaluate` runs. purify: comma list of purifications (`mist.runner.evaluation.purify`); strengths:
    img2img strengths (0..1); steps: DDIM steps of the full schedule; guidance: classifier-free guidance scale; prompt:
    "a painting" or "a photo"; seed: of every random draw (the same for clean and protected images); method: whose loss
    scores the purified images (None: the method the protected images record, else Mist's); ssim_threshold: an
    absolute bound the SSIM of the protected and clean mimicry outputs must also stay below for the protection to hold
    (None: none; the verdict is calibrated against references measured in the run, see `scores`). lora: also run LoRA
    fine-tuning mimicry (`mimicry.LoraMimicry`) with `lora_steps` training steps of rank `lora_rank` at
    `lora_learning_rate` (the defaults of diffusers' LoRA training scripts: rank 4, 1e-4; 500 steps). ti: also run
    textual inversion mimicry (`mimicry.TextualInversionMimicry`) with `ti_steps` optimiser steps (of 4 images each)
    at `ti_learning_rate` (the run documented with diffusers' textual inversion example: 3000 steps, 2e-3). clip: the
    folder of a CLIP vision tower for CLIP similarity and CMMD (None: the SD diffusers folder's safety_checker, if
    any; see `mist.runner.evaluation.clip`). upscaler: the diffusers folder of the SD x4 upscaler that `upscale`
    purifies through (None: the Hugging Face cache's snapshot). text_encoders: comma list of the text encoder files
    an SD 3.x or Flux single file mimics with (as `mist protect --text-encoders` takes them)."""

    purify: str = DEFAULT_PURIFY
    strengths: tuple[float, ...] = DEFAULT_STRENGTHS
    steps: int = 50
    guidance: float = 7.5
    prompt: str = STYLE_PROMPT
    seed: int = 0
    method: str | None = None
    ssim_threshold: float | None = None
    lora: bool = False
    lora_steps: int = 500
    lora_rank: int = 4
    lora_learning_rate: float = 1e-4
    ti: bool = False
    ti_steps: int = 3000
    ti_learning_rate: float = 2e-3
    clip: str | None = None
    upscaler: str | None = None
    text_encoders: str | None = None

    @property
    def text_encoder_files(self) -> tuple[str, ...]:
        """The `text_encoders` files, in the order given."""
        return tuple(name.strip() for name in (self.text_encoders or "").split(",") if name.strip())

    def __post_init__(self) -> None:
        parse_purifications(self.purify)
        if not all(0 < s <= 1 for s in self.strengths):
            raise ValueError(f"strengths: each must be above 0 and at most 1, got {list(self.strengths)}")
        if not 1 <= self.steps <= MAX_DDIM_STEPS:
            raise ValueError(f"steps: must be 1 to {MAX_DDIM_STEPS} (DDIM steps of SD's 1000-step schedule), got "
                             f"{self.steps}")
        if not (math.isfinite(self.guidance) and self.guidance >= 1):
            raise ValueError(f"guidance: must be at least 1, got {self.guidance}")
        if self.prompt not in (STYLE_PROMPT, OBJECT_PROMPT):
            raise ValueError(f"prompt: must be {STYLE_PROMPT!r} or {OBJECT_PROMPT!r}, got {self.prompt!r}")
        if self.lora_steps < 1 or self.lora_rank < 1:
            raise ValueError(f"lora_steps, lora_rank: must be at least 1, got {self.lora_steps}, {self.lora_rank}")
        if not (math.isfinite(self.lora_learning_rate) and self.lora_learning_rate > 0):
            raise ValueError(f"lora_learning_rate: must be above 0, got {self.lora_learning_rate}")
        if self.ti_steps < 1:
            raise ValueError(f"ti_steps: must be at least 1, got {self.ti_steps}")
        if not (math.isfinite(self.ti_learning_rate) and self.ti_learning_rate > 0):
            raise ValueError(f"ti_learning_rate: must be above 0, got {self.ti_learning_rate}")
        if self.ssim_threshold is not None and not 0 < self.ssim_threshold <= 1:
            raise ValueError(f"ssim_threshold: must be above 0 and at most 1, got {self.ssim_threshold}")
        if self.clip is not None and not Path(self.clip).expanduser().is_dir():
            raise ValueError(f"clip: {self.clip}: not a folder (give a CLIP vision tower saved by transformers)")
        if self.upscaler is not None and not (Path(self.upscaler) / "model_index.json").is_file():
            problem = "no such folder" if not Path(self.upscaler).exists() else "no model_index.json in it"
            raise ValueError(f"upscaler: {self.upscaler}: {problem}; give the diffusers folder of "
                             f"{X4_UPSCALER_REPOSITORY}")
        for name in self.text_encoder_files:
            if file_problem(name):
                raise ValueError(f"text_encoders: {name}: {file_problem(name)}")
        if self.method is not None:
            from mist.engine.methods import get_method

            get_method(self.method)


@dataclass(frozen=True)
class Option:
    """How a face takes one evaluation setting: the `mist evaluate` flag (the HTTP service's form field is that name
    without its dashes: `ssim-threshold`), the kind of its value (`mist.runner.flags.typed_value`'s, or "list": a comma
    list of numbers), one line of help, and whether it names a path on the machine that runs the evaluation (`local`:
    the HTTP service refuses it from its clients)."""

    flag: str
    kind: str
    help: str
    local: bool = False  # a path on the machine that runs Mist: only its own user may give it, not an HTTP client


# Every evaluation setting, once, for the command line and the HTTP service (defaults: EvaluationSettings').
EVALUATION_OPTIONS: dict[str, Option] = {
    "purify": Option("--purify", "str", "comma list of purifications KIND[:VALUE] among {kinds}; '' for none"),
    "strengths": Option("--strengths", "list", "img2img strengths, comma list of numbers in (0, 1]"),
    "steps": Option("--steps", "int", "DDIM steps of the full schedule"),
    "guidance": Option("--guidance", "float", "classifier-free guidance scale"),
    "prompt": Option("--prompt", "str", f"img2img prompt: {STYLE_PROMPT!r} or {OBJECT_PROMPT!r}"),
    "seed": Option("--seed", "int", "seed of every random draw"),
    "method": Option("--method", "str", "method whose loss scores the purified images (default: the one the "
                                        "protected images record)"),
    "ssim_threshold": Option("--ssim-threshold", "float", "also require the SSIM of the protected and clean "
                                                          "mimicry outputs to be below this for the protection to "
                                                          "hold (the verdict is calibrated in the run against the "
                                                          "mimicry's seed-to-seed variation and a same-size random "
                                                          "noise; this adds a fixed bound)"),
    "lora": Option("--lora", "bool", "also run LoRA fine-tuning mimicry: adapters trained on the clean set and on "
                                     "the protected set, then images sampled from the prompt with the same seeds "
                                     "(needs peft; slow: see README)"),
    "lora_steps": Option("--lora-steps", "int", "LoRA training steps"),
    "lora_rank": Option("--lora-rank", "int", "LoRA rank"),
    "lora_learning_rate": Option("--lora-lr", "float", "LoRA learning rate"),
    "ti": Option("--ti", "bool", "also run textual inversion mimicry: a new word learnt from the clean set and from "
                                 "the protected set, then images sampled from a prompt holding it with the same seeds "
                                 "(slow: see README)"),
    "ti_steps": Option("--ti-steps", "int", "textual inversion training steps (4 images each)"),
    "ti_learning_rate": Option("--ti-lr", "float", "textual inversion learning rate"),
    "clip": Option("--clip", "str", "folder of a CLIP vision tower (transformers CLIPVisionModelWithProjection / "
                                    "CLIPModel, or an SD diffusers folder's safety_checker) for the CLIP similarity "
                                    "and CMMD of the mimicry outputs (default: the SD folder's safety_checker, if "
                                    "any; never downloaded)", local=True),
    "upscaler": Option("--upscaler", "str", "diffusers folder of the SD x4 upscaler for the `upscale` purification "
                                            "(default: its snapshot in the Hugging Face cache; never downloaded)",
                       local=True),
    "text_encoders": Option("--text-encoders", "str", "text encoder files (CLIP-L, OpenCLIP-G, T5-XXL; "
                                                      "comma-separated) of an SD 3.x or Flux single file given as "
                                                      "the model", local=True),
}
EVALUATION_FLAGS = {name: option.flag for name, option in EVALUATION_OPTIONS.items()}


def evaluation_settings(given: Mapping[str, Any], names: Mapping[str, str] | None = None) -> EvaluationSettings:
    """EvaluationSettings from values as a face received them (command-line words, form fields, JSON values), each
    typed by its option's kind; missing ones take their defaults. ValueError in one line that names the setting as
    `names` (setting -> what its user typed) or else as its flag does."""
    with fields_as_flags({**EVALUATION_FLAGS, **(names or {})}):
        unknown = sorted(set(given) - set(EVALUATION_OPTIONS))
        if unknown:
            raise ValueError(f"{unknown[0]}: not a setting of an evaluation")
        values = {}
        for name, value in given.items():
            try:
                values[name] = _typed(value, EVALUATION_OPTIONS[name].kind)
            except ValueError as exc:
                raise ValueError(f"{name}: {exc}") from None
        return EvaluationSettings(**values)


def _typed(value: Any, kind: str) -> Any:
    if value is None:  # a JSON null: the setting's "none" (an optional one), checked by EvaluationSettings
        return None
    if kind == "list":
        return _numbers(value)
    if kind == "str":
        if value is not None and not isinstance(value, str):
            raise ValueError(f"must be text, got {value!r}")
        return value
    return typed_value(value, kind)


def settings_record(settings: EvaluationSettings) -> dict[str, Any]:
    """The settings as JSON values, for a queued evaluation (`EvaluationSettings(**record)` makes them again)."""
    return {item.name: list(value) if isinstance(value := getattr(settings, item.name), tuple) else value
            for item in fields(settings)}


def _numbers(value: Any) -> tuple[float, ...]:
    parts = value.split(",") if isinstance(value, str) else value if isinstance(value, (list, tuple)) else None
    if parts is None:
        raise ValueError(f"not a comma list of numbers: {value!r}")
    try:
        return tuple(typed_value(part, "float") for part in parts if not isinstance(part, str) or part.strip())
    except ValueError:
        raise ValueError(f"not a comma list of numbers: {value!r}") from None
