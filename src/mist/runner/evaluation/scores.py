"""Scores of one mimicry of one image after one purification, the worst case over purifications, the calibrated
verdict, and the headline for the set.

The question is whether the protection still changes what a mimic gets: the mimicry output of the protected image is
compared with the mimicry output of the clean image (same purification, same seed), in pixels (RMSE, SSIM) and in
the latent space, and measured against the target pattern's latent: `target_pull` is 0 when the protected output is
as far from the target as the clean one, and 1 when it is as close as the mimicry of the target pattern itself.

How unlike is unlike enough is measured in the same run, not chosen by hand. Mimicry is random: the same clean image
mimicked with another seed comes out different too, and any small change of the input moves the output. So each
image and mimicry gets two references: the *noise floor*, the SSIM between the clean image's mimicries with two
seeds, and the *random control*, the SSIM between the mimicries of the clean image and of the clean image plus random
noise of the protection's own size (its L-infinity, in random signs), same seed. The protection holds where the
protected image's mimicry is less like the clean one's than both references are: it changes the mimicry more than
chance and more than any perturbation of its size would. Its *effect* is how far below the noise floor it lands
(`floor_ssim - ssim`; above 0: beyond chance).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Sequence

import numpy as np
import torch

from mist.runner.evaluation import metrics
from mist.runner.evaluation.words import word

_TINY = 1e-12
BOOTSTRAP_DRAWS = 2000  # resamplings of the images for the headline's interval
CONFIDENCE = 0.95


@dataclass(frozen=True)
class Score:
    """One image x purification x mimicry. Distances between the mimicry outputs of the protected and the clean
    image: `rmse_levels` (0..255 levels), `ssim` (1: identical), `latent_mse` (mean squared difference of the final
    scaled latents). Target: mean squared latent distance of each output to the target pattern's latent (posterior
    mean), of the target pattern's own mimicry (`target_mse_reference`), and `target_pull` (None without a target or
    when clean and target outputs coincide). `loss_clean` / `loss_protected`: the method's objective (what its attack
    minimises) on the purified clean and protected images. `floor_ssim`: SSIM of the clean image's mimicries with two
    seeds; `control_ssim`: SSIM of the mimicries of the clean image and of the clean image plus random noise of the
    protection's size (both without purification, the same for every purification; None where not measured).
    `holds`: ssim below both (and below the optional absolute threshold). `clip_similarity`: cosine of the CLIP
    image embeddings of the two mimicry outputs (1: the same to CLIP; None without a CLIP tower); it informs, the
    verdict does not use it."""

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
    floor_ssim: float | None = None
    control_ssim: float | None = None
    clip_similarity: float | None = None

    @property
    def effect(self) -> float | None:
        """How far below the noise floor the protected mimicry's SSIM lands (above 0: beyond chance)."""
        return None if self.floor_ssim is None else self.floor_ssim - self.ssim

    def as_dict(self) -> dict:
        return asdict(self) | {"effect": self.effect}


@dataclass(frozen=True)
class References:
    """One image's references for one mimicry: the noise floor and the random control (SSIMs; None: not measured)."""

    floor_ssim: float | None = None
    control_ssim: float | None = None

    def holds(self, ssim: float, threshold: float | None) -> bool:
        below = [bound for bound in (self.floor_ssim, self.control_ssim, threshold) if bound is not None]
        return all(ssim < bound for bound in below)


def score(image: str, purification: str, mimicry: str, strength: float | None, clean_out: torch.Tensor,
          protected_out: torch.Tensor, clean_latent: torch.Tensor, protected_latent: torch.Tensor,
          target_latent: torch.Tensor | None, reference_latent: torch.Tensor | None, losses: tuple[float, float],
          references: References = References(), threshold: float | None = None,
          clip_similarity: float | None = None) -> Score:
    """The scores of one mimicry of one image (tensors (1, ...); outputs in [-1, 1], latents scaled);
    `clip_similarity` as measured by the caller (`mist.runner.evaluation.clip`)."""
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
                 loss_clean=losses[0], loss_protected=losses[1], holds=references.holds(similarity, threshold),
                 floor_ssim=references.floor_ssim, control_ssim=references.control_ssim,
                 clip_similarity=clip_similarity)


