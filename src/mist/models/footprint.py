"""How much memory a model takes once loaded with some parts, counted without reading a weight: from a safetensors
file's header (the shapes of its tensors), a `.ckpt`'s memory-mapped tensors, or the configs of an SD 3.x / Flux
folder's transformer and text encoders. So a run that loads several models (an ensemble, `--against`) can be refused
before anything big is read.

Every count is in float32, as Mist loads every model but an SD 3.x or Flux transformer (read in the run's precision,
so its count is an upper bound for a bf16 run), and covers what loading holds at its peak: the VAE encoder (and
decoder if asked), the denoiser, and the text encoders, which are run once for the prompts' embeddings and then
freed. For SD 3.x and Flux the text encoders are run and freed before the
transformer is read, so the larger of the two counts.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import torch

from mist.models import flow_files, flow_loading
from mist.models.architectures import TINY
from mist.models.families import VAE_PARTS
from mist.models.loading import (empty_modules, keys_to_read, pipeline_family, read_json, read_original_state_dict,
                                 weights_file)
from mist.models.locate import TINY_RANDOM
from mist.models.vae_folder import is_vae_folder

_TEXT_PARTS = frozenset({"text_encoder", "text_model"})
_DIFFUSERS_WEIGHTS = ("diffusion_pytorch_model",)
_TEXT_WEIGHTS = ("model", "pytorch_model")


def model_bytes(where: str | os.PathLike, parts: frozenset[str]) -> int:
    """Bytes the resolved model `where` (`tiny-random`, a single file, a diffusers pipeline or VAE folder) holds at
    most while it loads with `parts` (see the module's notes). ValueError naming a file Mist cannot read."""
    if str(where) == TINY_RANDOM:
        return 4 * sum(p.numel() for module in empty_modules(TINY, parts) if module is not None
                       for p in module.parameters())
    path = Path(where)
    if is_vae_folder(path):
        return _vae_bytes(path, parts)
    if path.is_dir():
        return _folder_bytes(path, parts)
    return _file_bytes(path, parts)


def _file_bytes(path: Path, parts: frozenset[str]) -> int:
    """A single file's: the tensors loading reads for `parts`, from the safetensors header or a `.ckpt` mapped."""
    if path.suffix.lower() == ".safetensors":
        counts = _header_counts(path)
        return 4 * sum(counts[key] for key in keys_to_read(list(counts), parts))
    state, _ = read_original_state_dict(path, parts)  # memory-mapped: nothing is read but the keys and shapes
    return 4 * sum(tensor.numel() for tensor in state.values())


def _folder_bytes(folder: Path, parts: frozenset[str]) -> int:
    """A diffusers pipeline folder's: its VAE's, and the denoiser's and text encoders' where `parts` ask for them."""
    family = pipeline_family(folder)
    vae = _vae_bytes(folder / "vae", parts)
    text = bool(parts & _TEXT_PARTS)
    if not family.denoiser:
        return vae
    if family.flow:
        joint = read_json(folder / "transformer" / "config.json") if "unet" in parts else {}
        arch = flow_loading.architecture(family, read_json(folder / "vae" / "config.json"), folder.name, joint, {})
        texts, held = flow_loading.part_bytes(folder, arch, text)
        return max(sum(texts.values()), sum(held.values()) + vae)
    towers = ("text_encoder", "text_encoder_2") if family.key == "sdxl" else ("text_encoder",)
    unet = _component_bytes(folder / "unet", _DIFFUSERS_WEIGHTS) if "unet" in parts else 0
    return vae + unet + sum(_component_bytes(folder / tower, _TEXT_WEIGHTS) for tower in towers if text)


def _vae_bytes(folder: Path, parts: frozenset[str]) -> int:
    """A diffusers VAE folder's encoder (and decoder, if `parts` has it)."""
    prefixes = tuple(p for part in ("encoder", "decoder") if part in parts | {"encoder"} for p in VAE_PARTS[part])
    return _component_bytes(folder, _DIFFUSERS_WEIGHTS, prefixes)


def _component_bytes(folder: Path, stems: tuple[str, ...], prefixes: tuple[str, ...] = ("",)) -> int:
    """The float32 bytes of a diffusers component's tensors whose names begin with one of `prefixes`."""
    file = weights_file(folder, stems)
    if file.suffix == ".safetensors":
        counts = _header_counts(file)
    else:
        try:
            state = torch.load(file, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError:  # a legacy (not zip) file cannot be mapped: its size on disk, in float32 or float16
            return file.stat().st_size * (2 if ".fp16" in file.name else 1)
        counts = {key: tensor.numel() for key, tensor in state.items()}
    return 4 * sum(count for key, count in counts.items() if key.startswith(prefixes))


def _header_counts(path: Path) -> dict[str, int]:
    """Each tensor's element count, from a safetensors file's header alone (`flow_files.header`)."""
    return {key: math.prod(shape) for key, (shape, _) in flow_files.header(path).items()}
