"""Tiny random SD 3.x (3 medium's design, and 3.5's with extra attention layers and query/key norms) and Flux (dev,
schnell) models with CLIP-L, OpenCLIP-G and a T5 v1.1-style encoder of T5's real vocabulary, saved as the published
single files are laid out (the transformer in the original key names, under `model.diffusion_model.` or bare; SD 3's
VAE under `first_stage_model.`, Flux's in an ae.safetensors beside it; text encoders in transformers' names, in files
of their own or inside an SD 3 `_incl_clips` file) and as diffusers folders, so that one model can be loaded both ways.

The original key names are written here from the original layouts (MMDiT's `joint_blocks`, Flux's `double_blocks` /
`single_blocks`); reading them back through diffusers' SD 3 converter checks them.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from diffusers import FluxTransformer2DModel, SD3Transformer2DModel
from safetensors.torch import save_file
from transformers import (CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, PreTrainedTokenizerFast,
                          T5Config, T5EncoderModel)

from mist.models import flow_files
from mist.models.t5_tokenizer import t5_tokenizer
from support.families import tiny_vae
from support.flows import Parts, save_folder
from support.original_layout import vae_to_original_layout

JOINT = 96  # T5's width here, and the transformers' text width: wider than the two CLIP towers side by side (80)
SD3 = dict(sample_size=8, patch_size=2, in_channels=16, num_layers=2, attention_head_dim=8, num_attention_heads=2,
           joint_attention_dim=JOINT, caption_projection_dim=16, pooled_projection_dim=32, out_channels=16,
           pos_embed_max_size=16)
SD35 = dict(SD3, dual_attention_layers=(0,), qk_norm="rms_norm")
FLUX = dict(patch_size=1, in_channels=64, num_layers=1, num_single_layers=1, attention_head_dim=32,
            num_attention_heads=2, joint_attention_dim=JOINT, pooled_projection_dim=32, axes_dims_rope=(4, 14, 14))
_CLIP = dict(vocab_size=49408, intermediate_size=37, num_hidden_layers=2, num_attention_heads=1,
             max_position_embeddings=77, projection_dim=16, bos_token_id=49406, eos_token_id=49407,
             pad_token_id=49407)


@dataclass
class Files:
    """Where a tiny model's single files are: the model file and its separate text encoder files."""

    model: Path
    text_encoders: list[Path]


def tiny(kind: str, seed: int = 0) -> Parts:
    """kind: sd3, sd35, dev or schnell."""
    family = "sd3" if kind.startswith("sd3") else "flux"
    vae = tiny_vae(family, seed)
    torch.manual_seed(seed)
    if family == "sd3":
        transformer = SD3Transformer2DModel(**(SD3 if kind == "sd3" else SD35))
        clips = [CLIPTextModelWithProjection(CLIPTextConfig(**_CLIP, hidden_size=32, hidden_act="quick_gelu")),
                 CLIPTextModelWithProjection(CLIPTextConfig(**_CLIP, hidden_size=48, hidden_act="gelu"))]
    else:
        transformer = FluxTransformer2DModel(**FLUX, guidance_embeds=kind == "dev")
        clips = [CLIPTextModel(CLIPTextConfig(**_CLIP, hidden_size=32, hidden_act="quick_gelu"))]
    t5 = T5EncoderModel(T5Config(vocab_size=32128, d_model=JOINT, d_kv=8, d_ff=32, num_layers=1, num_heads=2,
                                 feed_forward_proj="gated-gelu"))
    return Parts(family, transformer.eval(), vae, [c.eval() for c in clips], t5.eval())


def _qkv(state: dict, block: str, names: tuple[str, ...]) -> dict[str, torch.Tensor]:
    return {kind: torch.cat([state[f"{block}{name}.{kind}"] for name in names]) for kind in ("weight", "bias")}


def _swap(tensor: torch.Tensor) -> torch.Tensor:
    first, second = tensor.chunk(2)
    return torch.cat([second, first])


def _both(out: dict, state: dict, old: str, new: str, swap: bool = False) -> None:
    for kind in ("weight", "bias"):
        out[f"{new}.{kind}"] = _swap(state[f"{old}.{kind}"]) if swap else state[f"{old}.{kind}"]


