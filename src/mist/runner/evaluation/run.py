"""The evaluation run: pair the originals with their protected versions, measure how visible the protection is, purify
both, run every mimicry on both with the same seed, score, and hand everything to the report.

The model is loaded once, offline, through the job runner's `ModelCache` (with its VAE decoder), after every input
has been read and every option checked.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from statistics import fmean
from typing import TYPE_CHECKING, Any, Callable, Sequence

from PIL import Image

from mist.common import images
from mist.engine.attack import Cancelled
from mist.runner.estimate import Estimate
from mist.runner.evaluation.pairs import Pair, match_pairs
from mist.runner.evaluation.purify import NONE, Context, Purification, parse_purifications
from mist.runner.evaluation.resume import Finished, evaluation_key
from mist.runner.evaluation.scores import (Headline, References, Score, SetScore, headlines, score, verdict,
                                           worst_cases)
from mist.runner.evaluation.settings import EvaluationSettings

if TYPE_CHECKING:
    import torch

    from mist.engine.config import ProtectConfig
    from mist.runner.jobs import ModelCache
    from mist.models import StableDiffusion
    from mist.runner.evaluation.clip import ClipTower
    from mist.runner.evaluation.img2img import Generated
    from mist.runner.evaluation.mimicry import Mimicry

log = logging.getLogger(__name__)

EVALUATION_PARTS = frozenset({"encoder", "unet", "text_encoder", "decoder"})
THUMBNAIL = 256  # longest side, in pixels, of the images the report shows


@dataclass(frozen=True)
class EvaluationProgress:
    """`done` of `total` units of work (a purification or a mimicry of the whole set), what was done last, and the
    time left (`mist.runner.estimate.Estimate` over the units; None until two units are done)."""

    done: int
    total: int
    doing: str
    seconds_left: float | None = None
    seconds_per_unit: float | None = None


@dataclass
class ImageResult:
    """What was measured for one pair, and the pictures the report shows (thumbnails, by column name)."""

    pair: Pair
    size: tuple[int, int]  # (width, height) at which it was evaluated
    invisibility: dict[str, float]
    verdict: str = ""
    pictures: dict[str, Image.Image] = field(default_factory=dict)


@dataclass
class Evaluation:
    """Everything a report shows."""

    settings: EvaluationSettings
    model: str
    random_weights: bool
    method: str
    purifications: list[Purification]  # those that ran, "none" first
    skipped: list[str]  # one line each: a purification or metric not run, and why
    unmatched: list[str]
    mimicries: list[tuple[str, str, float | None]]  # (name, label, strength)
    images: list[ImageResult]
    scores: list[Score]
    seconds: float
    scored_with: dict[str, Any] = field(default_factory=dict)  # the method's parameters its loss was computed with
    finished: Finished | None = None  # its units of work kept for a resume (cleared once the report is out)
    headlines: list[Headline] = field(default_factory=list)  # the set's answer per mimicry (`scores.headlines`)
    sets: list[SetScore] = field(default_factory=list)  # CMMD, BRISQUE, NIQE per purification x mimicry
    clip_tower: str | None = None  # the CLIP vision tower's folder name (never its full path), None: none

    @property
    def worst(self) -> list[Score]:
        return worst_cases(self.scores)


def evaluate_folders(originals: Path, protected: Path, settings: EvaluationSettings, models: ModelCache,
                     progress: Callable[[EvaluationProgress], None] | None = None,
                     on_load: Callable[[str | Path, torch.device], None] | None = None,
                     extra_mimicries: Callable[[StableDiffusion], Sequence[Mimicry]] | None = None,
                     resume: Path | None = None, cancel: threading.Event | None = None) -> Evaluation:
    """Evaluate the protected images in `protected` against their originals in `originals` (files or folders).
    `resume`: a folder where each finished unit of work is kept (`mist.runner.evaluation.resume`), so that the same
    evaluation started again after an interruption does not redo it; the caller clears it once the report is out
    (`Evaluation.finished.clear()`). `cancel`: once set, `mist.engine.attack.Cancelled` is raised at the next DDIM step
    or unit of work (what was finished stays kept in `resume`).

    Raises ValueError naming the file for an unreadable image, and for options;
    ModelNotFoundError when there is no model. `extra_mimicries(model)` adds mimicries to the img2img ones (the seam
    for fine-tuning mimicry)."""
    import torch

    from mist.engine.methods import get_method
    from mist.runner.evaluation.clip import ClipTower, clip_iqa_problem, find_tower
    from mist.runner.evaluation.metrics import Lpips, lpips_problem
    from mist.runner.evaluation.quality import quality_problems

    started = time.perf_counter()
    require_extras()
    pairs, unmatched = match_pairs(originals, protected)
    # Read every image before the model loads: a bad file stops the run at once, naming it. An original of another
    # size or aspect is resized to its protected image's size, as the protection resized it (bicubic).
    loaded = [(pair, images.read_image(pair.original), images.read_image(pair.protected)) for pair in pairs]
    requested = parse_purifications(settings.purify)
    upscaler = Path(settings.upscaler) if settings.upscaler is not None else None
    purifications = [NONE] + [p for p in requested if not p.problem(upscaler)]
    lpips_reason = lpips_problem()
    tower_folder, clip_reason = find_tower(settings.clip, models.where())
    skipped = _skipped(requested, lpips_reason, clip_reason, quality_problems(), upscaler,
                       clip_iqa_problem(tower_folder))
    method_name = settings.method or next((p.metadata["mist:method"] for p in pairs if "mist:method" in p.metadata),
                                          "mist")
    scoring = scoring_config(method_name, pairs)
    device = models.device()
    ti_parts = {"text_model"} if settings.ti else set()  # textual inversion trains through the text encoder
    model = models.model(EVALUATION_PARTS | ti_parts | get_method(method_name).parts, on_load,
                         settings.text_encoder_files).placed(device)
    mimicries = _mimicries(model, settings, extra_mimicries, cancel)
    results, cleans, shields = _measured_pairs(loaded, Lpips() if lpips_reason is None else None)
    ticker = _Ticker(len(purifications) * (1 + 2 * len(mimicries)) + 3 * len(mimicries), progress, cancel)
    identity = models.identity() if resume is not None else None  # hashing files and model only to resume
    finished = Finished(resume, evaluation_key(pairs, settings, method_name, scoring.params.record(),
                                               f"{identity.name} {identity.sha256}") if identity else "")
    scorer = _Scoring(_MethodScorer(model, scoring, device), Context(model, settings.seed, cancel, upscaler),
                      settings, ticker, finished, ClipTower(tower_folder, device) if tower_folder is not None else None)
    scores = scorer.run(purifications, mimicries, results, cleans, shields)
    labels = {p.name: p.label for p in purifications}
    for index, result in enumerate(results):
        own = [s for s in scores if s.image == result.pair.name]
        result.verdict = verdict(own, labels, bool(torch.equal(cleans[index], shields[index])))
    return Evaluation(settings=settings, model=str(models.identity().name), random_weights=model.random_weights,
                      method=method_name, purifications=purifications, skipped=skipped, unmatched=unmatched,
                      mimicries=[(m.name, m.label, m.strength) for m in mimicries], images=results, scores=scores,
                      seconds=time.perf_counter() - started, scored_with=scoring.params.record(), finished=finished,
                      headlines=headlines(scores, settings.seed), sets=scorer.sets,
                      clip_tower=_tower_name(tower_folder))


def _tower_name(folder: Path | None) -> str | None:
    """How the report names the CLIP tower: its folder's name, with its parent's for an SD folder's safety_checker."""
    if folder is None:
        return None
    from mist.runner.evaluation.clip import SAFETY_CHECKER

    return f"{folder.parent.name}/{folder.name}" if folder.name == SAFETY_CHECKER else folder.name


