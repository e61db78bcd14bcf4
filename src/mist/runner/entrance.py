"""The one way into the job runner, for every face (command line, `mist_v3.py`, `mist evaluate`, `mist serve`):
`open_models` makes each check that can be made before any compute, so that every face refuses the same things with
the same one-line message before a model loads or an image is read."""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

from mist.engine.config import ProtectConfig
from mist.runner.jobs import ModelCache

if TYPE_CHECKING:
    from mist.runner.ray_pool import RayModels


def open_models(model: str | os.PathLike | None, device: str | None, low_memory: bool | None = None,
                compile: bool = False, ray: str | None = None, ray_resource: str = "GPU",
                precision: str | None = None, text_encoders: str | tuple[str, ...] = ()) -> ModelCache | RayModels:
    """Where the job runner's attacks will run: one model in this process (a ModelCache, not loaded yet), or with `ray`
    (a cluster's address) a pool of the cluster's workers (`mist.runner.ray_pool.RayModels`, which check on their own
    node).

    Checked now, in this order: ValueError("text_encoders: FILE: ...") for a server's text encoder file
    (`text_encoders`: comma-separated in one string, or a tuple) that is missing or a folder, and
    ValueError("text_encoders: ...") for any with `ray` (each worker opens its own model); ValueError("device: ...")
    for a device this machine lacks (no CUDA, a GPU index past the last one, no Apple GPU); ValueError("precision:
    ...") for a `precision` that device cannot run; ValueError("compile: ...") where compiling cannot be had (with ray,
    whose workers run uncompiled, or without the compiler the device needs); `ModelNotFoundError` when there is no
    model where `model` points or Mist looks; last, ValueError naming the file when the text encoder files cannot
    serve the model (`ModelCache.check_text_encoders`)."""
    text_encoders = ProtectConfig(text_encoders=text_encoders).text_encoders  # split; each a file (the settings' check)
    if ray:
        if text_encoders:
            raise ValueError("text_encoders: not with a Ray cluster (its workers open their own model): serve the "
                             "model's diffusers folder, or SD 3's _incl_clips file")
        if compile:
            raise ValueError("compile: not available with a Ray cluster (its workers run the networks uncompiled)")
        from mist.runner.ray_pool import RayModels

        return RayModels(ray, model, device, low_memory, ray_resource)
    models = ModelCache(model, device, low_memory, compile, text_encoders)
    chosen = models.device()
    if precision is not None:
        models.precision(precision)
    if compile:
        from mist.engine.compiling import check_can_compile

        check_can_compile(chosen)
    models.where()
    models.check_text_encoders()
    return models
