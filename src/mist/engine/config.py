"""ProtectConfig: every setting that shapes a protected image, validated once, in the units users know.

A run's settings are generic (the L-infinity budget, PGD steps, geometry, seed, precision) plus a protection method
(`mist.engine.methods`) with that method's own parameters. Strength and step size are given in 0..255 pixel levels as in
Mist v1.2; the engine works on images in [-1, 1], so `radius` and `step` convert them (one level is 2 / 255 there).
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any, Literal, Mapping

from mist.common.files import file_problem
from mist.common.model_names import TINY_RANDOM, model_label
from mist.engine.methods import DEFAULT_METHOD, MethodParams, get_method
from mist.engine.robust import DEFAULT_TRANSFORMS, TRANSFORMS, parts_needed
from mist.engine.shaping import SHAPES

Precision = Literal["auto", "fp32", "bf16", "fp16"]
PRECISIONS: tuple[Precision, ...] = ("auto", "fp32", "bf16", "fp16")
STARTS = ("random", "image")  # where PGD's delta starts: uniform in the budget, or 0 (`mist.engine.attack`)
SCHEDULES = ("constant", "linear")  # PGD's step: constant, or PhotoGuard's linear decay to a hundredth
# default: the settings as given; paper: each method's `paper_preset` where a setting is not given
PRESETS = ("default", "paper")
DEFAULT_PRESET = "default"
# How an ensemble (`against`) combines its members' losses, each divided by its size at the start: their sum, or the
# worst case, their maximum (`mist.engine.ensemble`).
COMBINES = ("sum", "max")


@dataclass(frozen=True)
class ProtectConfig:
    """Settings of one protection run (Mist v1.2 defaults).

    method: the protection method's name (`mist.engine.methods.list_methods`); params: its parameters, as its
    MethodParams
        dataclass or a mapping of them (None or missing ones: the method's defaults). `ProtectConfig.of` takes both
        kinds of settings by keyword: `ProtectConfig.of(steps=50, mode="textural")`.
    epsilon: L-infinity budget in pixel levels (0..255). step_size: PGD step in pixel levels. steps: PGD iterations.
    input_size: side of the square the image is resized to, or of its shorter side with keep_aspect or original_size.
    block_num: the image is protected as block_num x block_num tiles (low-VRAM mode at 2).
    mask: image whose pure-white (255) pixels mark the region to protect; None protects everything.
    precision: arithmetic of the networks' forward and backward passes (autocast, and weights stored in that type);
        losses are always float32. "auto" picks per device (see `mist.models.device.resolve_precision`).
    original_size: return the protected image at the input's own resolution and aspect. The perturbation is computed
        at the processing size with the aspect kept (as with keep_aspect), resized bicubic to the input's size, kept
        within epsilon and the mask there, and added to the input's own pixels.
    robust: names of the random transforms (`mist.engine.robust.TRANSFORMS`) the loss is averaged over at every PGD step
        (expectation over transformation, any method); empty: off. A comma-separated string is split.
    eot_samples: transforms drawn per step and image (only with robust).
    shape: "blur" reshapes the finished perturbation's spectrum (`mist.engine.shaping.shape_blur`), within epsilon and
    the
        mask; None: off.
    start: where PGD starts, "random" (uniform within epsilon, Mist v1.2) or "image" (the image itself).
    step_schedule: "constant" steps of step_size, or "linear", decaying to step_size / 100 (PhotoGuard's).
    against: further models (paths, or `tiny-random`) the same perturbation must also fool, beside the run's model:
        each runs the method on its own parts (its VAE encoder, and its denoiser and prompt conditioning for a
        denoiser-side method); not for a method that fine-tunes a surrogate. A comma-separated string is split.
    against_combine: how the members' losses, each normalised by its value at the start, are combined: "sum" or "max"
        (the worst case); see `mist.engine.ensemble`.
    text_encoders: the text encoder files (CLIP-L, OpenCLIP-G, T5-XXL) of an SD 3.x or Flux model given as a single
        file, for the methods that read the denoiser (`mist.models.text_files`). A comma-separated string is split.

    A preset is no setting of its own: `of` and `but` take `preset="paper"` and fill every setting not given with the
    method's paper preset (`Method.paper_preset`), so the resolved values are what outputs record.
    """

    method: str = DEFAULT_METHOD
    params: MethodParams | Mapping[str, Any] | None = field(default=None, compare=True)
    epsilon: float = 16
    steps: int = 100
    step_size: float = 1
    input_size: int = 512
    block_num: int = 1
    keep_aspect: bool = False
    mask: Path | None = None
    seed: int = 23
    precision: Precision = "auto"
    original_size: bool = False
    robust: tuple[str, ...] = ()
    eot_samples: int = 1
    shape: str | None = None
    start: str = "random"
    step_schedule: str = "constant"
    against: tuple[str, ...] = ()
    against_combine: str = "sum"
    text_encoders: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if self.mask is not None and not isinstance(self.mask, Path):
            object.__setattr__(self, "mask", Path(self.mask))
        object.__setattr__(self, "robust", _names(self.robust))
        object.__setattr__(self, "against", _names(self.against))
        object.__setattr__(self, "text_encoders", _names(self.text_encoders))
        method = get_method(self.method)
        if not isinstance(self.params, method.Params):
            given = dict(self.params or {})
            if isinstance(self.params, MethodParams):
                raise ValueError(f"params: {type(self.params).__name__} are not the parameters of method {self.method}")
            names = {f.name for f in fields(method.Params)}
            unknown = sorted(set(given) - names)
            if unknown:
                raise ValueError(f"{unknown[0]}: not a parameter of method {self.method} "
                                 f"(its parameters: {', '.join(sorted(names)) or 'none'})")
            object.__setattr__(self, "params", method.Params(**given))
        problems = list(self._problems())
        if problems:
            raise ValueError(problems[0])

    @classmethod
    def of(cls, **settings: Any) -> ProtectConfig:
        """Settings by keyword, run settings and the method's parameters mixed: `ProtectConfig.of(method="mist",
        steps=50, mode="textural")`."""
        return cls().but(**settings)

    def but(self, **settings: Any) -> ProtectConfig:
        """These settings with some changed by keyword, run settings and method parameters alike; a change of method
        starts from the new method's defaults. `preset="paper"` fills the settings not given with the (new) method's
        paper preset (parameters given whole, as `params`, take none of the preset's)."""
        settings = with_preset(settings, self.method)
        own = {f.name for f in fields(self)}
        general = {name: value for name, value in settings.items() if name in own}
        method = general.get("method", self.method)
        if "params" in general:
            return replace(self, **general)
        base = self.params.record() if method == self.method else {}
        base.update({name: value for name, value in settings.items() if name not in own})
        return replace(self, **general, params=base)

    def _problems(self):
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
        elif not self.aspect_kept and self.input_size % (8 * self.block_num):
            yield (f"input_size: {self.input_size} is not divisible by 8 x block_num = {8 * self.block_num} "
                   f"(try {self.input_size // (8 * self.block_num) * 8 * self.block_num})")
        if not _is_int(self.seed):
            yield f"seed: must be a whole number, got {self.seed!r}"
        if self.precision not in PRECISIONS:
            yield f"precision: must be one of {', '.join(PRECISIONS)}, got {self.precision!r}"
        if self.mask is not None and not self.mask.is_file():
            yield f"mask: {self.mask}: no such file"
        for name in self.robust:
            if name not in TRANSFORMS:
                yield f"robust: unknown transform {name!r} (choose from {', '.join(TRANSFORMS)})"
        if len(set(self.robust)) < len(self.robust):
            yield f"robust: a transform is named twice in {','.join(self.robust)}"
        if not _is_int(self.eot_samples) or self.eot_samples < 1:
            yield f"eot_samples: must be a whole number >= 1, got {self.eot_samples!r}"
        elif self.eot_samples > 1 and not self.robust:
            yield "eot_samples: needs robust transforms to average over (e.g. jpeg,resize,blur)"
        if self.shape is not None and self.shape not in SHAPES:
            yield f"shape: must be one of {', '.join(SHAPES)}, got {self.shape!r}"
        if self.start not in STARTS:
            yield f"start: must be one of {', '.join(STARTS)}, got {self.start!r}"
        if self.step_schedule not in SCHEDULES:
            yield f"step_schedule: must be one of {', '.join(SCHEDULES)}, got {self.step_schedule!r}"
        yield from self._ensemble_problems()
        for file in self.text_encoders:
            if file_problem(file):
                yield f"text_encoders: {file}: {file_problem(file)}"

    def _ensemble_problems(self):
        if self.against_combine not in COMBINES:
            yield f"against_combine: must be one of {', '.join(COMBINES)}, got {self.against_combine!r}"
        elif self.against_combine != "sum" and not self.against:
            yield "against_combine: needs models to combine (against)"
        if not self.against:
            return
        if get_method(self.method).trains_surrogate:
            yield (f"against: --method {self.method} fine-tunes a surrogate of the model between PGD steps, which an "
                   "ensemble would need once per model (each with its own copy and optimiser state); Mist runs it "
                   "against one model only")
        for spec in self.against:
            if spec != TINY_RANDOM and not Path(spec).expanduser().exists():
                yield f"against: {spec}: no such model file or folder"

    @property
    def against_labels(self) -> tuple[str, ...]:
        """How outputs name the `against` models: file or folder names, never full paths (see `model_label`)."""
        return tuple(model_label(spec if spec == TINY_RANDOM else Path(spec).expanduser()) for spec in self.against)

    @property
    def parts(self) -> frozenset[str]:
        """The model parts a run of these settings reads: its method's, and the VAE decoder for robust `vae`."""
        return get_method(self.method).parts_for(self.params) | parts_needed(self.robust)

    @property
    def aspect_kept(self) -> bool:
        """Whether images are processed with their aspect ratio kept (keep_aspect, or implied by original_size)."""
        return self.keep_aspect or self.original_size

    def processed_size(self, width: int, height: int, side_multiple: int = 8) -> tuple[int, int]:
        """(width, height) in pixels at which a width x height image is protected by a model whose sides (of each tile)
        must be multiples of `side_multiple` pixels (see `images.processed_size`)."""
        from mist.common.images import processed_size  # here, not at the top: images imports torch, config stays light

        return processed_size(width, height, self.input_size, self.block_num, self.aspect_kept, side_multiple)

    def steps_per_image(self, batch_size: int = 1) -> int:
        """PGD steps an image protected on its own takes: `steps` for each attack batch of its tiles (block_num x
        block_num of them, `batch_size` at a time); what `mist.engine.pipeline.Progress.total` counts for it."""
        return steps_per_image(self.steps, self.block_num, batch_size)

    @property
    def radius(self) -> float:
        """epsilon in [-1, 1] image units."""
        return self.epsilon / 255 * 2

    @property
    def step(self) -> float:
        """step_size in [-1, 1] image units."""
        return self.step_size / 255 * 2

    def files(self) -> dict[str, Path]:
        """Every file these settings name (the mask, a method's target...) by setting name."""
        named = {"mask": self.mask, **{name: value for name, value in vars(self.params).items()}}
        return {name: value for name, value in named.items() if isinstance(value, Path)}

    def to_json(self) -> str:
        """The settings as canonical JSON, the method's parameters beside the run's (paths as strings)."""
        values = {name: value for name, value in asdict(self).items() if name != "params"}
        values["mask"] = None if self.mask is None else str(self.mask)
        if not self.robust and self.shape is None:  # as before these settings existed: earlier outputs still resume
            for name in ("robust", "eot_samples", "shape"):
                del values[name]
        for name in ("start", "step_schedule"):  # likewise
            if values[name] == getattr(ProtectConfig, name):
                del values[name]
        if self.against:  # the models by name only: a full path would leak into published images
            values["against"] = list(self.against_labels)
        else:  # likewise, as before the setting existed
            del values["against"], values["against_combine"]
        if self.text_encoders:  # by file name only, as the models
            values["text_encoders"] = [Path(file).name for file in self.text_encoders]
        else:
            del values["text_encoders"]
        values.update(self.params.record())
        return json.dumps(values, sort_keys=True, ensure_ascii=False)


@dataclass(frozen=True)
class RunSetting:
    """How users name and give one of ProtectConfig's run settings (its default is ProtectConfig's, its checks
    `ProtectConfig._problems`): the `mist protect` flag, which the HTTP service's form also takes without its dashes;
    a one-letter flag; the kind of its value as faces type it (`mist.runner.flags.typed_value`: "int", "float",
    "bool" for a switch, "str", "file"); its choices where they are fixed; `bare`, the value the flag alone stands for;
    `metavar`, its value's name in the command line's help; one line of help with the unit; and `local`: it names
    paths on the machine that runs Mist, which only that machine's user may give (the HTTP service refuses it)."""

    flag: str
    kind: str
    help: str
    short: str | None = None
    choices: tuple[str, ...] | None = None
    bare: str | None = None
    metavar: str | None = None  # how the command line's help names the value (default: the flag's name)
    local: bool = False


# Every run setting, once; the methods' own parameters are declared with them (`mist.engine.methods.param`).
RUN_SETTINGS: dict[str, RunSetting] = {
    "method": RunSetting("--method", "str", "protection method, of those under methods below"),
    "epsilon": RunSetting("--epsilon", "int", "strength: largest change of a pixel, in levels 0..255", "-e"),
    "steps": RunSetting("--steps", "int", "PGD iterations", "-s"),
    "step_size": RunSetting("--step-size", "float", "PGD step in pixel levels"),
    "input_size": RunSetting("--input-size", "int", "side the image is resized to (shorter side with --no-resize)"),
    "block_num": RunSetting("--block-num", "int", "protect as N x N tiles; 2 = low-VRAM mode", "-b"),
    "mask": RunSetting("--mask", "file", "mask image: pure white (255) marks the region to protect"),
    "keep_aspect": RunSetting("--no-resize", "bool", "keep the aspect ratio: shorter side to --input-size, sides to "
                                                     "multiples of 8 x block-num"),
    "original_size": RunSetting("--original-size", "bool", "return the protected image at the input's own "
                                                           "resolution and aspect (the perturbation is computed with "
                                                           "the aspect kept at --input-size, then resized to the "
                                                           "input's size)"),
    "seed": RunSetting("--seed", "int", "random seed: same seed, same output"),
    "precision": RunSetting("--precision", "str", "network arithmetic; losses stay float32. auto: bf16 on GPUs and "
                                                  "on CPUs with native bf16, else fp32", choices=PRECISIONS),
    "robust": RunSetting("--robust", "str", "robust to purification: at every step average the loss over random "
                                            f"transforms of the image, a comma list of {', '.join(TRANSFORMS)}; "
                                            f"--robust alone: {','.join(DEFAULT_TRANSFORMS)}. Costs --eot-samples "
                                            "times the time per step (a vae draw: about twice that; it loads the VAE "
                                            "decoder)", bare=",".join(DEFAULT_TRANSFORMS)),
    "eot_samples": RunSetting("--eot-samples", "int", "with --robust: transforms drawn and averaged per step",
                              metavar="K"),
    "shape": RunSetting("--shape", "str", "blur: reshape the finished perturbation's spectrum like the image's, per "
                                          "region (after BlurGuard), within the same epsilon and mask",
                        choices=SHAPES),
    "start": RunSetting("--start", "str", "where PGD starts: random (uniform within epsilon) or image (the image "
                                          "itself)", choices=STARTS),
    "step_schedule": RunSetting("--step-schedule", "str", "PGD's step: constant, or linear (PhotoGuard's: decays "
                                                          "from --step-size to a hundredth of it)", choices=SCHEDULES),
    "against": RunSetting("--against", "str", "also fool these models (paths, comma-separated) with the same "
                                              "perturbation, within the same epsilon, each through the parts the "
                                              "method reads: its VAE encoder (137 MB), or with a denoiser-side "
                                              "method the whole model (SDXL: 10.3 GB in float32); each costs its "
                                              "memory and time per step; refused: aspl, mist2-lora, a member without "
                                              "a denoiser Mist runs, models that together do not fit in memory",
                          metavar="MODEL[,MODEL...]", local=True),
    "against_combine": RunSetting("--against-combine", "str", "with --against: sum the models' losses, each divided "
                                                              "by its value at the start, or take their max (the "
                                                              "worst case)", choices=COMBINES),
    "text_encoders": RunSetting("--text-encoders", "str", "an SD 3.x or Flux single file's text encoder files "
                                                          "(CLIP-L, OpenCLIP-G, T5-XXL; comma-separated), for the "
                                                          "methods that read the denoiser; each is run once at load "
                                                          "and freed", metavar="FILE[,FILE...]", local=True),
    "preset": RunSetting("--preset", "str", "paper: the chosen method's budget, steps, step size, start, schedule "
                                            "and parameters as its paper's public code runs them, where not given "
                                            "(see the README's table)", choices=PRESETS),
}
# The run settings a preset may set: the command line leaves them unset (None) unless typed.
PRESET_SETTINGS = ("epsilon", "steps", "step_size", "start", "step_schedule")


def preset_values(method: str, preset: str) -> dict[str, Any]:
    """The settings `preset` gives `method` (run settings and the method's parameters, by name): none for "default",
    the method's `paper_preset` for "paper". ValueError("preset: ...") for an unknown preset."""
    if preset not in PRESETS:
        raise ValueError(f"preset: must be one of {', '.join(PRESETS)}, got {preset!r}")
    return dict(get_method(method).paper_preset) if preset == "paper" else {}


def with_preset(settings: Mapping[str, Any], method: str = DEFAULT_METHOD) -> dict[str, Any]:
    """`ProtectConfig.of`'s keywords with `preset` replaced by the values it gives their method (`method` where they
    name none) where they give none: the same settings, spelt out (also for what reads a job's settings without
    building them, such as a server's limits)."""
    given = dict(settings)
    preset = given.pop("preset", DEFAULT_PRESET)
    return {**preset_values(given.get("method", method), preset), **given}


def steps_per_image(steps: int, block_num: int = 1, batch_size: int = 1) -> int:
    """`ProtectConfig.steps_per_image` from the settings' numbers (a job's stored settings, say)."""
    return steps * math.ceil(block_num * block_num / max(1, batch_size))


def _names(value: str | tuple[str, ...] | list[str]) -> tuple[str, ...]:
    """A list setting's names: a comma-separated string split, blanks dropped."""
    names = value.split(",") if isinstance(value, str) else value
    return tuple(name.strip() for name in names if name.strip())


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: object) -> bool:
    return (isinstance(value, (int, float)) and not isinstance(value, bool)) and math.isfinite(value)
