"""One perturbation against several models at once (`--against`): an ensemble of the run's model and the `against`
models, each with the run's method on its own model, inside one L-inf budget and one PGD loop.

Each member's loss is that of the method on its own model: its target encoded through its own VAE, its latent with
its own channels, scale and shift, and for a denoiser-side method (Mist's semantic and fused modes, AdvDM, SDS,
Mist-v2) its own denoiser, noise schedule, prediction type and prompt conditioning (the parts the method's
`parts_for` names). The members' raw losses are of very different sizes (a 16-channel SD 3.x latent's distances are
several times a 4-channel one's, PID's terms start near zero, a v-prediction or flow model's denoising loss is of
another size than a noise predictor's), and PGD follows only the sign of the combined objective's gradient: a plain
sum would follow whichever member has the largest gradient and leave the others where they were. So each member's
objective is divided by its magnitude at the first evaluation (the PGD start point, one value per image; 1 where that
is zero, as PID's is when PGD starts at the image itself; a mean of draws for a denoiser-side method, below), which
makes every member start near +1 or -1 and count alike; then

    sum  objective = sum over members of L_m(x') / |L_m(start)|   (the default: every member's relative progress)
    max  objective = max over members of L_m(x') / |L_m(start)|   (the worst case: each step serves the member that
                                                                   has moved least)

The sign step follows the gradient of that combination. Each member's raw objective is also reported as a term
`loss@LABEL` (LABEL: its model's file or folder name), so progress lines and outputs show every member's loss at the
start and the end of the attack.

The same rule serves the denoiser losses, with one change. All the division decides is each member's weight in the
gradient's sign, and a member's own size is the scale its gradient has, whatever its family (a v-prediction or flow
model's loss is of another size than a noise predictor's). But a denoiser loss is a new draw of (t, n) at every
evaluation, and one draw is a poor measure of its size: on the tiny test models one member's first draw was a fifth of
its later ones, which made it weigh five times the others for the whole run. So when the method reads a denoiser, each
member's scale is the mean of |L_m(start)| over SCALE_DRAWS (8) evaluations at the start point, without gradients,
drawing from a stream of their own per image ("scale"), so the attack's own draws are those it would make without
them; this costs 8 forward passes per member once per attack (under 3% of a 100-step run). The weights then carry
about a third of one draw's noise (1 / sqrt(8)), are fixed for the run, and every step serves every member. An
encoder-side method's loss draws only the posterior sample, whose noise is small: its scale stays the first value.
Two limits remain: an objective that can pass through zero (Mist's fused textural - r * semantic where r times the
semantic loss is about the textural sum: small images) has no relative progress, and a member whose draws start near
zero outweighs the others; and "max" compares ratios whose draws change at every step, so with denoiser losses it
follows the draws more than the sum does (the sum is the default).

Random numbers: the members' losses are evaluated in order, the run's model first, then the `against` models as
given, and each draws from the same generator per image (its posterior sample, then t and n where its method draws
them) after the member before it; the scales' draws come after, member by member, from the "scale" stream. The same
seed and settings give the same bytes, and adding or moving a member changes the draws of the members after it.

Methods that fine-tune a surrogate between steps (a `SurrogateLoss`: `Method.trains_surrogate`, Mist-v2's LoRA loop and
ASPL) are refused with `against` (by `ProtectConfig`): the ensemble would need one surrogate per member, each with its
own copy of the denoiser or adapters and optimiser state, fine-tuned between the steps; their losses without the
fine-tuning (mist2, advdm) run.

Members are read from disk once per process and kept, so that a folder of images, a batch after batch, a service's
next job or a Ray worker's next image do not read them again. A VAE encoder alone (an encoder-side method) is kept in
float32 on the CPU for the life of the process, 137 MB per member (34.2M parameters for SD 1.x, 2.x and SDXL, 34.3M
for SD 3.x and Flux); a Protector on another device or in half precision holds its own converted copy beside it while
it lives (69 MB in bf16), and on the CPU in float32 uses the kept weights themselves. A member with its denoiser is
large (SDXL's UNet is 10.3 GB in float32, Flux's transformer about 48 GB), so it is handed to the Protector to
convert in place, as the run's own model is (`mist.runner.jobs.ModelCache`): no second copy is ever held, a later run in
float32 or in the same precision uses it as it is, a run in another precision reads it again; and only one ensemble's
denoiser members are kept at a time (a run with other members, or with none, lets them go). Before any member is read,
`mist.engine.ensemble_checks` refuses a member that cannot run the method and a set of models that cannot fit in memory.
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
SCALE_DRAWS = 8  # draws of a denoiser member's loss averaged for its scale (see the module's notes)
_KEPT: dict[tuple[str, frozenset[str]], StableDiffusion] = {}  # by resolved path and parts: see the module's notes
_KEPT_LOCK = threading.Lock()


@dataclass(frozen=True)
class Member:
    """One further model of an ensemble: how outputs name it, and the run's method on its model."""

    label: str
    method: Method


