"""How much memory loading a model with some parts holds at its peak, by named part, counted without reading a weight:
from a safetensors file's header (the shapes and stored types of its tensors), a `.ckpt`'s memory-mapped tensors, the
weight files of a diffusers folder's components, or the configs of an SD 3.x / Flux folder's transformer and text
encoders (modules built on the meta device). The one count both `load_model` (before it reads anything) and the
ensemble check (`mist.engine.ensemble_checks`, for several models at once) refuse with, so the two cannot disagree.

What is counted is what loading reads: every tensor it takes from a file for the parts asked (the VAE encoder always),
in float32, as Mist holds every weight but those of an SD 3.x or Flux transformer, which are read in the run's type,
and of a T5-XXL text encoder, which is built in the type it is stored in (float32, else bfloat16; see
`mist.models.text_files`). SD 1.x, 2.x and XL load their parts together; SD 3.x and Flux run their text encoders on
the prompts and free them before the transformer is read, so the larger of the two counts.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from mist.models import flow_files, text_files
from mist.models.architectures import TINY, Family
from mist.models.device import available_ram_bytes
from mist.models.families import UNET, VAE_PARTS, vae_file
from mist.models.flow_loading import transformer_class
from mist.models.flow_text import CLIP_TOWERS, T5_TOWER, clip_class, pretrained
from mist.models.identify import model_family
from mist.models.loading import (TEXT_PARTS, TEXT_PREFIXES, empty_modules, keys_to_read, read_json,
                                 read_original_state_dict, unreadable, weights_file)
from mist.models.locate import TINY_RANDOM
from mist.models.vae_folder import is_vae_folder

_DIFFUSERS_WEIGHTS = ("diffusion_pytorch_model",)
_TEXT_WEIGHTS = ("model", "pytorch_model")
_HALF = ("float16", "bfloat16")
_FIRST_NOTE = "the text encoders are run and freed before the transformer is read"


@dataclass(frozen=True)
class Footprint:
    """The bytes of each part loading holds, by name: `held`, the parts held together once loaded; `first`, the
    parts run and freed before `held` is read (SD 3.x's and Flux's text encoders)."""

    held: dict[str, int]
    first: dict[str, int] = field(default_factory=dict)

    @property
    def peak(self) -> int:
        """The most bytes held at once while the model loads."""
        return max(sum(self.first.values()), sum(self.held.values()))

    def detail(self) -> str:
        """Each part's size in GB (one decimal), the parts freed first named first."""
        sizes = ", ".join(f"{name} {size / 1e9:.1f} GB" for name, size in {**self.first, **self.held}.items())
        return f"{sizes}; {_FIRST_NOTE}" if self.first else sizes


def refuse_too_large(where: str | os.PathLike, parts: frozenset[str], dtype: torch.dtype = torch.float32,
                     text_encoders: tuple[Path, ...] = ()) -> None:
    """ValueError naming `where` in one line when loading it with `parts` (`model_footprint`) needs more memory than
    this machine has available; nothing is counted where that is unknown."""
    available = available_ram_bytes()
    if available is None:
        return
    footprint = model_footprint(where, parts, dtype, text_encoders)
    if footprint.peak > available:
        raise ValueError(f"{where}: this {model_family(where).title} model needs about {footprint.peak / 1e9:.1f} GB "
                         f"of memory to load the parts this run uses in float32 ({footprint.detail()}), and "
                         f"{available / 1e9:.1f} GB is available")


def model_footprint(where: str | os.PathLike, parts: frozenset[str], dtype: torch.dtype = torch.float32,
                    text_encoders: tuple[Path, ...] = ()) -> Footprint:
    """What loading the resolved model `where` (`tiny-random`, a single file, a diffusers pipeline or VAE folder)
    with `parts` holds (see the module's notes): `dtype` the type an SD 3.x or Flux transformer is read in,
    `text_encoders` the text encoder files an SD 3.x or Flux single file is given. ValueError naming a file Mist
    refuses or cannot read."""
    if str(where) == TINY_RANDOM:
        with torch.device("meta"):  # shapes only: nothing is allocated or drawn
            unet, encoder, text, decoder = empty_modules(TINY, parts)
        named = {"UNet": (unet,), "text encoders": (text,), "VAE": (encoder, decoder)}
        return Footprint({name: 4 * sum(_count(module) for module in modules if module is not None)
                          for name, modules in named.items() if modules[0] is not None})
    path = Path(where)
    if is_vae_folder(path):
        return Footprint({"VAE": _vae_bytes(path, parts)})
    family = model_family(path)
    if path.is_dir():
        return _flow_folder(path, family, parts, dtype) if family.flow else _folder(path, family, parts)
    counts, keys = _read_counts(path, parts)
    if family.flow and family.denoiser:
        return _flow_file(path, family, keys, parts, dtype, text_encoders)
    return Footprint(_by_part(counts))


def _read_counts(path: Path, parts: frozenset[str]) -> tuple[dict[str, int], list[str]]:
    """The element count of each tensor loading reads from the single file `path` for `parts` (`keys_to_read`), and
    all its key names: from a safetensors file's header, or a `.ckpt`'s memory-mapped tensors (only names and shapes
    are read)."""
    if path.suffix.lower() == ".safetensors":
        counts = _header_counts(path)
        keys = list(counts)
        return {key: counts[key] for key in keys_to_read(keys, parts)}, keys
    state, keys = read_original_state_dict(path, parts)
    return {key: tensor.numel() for key, tensor in state.items()}, keys