def sd3_original(transformer: SD3Transformer2DModel) -> dict[str, torch.Tensor]:
    """The MMDiT's weights in the original names (no prefix)."""
    state, config = transformer.state_dict(), transformer.config
    out = {"pos_embed": state["pos_embed.pos_embed"]}
    for old, new in (("pos_embed.proj", "x_embedder.proj"), ("context_embedder", "context_embedder"),
                     ("time_text_embed.timestep_embedder.linear_1", "t_embedder.mlp.0"),
                     ("time_text_embed.timestep_embedder.linear_2", "t_embedder.mlp.2"),
                     ("time_text_embed.text_embedder.linear_1", "y_embedder.mlp.0"),
                     ("time_text_embed.text_embedder.linear_2", "y_embedder.mlp.2"),
                     ("proj_out", "final_layer.linear")):
        _both(out, state, old, new)
    _both(out, state, "norm_out.linear", "final_layer.adaLN_modulation.1", swap=True)
    for i in range(config.num_layers):
        out.update(_sd3_block(state, i, last=i == config.num_layers - 1))
    return out


def _sd3_block(state: dict, i: int, last: bool) -> dict[str, torch.Tensor]:
    old, new, out = f"transformer_blocks.{i}.", f"joint_blocks.{i}.", {}
    for kind, tensor in _qkv(state, old, ("attn.to_q", "attn.to_k", "attn.to_v")).items():
        out[f"{new}x_block.attn.qkv.{kind}"] = tensor
    for kind, tensor in _qkv(state, old, ("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj")).items():
        out[f"{new}context_block.attn.qkv.{kind}"] = tensor
    pairs = [("attn.to_out.0", "x_block.attn.proj"), ("norm1.linear", "x_block.adaLN_modulation.1"),
             ("ff.net.0.proj", "x_block.mlp.fc1"), ("ff.net.2", "x_block.mlp.fc2")]
    if not last:
        pairs += [("attn.to_add_out", "context_block.attn.proj"),
                  ("norm1_context.linear", "context_block.adaLN_modulation.1"),
                  ("ff_context.net.0.proj", "context_block.mlp.fc1"), ("ff_context.net.2", "context_block.mlp.fc2")]
    for a, b in pairs:
        _both(out, state, old + a, new + b)
    if last:
        _both(out, state, old + "norm1_context.linear", new + "context_block.adaLN_modulation.1", swap=True)
    for a, b in (("attn.norm_q", "x_block.attn.ln_q"), ("attn.norm_k", "x_block.attn.ln_k"),
                 ("attn.norm_added_q", "context_block.attn.ln_q"), ("attn.norm_added_k", "context_block.attn.ln_k"),
                 ("attn2.norm_q", "x_block.attn2.ln_q"), ("attn2.norm_k", "x_block.attn2.ln_k")):
        if f"{old}{a}.weight" in state:
            out[f"{new}{b}.weight"] = state[f"{old}{a}.weight"]
    if f"{old}attn2.to_q.weight" in state:
        for kind, tensor in _qkv(state, old, ("attn2.to_q", "attn2.to_k", "attn2.to_v")).items():
            out[f"{new}x_block.attn2.qkv.{kind}"] = tensor
        _both(out, state, old + "attn2.to_out.0", new + "x_block.attn2.proj")
    return out


_FLUX_DOUBLE = {"norm1.linear": "img_mod.lin", "norm1_context.linear": "txt_mod.lin", "attn.to_out.0": "img_attn.proj",
                "attn.to_add_out": "txt_attn.proj", "ff.net.0.proj": "img_mlp.0", "ff.net.2": "img_mlp.2",
                "ff_context.net.0.proj": "txt_mlp.0", "ff_context.net.2": "txt_mlp.2"}
_FLUX_NORMS = {"attn.norm_q": "img_attn.norm.query_norm", "attn.norm_k": "img_attn.norm.key_norm",
               "attn.norm_added_q": "txt_attn.norm.query_norm", "attn.norm_added_k": "txt_attn.norm.key_norm"}
_FLUX_OTHER = {new: old for old, new in flow_files._FLUX_OTHER.items()}  # validated against diffusers' converter


def flux_original(transformer: FluxTransformer2DModel) -> dict[str, torch.Tensor]:
    """Flux's weights in Black Forest Labs' names (no prefix)."""
    state, config, out = transformer.state_dict(), transformer.config, {}
    for old, new in _FLUX_OTHER.items():
        if f"{old}.weight" in state:
            _both(out, state, old, new)
    _both(out, state, "norm_out.linear", "final_layer.adaLN_modulation.1", swap=True)
    for i in range(config.num_layers):
        old, new = f"transformer_blocks.{i}.", f"double_blocks.{i}."
        for a, b in _FLUX_DOUBLE.items():
            _both(out, state, old + a, new + b)
        for a, b in _FLUX_NORMS.items():
            out[f"{new}{b}.scale"] = state[f"{old}{a}.weight"]
        for kind, tensor in _qkv(state, old, ("attn.to_q", "attn.to_k", "attn.to_v")).items():
            out[f"{new}img_attn.qkv.{kind}"] = tensor
        for kind, tensor in _qkv(state, old, ("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj")).items():
            out[f"{new}txt_attn.qkv.{kind}"] = tensor
    for i in range(config.num_single_layers):
        old, new = f"single_transformer_blocks.{i}.", f"single_blocks.{i}."
        _both(out, state, old + "norm.linear", new + "modulation.lin")
        _both(out, state, old + "proj_out", new + "linear2")
        out[f"{new}norm.query_norm.scale"] = state[f"{old}attn.norm_q.weight"]
        out[f"{new}norm.key_norm.scale"] = state[f"{old}attn.norm_k.weight"]
        for kind, tensor in _qkv(state, old, ("attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp")).items():
            out[f"{new}linear1.{kind}"] = tensor
    return out


