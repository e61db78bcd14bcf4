"""The Python API: `protect(images, ...)` returns protected PIL images with what the attack measured."""

from __future__ import annotations

import os
from dataclasses import replace
from typing import Callable, Sequence

from PIL import Image

from . import images as image_io
from .config import ProtectConfig
from .device import pick_device
from .models import StableDiffusion, load_model
from .protect import Progress, ProtectedImage, Protector

ImageInput = str | os.PathLike | Image.Image


def protect(
    inputs: ImageInput | Sequence[ImageInput],
    config: ProtectConfig | None = None,
    *,
    model: StableDiffusion | str | os.PathLike | None = None,
    device: str | None = None,
    mask: ImageInput | None = None,
    callback: Callable[[int, Progress], None] | None = None,
    **settings: object,
) -> list[ProtectedImage]:
    """Protect one image or several (file paths or PIL images) and return a `ProtectedImage` for each, in order.

    Settings come from `config` (Mist v1.2's defaults if None), changed by keyword (`protect(img, steps=50)`).
    `model` is a loaded `StableDiffusion` (reuse it across calls: loading takes seconds) or what `mist protect
    --model` accepts; None searches the default places. `mask` (a path or image, white = protect) overrides
    config.mask. `callback(image_index, progress)` is called after every PGD step.

        >>> import mist
        >>> [result] = mist.protect("painting.png", steps=100, model="models/ldm/stable-diffusion-v1/model.ckpt")
        >>> result.image.save("painting-protected.png")
    """
    config = replace(config or ProtectConfig(), **settings)
    single = isinstance(inputs, (str, os.PathLike, Image.Image))
    pictures = [_as_image(item) for item in ([inputs] if single else inputs)]
    mask_image = _as_image(mask) if mask is not None else (image_io.read_image(config.mask) if config.mask else None)
    if not isinstance(model, StableDiffusion):
        model = load_model(model)
    protector = Protector(model, config, pick_device(device))
    results = []
    for index, picture in enumerate(pictures):
        on_step = (lambda progress, index=index: callback(index, progress)) if callback else None
        results.append(protector.protect(picture, mask_image, on_step))
    return results


def _as_image(item: ImageInput) -> Image.Image:
    return item.convert("RGB") if isinstance(item, Image.Image) else image_io.read_image(item)