def _by_part(counts: dict[str, int]) -> dict[str, int]:
    """A single file's tensor `counts` in float32 bytes by part: UNet, text encoders, and the rest, its VAE."""
    named = {"UNet": (UNET,), "text encoders": TEXT_PREFIXES}
    sizes = dict.fromkeys([*named, "VAE"], 0)
    for key, count in counts.items():
        sizes[next((name for name, prefixes in named.items() if key.startswith(prefixes)), "VAE")] += 4 * count
    return {name: size for name, size in sizes.items() if size}


def _flow_file(path: Path, family: Family, keys: list[str], parts: frozenset[str], dtype: torch.dtype,
               text_encoders: tuple[Path, ...]) -> Footprint:
    """An SD 3.x or Flux single file's: its VAE (a Flux transformer's: in the ae.safetensors beside it), and for the
    denoiser-side parts its transformer in `dtype` and the text encoders inside it or in `text_encoders`; ValueError
    naming the file, as loading would, when its transformer is not whole or a text encoder is missing."""
    vae_counts, _ = _read_counts(vae_file(path, family, keys), parts & frozenset(VAE_PARTS))
    vae = {"VAE": 4 * sum(vae_counts.values())}
    text = bool(parts & TEXT_PARTS)
    if not text and "unet" not in parts:
        return Footprint(vae)
    head = flow_files.header(path)
    flow_files.transformer_config(path, family.key, flow_files.below(head, flow_files.transformer_prefix(head)))
    found = text_files.towers(path, head, text_encoders, family.key) if text else {}
    first = {f"{text_files.TITLES[kind]} {tower.path.name}": _tower_bytes(tower) for kind, tower in found.items()}
    held = {"transformer": _stored_bytes(flow_files.transformer_weights(head), dtype.itemsize)
            } if "unet" in parts else {}
    return Footprint({**held, **vae}, first)


def _tower_bytes(tower: text_files.Tower) -> int:
    """The bytes a text encoder in a file takes once built: T5 in `text_files.t5_type`, CLIP in float32."""
    return _stored_bytes(tower.head, text_files.t5_type(tower).itemsize if tower.kind == "t5" else 4)


def _stored_bytes(head: flow_files.Header, width: int) -> int:
    """The bytes `head`'s tensors take at `width` bytes each."""
    return width * sum(math.prod(shape) for shape, _ in head.values())


def _folder(folder: Path, family: Family, parts: frozenset[str]) -> Footprint:
    """An SD 1.x, 2.x or XL diffusers folder's (or the VAE of another family's): its components' weight files."""
    sizes = {}
    if family.denoiser and "unet" in parts:
        sizes["UNet"] = _component_bytes(folder / "unet", _DIFFUSERS_WEIGHTS)
    if family.denoiser and parts & TEXT_PARTS:
        towers = ("text_encoder", "text_encoder_2") if family.key == "sdxl" else ("text_encoder",)
        sizes["text encoders"] = sum(_component_bytes(folder / tower, _TEXT_WEIGHTS) for tower in towers)
    return Footprint({**sizes, "VAE": _vae_bytes(folder / "vae", parts)})


def _flow_folder(folder: Path, family: Family, parts: frozenset[str], dtype: torch.dtype) -> Footprint:
    """An SD 3.x or Flux diffusers folder's, counted on modules built on the meta device from its configs (its
    transformer and T5 may be split over several files): the transformer in `dtype`, the CLIP towers in float32, T5
    in the type its config states."""
    from transformers import AutoConfig, T5EncoderModel

    held, first = {}, {}
    text = bool(parts & TEXT_PARTS)
    t5 = folder / T5_TOWER[family.key][0]
    with torch.device("meta"):
        if "unet" in parts:
            config = read_json(folder / "transformer" / "config.json")
            held["transformer"] = dtype.itemsize * _count(transformer_class(family.key).from_config(config))
        for tower, _ in CLIP_TOWERS[family.key] if text else ():
            first[f"CLIP {tower}"] = 4 * _count(clip_class(family.key)(pretrained(AutoConfig, folder / tower)))
        if text and (t5 / "config.json").is_file():
            stored = json.loads((t5 / "config.json").read_text(encoding="utf-8"))
            width = 2 if (stored.get("dtype") or stored.get("torch_dtype")) in _HALF else 4
            first[f"T5 {t5.name}"] = width * _count(T5EncoderModel(pretrained(AutoConfig, t5)))
    return Footprint({**held, "VAE": _vae_bytes(folder / "vae", parts)}, first)


def _count(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


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
        except Exception as exc:  # a pickle of more than plain weights, a truncated file: named as loading names it
            if isinstance(exc, RuntimeError) and "mmap" in str(exc):  # a legacy (not zip) file cannot be mapped: its
                return file.stat().st_size * (2 if ".fp16" in file.name else 1)  # size on disk, float32 or float16
            raise unreadable(file, exc, "cannot read weights") from exc
        counts = {key: tensor.numel() for key, tensor in state.items()}
    return 4 * sum(count for key, count in counts.items() if key.startswith(prefixes))


def _header_counts(path: Path) -> dict[str, int]:
    """Each tensor's element count, from a safetensors file's header alone (`flow_files.header`)."""
    return {key: math.prod(shape) for key, (shape, _) in flow_files.header(path).items()}
