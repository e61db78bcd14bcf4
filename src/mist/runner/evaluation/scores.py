"""Scores of one mimicry of one image after one purification, the worst case over purifications, and the verdict.

The question is whether the protection still changes what a mimic gets: the mimicry output of the protected image is
compared with the mimicry output of the clean image (same purification, same seed), in pixels (RMSE, SSIM) and in
the latent space, and measured against the target pattern's latent: `target_pull` is 0 when the protected output is
as far from the target as the clean one, and 1 when it is as close as the mimicry of the target pattern itself.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Sequence

import torch

from mist.runner.evaluation import metrics
from mist.runner.evaluation.settings import SSIM_THRESHOLD
_TINY = 1e-12


@dataclass(frozen=True)
class Score:
    """One image x purification x mimicry. Distances between the mimicry outputs of the protected and the clean
    image: `rmse_levels` (0..255 levels), `ssim` (1: identical), `latent_mse` (mean squared difference of the final
    scaled latents). Target: mean squared latent distance of each output to the target pattern's latent (posterior
    mean), of the target pattern's own mimicry (`target_mse_reference`), and `target_pull` (None without a target or
    when clean and target outputs coincide). `loss_clean` / `loss_protected`: the method's objective (what its attack
    minimises) on the purified clean and protected images."""

    image: str
    purification: str
    mimicry: str
    strength: float | None
    rmse_levels: float
    ssim: float
    latent_mse: float
    target_mse_protected: float | None
    target_mse_clean: float | None
    target_mse_reference: float | None
    target_pull: float | None
    loss_clean: float
    loss_protected: float
    holds: bool

    def as_dict(self) -> dict:
        return asdict(self)


def score(image: str, purification: str, mimicry: str, strength: float | None, clean_out: torch.Tensor,
          protected_out: torch.Tensor, clean_latent: torch.Tensor, protected_latent: torch.Tensor,
          target_latent: torch.Tensor | None, reference_latent: torch.Tensor | None, losses: tuple[float, float],
          threshold: float = SSIM_THRESHOLD) -> Score:
    """The scores of one mimicry of one image (tensors (1, ...); outputs in [-1, 1], latents scaled)."""
    similarity = metrics.ssim(protected_out, clean_out)[0].item()
    to_target = {"target_mse_protected": None, "target_mse_clean": None, "target_mse_reference": None,
                 "target_pull": None}
    if target_latent is not None and reference_latent is not None:
        protected_d = metrics.mean_squared(protected_latent, target_latent)[0].item()
        clean_d = metrics.mean_squared(clean_latent, target_latent)[0].item()
        reference_d = metrics.mean_squared(reference_latent, target_latent)[0].item()
        span = clean_d - reference_d
        to_target = {"target_mse_protected": protected_d, "target_mse_clean": clean_d,
                     "target_mse_reference": reference_d,
                     "target_pull": (clean_d - protected_d) / span if abs(span) > _TINY else None}
    return Score(image=image, purification=purification, mimicry=mimicry, strength=strength,
                 rmse_levels=metrics.rmse_levels(protected_out, clean_out)[0].item(), ssim=similarity,
                 latent_mse=metrics.mean_squared(protected_latent, clean_latent)[0].item(), **to_target,
                 loss_clean=losses[0], loss_protected=losses[1], holds=similarity < threshold)


def worst_cases(scores: Sequence[Score]) -> list[Score]:
    """Per image and mimicry, the score of the purification that leaves the least of the protection (the highest
    SSIM between the two mimicry outputs): what a mimic who tries them all gets."""
    worst: dict[tuple[str, str], Score] = {}
    for s in scores:
        key = (s.image, s.mimicry)
        if key not in worst or s.ssim > worst[key].ssim:
            worst[key] = s
    return list(worst.values())


def verdict(scores: Sequence[Score], labels: dict[str, str], identical: bool,
            threshold: float = SSIM_THRESHOLD) -> str:
    """One line for one image: whether the protection held under every purification and mimicry, or the weakest
    case that broke it. `labels`: purification name -> human name; `identical`: the protected image equals the
    original."""
    if identical:
        return "no change: the protected image equals the original"
    if not scores:
        return "not measured"
    weakest = max(scores, key=lambda s: s.ssim)
    where = f"{labels.get(weakest.purification, weakest.purification)} at {_mimicry_words(weakest)}"
    if weakest.holds:
        return (f"protection survived every purification and mimicry (weakest: {where}, SSIM {weakest.ssim:.2f} < "
                f"{threshold:.2f})")
    broken = sum(1 for s in scores if not s.holds)
    more = f"; {broken - 1} more case(s) broken" if broken > 1 else ""
    return f"protection broken by {where} (SSIM {weakest.ssim:.2f} >= {threshold:.2f}){more}"


def _mimicry_words(s: Score) -> str:
    return f"strength {s.strength:g}" if s.strength is not None else s.mimicry
