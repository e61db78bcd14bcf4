"""The Python API: `protect(images, ...)` returns protected PIL images with what the attack measured; the model comes
from the job runner's `ModelCache`, as for the other faces."""

from __future__ import annotations

import os
from typing import Callable, Sequence

from PIL import Image

from . import images as image_io
from .config import ProtectConfig
from .jobs import ModelCache
from .models import StableDiffusion
from .pipeline import Progress, ProtectedImage

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
    **settings: object,
) -> list[ProtectedImage]:
    """Protect one image or several (file paths or PIL images) and return a `ProtectedImage` for each, in order.

    Settings come from `config` (Mist v1.2's defaults if None), changed by keyword: run settings and the method's
    parameters alike (`protect(img, steps=50, mode="textural")`, `protect(img, method="advdm")`).
    `model` is a loaded `StableDiffusion` (reuse it across calls: loading takes seconds; it is never changed) or what
    `mist protect --model` accepts; None searches the default places. `mask` (a path or image of any size, pure white
    = protect) overrides config.mask. `callback(progress)` is called after every PGD step (`progress.images` says
    which images it concerns). `low_memory` (gradient checkpointing) changes speed and memory, not the result;
    `batch_size` (tiles per attack batch) draws the same random numbers, but batched arithmetic can differ in the
    last bits and flip a rare sign step.

        >>> import mist
        >>> [result] = mist.protect("painting.png", steps=100, model="models/ldm/stable-diffusion-v1/model.ckpt")
        >>> result.image.save("painting-protected.png")
    """
    config = (config or ProtectConfig()).but(**settings)
    single = isinstance(inputs, (str, os.PathLike, Image.Image))
    pictures = [_as_image(item) for item in ([inputs] if single else inputs)]
    mask_image = _as_image(mask) if mask is not None else None  # None: the Protector applies config.mask
    protector = ModelCache(model, device, low_memory).protector(config, batch_size=batch_size)
    return protector.protect_many(pictures, [mask_image] * len(pictures), callback)


def _as_image(item: ImageInput) -> Image.Image:
    return item.convert("RGB") if isinstance(item, Image.Image) else image_io.read_image(item)
