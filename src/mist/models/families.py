"""Which model family a checkpoint file or diffusers folder holds, told from its key names, a few shapes and its
configs; and the one-line refusals of what Mist cannot protect against (a refiner, an inpainting model, a ControlNet,
a LoRA alone) or cannot run a method on (a denoiser-side method on a VAE alone).

Single files are told apart the way their original layouts differ: Flux's transformer has `double_blocks`, SD 3.x's
MMDiT `joint_blocks`, SDXL's second text encoder sits under `conditioner.embedders.1.` (its refiner has only
`conditioner.embedders.0.`, OpenCLIP-G), SD 2.x's OpenCLIP text encoder under `cond_stage_model.model.` and its
cross-attention is 1024 wide; SD 1.x is the rest. A VAE alone (Flux's `ae.safetensors`: bare `encoder.` / `decoder.`
keys) is told by its latent channels: 16 channels without `quant_conv` is Flux's layout, or SD 3.x's under
`first_stage_model.`. Diffusers folders name their pipeline in model_index.json; a diffusers VAE folder alone (its
config.json and weights) is told by the latent channels, scale and shift its config carries, which also tells SD 3.x's
16-channel VAE from Flux's.
"""

from __future__ import annotations

from dataclasses import replace
from math import isclose
from pathlib import Path
from typing import Any, Iterable

import torch

from mist.models.architectures import ENCODER_SIDE_METHODS, FAMILIES, Family

UNET = "model.diffusion_model."
FIRST_CONV = UNET + "input_blocks.0.0.weight"  # its input channels tell an inpainting UNet (9)
SD2_TEXT = "cond_stage_model.model."  # SD 2.x's OpenCLIP text tower
# Where single files keep the VAE: LDM's and SD 3.x's prefix, ComfyUI's bundled files' prefix, Flux's bare ae file.
VAE_PREFIXES = ("first_stage_model.", "vae.", "")
# The VAE's own key prefixes of each VAE part (below the file's VAE prefix).
VAE_PARTS = {"encoder": ("encoder.", "quant_conv."), "decoder": ("decoder.", "post_quant_conv.")}
# Pipelines of diffusers folders, by model_index.json's `_class_name`; SD 1.x's also hold SD 2.x (told by width).
PIPELINES = {"StableDiffusionPipeline": "sd1", "StableDiffusionImg2ImgPipeline": "sd1",
             "StableDiffusionXLPipeline": "sdxl", "StableDiffusionXLImg2ImgPipeline": "sdxl",
             "StableDiffusion3Pipeline": "sd3", "StableDiffusion3Img2ImgPipeline": "sd3",
             "FluxPipeline": "flux", "FluxImg2ImgPipeline": "flux"}
FLUX_VAE_FILE = "ae.safetensors"  # Flux's VAE as Black Forest Labs publish it, beside the transformer's file
_SD2_WIDTH = 1024  # cross-attention / text width of SD 2.x (SD 1.x: 768)
# ControlNet keys: LDM's single files, diffusers' single files, lllyasviel's bare .pth files.
_CONTROLNET_PREFIXES = ("control_model.", "controlnet_", "input_hint_block.", "zero_convs.")
_LORA_MARKS = (".lora_A.", ".lora_B.", ".lora_down.", ".lora_up.", "lora_unet_", "lora_te_", "lora_te1_", "lora_te2_")


def vae_prefix(keys: Iterable[str]) -> str:
    """The prefix a single file's original-layout VAE keys carry ("" for a bare VAE file); LDM's when it has none."""
    names = set(keys)
    return next((p for p in VAE_PREFIXES if f"{p}encoder.conv_in.weight" in names), VAE_PREFIXES[0])


def family_from_names(keys: list[str]) -> Family | None:
    """The family a single file's key names alone tell (None: SD 1.x, or whatever the shapes decide)."""
    if any(k.startswith((UNET + "double_blocks.", "double_blocks.")) for k in keys):
        return FAMILIES["flux"]
    if any(k.startswith((UNET + "joint_blocks.", "joint_blocks.")) for k in keys):
        return FAMILIES["sd3"]
    if any(k.startswith("conditioner.embedders.1.") for k in keys):
        return FAMILIES["sdxl"]
    if any(k.startswith(SD2_TEXT) for k in keys):
        return FAMILIES["sd2"]
    return None


def file_family(path: Path, state: dict[str, torch.Tensor], keys: list[str]) -> Family:
    """The family of the single file at `path` (its key names `keys`, its tensors read so far `state`); ValueError
    naming the file for what Mist refuses."""
    refuse_unsupported_file(path, state, keys)
    family = family_from_names(keys)
    if family is None:
        cross = state.get(first_cross_attention(keys) or "")
        if cross is not None and cross.shape[1] == _SD2_WIDTH:
            family = FAMILIES["sd2"]
        elif not any(k.startswith((UNET, "cond_stage_model.")) for k in keys):
            family = _lone_vae_family(path, state, keys)
    family = family or FAMILIES["sd1"]
    if family.key != "sd1":
        vae_file(path, family, keys)
    return family


