"""Masked L-infinity PGD with sign steps (Madry et al., 2018), as Mist v1.2 runs it through advertorch.

The attack knows nothing of models: it minimises any per-image loss of x' in [-1, 1]. With the budget `radius` and
step `step` in [-1, 1] units: delta starts uniform in [-radius, radius], kept so x + delta stays in [-1, 1]; each step
evaluates the loss at x + delta * mask, moves delta by -step * sign(gradient), clips it to [-radius, radius] and again
so x + delta stays in [-1, 1]. The result is x + delta * mask, clipped to [-1, 1]: pixels outside the mask never change.

Two choices of the papers' code (`--preset paper`): `start="image"` starts delta at 0 (Diff-Protect's SDS, Mist-v2,
Anti-DreamBooth) instead of the random point, and `schedule="linear"` decays the step as PhotoGuard's `pgd` does
(MadryLab/photoguard, notebooks/demo_simple_attack_img2img.ipynb): step i (0-based) of n is
step - (step - step / 100) / n * i, from `step` down toward step / 100.

A gradient element that is exactly zero has no sign and its pixel does not move. In float32 or bf16 that practically
never happens but under `--robust` transforms that crop or clip; in fp16 it is the mark of underflow, so it is logged
as a warning when it concerns more than ZERO_SIGN_WARNING of the pixels inside the mask at any step.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Callable, Sequence

import torch

from mist.engine.config import SCHEDULES, STARTS
from mist.engine.methods import LossTerms

log = logging.getLogger(__name__)

ZERO_SIGN_WARNING = 0.01  # fraction of the masked pixel values whose gradient is exactly zero


@dataclass(frozen=True)
class StepInfo:
    """What one PGD step saw at the point it started from: values per image of the batch (the objective, and each of
    the method's named terms)."""

    step: int  # 1-based
    steps: int
    objective: list[float]
    terms: dict[str, list[float]]


class Cancelled(Exception):
    """Raised from a step callback to stop the attack; the current image is left unfinished."""


def masked_linf_pgd(
    x: torch.Tensor,
    loss: Callable[[torch.Tensor, Sequence[torch.Generator]], LossTerms],
    *,
    radius: float,
    step: float,
    steps: int,
    generators: Sequence[torch.Generator],
    mask: torch.Tensor | None = None,
    callback: Callable[[StepInfo], None] | None = None,
    loss_scale: float = 1.0,
    before_step: Callable[[int, torch.Tensor], None] | None = None,
    start: str = "random",
    schedule: str = "constant",
) -> torch.Tensor:
    """Protected images for `x` (N, 3, H, W) in [-1, 1]; `mask` (N or 1, 1, H, W) is 1 where pixels may change.
    Image i draws its random start, and the loss its random numbers, from generators[i]. The objective is multiplied
    by `loss_scale` before differentiating (the signs, all PGD uses, do not change; half-precision gradients can be
    kept clear of underflow). `before_step(index, x')`, if given, runs before step `index` (0-based) with the current
    images x + delta * mask, detached: where a method trains a surrogate between steps (`SurrogateLoss`). `start`:
    "random" (uniform in the budget) or "image" (delta 0, nothing drawn); `schedule`: "constant" or "linear" (see
    `step_size_at`)."""
    x = x.detach()
    mask = torch.ones_like(x[:, :1]) if mask is None else mask.to(x)
    delta = _start(x, radius, generators, start)
    sizes = [step_size_at(step, index, steps, schedule) for index in range(steps)]
    inside = (mask > 0).expand_as(x)
    warned = False
    for index in range(steps):
        if before_step is not None:
            before_step(index, (x + delta * mask).detach())
        delta.requires_grad_(True)
        terms = loss(x + delta * mask, generators)
        (gradient,) = torch.autograd.grad(terms.objective.sum() * loss_scale, delta)
        if not torch.isfinite(gradient).all():
            # fp16 can overflow or underflow where fp32 would not; a silent NaN sign would corrupt the image.
            raise FloatingPointError(f"step {index + 1}: the gradient is not finite; run with --precision fp32 "
                                     "(or bf16 where supported)")
        zeros = 0.0 if warned or not inside.any() else (gradient[inside] == 0).float().mean().item()
        if zeros > ZERO_SIGN_WARNING:
            log.warning("step %d: the gradient is exactly zero on %.1f%% of the protected pixel values; those pixels "
                        "are not moved (in fp16 this is underflow: run with --precision fp32, or bf16 where supported; "
                        "with --robust, a crop or a clipped value leaves pixels without a gradient)", index + 1,
                        100 * zeros)
            warned = True
        with torch.no_grad():
            delta = (delta - sizes[index] * gradient.sign()).clamp(-radius, radius)
            delta = (x + delta).clamp(-1, 1) - x
        if callback is not None:
            callback(StepInfo(index + 1, steps, _values(terms.objective),
                              {name: _values(value) for name, value in terms.terms.items()}))
    return (x + delta.detach() * mask).clamp(-1, 1)


def step_size_at(step: float, index: int, steps: int, schedule: str = "constant") -> float:
    """The step of PGD step `index` (0-based) of `steps`: `step` itself ("constant"), or PhotoGuard's linear decay
    step - (step - step / 100) / steps * index ("linear"), written as its code writes it."""
    if schedule == "constant":
        return step
    if schedule == "linear":
        return step - (step - step / 100) / steps * index
    raise ValueError(f"step_schedule: must be one of {', '.join(SCHEDULES)}, got {schedule!r}")


def _start(x: torch.Tensor, radius: float, generators: Sequence[torch.Generator], start: str) -> torch.Tensor:
    """delta's first value: uniform in [-radius, radius] from each image's generator ("random"), or 0 ("image"); kept
    so that x + delta stays in [-1, 1]."""
    if start == "image":
        return torch.zeros_like(x)
    if start != "random":
        raise ValueError(f"start: must be one of {', '.join(STARTS)}, got {start!r}")
    drawn = torch.cat([torch.rand((1, *x.shape[1:]), generator=g) for g in generators])
    delta = (drawn * 2 - 1).to(x) * radius
    return (x + delta).clamp(-1, 1) - x


def _values(values: torch.Tensor) -> list[float]:
    return values.detach().float().cpu().tolist()