def _skipped(requested: list[Purification], lpips_reason: str | None, clip_reason: str | None,
             quality: dict[str, str], upscaler: Path | None, iqa_reason: str | None = None) -> list[str]:
    """One line for each purification or metric that will not run, and why (and what would make it run)."""
    skipped = [f"{p.name}: skipped: {problem}" for p in requested if (problem := p.problem(upscaler))]
    if lpips_reason:
        skipped.append(f"LPIPS: skipped: {lpips_reason}")
        skipped += [f"{p.name}: its similarity term is 1 - SSIM, a weight-free stand-in for LPIPS"
                    for p in requested if p.kind == "impress"]
    if clip_reason:
        skipped.append(f"CLIP similarity / CMMD: skipped: {clip_reason}")
    if iqa_reason:
        skipped.append(f"CLIP-IQA: skipped: {iqa_reason}")
    skipped += [f"{metric}: skipped: {reason}" for metric, reason in quality.items()]
    return skipped + ["FID: not computed: it needs thousands of images to mean anything (and Inception weights Mist "
                      "does not download); CMMD, sample-efficient, stands in for it where a CLIP tower is found"]


def _mimicries(model: StableDiffusion, settings: EvaluationSettings,
               extra: Callable[[StableDiffusion], Sequence[Mimicry]] | None,
               cancel: threading.Event | None) -> list[Mimicry]:
    """img2img at each strength, LoRA fine-tuning and textual inversion when asked for, and the caller's extra
    mimicries."""
    from mist.runner.evaluation.mimicry import LoraMimicry, TextualInversionMimicry, img2img_mimicries

    mimicries: list[Mimicry] = img2img_mimicries(model, settings.strengths, settings.steps, settings.guidance,
                                                 settings.prompt, cancel)
    if settings.lora:
        mimicries.append(LoraMimicry(model, settings.lora_steps, settings.lora_rank, settings.lora_learning_rate,
                                     settings.steps, settings.guidance, settings.prompt, cancel=cancel))
    if settings.ti:
        mimicries.append(TextualInversionMimicry(model, settings.ti_steps, settings.ti_learning_rate, settings.steps,
                                                 settings.guidance, settings.prompt, cancel=cancel))
    if extra is not None:
        mimicries += list(extra(model))
    return mimicries