def vae_file(path: Path, family: Family, keys: list[str]) -> Path:
    """The file that holds a single file's VAE: itself, or for a Flux transformer published alone (as
    flux1-dev.safetensors is) the ae.safetensors beside it; ValueError naming `path` when neither does."""
    if f"{vae_prefix(keys)}encoder.conv_in.weight" in keys:
        return path
    beside = path.with_name(FLUX_VAE_FILE)
    if family.key == "flux" and beside.is_file():
        return beside
    what = "a Flux transformer" if family.key == "flux" else f"a {family.title} file"
    raise ValueError(f"{path}: {what} without its VAE: give the file or diffusers folder that holds the VAE "
                     f"(for Flux, put its {FLUX_VAE_FILE} beside the transformer's file)")


def _lone_vae_family(path: Path, state: dict[str, torch.Tensor], keys: list[str]) -> Family | None:
    """The family of a file holding a VAE and nothing else: 16 latent channels is Flux's autoencoder (bare keys, as
    ae.safetensors) or SD 3.x's (under first_stage_model.); a 4-channel VAE alone is refused, SD 1.x's, 2.x's and
    SDXL's being the same shape. None: not a VAE file either."""
    prefix = vae_prefix(keys)
    conv_out = state.get(f"{prefix}encoder.conv_out.weight")
    if conv_out is None:
        return None
    channels = conv_out.shape[0] // 2
    if channels == 16:
        return alone(FAMILIES["sd3" if prefix == "first_stage_model." else "flux"])
    raise ValueError(f"{path}: a VAE alone with {channels} latent channels (SD 1.x's, 2.x's and SDXL's have 4 and the "
                     "same shape, so Mist cannot tell which model it serves): give the whole model's file or folder, "
                     "or the VAE as a diffusers folder (config.json with its scaling_factor beside the weights)")


def first_cross_attention(keys: list[str]) -> str | None:
    """The first (sorted) UNet cross-attention key weight: its width tells SD v1 (768) from SD 2.x (1024)."""
    return min((k for k in keys if k.startswith(UNET) and k.endswith("attn2.to_k.weight")), default=None)


def refuse_unsupported_file(path: Path, state: dict[str, torch.Tensor], keys: list[str]) -> None:
    """ValueError naming `path` if it is a LoRA alone, a ControlNet, an SDXL refiner or an inpainting model."""
    if any(mark in k for k in keys for mark in _LORA_MARKS):
        raise ValueError(f"{path}: a LoRA file alone (adapter weights, no base model): give the model it was trained "
                         "on instead")
    if any(k.startswith(_CONTROLNET_PREFIXES) for k in keys):
        raise ValueError(f"{path}: a ControlNet (a conditioning add-on, not a base model): give the base model instead")
    if (any(k.startswith("conditioner.embedders.0.model.") for k in keys)
            and not any(k.startswith("conditioner.embedders.1.") for k in keys)):
        raise ValueError(f"{path}: an SDXL refiner (OpenCLIP-G as its only text encoder): Mist needs the SDXL base "
                         "model")
    first = state.get(FIRST_CONV)
    if first is not None and first.shape[1] == 9:
        raise ValueError(f"{path}: an inpainting model (its UNet takes 9 input channels): give a plain text-to-image "
                         "model")


def folder_family(folder: Path, index: dict[str, Any], configs: dict[str, dict[str, Any]]) -> Family:
    """The family of a diffusers folder from its model_index.json (`index`; empty: none, read as SD 1.x's) and the
    UNet and text encoder `configs` it has ({} where absent); ValueError naming the folder for what Mist refuses."""
    name = index.get("_class_name", "StableDiffusionPipeline")
    if "Inpaint" in name:
        raise ValueError(f"{folder}: an inpainting pipeline ({name}): give a plain text-to-image model")
    if "ControlNet" in name:
        raise ValueError(f"{folder}: a ControlNet pipeline ({name}): give the base model instead")
    if PIPELINES.get(name) == "sdxl" and index.get("requires_aesthetics_score"):
        raise ValueError(f"{folder}: an SDXL refiner ({name} with aesthetic-score conditioning): Mist needs the SDXL "
                         "base model")
    if name not in PIPELINES:
        raise ValueError(f"{folder}: a {name} folder, which Mist does not support (it knows "
                         f"{', '.join(sorted(set(PIPELINES)))})")
    widths = (configs.get("text_encoder", {}).get("hidden_size"), configs.get("unet", {}).get("cross_attention_dim"))
    if PIPELINES[name] == "sd1" and (_SD2_WIDTH in widths or configs.get("unet", {}).get("use_linear_projection")):
        return FAMILIES["sd2"]  # SD 2.x's UNet projects into its transformers linearly, SD 1.x's with 1x1 convolutions
    return FAMILIES[PIPELINES[name]]


def alone(family: Family) -> Family:
    """`family` as a VAE alone: titled so, and without a denoiser (only the encoder-side methods run on it)."""
    return replace(family, title=f"{family.title} VAE (alone)", denoiser=False)


