"""Stable Diffusion v1 (and the VAE of SD 2.x, SDXL, SD 3.x and Flux models), located and loaded offline; see
`load_model`."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import torch

from mist.models.architectures import SD_V1, TINY, Architecture
from mist.models.components import StableDiffusion
from mist.models.loading import DEFAULT_PARTS, KNOWN_PARTS, build_random, load_path
from mist.common.model_names import model_label
from mist.models.locate import TINY_RANDOM, ModelNotFoundError, resolve_model
from mist.models.vae_folder import is_vae_folder, load_vae_folder

__all__ = ["DEFAULT_PARTS", "KNOWN_PARTS", "Architecture", "ModelNotFoundError", "SD_V1", "StableDiffusion", "TINY",
           "TINY_RANDOM", "load_model", "model_label", "quiet_model_libraries", "resolve_model",
           "takes_no_text_encoders"]


def load_model(spec: str | os.PathLike | None = None, architecture: Architecture = SD_V1,
               parts: frozenset[str] = DEFAULT_PARTS, text_encoders: tuple[str | os.PathLike, ...] = (),
               dtype: torch.dtype = torch.float32) -> StableDiffusion:
    """Load the model `spec` names (a path or `tiny-random`), or the first one found where Mist looks by default.

    `architecture` gives the shape of single-file checkpoints (SD v1 unless a test saves a smaller one). `parts`:
    which of "unet", "text_encoder", "decoder" (the VAE decoder, for evaluation) and "text_model" (the text encoder
    kept, for textual inversion) to load besides the VAE encoder (for protection, a method's `parts`; the others are
    not read). A VAE alone loads as such, and asking it for more is refused (see `mist.models.families`).
    `text_encoders`: the text encoder files an SD 3.x or Flux single file needs (`mist.models.text_files`). Weights
    arrive on the CPU in float32, but an SD 3.x or Flux transformer's in `dtype` (the run's: no float32 copy of it is
    made); `StableDiffusion.placed` moves and casts them.
    """
    if not parts <= KNOWN_PARTS:
        raise ValueError(f"parts: unknown model parts {sorted(parts - KNOWN_PARTS)} (known: {sorted(KNOWN_PARTS)})")
    where = resolve_model(spec)
    if text_encoders and (where == TINY_RANDOM or is_vae_folder(where)):
        raise takes_no_text_encoders(where)
    if where == TINY_RANDOM:
        return build_random(TINY, parts=parts)
    if is_vae_folder(where):
        return load_vae_folder(Path(where), parts)
    return load_path(where, architecture, parts, tuple(Path(f).expanduser() for f in text_encoders), dtype)


def takes_no_text_encoders(where: str | os.PathLike) -> ValueError:
    """The error for text encoder files given with the model at `where` (named by its file or folder name), which
    is not an SD 3.x or Flux single file and so takes none."""
    return ValueError(f"text_encoders: {model_label(where)} takes no text encoder files (only SD 3.x's and Flux's "
                      "single files do)")


def quiet_model_libraries() -> None:
    """Unless logging is verbose, keep only errors from diffusers and transformers. Imports both (seconds): call it
    only once a model is about to be used."""
    if logging.getLogger().isEnabledFor(logging.INFO):
        return
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    diffusers_logging.set_verbosity_error()
    transformers_logging.set_verbosity_error()
