"""Write diffusers / transformers modules in the layout of the original CompVis Stable Diffusion v1 checkpoint.

Tests use this to turn tiny random models into `sd-v1-4.ckpt`-style files (`model.diffusion_model.*`,
`first_stage_model.*`, `cond_stage_model.transformer.*`) and then load them back through the product's real loader.
The mapping is derived from the module configs, so it fits any block count, width or `layers_per_block`.
"""

from __future__ import annotations

import torch
from diffusers import AutoencoderKL, UNet2DConditionModel
from transformers import CLIPTextModel

# Renames applied to the part of a key below a mapped module (first matching old name wins).
_UNET_RESNET = {"norm1": "in_layers.0", "conv1": "in_layers.2", "time_emb_proj": "emb_layers.1",
                "norm2": "out_layers.0", "conv2": "out_layers.3", "conv_shortcut": "skip_connection"}
_VAE_RESNET = {"conv_shortcut": "nin_shortcut"}
_VAE_ATTENTION = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}

Mapping = dict[str, tuple[str, dict[str, str]]]  # diffusers module prefix -> (ldm module prefix, renames below it)


def _unet_mapping(config) -> Mapping:
    per_block = config["layers_per_block"]
    if not isinstance(per_block, int):
        raise ValueError("the ldm layout needs the same layers_per_block for every block")
    mapping: Mapping = {
        "time_embedding.linear_1.": ("time_embed.0.", {}),
        "time_embedding.linear_2.": ("time_embed.2.", {}),
        "conv_in.": ("input_blocks.0.0.", {}),
        "mid_block.resnets.0.": ("middle_block.0.", _UNET_RESNET),
        "mid_block.attentions.0.": ("middle_block.1.", {}),
        "mid_block.resnets.1.": ("middle_block.2.", _UNET_RESNET),
        "conv_norm_out.": ("out.0.", {}),
        "conv_out.": ("out.2.", {}),
        "add_embedding.linear_1.": ("label_emb.0.0.", {}),  # SDXL's added (pooled text + time ids) embedding
        "add_embedding.linear_2.": ("label_emb.0.2.", {}),
    }
    # input_blocks.0 is conv_in; each down block then has `per_block` (resnet, attention) rows and one downsampler row.
    for b in range(len(config["down_block_types"])):
        for layer in range(per_block):
            row = 1 + b * (per_block + 1) + layer
            mapping[f"down_blocks.{b}.resnets.{layer}."] = (f"input_blocks.{row}.0.", _UNET_RESNET)
            mapping[f"down_blocks.{b}.attentions.{layer}."] = (f"input_blocks.{row}.1.", {})
        mapping[f"down_blocks.{b}.downsamplers.0.conv."] = (f"input_blocks.{(b + 1) * (per_block + 1)}.0.op.", {})
    # Each up block has `per_block + 1` rows; its upsampler sits in the last row, after the attention if there is one.
    for b, block_type in enumerate(config["up_block_types"]):
        for layer in range(per_block + 1):
            row = b * (per_block + 1) + layer
            mapping[f"up_blocks.{b}.resnets.{layer}."] = (f"output_blocks.{row}.0.", _UNET_RESNET)
            mapping[f"up_blocks.{b}.attentions.{layer}."] = (f"output_blocks.{row}.1.", {})
        last_row, slot = (b + 1) * (per_block + 1) - 1, 2 if "CrossAttn" in block_type else 1
        mapping[f"up_blocks.{b}.upsamplers.0.conv."] = (f"output_blocks.{last_row}.{slot}.conv.", {})
    return mapping


def _vae_mapping(config) -> Mapping:
    mapping: Mapping = {"quant_conv.": ("quant_conv.", {}), "post_quant_conv.": ("post_quant_conv.", {})}
    for part in ("encoder", "decoder"):
        mapping |= {
            f"{part}.conv_in.": (f"{part}.conv_in.", {}),
            f"{part}.conv_norm_out.": (f"{part}.norm_out.", {}),
            f"{part}.conv_out.": (f"{part}.conv_out.", {}),
            f"{part}.mid_block.resnets.0.": (f"{part}.mid.block_1.", _VAE_RESNET),
            f"{part}.mid_block.resnets.1.": (f"{part}.mid.block_2.", _VAE_RESNET),
            f"{part}.mid_block.attentions.0.": (f"{part}.mid.attn_1.", _VAE_ATTENTION),
        }
    per_block = config["layers_per_block"]
    for i in range(len(config["down_block_types"])):
        for layer in range(per_block):
            mapping[f"encoder.down_blocks.{i}.resnets.{layer}."] = (f"encoder.down.{i}.block.{layer}.", _VAE_RESNET)
        mapping[f"encoder.down_blocks.{i}.downsamplers.0.conv."] = (f"encoder.down.{i}.downsample.conv.", {})
    levels = len(config["up_block_types"])
    for i in range(levels):  # the ldm decoder numbers its levels from the lowest resolution up, diffusers the reverse
        level = levels - 1 - i
        for layer in range(per_block + 1):
            mapping[f"decoder.up_blocks.{i}.resnets.{layer}."] = (f"decoder.up.{level}.block.{layer}.", _VAE_RESNET)
        mapping[f"decoder.up_blocks.{i}.upsamplers.0.conv."] = (f"decoder.up.{level}.upsample.conv.", {})
    return mapping