@dataclass(frozen=True)
class SetScore:
    """One purification x mimicry over the whole set: `cmmd`, the CLIP maximum mean discrepancy (x 1000) between the
    clean and the protected images' mimicry outputs (0: alike as sets; None without a CLIP tower or with one image);
    the mean BRISQUE and NIQE of the clean and of the protected outputs (no-reference quality, higher = worse; None
    where not run); the mean CLIP-IQA of each (0..1, higher = better; None without a whole CLIP model). See
    `mist.runner.evaluation.clip` and `quality`."""

    purification: str
    mimicry: str
    cmmd: float | None = None
    brisque_clean: float | None = None
    brisque_protected: float | None = None
    niqe_clean: float | None = None
    niqe_protected: float | None = None
    clip_iqa_clean: float | None = None
    clip_iqa_protected: float | None = None

    def as_dict(self) -> dict:
        return asdict(self)


def worst_cases(scores: Sequence[Score]) -> list[Score]:
    """Per image and mimicry, the score of the purification that leaves the least of the protection (the highest
    SSIM between the two mimicry outputs): what a mimic who tries them all gets."""
    worst: dict[tuple[str, str], Score] = {}
    for s in scores:
        key = (s.image, s.mimicry)
        if key not in worst or s.ssim > worst[key].ssim:
            worst[key] = s
    return list(worst.values())


def verdict(scores: Sequence[Score], labels: dict[str, str], identical: bool, lang: str = "en") -> str:
    """One line for one image in `lang` (`words.LANGUAGES`): whether the protection held under every purification
    and mimicry, or the weakest case that broke it, with the references it was judged against. `labels`: purification
    name -> human name; `identical`: the protected image equals the original."""
    if identical:
        return word(lang, "identical")
    if not scores:
        return word(lang, "not_measured")
    broken = [s for s in scores if not s.holds]
    weakest = max(broken or scores, key=lambda s: s.ssim)
    mimicry = word(lang, "strength", strength=f"{weakest.strength:g}") if weakest.strength is not None \
        else weakest.mimicry
    where = word(lang, "where", purification=labels.get(weakest.purification, weakest.purification), mimicry=mimicry)
    references = [f"{word(lang, name)} {value:.2f}" for name, value in (("seed_to_seed", weakest.floor_ssim),
                                                                         ("random_noise", weakest.control_ssim))
                  if value is not None]
    against = word(lang, "references", references=", ".join(references)) if references else ""
    if not broken:
        return word(lang, "survived", where=where, ssim=f"{weakest.ssim:.2f}", references=against)
    more = word(lang, "more_broken", count=len(broken) - 1) if len(broken) > 1 else ""
    return word(lang, "broken_by", where=where, ssim=f"{weakest.ssim:.2f}", references=against, more=more)


@dataclass(frozen=True)
class Headline:
    """The set's answer for one mimicry, after the strongest purifier tried: per image the purification whose
    mimicry came closest to the clean one's (`worst`, the most common of those named), the mean effect over images
    (noise floor minus SSIM) with a bootstrap interval over images, how many images held, and the decision: "holds"
    (the interval lies above 0 and most images held), "broken" (it lies below 0) or "unclear"."""

    mimicry: str
    worst: str
    effect: float
    low: float
    high: float
    images: int
    held: int
    decision: str

    def as_dict(self) -> dict:
        return asdict(self)


def headlines(scores: Sequence[Score], seed: int = 0) -> list[Headline]:
    """One Headline per mimicry, from the worst case of each image (`worst_cases`); none where no score has a floor.
    With one image there is no interval (low = high = its effect) and the decision is that image's."""
    out = []
    worst = worst_cases(scores)
    for mimicry in dict.fromkeys(s.mimicry for s in worst):
        own = [s for s in worst if s.mimicry == mimicry and s.effect is not None]
        if not own:
            continue
        effects = np.array([s.effect for s in own])
        low, high = _bootstrap(effects, seed)
        held = sum(s.holds for s in own)
        if len(own) == 1:
            decision = "holds" if held else "broken"
        else:
            decision = "holds" if low > 0 and 2 * held > len(own) else "broken" if high < 0 else "unclear"
        names = [s.purification for s in own]
        out.append(Headline(mimicry, max(dict.fromkeys(names), key=names.count), float(effects.mean()), low, high,
                            len(own), held, decision))
    return out


def _bootstrap(values: np.ndarray, seed: int) -> tuple[float, float]:
    """The CONFIDENCE percentile interval of the mean of `values`, resampling them BOOTSTRAP_DRAWS times."""
    if len(values) < 2:
        return float(values.mean()), float(values.mean())
    draws = np.random.default_rng(seed).integers(0, len(values), size=(BOOTSTRAP_DRAWS, len(values)))
    means = values[draws].mean(axis=1)
    tail = (1 - CONFIDENCE) / 2 * 100
    return float(np.percentile(means, tail)), float(np.percentile(means, 100 - tail))