def source_label(source: str | Path) -> str:
    """How outputs name a model from its source (`tiny-random`, or a path): its file or folder name."""
    return model_label(str(source) if str(source) == TINY_RANDOM else Path(source).expanduser())


def load_members(config: ProtectConfig, device: torch.device, precision: str, low_memory: bool) -> list[Member]:
    """The config's `against` models, each with the parts the run's method reads (the VAE encoder alone for an
    encoder-side method; with the denoiser and prompt conditioning for a denoiser-side one), on `device` in `precision`
    (`low_memory`: with gradient checkpointing), each with the run's method ready to prepare its loss. Kept denoiser
    members this run does not use are let go first. ValueError naming a model that cannot be read or used."""
    method = get_method(config.method)
    parts = method.parts_for(config.params)
    dtype = PRECISION_DTYPES[precision]
    with _KEPT_LOCK:
        wanted = {(str(resolve_model(spec)), parts) for spec in config.against}
        for key in [key for key in _KEPT if key[1] != ENCODER_ONLY and key not in wanted]:
            del _KEPT[key]
    members = []
    for spec in config.against:
        if parts == ENCODER_ONLY:  # small: this Protector's copy, the kept weights left as they are
            model = member_model(spec, parts).placed(device, dtype)
        else:  # large: converted in place, one copy in memory
            model = member_model(spec, parts, dtype).placed(device, dtype, in_place=True)
        model.set_gradient_checkpointing(low_memory)
        members.append(Member(source_label(spec), method(config.params, model, precision)))
    return members


def member_model(spec: str | Path, parts: frozenset[str] = ENCODER_ONLY,
                 dtype: torch.dtype = torch.float32) -> StableDiffusion:
    """The model `spec` names with `parts` (the VAE encoder alone by default): read on the first call for its resolved
    path and parts in this process and kept for the next ones, read again when the kept one was converted to another
    type than float32 or `dtype` (an SD 3.x or Flux transformer is read in `dtype`, as the run's own is). ValueError or
    ModelNotFoundError naming a model that cannot be read."""
    key = (str(resolve_model(spec)), parts)
    with _KEPT_LOCK:
        kept = _KEPT.get(key)
        if kept is None or kept.dtype not in (torch.float32, dtype):
            _KEPT[key] = kept = load_model(spec, parts=parts, dtype=dtype)
        return kept


def kept_member(spec: str | Path, parts: frozenset[str]) -> StableDiffusion | None:
    """The kept model `spec` names with `parts`, or None when none is kept (nothing is read)."""
    with _KEPT_LOCK:
        return _KEPT.get((str(resolve_model(spec)), parts))


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


def ensemble_loss(losses: Sequence[tuple[str, Loss]], combine: str,
                  scale_generators: Sequence[torch.Generator] | None = None) -> Loss:
    """The combined loss of the members' `losses` (label, loss), the first the run's own model: their objectives
    normalised by their magnitudes at the first call and summed (`combine` "sum") or maxed ("max"). With
    `scale_generators` (one per image, a stream of their own) each magnitude is the mean over SCALE_DRAWS draws from
    them instead of the first call's own value (see the module's notes). Its terms are the first member's own terms,
    and each member's raw objective as `term_name(label)`."""
    labels = unique_labels([label for label, _ in losses])
    scales: list[torch.Tensor] = []

    def loss(x: torch.Tensor, generators: Sequence[torch.Generator]) -> LossTerms:
        values = [member(x, generators) for _, member in losses]
        if not scales and scale_generators is None:
            scales.extend(_magnitude(value.objective) for value in values)
        elif not scales:
            scales.extend(_mean_magnitude(member, x, scale_generators) for _, member in losses)
        ratios = torch.stack([value.objective / scale for value, scale in zip(values, scales, strict=True)])
        objective = ratios.sum(0) if combine == "sum" else ratios.max(0).values
        terms = dict(values[0].terms)
        terms.update({term_name(label): value.objective for label, value in zip(labels, values, strict=True)})
        return LossTerms(objective, terms)

    return loss


def draws_scale(config: ProtectConfig) -> bool:
    """Whether an ensemble of `config` normalises by the mean of several draws: its method reads a denoiser, whose
    loss is a new draw of (t, n) at every evaluation."""
    method = get_method(config.method)
    return method.parts_for(config.params) != ENCODER_ONLY


def _magnitude(objective: torch.Tensor) -> torch.Tensor:
    """|objective| per image, detached; 1 where it is zero (nothing to normalise by)."""
    size = objective.detach().abs()
    return torch.where(size > 0, size, torch.ones_like(size))


@torch.no_grad()
def _mean_magnitude(member: Loss, x: torch.Tensor, generators: Sequence[torch.Generator]) -> torch.Tensor:
    """The mean over SCALE_DRAWS evaluations of |member(x)| per image, drawing from `generators`; 1 where zero."""
    total = sum(member(x.detach(), generators).objective.abs() for _ in range(SCALE_DRAWS))
    return _magnitude(total / SCALE_DRAWS)