def _rename(key: str, mapping: Mapping) -> str:
    prefix = max((p for p in mapping if key.startswith(p)), key=len, default=None)
    if prefix is None:
        raise KeyError(f"no original-layout name for {key!r}")
    new_prefix, renames = mapping[prefix]
    rest = key[len(prefix):]
    for old, new in renames.items():
        if rest.startswith(old + "."):
            rest = new + rest[len(old):]
            break
    return new_prefix + rest


def to_original_layout(
    unet: UNet2DConditionModel, vae: AutoencoderKL, text_encoder: CLIPTextModel, *, novelai: bool = False
) -> dict[str, torch.Tensor]:
    """One state dict in the sd-v1-4.ckpt layout; `novelai` drops the `text_model.` level of the text encoder keys.

    The tensors are the modules' own (not copies).
    """
    state = unet_to_original_layout(unet)
    state.update(vae_to_original_layout(vae))
    # transformers 4 names the text encoder's weights `text_model.*`, transformers 5 drops that level.
    text_prefix = "cond_stage_model.transformer." + ("" if novelai else "text_model.")
    for key, tensor in text_encoder.state_dict().items():
        if not key.endswith("position_ids"):
            state[text_prefix + key.removeprefix("text_model.")] = tensor
    return state


def unet_to_original_layout(unet: UNet2DConditionModel) -> dict[str, torch.Tensor]:
    """The UNet's weights in the LDM layout under `model.diffusion_model.` (SD 1.x, 2.x and SDXL alike)."""
    unet_mapping = _unet_mapping(unet.config)
    return {"model.diffusion_model." + _rename(key, unet_mapping): tensor for key, tensor in unet.state_dict().items()}


_OPEN_CLIP_LAYER = {"layer_norm1.": "ln_1.", "layer_norm2.": "ln_2.", "mlp.fc1.": "mlp.c_fc.",
                    "mlp.fc2.": "mlp.c_proj.", "self_attn.out_proj.": "attn.out_proj."}


def open_clip_layout(tower, prefix: str) -> dict[str, torch.Tensor]:
    """A transformers CLIP text tower in OpenCLIP's layout under `prefix` (SD 2.x's `cond_stage_model.model.`, SDXL's
    `conditioner.embedders.1.model.`): fused q/k/v projections, `positional_embedding`, `ln_final`, and
    `text_projection` as a (width, embed) matrix (the identity for a tower without a projection)."""
    own = {k.removeprefix("text_model."): v for k, v in tower.state_dict().items() if not k.endswith("position_ids")}
    width = own["embeddings.token_embedding.weight"].shape[1]
    state = {"token_embedding.weight": own.pop("embeddings.token_embedding.weight"),
             "positional_embedding": own.pop("embeddings.position_embedding.weight"),
             "ln_final.weight": own.pop("final_layer_norm.weight"), "ln_final.bias": own.pop("final_layer_norm.bias"),
             "text_projection": own.pop("text_projection.weight").T.contiguous() if "text_projection.weight" in own
             else torch.eye(width)}
    layers = {int(k.split(".")[2]) for k in own}
    for i in layers:
        below = f"encoder.layers.{i}."
        for kind in ("weight", "bias"):
            state[f"transformer.resblocks.{i}.attn.in_proj_{kind}"] = torch.cat(
                [own.pop(f"{below}self_attn.{p}_proj.{kind}") for p in "qkv"])
        for key in [k for k in own if k.startswith(below)]:
            rest = key[len(below):]
            old = next(o for o in _OPEN_CLIP_LAYER if rest.startswith(o))
            state[f"transformer.resblocks.{i}.{_OPEN_CLIP_LAYER[old]}{rest[len(old):]}"] = own.pop(key)
    assert not own, sorted(own)
    return {prefix + key: tensor for key, tensor in state.items()}


def vae_to_original_layout(vae: AutoencoderKL, prefix: str = "first_stage_model.") -> dict[str, torch.Tensor]:
    """The VAE's weights in the original (LDM / Flux autoencoder) layout under `prefix` ("" for a bare VAE file such as
    Flux's ae.safetensors); a VAE without 1x1 quant convolutions (SD 3.x, Flux) simply has none of those keys."""
    state = {}
    vae_mapping = _vae_mapping(vae.config)
    for key, tensor in vae.state_dict().items():
        name = _rename(key, vae_mapping)
        if ".mid.attn_1." in name and name.endswith(".weight") and tensor.ndim == 2:
            tensor = tensor[:, :, None, None]  # ldm's attention projections are 1x1 convolutions
        state[prefix + name] = tensor
    return state