def lone_vae_family(folder: Path, config: dict[str, Any]) -> Family:
    """The family of the diffusers VAE folder `folder` alone, told from its `config`'s latent channels, scaling_factor
    and shift_factor (SD 1.x's and 2.x's VAE is one: read as SD 1.x's), as one without its denoiser: only the
    encoder-side methods run on a VAE alone. ValueError naming the folder when they match no family's."""
    channels = config.get("latent_channels", 4)
    scale, shift = config.get("scaling_factor"), config.get("shift_factor") or 0.0
    for family in FAMILIES.values():
        known = family.vae_config()
        if (known["latent_channels"] == channels and scale is not None and isclose(known["scaling_factor"], scale)
                and isclose(known.get("shift_factor") or 0.0, shift, abs_tol=1e-9)):
            return alone(family)
    raise ValueError(f"{folder}: a VAE alone whose config ({channels} latent channels, scaling_factor {scale}, "
                     f"shift_factor {shift}) matches no family Mist knows: give the whole model's file or folder")


def refuse_denoiser_parts(source: Path | str, family: Family, parts: frozenset[str]) -> None:
    """ValueError naming `source` when a run asks an encoder-only family (a VAE alone) for a part beyond its VAE, or
    a family other than SD 1.x for its text encoder itself (textual inversion)."""
    if family.denoiser and family.key != "sd1" and "text_model" in parts:
        raise ValueError(f"{source}: a {family.title} model: textual inversion, which trains a word through the text "
                         "encoder, runs on Stable Diffusion 1.x only so far")
    if family.denoiser:
        return
    needed = (["denoiser"] if "unet" in parts else []) + (["text encoder"] if parts & {"text_encoder", "text_model"}
                                                           else [])
    if needed:
        raise ValueError(f"{source}: a {family.title} model: so far only the encoder-side methods "
                         f"({ENCODER_SIDE_METHODS}) run; this run needs its {' and '.join(needed)}")


def file_prediction_type(path: Path, family: Family) -> str:
    """What the denoiser of the single file at `path` predicts. A file does not say: SD 2.x's published 768-pixel
    files (768-v-ema.ckpt, v2-1_768-ema-pruned.safetensors and their kin) predict v and carry their size in their name,
    its 512-pixel ones (512-base-ema.ckpt, v2-1_512-ema-pruned) predict the noise; SDXL predicts the noise. So a
    2.x file whose name holds "768" is read as a v-prediction model, any other as a noise predictor (a diffusers
    folder says it in scheduler/scheduler_config.json)."""
    return "v_prediction" if family.key == "sd2" and "768" in path.name else "epsilon"


def vae_config_from_weights(path: Path, family: Family, state: dict[str, torch.Tensor], keys: list[str],
                            prefix: str) -> dict[str, Any]:
    """The diffusers VAE config of a single file's original-layout VAE: the family's shipped config, with the block
    widths, depth, latent channels and 1x1 convolutions its weights have (the group count, scale and shift factors
    are not in the weights: the family's)."""
    config = family.vae_config()
    names = set(keys)
    widths = []
    while f"{prefix}encoder.down.{len(widths)}.block.0.conv1.weight" in state:
        widths.append(state[f"{prefix}encoder.down.{len(widths)}.block.0.conv1.weight"].shape[0])
    depth = 0
    while f"{prefix}encoder.down.0.block.{depth}.conv1.weight" in names:
        depth += 1
    conv_out = state.get(f"{prefix}encoder.conv_out.weight")
    if not widths or conv_out is None:
        raise ValueError(f"{path}: not a {family.title} model Mist can read: no VAE encoder weights in the original "
                         "layout")
    config.update(block_out_channels=widths, layers_per_block=depth, latent_channels=conv_out.shape[0] // 2,
                  down_block_types=["DownEncoderBlock2D"] * len(widths),
                  up_block_types=["UpDecoderBlock2D"] * len(widths),
                  use_quant_conv=f"{prefix}quant_conv.weight" in names,
                  use_post_quant_conv=f"{prefix}post_quant_conv.weight" in names,
                  mid_block_add_attention=f"{prefix}encoder.mid.attn_1.q.weight" in names)
    return config


LARGEST_SIDE_MULTIPLE = 16  # of the multiples `side_multiple` gives


def side_multiple(family: Family, parts: frozenset[str]) -> tuple[int, str]:
    """The multiple of pixels that each side of the image a run of `parts` on `family` protects (of each tile, in
    block mode) must be, and why: 8, as every family's VAE halves the image three times; 16 when an SD 3.x or Flux
    transformer runs, as it cuts the latent into 2 x 2 patches (Flux packs them; SD 3's MMDiT embeds them)."""
    if family.flow and "unet" in parts:
        return 16, f"the {family.title} transformer cuts the latent (1/8 of each side) into 2 x 2 patches"
    return 8, f"the {family.title} VAE halves each side three times"
