"""SD 3.x's and Flux's transformers from single .safetensors files (Stability's `sd3_medium.safetensors`,
`sd3.5_medium.safetensors`; Black Forest Labs' `flux1-dev.safetensors`, `flux1-schnell.safetensors`), their weights
read in the run's type straight from the file, never fetched.

A file states no config: the shapes are read from its weights. SD 3.x's MMDiT (`joint_blocks`) is as wide as 64 times
its depth, with as many attention heads as blocks; SD 3.5's extra attention layers (`attn2`) and query/key norms
(`ln_q`) are seen in the keys. Flux's transformer has heads of the width its query norms have, rotary axes of an
eighth of a head for the index and the rest split between rows and columns (16, 56, 56 for its 128-wide heads), and a
guidance input (`guidance_in`) in dev, none in schnell. Keys may carry ComfyUI's `model.diffusion_model.` prefix.
SD 3.x's weights are renamed by diffusers' own converter; Flux's by `_flux_names` (diffusers' converter assumes
Flux's full width).

A file is read by its header first (names, shapes, stored types: `header`) so that the memory a run needs is known
before any weight is.
"""

from __future__ import annotations

import json
import math
import re
import struct
from pathlib import Path

import torch
from torch import nn

UNET = "model.diffusion_model."
# The published scheduler configs (SD 3 medium's and 3.5's; Flux dev's dynamic shift; schnell's none), which single
# files do not carry.
SCHEDULES = {"sd3": {"shift": 3.0},
             "dev": {"shift": 3.0, "use_dynamic_shifting": True, "base_shift": 0.5, "max_shift": 1.15,
                     "base_image_seq_len": 256, "max_image_seq_len": 4096},
             "schnell": {"shift": 1.0, "use_dynamic_shifting": False}}

Header = dict[str, tuple[tuple[int, ...], str]]  # key -> (shape, stored type as safetensors names it: "BF16", ...)


def header(path: Path) -> Header:
    """Every tensor's shape and stored type in the .safetensors file `path`, read from its header alone."""
    if path.suffix.lower() != ".safetensors":
        raise ValueError(f"{path}: SD 3.x and Flux parts are read from .safetensors files only")
    try:
        with path.open("rb") as handle:
            size = struct.unpack("<Q", handle.read(8))[0]
            entries = json.loads(handle.read(size))
        return {key: (tuple(entry["shape"]), entry["dtype"]) for key, entry in entries.items()
                if key != "__metadata__"}
    except (OSError, ValueError, KeyError, TypeError, struct.error) as exc:
        raise ValueError(f"{path}: cannot read as a safetensors file ({type(exc).__name__})") from exc


def below(head: Header, prefix: str) -> Header:
    """The entries of `head` under `prefix`, named without it."""
    return {key[len(prefix) :]: entry for key, entry in head.items() if key.startswith(prefix)}


