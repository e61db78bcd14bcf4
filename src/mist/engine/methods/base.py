"""What a protection method is: its parameters, the model parts it needs, and a loss that PGD minimises.

A method is one class in one module of this package, registered with `mist.engine.methods.register_method`. Everything
else (the attack loop, tiles and seeds, the command line's flags, the web UI's controls, the PNG metadata) is generic
and reads what the method declares here. Method modules import PyTorch inside their functions, not at the top: the
command line lists methods and checks their parameters before it loads PyTorch.
"""

from __future__ import annotations

import math
from dataclasses import MISSING, dataclass, field, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, ClassVar, Mapping, Sequence

if TYPE_CHECKING:
    import torch
    from PIL import Image

    from mist.models import StableDiffusion

# The parts of Stable Diffusion a method can ask for; the loader reads only those.
PARTS = frozenset({"encoder", "unet", "text_encoder"})


@dataclass(frozen=True)
class LossTerms:
    """A loss evaluated on a batch of N images: `objective` (N,) is what PGD minimises, `terms` the named values a
    user sees in progress lines and reports (each (N,); e.g. "textural", "semantic")."""

    objective: torch.Tensor
    terms: dict[str, torch.Tensor]


Loss = Callable[["torch.Tensor", Sequence["torch.Generator"]], LossTerms]


@dataclass(frozen=True)
class TileInputs:
    """What a method may prepare from for one tile of one image: the clean tile `clean` (1, 3, h, w) in [-1, 1] on the
    device, the matching tile of the method's target image (None when it has none), and `seed(stream)`, the seed of
    this tile's random stream named `stream` (reproducible from the run's seed and the image's pixels)."""

    clean: torch.Tensor
    target: torch.Tensor | None
    seed: Callable[[str], int]


class SurrogateLoss:
    """A loss whose networks are trained while the attack runs (a surrogate fine-tuned between rounds of PGD steps,
    as in Anti-DreamBooth's ASPL). `prepare` returns one where a method needs it; the pipeline then calls
    `before_step(step, x)` before each PGD step `step` (0-based), with the images being protected as they stand, x'
    (N, 3, H, W) in [-1, 1] without a graph, and the method trains there. Plain loss functions never see the hook."""

    def __call__(self, x: torch.Tensor, generators: Sequence[torch.Generator]) -> LossTerms:
        raise NotImplementedError

    def before_step(self, step: int, x: torch.Tensor) -> None:
        raise NotImplementedError


def param(default: Any, help: str, *, label: str | None = None, flag: str | None = None, short: str | None = None,
          choices: Sequence[Any] | None = None, choice_labels: Mapping[Any, str] | None = None,
          low: float | None = None, high: float | None = None, slider: tuple[float, float, float] | None = None,
          advanced: bool = False, file: bool = False) -> Any:
    """A method parameter: a dataclass field with what every face needs to show and check it.

    help: one sentence with the unit. label: a short name for the web UI (default: from the field's name); its
    translations live with the web UI (`mist.faces.webui.text`). flag: the command-line flag (default
    `--field-name`); short: a one-letter flag too. choices: the allowed values, choice_labels their names in the web
    UI; low, high: the allowed range (inclusive) of a number; slider: (minimum, maximum, step) of the web UI's slider
    for it, where that differs from (low, high); advanced: shown under "Advanced" in the web UI; file: the value is a
    path to an existing file (or None). The kind (number, whole number, switch) comes from the default.
    """
    kind = "file" if file else "choice" if choices else type(default).__name__
    if kind not in ("file", "choice", "bool", "int", "float"):
        raise TypeError(f"param: unsupported default {default!r}")
    metadata = {"help": help, "label": label, "flag": flag, "short": short,
                "choices": tuple(choices) if choices else None, "choice_labels": dict(choice_labels or {}),
                "low": low, "high": high, "slider": slider, "advanced": advanced, "kind": kind}
    return field(default=default, metadata=metadata)


@dataclass(frozen=True)
class ParamSpec:
    """One declared parameter, as the faces see it."""

    name: str
    default: Any
    kind: str  # "float", "int", "bool", "choice" or "file"
    help: str
    label: str
    flag: str
    short: str | None
    choices: tuple[Any, ...] | None
    choice_labels: dict[Any, str]  # web UI names of the choices (English; missing ones: the value itself)
    low: float | None
    high: float | None
    slider: tuple[float, float, float] | None
    advanced: bool


def param_specs(params_class: type) -> list[ParamSpec]:
    """The declared parameters of a method's parameter class, in order."""
    specs = []
    for item in fields(params_class):
        meta = item.metadata
        if "kind" not in meta:
            raise TypeError(f"{params_class.__name__}.{item.name}: declare it with mist.engine.methods.param")
        label = meta["label"] or item.name.replace("_", " ").capitalize()
        default = None if item.default is MISSING else item.default
        specs.append(ParamSpec(item.name, default, meta["kind"], meta["help"], label,
                               meta["flag"] or "--" + item.name.replace("_", "-"), meta["short"], meta["choices"],
                               meta["choice_labels"], meta["low"], meta["high"], meta["slider"], meta["advanced"]))
    return specs


