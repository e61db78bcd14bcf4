"""One perturbation against several models' VAE encoders at once (`--against`): an ensemble of the run's model and
the `against` models, each with the run's method on its own VAE, inside one L-inf budget and one PGD loop.

Each member's loss is that of the method on its own model: its target encoded through its own VAE, its latent with
its own channels, scale and shift. The members' raw losses are of very different sizes (a 16-channel SD 3.x latent's
distances are several times a 4-channel one's, and PID's terms start near zero), and PGD follows only the sign of the
combined objective's gradient: a plain sum would follow whichever member has the largest gradient and leave the others
where they were. So each member's objective is divided by its magnitude at the first evaluation (the PGD start point,
one value per image; 1 where that is zero, as PID's is when PGD starts at the image itself), which makes every member
start at +1 or -1 and count alike; then

    sum  objective = sum over members of L_m(x') / |L_m(start)|   (the default: every member's relative progress)
    max  objective = max over members of L_m(x') / |L_m(start)|   (the worst case: each step serves the member that
                                                                   has moved least)

The sign step follows the gradient of that combination. Each member's raw objective is also reported as a term
`loss@LABEL` (LABEL: its model's file or folder name), so progress lines and outputs show every member's loss at the
start and the end of the attack.

Each member's VAE encoder is read from disk once per process (`member_encoder`) and kept, in float32 on the CPU, for
the next Protectors: a folder of images, a batch after batch, a service's next job do not read it again. That costs
its float32 size for the life of the process, 137 MB per member (34.2M parameters for SD 1.x, 2.x and SDXL, 34.3M for
SD 3.x and Flux); a Protector on another device or in half precision holds its own converted copy beside it while it
lives (69 MB in bf16), and on the CPU in float32 uses the kept weights themselves.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch

from mist.common.model_names import TINY_RANDOM, model_label
from mist.engine.config import ProtectConfig
from mist.engine.methods import Loss, LossTerms, Method, get_method
from mist.engine.objectives import PRECISION_DTYPES
from mist.models import StableDiffusion, load_model, resolve_model

ENCODER_ONLY = frozenset({"encoder"})
_KEPT: dict[tuple[str, frozenset[str]], StableDiffusion] = {}  # by resolved path and parts: see the module's notes
_KEPT_LOCK = threading.Lock()


@dataclass(frozen=True)
class Member:
    """One further model of an ensemble: how outputs name it, and the run's method on its VAE encoder."""

    label: str
    method: Method


def source_label(source: str | Path) -> str:
    """How outputs name a model from its source (`tiny-random`, or a path): its file or folder name."""
    return model_label(str(source) if str(source) == TINY_RANDOM else Path(source).expanduser())


def load_members(config: ProtectConfig, device: torch.device, precision: str, low_memory: bool) -> list[Member]:
    """The config's `against` models, the VAE encoder of each alone (about 34M parameters, 137 MB in float32, for
    SD 1.x to Flux), on `device` in `precision` (`low_memory`: with gradient checkpointing), each with the run's
    method ready to prepare its loss. ValueError naming a model that cannot be read or used."""
    method = get_method(config.method)
    members = []
    for spec in config.against:
        model = member_encoder(spec).placed(device, PRECISION_DTYPES[precision])
        model.set_gradient_checkpointing(low_memory)  # on this Protector's copy of the modules, not the kept ones
        members.append(Member(source_label(spec), method(config.params, model, precision)))
    return members


def member_encoder(spec: str | Path) -> StableDiffusion:
    """The VAE encoder alone of the model `spec` names, float32 on the CPU: read on the first call for its resolved
    path in this process and kept for the next ones (never changed: callers place a copy). ValueError or
    ModelNotFoundError naming a model that cannot be read."""
    key = (str(resolve_model(spec)), ENCODER_ONLY)
    with _KEPT_LOCK:
        if key not in _KEPT:
            _KEPT[key] = load_model(spec, parts=ENCODER_ONLY)
        return _KEPT[key]


def term_name(label: str) -> str:
    """The name of a member's raw objective among the reported terms."""
    return f"loss@{label}"


def unique_labels(labels: Sequence[str]) -> list[str]:
    """`labels` with a second (third...) use of a name marked `#2` (`#3`...), so that each member has its own term."""
    seen: dict[str, int] = {}
    out = []
    for label in labels:
        seen[label] = seen.get(label, 0) + 1
        out.append(label if seen[label] == 1 else f"{label}#{seen[label]}")
    return out


def ensemble_loss(losses: Sequence[tuple[str, Loss]], combine: str) -> Loss:
    """The combined loss of the members' `losses` (label, loss), the first the run's own model: their objectives
    normalised by their magnitudes at the first call and summed (`combine` "sum") or maxed ("max"). Its terms are the
    first member's own terms, and each member's raw objective as `term_name(label)`."""
    labels = unique_labels([label for label, _ in losses])
    scales: list[torch.Tensor] = []

    def loss(x: torch.Tensor, generators: Sequence[torch.Generator]) -> LossTerms:
        values = [member(x, generators) for _, member in losses]
        if not scales:
            scales.extend(_magnitude(value.objective) for value in values)
        ratios = torch.stack([value.objective / scale for value, scale in zip(values, scales, strict=True)])
        objective = ratios.sum(0) if combine == "sum" else ratios.max(0).values
        terms = dict(values[0].terms)
        terms.update({term_name(label): value.objective for label, value in zip(labels, values, strict=True)})
        return LossTerms(objective, terms)

    return loss


def _magnitude(objective: torch.Tensor) -> torch.Tensor:
    """|objective| per image, detached; 1 where it is zero (nothing to normalise by)."""
    size = objective.detach().abs()
    return torch.where(size > 0, size, torch.ones_like(size))