def read(path: Path, names: dict[str, str], dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """The tensors of `path` that `names` maps (key in the file -> new name), each cast to `dtype` as it is read, so
    no copy of the whole in another type is ever held (float8 weights are widened)."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as handle:
        return {new: handle.get_tensor(key).to(dtype) for key, new in names.items()}


_OTHER_PARTS = ("first_stage_model.", "vae.", "text_encoders.")  # an SD 3 or ComfyUI file's VAE and text encoders


def transformer_weights(head: Header) -> Header:
    """The transformer's entries of a file's header `head`, keys as in the file (its VAE's and text encoders' left)."""
    prefix = transformer_prefix(head)
    return {key: entry for key, entry in head.items() if key.startswith(prefix) and not key.startswith(_OTHER_PARTS)}


def transformer_prefix(head: Header) -> str:
    """The prefix a file's transformer keys carry: ComfyUI's `model.diffusion_model.` or none."""
    return UNET if any(key.startswith(UNET) for key in head) else ""


def _count(head: Header, pattern: str) -> int:
    """How many distinct block numbers the keys matching `pattern` (with one `(\\d+)` group) have."""
    return len({match.group(1) for key in head if (match := re.match(pattern, key))})


def sd3_config(head: Header) -> dict:
    """SD3Transformer2DModel's arguments for the MMDiT weights `head` (keys without prefix)."""
    width, channels, patch, _ = head["x_embedder.proj.weight"][0]
    depth = _count(head, r"joint_blocks\.(\d+)\.x_block\.attn\.qkv\.weight")
    return dict(sample_size=128, patch_size=patch, in_channels=channels, num_layers=depth,
                attention_head_dim=width // depth, num_attention_heads=depth,
                joint_attention_dim=head["context_embedder.weight"][0][1], caption_projection_dim=width,
                pooled_projection_dim=head["y_embedder.mlp.0.weight"][0][1],
                out_channels=head["final_layer.linear.weight"][0][0] // (patch * patch),
                pos_embed_max_size=math.isqrt(head["pos_embed"][0][1]),
                dual_attention_layers=tuple(sorted({int(k.split(".")[1]) for k in head if ".attn2." in k})),
                qk_norm="rms_norm" if any(".ln_q." in k for k in head) else None)


def flux_config(head: Header) -> dict:
    """FluxTransformer2DModel's arguments for the Flux weights `head` (keys without prefix)."""
    width, channels = head["img_in.weight"][0]
    heads = head["double_blocks.0.img_attn.norm.query_norm.scale"][0][0]
    index = heads // 8
    out = head["final_layer.linear.weight"][0][0]
    return dict(patch_size=1, in_channels=channels, out_channels=None if out == channels else out,
                num_layers=_count(head, r"double_blocks\.(\d+)\."),
                num_single_layers=_count(head, r"single_blocks\.(\d+)\."),
                attention_head_dim=heads, num_attention_heads=width // heads,
                joint_attention_dim=head["txt_in.weight"][0][1],
                pooled_projection_dim=head["vector_in.in_layer.weight"][0][1],
                guidance_embeds="guidance_in.in_layer.weight" in head,
                axes_dims_rope=(index, (heads - index) // 2, (heads - index) // 2))


def transformer_config(path: Path, family: str, head: Header) -> dict:
    """The transformer's arguments from the weights `head` (keys without prefix); ValueError naming `path` when they
    are not a whole SD 3.x MMDiT or Flux transformer."""
    try:
        return sd3_config(head) if family == "sd3" else flux_config(head)
    except (KeyError, IndexError, ValueError, ZeroDivisionError) as exc:
        raise ValueError(f"{path}: not a whole {'SD 3.x' if family == 'sd3' else 'Flux.1'} transformer: weights "
                         f"missing ({exc})") from exc


# Flux's names (per double block, per single block, and the rest) -> diffusers' FluxTransformer2DModel's.
_FLUX_DOUBLE = {"img_mod.lin": "norm1.linear", "txt_mod.lin": "norm1_context.linear",
                "img_attn.norm.query_norm.scale": "attn.norm_q.weight",
                "img_attn.norm.key_norm.scale": "attn.norm_k.weight",
                "txt_attn.norm.query_norm.scale": "attn.norm_added_q.weight",
                "txt_attn.norm.key_norm.scale": "attn.norm_added_k.weight",
                "img_attn.proj": "attn.to_out.0", "txt_attn.proj": "attn.to_add_out",
                "img_mlp.0": "ff.net.0.proj", "img_mlp.2": "ff.net.2",
                "txt_mlp.0": "ff_context.net.0.proj", "txt_mlp.2": "ff_context.net.2"}
_FLUX_SINGLE = {"modulation.lin": "norm.linear", "norm.query_norm.scale": "attn.norm_q.weight",
                "norm.key_norm.scale": "attn.norm_k.weight", "linear2": "proj_out"}
_FLUX_OTHER = {"time_in.in_layer": "time_text_embed.timestep_embedder.linear_1",
               "time_in.out_layer": "time_text_embed.timestep_embedder.linear_2",
               "vector_in.in_layer": "time_text_embed.text_embedder.linear_1",
               "vector_in.out_layer": "time_text_embed.text_embedder.linear_2",
               "guidance_in.in_layer": "time_text_embed.guidance_embedder.linear_1",
               "guidance_in.out_layer": "time_text_embed.guidance_embedder.linear_2",
               "txt_in": "context_embedder", "img_in": "x_embedder", "final_layer.linear": "proj_out"}
# Fused projections, split in row blocks: (Flux's name, diffusers' names) per double block and per single block.
_FLUX_FUSED = (("double_blocks", "img_attn.qkv", ("attn.to_q", "attn.to_k", "attn.to_v")),
               ("double_blocks", "txt_attn.qkv", ("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj")),
               ("single_blocks", "linear1", ("attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp")))
_DIFFUSERS_BLOCKS = {"double_blocks": "transformer_blocks", "single_blocks": "single_transformer_blocks"}


def _rename(key: str, table: dict[str, str], block: str = "") -> str | None:
    """`key` (without its block prefix `block`) renamed by `table` (names match whole, or up to .weight / .bias)."""
    rest = key[len(block) :]
    for old, new in table.items():
        if rest == old or rest.startswith(old + ".") and rest[len(old) + 1 :] in ("weight", "bias"):
            return block.replace(*_block_names(block)) + new + rest[len(old) :]
    return None


def _block_names(block: str) -> tuple[str, str]:
    """(Flux's block list name, diffusers') for a block prefix such as `double_blocks.3.`; no change for none."""
    kind = block.split(".")[0]
    return (kind, _DIFFUSERS_BLOCKS[kind]) if kind in _DIFFUSERS_BLOCKS else ("", "")


def flux_state(state: dict[str, torch.Tensor], width: int) -> dict[str, torch.Tensor]:
    """Flux's weights (keys without prefix) renamed and split for FluxTransformer2DModel of hidden width `width`."""
    out = {}
    for key, tensor in state.items():
        match = re.match(r"(double_blocks|single_blocks)\.\d+\.", key)
        block = match.group(0) if match else ""
        table = (_FLUX_DOUBLE if block.startswith("double") else _FLUX_SINGLE) if block else _FLUX_OTHER
        name = _rename(key, table, block)
        if name is not None:
            out[name] = tensor
        elif key.startswith("final_layer.adaLN_modulation.1."):
            shift, scale = tensor.chunk(2, dim=0)  # Flux orders shift then scale, diffusers scale then shift
            out["norm_out.linear." + key.rsplit(".", 1)[1]] = torch.cat([scale, shift])
        else:
            out.update(_split_fused(key, tensor, block, width))
    return out


def _split_fused(key: str, tensor: torch.Tensor, block: str, width: int) -> dict[str, torch.Tensor]:
    """A fused projection's weight or bias split into diffusers' separate ones ({} for a key of no known kind)."""
    for kind, fused, names in _FLUX_FUSED:
        rest = key[len(block) :]
        if block.startswith(kind) and rest.rsplit(".", 1)[0] == fused:
            sizes = [width] * 3 + ([tensor.shape[0] - 3 * width] if len(names) == 4 else [])
            suffix = rest.rsplit(".", 1)[1]
            target = block.replace(*_block_names(block))
            return {f"{target}{name}.{suffix}": part for name, part in zip(names, tensor.split(sizes), strict=True)}
    return {}


def load_transformer(path: Path, family: str, head: Header, config: dict, dtype: torch.dtype) -> nn.Module:
    """The transformer of the single file `path` (its header `head`, its shapes `config`), built without weights and
    given the file's, read in `dtype`; ValueError naming `path` when they do not fit."""
    from diffusers.loaders.single_file_utils import convert_sd3_transformer_checkpoint_to_diffusers

    from mist.models.flow_loading import transformer_class

    prefix = transformer_prefix(head)
    state = read(path, {key: key[len(prefix) :] for key in transformer_weights(head)}, dtype)
    try:
        if family == "sd3":
            state = convert_sd3_transformer_checkpoint_to_diffusers(state)
        else:
            state = flux_state(state, config["attention_head_dim"] * config["num_attention_heads"])
    except (KeyError, IndexError, RuntimeError) as exc:
        raise ValueError(f"{path}: transformer weights missing or misshapen ({exc})") from exc
    with torch.device("meta"):
        transformer = transformer_class(family).from_config(config)
    try:
        transformer.load_state_dict(state, strict=True, assign=True)
    except RuntimeError as exc:
        detail = str(exc).strip().splitlines()[-1].strip()[:200]
        raise ValueError(f"{path}: transformer weights do not fit its shapes ({detail})") from exc
    return transformer
