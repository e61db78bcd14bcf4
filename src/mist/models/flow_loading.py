"""SD 3.x's and Flux's denoisers from a diffusers folder: the architecture (transformer and scheduler configs, the
velocity target) and the transformer loaded into its velocity-predictor wrapper
(`flow_denoisers`). Everything is read from the folder (`local_files_only`): nothing is fetched.

The transformer is read in the run's type (a bf16 run never holds a float32 copy: SD 3.5 medium's is 10 GB in
float32); the text encoders are run once at load (`flow_text`) and freed.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path
from typing import Any, Iterator

import torch
from torch import nn

from mist.models.architectures import Architecture, Family, encoder_only
from mist.models.flow_denoisers import FLUX_GUIDANCE, FluxDenoiser, SD3Denoiser
from mist.models.flow_text import pretrained

_TRANSFORMERS = {"sd3": "SD3Transformer2DModel", "flux": "FluxTransformer2DModel"}


def architecture(family: Family, vae: dict[str, Any], name: str, transformer: dict[str, Any],
                 scheduler: dict[str, Any]) -> Architecture:
    """A `family` (SD 3.x, Flux) model of VAE config `vae`, transformer config `transformer` ({}: not loaded) and
    scheduler config `scheduler` (its shift: `noising.FlowShift`); the scale and shift factors the VAE config lacks
    are the family's (`encoder_only`)."""
    return replace(encoder_only(family, vae, name), unet=transformer, prediction_type="flow", schedule=scheduler)


@contextmanager
def quiet_progress() -> Iterator[None]:
    """transformers' and diffusers' weight-loading progress bars off while an SD 3.x or Flux model loads (they print
    one to stderr per part), then as they were."""
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    was = [library.is_progress_bar_enabled() for library in (transformers_logging, diffusers_logging)]
    transformers_logging.disable_progress_bar()
    diffusers_logging.disable_progress_bar()
    try:
        yield
    finally:
        for library, enabled in zip((transformers_logging, diffusers_logging), was, strict=True):
            if enabled:
                library.enable_progress_bar()


def transformer_class(family: str) -> type[nn.Module]:
    import diffusers

    return getattr(diffusers, _TRANSFORMERS[family])


def load_denoiser(folder: Path, arch: Architecture, dtype: torch.dtype = torch.float32) -> nn.Module:
    """The folder's transformer (transformer/), frozen, read in `dtype` (the run's: no float32 copy first),
    wrapped as a velocity predictor (`wrapped`)."""
    transformer = pretrained(transformer_class(arch.family), folder / "transformer", torch_dtype=dtype)
    return wrapped(arch, transformer)


def wrapped(arch: Architecture, transformer: nn.Module) -> nn.Module:
    """`transformer` as `arch`'s velocity predictor, frozen; Flux dev (a transformer with a guidance input) with
    guidance 3.5."""
    if arch.family == "sd3":
        denoiser = SD3Denoiser(transformer)
    else:
        denoiser = FluxDenoiser(transformer, FLUX_GUIDANCE if arch.unet.get("guidance_embeds") else None)
    return denoiser.eval().requires_grad_(False)