def _clip_file(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """A CLIP tower's weights as the published files name them (under `text_model.`, its projection beside)."""
    return {(k if k.startswith(("text_model.", "text_projection.")) else "text_model." + k): v.contiguous()
            for k, v in model.state_dict().items()}


def _t5_file(model: T5EncoderModel) -> dict[str, torch.Tensor]:
    """T5's weights as its published single files have them (`shared.weight`, no tied copy)."""
    return {k: v.contiguous() for k, v in model.state_dict().items() if k != "encoder.embed_tokens.weight"}


def save_files(folder: Path, parts: Parts, incl_clips: bool = False, prefixed: bool = True,
               dtype: torch.dtype = torch.float32) -> Files:
    """The model as published single files in `folder` (see the module's notes); `incl_clips`: SD 3's text encoders
    inside its file; `prefixed`: a Flux transformer under `model.diffusion_model.`; weights stored in `dtype`."""
    folder.mkdir(parents=True, exist_ok=True)
    cast = lambda state: {k: v.to(dtype) for k, v in state.items()}  # noqa: E731
    texts = {"clip_l": _clip_file(parts.clips[0]), "t5xxl": _t5_file(parts.t5)}
    if parts.family == "sd3":
        texts["clip_g"] = _clip_file(parts.clips[1])
        state = {f"model.diffusion_model.{k}": v for k, v in sd3_original(parts.transformer).items()}
        state.update(vae_to_original_layout(parts.vae, "first_stage_model."))
        if incl_clips:
            for name, weights in texts.items():
                state.update({f"text_encoders.{name}.transformer.{k}": v for k, v in weights.items()})
        model = folder / ("sd3_medium_incl_clips.safetensors" if incl_clips else "sd3_medium.safetensors")
    else:
        prefix = "model.diffusion_model." if prefixed else ""
        state = {prefix + k: v for k, v in flux_original(parts.transformer).items()}
        save_file(vae_to_original_layout(parts.vae, ""), str(folder / "ae.safetensors"))
        guided = parts.transformer.config.guidance_embeds
        model = folder / ("flux1-dev.safetensors" if guided else "flux1-schnell.safetensors")
    save_file(cast({k: v.contiguous() for k, v in state.items()}), str(model))
    files = []
    for name, weights in ({} if incl_clips else texts).items():
        files.append(folder / f"{name}.safetensors")
        save_file(cast(weights), str(files[-1]))
    return Files(model, files)


def save_same_folder(folder: Path, parts: Parts, scheduler: str | None = None) -> Path:
    """The model as a diffusers folder, its T5 tokenizer the one Mist ships (so both ways read prompts alike)."""
    save_folder(folder, parts, scheduler)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=t5_tokenizer(), pad_token="<pad>", eos_token="</s>",
                                        unk_token="<unk>")
    tokenizer.save_pretrained(folder / ("tokenizer_3" if parts.family == "sd3" else "tokenizer_2"))
    return folder


_STORED = {torch.float32: "F32", torch.bfloat16: "BF16", torch.float16: "F16"}


def sparse_safetensors(path: Path, tensors: dict[str, torch.Tensor]) -> Path:
    """A .safetensors file of `tensors` (meta tensors: shapes and types only) whose data is a hole: the header is
    written and the file extended to its full size, so a full-size model's file costs no disk (its weights read as
    zeros)."""
    import json
    import math
    import struct

    entries, offset = {}, 0
    for key, tensor in tensors.items():
        size = math.prod(tensor.shape) * tensor.element_size()
        entries[key] = {"dtype": _STORED[tensor.dtype], "shape": list(tensor.shape), "data_offsets": [offset,
                                                                                                     offset + size]}
        offset += size
    header = json.dumps(entries).encode()
    header += b" " * (-len(header) % 8)
    with path.open("wb") as handle:
        handle.write(struct.pack("<Q", len(header)) + header)
        handle.truncate(8 + len(header) + offset)
    return path