@dataclass(frozen=True)
class MethodParams:
    """Base of every method's parameter dataclass: checks each value against its declaration, once, with one-line
    errors that begin with the parameter's name (`fused_weight: must be ...`)."""

    def __post_init__(self) -> None:
        for spec in param_specs(type(self)):
            value = getattr(self, spec.name)
            if spec.kind == "file" and value is not None and not isinstance(value, Path):
                value = Path(value)
                object.__setattr__(self, spec.name, value)
            problem = _problem(spec, value)
            if problem:
                raise ValueError(f"{spec.name}: {problem}")

    def record(self) -> dict[str, Any]:
        """The values as JSON types (paths as strings), for the settings an output records."""
        return {spec.name: str(v) if isinstance(v := getattr(self, spec.name), Path) else v
                for spec in param_specs(type(self))}


def _problem(spec: ParamSpec, value: Any) -> str | None:
    if spec.kind == "choice":
        return None if value in spec.choices else f"must be one of {', '.join(map(str, spec.choices))}, got {value!r}"
    if spec.kind == "bool":
        return None if isinstance(value, bool) else f"must be true or false, got {value!r}"
    if spec.kind == "file":
        return None if value is None or value.is_file() else f"{value}: no such file"
    whole = spec.kind == "int"
    number = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if not number or (whole and not isinstance(value, int)):
        return f"must be a {'whole number' if whole else 'number'}, got {value!r}"
    if (spec.low is not None and value < spec.low) or (spec.high is not None and value > spec.high):
        low = "" if spec.low is None else f" from {spec.low:g}"
        high = "" if spec.high is None else f" to {spec.high:g}"
        return f"must be{low}{high}, got {value!r}"
    return None


class Method:
    """A protection method: subclass it in a module of its own, set the class attributes, implement `prepare`, and
    register it with `mist.engine.methods.register_method`.

    name: what users type (`--method NAME`). title: a short name for the web UI. summary: one sentence on
    what it attacks. paper: the paper it implements. Params: its MethodParams dataclass. parts: the model parts its
    loss runs through (a subset of PARTS; only those are loaded). paper_preset: the settings its paper's public code
    runs it with, where they differ from Mist's defaults or to state them (`--preset paper`): run settings (epsilon and
    step_size in 0..255 levels, steps, start, step_schedule) and its own parameters, by name, each figure with its
    source in a comment; empty: the defaults are the paper's. trains_surrogate: its loss fine-tunes a copy of the
    model between PGD steps (a `SurrogateLoss`), so it attacks one model alone (an ensemble refuses it).

    An instance is made per run by the Protector, with the model already placed on the device and the run's
    precision ("fp32", "bf16" or "fp16"); prompt embeddings and other per-run work belong in __init__.
    """

    name: ClassVar[str]
    title: ClassVar[str]
    summary: ClassVar[str]
    paper: ClassVar[str]
    Params: ClassVar[type[MethodParams]]
    parts: ClassVar[frozenset[str]]
    paper_preset: ClassVar[Mapping[str, Any]] = {}
    trains_surrogate: ClassVar[bool] = False

    def __init__(self, params: MethodParams, model: StableDiffusion, precision: str) -> None:
        self.params = params
        self.model = model
        self.precision = precision

    def target_image(self) -> Image.Image | None:
        """The image the pipeline resizes and tiles beside each artwork for `TileInputs.target`; None: no target."""
        return None

    @classmethod
    def parts_for(cls, params: MethodParams) -> frozenset[str]:
        """The model parts a run with `params` reads: `parts`, unless a setting makes the loss need fewer."""
        return frozenset(cls.parts)

    def prepare(self, tiles: Sequence[TileInputs]) -> Loss:
        """The loss of a batch of these tiles (in this order), to be called with the perturbed tiles and one generator
        per tile."""
        raise NotImplementedError

    def objective_is_a_mean(self) -> bool:
        """Whether the objective is a mean over the latent's elements alone (a denoising loss, say), whose gradient
        carries a factor 2 / N that fp16 flushes to zero (see `mist.engine.objectives.FP16_DENOISING_LOSS_SCALE`)."""
        return False

    def loss_scale(self) -> float:
        """The constant the objective is multiplied by before it is differentiated (only its sign is used by PGD):
        in fp16, FP16_DENOISING_LOSS_SCALE for an objective that is a mean (`objective_is_a_mean`), else 1."""
        from mist.engine.objectives import FP16_DENOISING_LOSS_SCALE

        return FP16_DENOISING_LOSS_SCALE if self.precision == "fp16" and self.objective_is_a_mean() else 1.0

    def algorithm(self) -> str:
        """What outputs record as the algorithm that made them: the method's title and paper by default."""
        return f"{self.title} ({self.paper}), masked L-inf PGD"