def _measured_pairs(loaded: list[tuple[Pair, Image.Image, Image.Image]], lpips: object | None
                    ) -> tuple[list[ImageResult], list[torch.Tensor], list[torch.Tensor]]:
    """Per pair: its result with the invisibility metrics and thumbnails, and both images as tensors at the protected
    image's size floored to a multiple of 8."""
    from mist.runner.evaluation.metrics import invisibility

    results, cleans, shields = [], [], []
    for pair, clean, shielded in loaded:
        size = (max(8, shielded.width // 8 * 8), max(8, shielded.height // 8 * 8))
        x, y = images.image_to_tensor(clean, size), images.image_to_tensor(shielded, size)
        cleans.append(x)
        shields.append(y)
        result = ImageResult(pair, size, invisibility(x, y, lpips))
        result.pictures["clean"] = _thumbnail(images.tensor_to_image(x))
        result.pictures["protected"] = _thumbnail(images.tensor_to_image(y))
        results.append(result)
    return results, cleans, shields


class _Ticker:
    """Counts units of work done, tells `progress` after each with the time left, and raises Cancelled after one
    once `cancel` is set."""

    def __init__(self, total: int, progress: Callable[[EvaluationProgress], None] | None,
                 cancel: threading.Event | None) -> None:
        self.total, self.done, self.progress, self.cancel = total, 0, progress, cancel
        self.estimate = Estimate([1] * total)
        self.estimate.begin()

    def __call__(self, doing: str) -> None:
        self.estimate.step(self.done, 1)
        self.done += 1
        if self.progress is not None:
            self.progress(EvaluationProgress(self.done, self.total, doing, self.estimate.seconds_left(),
                                             self.estimate.seconds_per_step))
        if self.cancel is not None and self.cancel.is_set():
            raise Cancelled


@dataclass
class _Scoring:
    """Every purification, then every mimicry of the purified clean and protected images with the same seed, scored."""

    scorer: _MethodScorer
    context: Context
    settings: EvaluationSettings
    tick: _Ticker
    finished: Finished
    tower: ClipTower | None = None  # for CLIP similarity and CMMD; None: not measured
    sets: list[SetScore] = field(default_factory=list)  # what `run` measured over the whole set, per unit
    _made: dict[str, list] = field(default_factory=dict)  # mimicry outputs this run has made or read back, by unit

    def run(self, purifications: list[Purification], mimicries: list[Mimicry], results: list[ImageResult],
            cleans: list[torch.Tensor], shields: list[torch.Tensor]) -> list[Score]:
        targets = self.scorer.targets([tuple(x.shape[-2:]) for x in cleans])
        references: dict[str, list[torch.Tensor | None]] = {}
        for mimicry in mimicries:
            references[mimicry.name] = self.finished.unit(
                f"reference {mimicry.name}", partial(_reference_latents, mimicry, targets, self.settings.seed))
            self.tick(f"target reference, {mimicry.label}")
        budgets = [round(result.invisibility["linf_levels"]) for result in results]
        calibration = {mimicry.name: self._references(mimicry, cleans, budgets) for mimicry in mimicries}
        scores: list[Score] = []
        for purification in purifications:
            purified_clean, purified_protected, losses = self.finished.unit(
                f"purification {purification.name}", partial(self._purified, purification, cleans, shields))
            if purification is not NONE:
                for result, y in zip(results, purified_protected, strict=True):
                    result.pictures[purification.name] = _thumbnail(images.tensor_to_image(y))
            self.tick(purification.label)
            for mimicry in mimicries:
                scores += self._mimicked(purification, mimicry, results, purified_clean, purified_protected,
                                         targets, references[mimicry.name], losses, calibration[mimicry.name])
        return scores

    def _references(self, mimicry: Mimicry, cleans: list[torch.Tensor], budgets: list[int]) -> list[References]:
        """Per image, the noise floor (its clean mimicry against the same with the next seed) and the random control
        (against the mimicry of the clean image plus random signs of the protection's L-infinity, same seed)."""
        from mist.runner.evaluation.metrics import ssim

        seed = self.settings.seed
        clean_out = self._generated(f"none {mimicry.name} clean", mimicry, cleans)
        floor_out = self._generated(f"floor {mimicry.name}", mimicry, cleans, seed + 1)
        self.tick(f"seed-to-seed variation, {mimicry.label}")
        noisy = [random_signs(x, budget, seed + index)
                 for index, (x, budget) in enumerate(zip(cleans, budgets, strict=True))]
        control_out = self._generated(f"control {mimicry.name}", mimicry, noisy)
        self.tick(f"random-noise control, {mimicry.label}")
        return [References(ssim(floor.images, clean.images)[0].item(), ssim(control.images, clean.images)[0].item())
                for clean, floor, control in zip(clean_out, floor_out, control_out, strict=True)]

    def _purified(self, purification: Purification, cleans: list[torch.Tensor], shields: list[torch.Tensor]
                  ) -> tuple[list[torch.Tensor], list[torch.Tensor], list[tuple[float, float]]]:
        """The clean and protected images after `purification`, and the method's losses on each pair of them. What
        the purification loaded for the images (the x4 upscaler) is freed once all are done."""
        if purification is NONE:
            purified_clean, purified_protected = cleans, shields
        else:
            try:
                purified_clean = [_purified(purification, x, self.context) for x in cleans]
                purified_protected = [_purified(purification, y, self.context) for y in shields]
            finally:
                self.context.release()
        losses = [self.scorer.losses(x, c, p) for x, c, p in zip(cleans, purified_clean, purified_protected,
                                                                 strict=True)]
        return purified_clean, purified_protected, losses

    def _generated(self, unit: str, mimicry: Mimicry, pictures: list[torch.Tensor],
                   seed: int | None = None) -> list[Generated]:
        """`mimicry` run on `pictures` with `seed` (default: the evaluation's), or read back when this run or an
        earlier one made it."""
        from mist.runner.evaluation.img2img import Generated

        seed = self.settings.seed if seed is None else seed
        if unit not in self._made:
            self._made[unit] = self.finished.unit(unit, lambda: [(g.images, g.latents)
                                                                 for g in mimicry.generate(pictures, seed)])
        return [Generated(images, latents) for images, latents in self._made[unit]]

    def _over_the_set(self, purification: Purification, mimicry: Mimicry, clean_out: list[torch.Tensor],
                      protected_out: list[torch.Tensor]) -> list[float | None]:
        """Record the set's CMMD and mean BRISQUE / NIQE of the clean and protected mimicry outputs; returns the CLIP
        similarity of each pair of outputs (None each without a CLIP tower)."""
        from mist.runner.evaluation.clip import cmmd, cosine
        from mist.runner.evaluation.quality import mean_quality, quality_problems

        problems = quality_problems()
        clean_q, protected_q = mean_quality(clean_out, problems), mean_quality(protected_out, problems)
        similarities: list[float | None] = [None] * len(clean_out)
        distance = None
        looks: tuple[float | None, float | None] = (None, None)
        if self.tower is not None:
            clean_e, protected_e = self.tower.embed(clean_out), self.tower.embed(protected_out)
            similarities, distance = cosine(clean_e, protected_e), cmmd(clean_e, protected_e)
            if self.tower.reads_text:
                looks = (fmean(self.tower.looks(clean_e)), fmean(self.tower.looks(protected_e)))
        self.sets.append(SetScore(purification.name, mimicry.name, distance, clean_q["brisque"],
                                  protected_q["brisque"], clean_q["niqe"], protected_q["niqe"], *looks))
        return similarities

    def _mimicked(self, purification: Purification, mimicry: Mimicry, results: list[ImageResult],
                  purified_clean: list[torch.Tensor], purified_protected: list[torch.Tensor], targets: list,
                  references: list, losses: list[tuple[float, float]], calibration: list[References]) -> list[Score]:
        unit = f"{purification.name} {mimicry.name}"
        clean_out = self._generated(f"{unit} clean", mimicry, purified_clean)
        self.tick(f"{purification.label}, {mimicry.label} (clean)")
        protected_out = self._generated(f"{unit} protected", mimicry, purified_protected)
        self.tick(f"{purification.label}, {mimicry.label} (protected)")
        similarities = self._over_the_set(purification, mimicry, [c.images for c in clean_out],
                                          [p.images for p in protected_out])
        scores = []
        for index, result in enumerate(results):
            c, p = clean_out[index], protected_out[index]
            target = targets[index][1] if targets[index] is not None else None
            scores.append(score(result.pair.name, purification.name, mimicry.name, mimicry.strength, c.images,
                                p.images, c.latents, p.latents, target, references[index], losses[index],
                                calibration[index], self.settings.ssim_threshold, similarities[index]))
            if purification is NONE:
                result.pictures[f"{mimicry.name} clean"] = _thumbnail(images.tensor_to_image(c.images))
            result.pictures[f"{mimicry.name} {purification.name}"] = _thumbnail(images.tensor_to_image(p.images))
        return scores


def scoring_config(method: str, pairs: Sequence[Pair]) -> ProtectConfig:
    """The settings the method's loss is scored with: its parameters as the first protected image made with `method`
    records them (an image protected with `--mode textural` is scored on the textural objective), else the method's
    defaults. A file parameter (another target) is not at hand, so its default stands; float32 always."""
    from mist.engine.config import ProtectConfig
    from mist.engine.methods import get_method, param_specs

    own = {spec.name for spec in param_specs(get_method(method).Params) if spec.kind != "file"}
    for pair in pairs:
        if pair.metadata.get("mist:method") == method and "mist:settings" in pair.metadata:
            try:
                recorded = json.loads(pair.metadata["mist:settings"])
            except ValueError:
                continue
            if isinstance(recorded, dict):
                return ProtectConfig.of(method=method, precision="fp32",
                                        **{name: value for name, value in recorded.items() if name in own})
    return ProtectConfig(method=method, precision="fp32")


def require_extras() -> None:
    """Raise ValueError in one line when a package of the `evaluate` extra is missing."""
    import importlib.util

    missing = [package for module, package in (("torchmetrics", "torchmetrics"), ("cv2", "opencv-python-headless"),
                                                ("matplotlib", "matplotlib"))
               if importlib.util.find_spec(module) is None]
    if missing:
        raise ValueError(f"evaluation needs {', '.join(missing)}: pip install 'mist-protect[evaluate]'")


class _MethodScorer:
    """The protection method's loss on purified images, and its target pattern's latents, through `Protector`'s
    scoring entry (`loss_for`) in float32."""

    def __init__(self, model: StableDiffusion, config: ProtectConfig, device: torch.device) -> None:
        from mist.engine.pipeline import Protector

        self.model = model
        self.protector = Protector(model, config, device)
        self.seed = 0

    def losses(self, clean: torch.Tensor, purified_clean: torch.Tensor,
               purified_protected: torch.Tensor) -> tuple[float, float]:
        """The method's objective, prepared from `clean`, on the purified clean and the purified protected image."""
        import torch

        loss = self.protector.loss_for(clean, seed=self.seed)
        with torch.no_grad():
            values = [loss(x.to(self.protector.device), [torch.Generator().manual_seed(self.seed)]).objective
                      for x in (purified_clean, purified_protected)]
        return values[0].sum().item(), values[1].sum().item()

    def targets(self, shapes: Sequence[tuple[int, int]]) -> list[tuple[torch.Tensor, torch.Tensor] | None]:
        """Per image shape (H, W): the method's target pattern resized to it and its scaled latent (posterior mean);
        None for a method without a target."""
        import torch

        target = self.protector.target
        if target is None:
            return [None] * len(shapes)
        out = []
        for height, width in shapes:
            picture = images.image_to_tensor(target, (width, height))
            with torch.no_grad():
                mean, _ = self.model.posterior(picture.to(self.model.device))
            out.append((picture, self.model.scale_latent(mean).cpu()))
        return out


def random_signs(x: torch.Tensor, levels: int, seed: int) -> torch.Tensor:
    """`x` (1, 3, H, W) in [-1, 1] from an 8-bit image, plus or minus `levels` 0..255 levels at random per value
    (the protection's L-infinity budget spent without aim), kept in 0..255: the random control's input."""
    import torch

    signs = torch.randint(0, 2, x.shape, generator=torch.Generator().manual_seed(seed), dtype=torch.int64) * 2 - 1
    pixel_levels = torch.round((x + 1) * 127.5) + signs * levels
    return pixel_levels.clamp(0, 255) / 127.5 - 1


def _reference_latents(mimicry: Mimicry, targets: list, seed: int) -> list:
    """The final latents of `mimicry` run on the target pattern itself, once per distinct shape."""
    by_shape: dict[tuple[int, ...], object] = {}
    out = []
    for target in targets:
        if target is None:
            out.append(None)
            continue
        shape = tuple(target[0].shape)
        if shape not in by_shape:
            by_shape[shape] = mimicry.generate([target[0]], seed)[0].latents
        out.append(by_shape[shape])
    return out


def _purified(purification: Purification, x: torch.Tensor, context: Context) -> torch.Tensor:
    picture = purification(images.tensor_to_image(x), context)
    return images.image_to_tensor(picture, (x.shape[3], x.shape[2]))


def _thumbnail(picture: Image.Image) -> Image.Image:
    copy = picture.copy()
    copy.thumbnail((THUMBNAIL, THUMBNAIL), Image.Resampling.LANCZOS)
    return copy
