"""The Python API: `protect(images, ...)` returns protected PIL images with what the attack measured, and
`evaluate(originals, protected, report_dir)` measures whether the protection holds; the model comes from the job
runner's `ModelCache`, as for the other faces."""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Sequence

from PIL import Image

from mist.common import images as image_io
from mist.engine.config import ProtectConfig
from mist.runner.jobs import ModelCache
from mist.common.model_names import TEST_MODEL_STEPS, names_test_model
from mist.models import StableDiffusion
from mist.engine.pipeline import Progress, ProtectedImage

if TYPE_CHECKING:
    from mist.runner.evaluation.run import Evaluation, EvaluationProgress

ImageInput = str | os.PathLike | Image.Image


def protect(
    inputs: ImageInput | Sequence[ImageInput],
    config: ProtectConfig | None = None,
    *,
    model: StableDiffusion | str | os.PathLike | None = None,
    device: str | None = None,
    mask: ImageInput | None = None,
    callback: Callable[[Progress], None] | None = None,
    low_memory: bool | None = None,
    batch_size: int = 1,
    compile: bool = False,
    **settings: object,
) -> list[ProtectedImage]:
    """Protect one image or several (file paths or PIL images) and return a `ProtectedImage` for each, in order.

    Settings come from `config` (Mist v1.2's defaults if None), changed by keyword: run settings and the method's
    parameters alike (`protect(img, steps=50, mode="textural")`, `protect(img, method="advdm")`); `preset="paper"`
    takes the method's paper settings where none are given (`protect(img, method="pid", preset="paper")`).
    `model` is a loaded `StableDiffusion` (reuse it across calls: loading takes seconds; it is never changed) or what
    `mist protect --model` accepts; None searches the default places. `mask` (a path or image of any size, pure white
    = protect) overrides config.mask. `callback(progress)` is called after every PGD step (`progress.images` says
    which images it concerns). `low_memory` (gradient checkpointing) changes speed and memory, not the result;
    `batch_size` (tiles per attack batch) draws the same random numbers, but batched arithmetic can differ in the
    last bits and flip a rare sign step. `compile` runs the networks through torch.compile (`mist.engine.compiling`):
    minutes the first time a size is met (see the README for what it gained); `ProtectedImage.compile_seconds` says how
    long it took.

        >>> import mist
        >>> [result] = mist.protect("painting.png", steps=100, model="models/ldm/stable-diffusion-v1/model.ckpt")
        >>> result.image.save("painting-protected.png")
    """
    test_model = not isinstance(model, StableDiffusion) and names_test_model(model)
    if config is None and "steps" not in settings and test_model:
        settings["steps"] = TEST_MODEL_STEPS
    config = (config or ProtectConfig()).but(**settings)
    single = isinstance(inputs, (str, os.PathLike, Image.Image))
    pictures = [_as_image(item) for item in ([inputs] if single else inputs)]
    mask_image = _as_image(mask) if mask is not None else None  # None: the Protector applies config.mask
    protector = ModelCache(model, device, low_memory, compile).protector(config, batch_size=batch_size)
    return protector.protect_many(pictures, [mask_image] * len(pictures), callback)


def _as_image(item: ImageInput) -> Image.Image:
    return item.convert("RGB") if isinstance(item, Image.Image) else image_io.read_image(item)


def evaluate(
    originals: str | os.PathLike,
    protected: str | os.PathLike,
    report_dir: str | os.PathLike | None = None,
    *,
    model: StableDiffusion | str | os.PathLike | None = None,
    device: str | None = None,
    progress: Callable[[EvaluationProgress], None] | None = None,
    **settings: object,
) -> Evaluation:
    """Measure whether the protection of the images in `protected` (a file or folder) holds against purification and
    img2img mimicry, comparing with their originals in `originals` (matched by file name or by the source SHA-256 a
    Mist output records); with `report_dir`, write index.html, results.json and results.csv there.

    With `report_dir`, what the evaluation finishes is kept in its `.unfinished` folder until the report is written,
    so the same call after an interruption does not redo it. Settings are
    `mist.runner.evaluation.settings.EvaluationSettings` fields by keyword (`purify="jpeg:75,resize:0.5"`,
    `strengths=(0.35,)`, `steps=50`, `seed=0`, ...). `model`: a loaded `StableDiffusion` with its "decoder" part, or
    what `mist evaluate --model` accepts. Returns the `Evaluation` (its `scores`, `images` with their verdicts).

        >>> import mist
        >>> result = mist.evaluate("art/", "protected/", "report/", model="models/ldm/stable-diffusion-v1/model.ckpt")
        >>> [image.verdict for image in result.images]
    """
    from mist.runner.evaluation.job import EvaluationJob, run_evaluation
    from mist.runner.evaluation.settings import EvaluationSettings

    if "strengths" in settings:
        settings["strengths"] = tuple(settings["strengths"])  # type: ignore[arg-type]
    chosen = EvaluationSettings(**settings)  # type: ignore[arg-type]
    job = EvaluationJob(Path(originals), Path(protected), chosen, Path(report_dir) if report_dir is not None else None)
    evaluation, _ = run_evaluation(job, ModelCache(model, device), progress=progress)
    return evaluation
