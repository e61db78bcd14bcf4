"""Tiny random SD 2.x and SDXL models in their real designs (SD 2.x's linear-projection UNet and OpenCLIP text tower,
SDXL's "text_time" UNet and two text towers), saved in each family's real layouts (an original single file, a
diffusers folder) for tests to load back through a user's path."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from diffusers import AutoencoderKL, UNet2DConditionModel
from safetensors.torch import save_file
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

from mist.models.architectures import TINY, Architecture
from support.families import PIPELINES, tiny_vae
from support.original_layout import open_clip_layout, unet_to_original_layout, vae_to_original_layout

_TEXT = dict(TINY.text)
_UNET = dict(sample_size=8, in_channels=4, out_channels=4, down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
             up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), block_out_channels=(32, 64), layers_per_block=1,
             attention_head_dim=(2, 4), use_linear_projection=True, norm_num_groups=32)
TINY_SD2 = Architecture(name="tiny-sd2", unet={**_UNET, "cross_attention_dim": 32}, vae=TINY.vae,
                        text={**_TEXT, "hidden_act": "gelu", "pad_token_id": 0}, family="sd2")
# SDXL's added embedding takes the pooled text (32 here) and six time ids of addition_time_embed_dim each.
_SDXL_UNET = {**_UNET, "cross_attention_dim": 64, "transformer_layers_per_block": (1, 2),
              "addition_embed_type": "text_time", "addition_time_embed_dim": 8,
              "projection_class_embeddings_input_dim": 32 + 6 * 8}
TINY_SDXL = Architecture(name="tiny-sdxl", unet=_SDXL_UNET, vae=TINY.vae, text=_TEXT, family="sdxl",
                         text_2={**_TEXT, "hidden_act": "gelu", "num_hidden_layers": 3, "pad_token_id": 0})
ARCHITECTURES = {"sd2": TINY_SD2, "sdxl": TINY_SDXL}


@dataclass
class Parts:
    """A tiny model's modules as diffusers and transformers make them. For SD 2.x the OpenCLIP tower has one layer
    more than the model reads (`towers[0]`, what the single file holds; SD 2.x reads the penultimate layer)."""

    arch: Architecture
    unet: UNet2DConditionModel
    vae: AutoencoderKL
    towers: list


def tiny_parts(family: str, seed: int = 0) -> Parts:
    arch = ARCHITECTURES[family]
    vae = tiny_vae(family, seed)
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(**arch.unet).eval()
    if family == "sd2":
        towers = [CLIPTextModel(CLIPTextConfig(**{**arch.text, "num_hidden_layers": 3})).eval()]
    else:
        towers = [CLIPTextModel(CLIPTextConfig(**arch.text)).eval(),
                  CLIPTextModelWithProjection(CLIPTextConfig(**arch.text_2)).eval()]
    return Parts(arch, unet, vae, towers)


def read_penultimate(tower: CLIPTextModel, layers: int) -> CLIPTextModel:
    """A copy of `tower` with its first `layers` layers only (what diffusers' converted SD 2.x folders hold)."""
    config = CLIPTextConfig(**{**tower.config.to_dict(), "num_hidden_layers": layers})
    copy = CLIPTextModel(config).eval()
    copy.load_state_dict(tower.state_dict(), strict=False)
    return copy


def save_single_file(path: Path, parts: Parts) -> Path:
    """The model in its family's original single-file layout."""
    state = {**unet_to_original_layout(parts.unet), **vae_to_original_layout(parts.vae)}
    if parts.arch.family == "sd2":
        state.update(open_clip_layout(parts.towers[0], "cond_stage_model.model."))
    else:
        clip_l = {k.removeprefix("text_model."): v for k, v in parts.towers[0].state_dict().items()}
        state.update({f"conditioner.embedders.0.transformer.text_model.{k}": v for k, v in clip_l.items()
                      if not k.endswith("position_ids")})
        state.update(open_clip_layout(parts.towers[1], "conditioner.embedders.1.model."))
    save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    return path


def save_folder(folder: Path, parts: Parts, prediction_type: str = "epsilon") -> Path:
    """The model as a diffusers folder (SD 2.x's text encoder with the layers the model reads, as diffusers' converted
    folders hold it), with model_index.json and the scheduler's prediction type."""
    parts.unet.save_pretrained(folder / "unet")
    parts.vae.save_pretrained(folder / "vae")
    if parts.arch.family == "sd2":
        read_penultimate(parts.towers[0], parts.arch.text["num_hidden_layers"]).save_pretrained(folder / "text_encoder")
    else:
        parts.towers[0].save_pretrained(folder / "text_encoder")
        parts.towers[1].save_pretrained(folder / "text_encoder_2")
    (folder / "scheduler").mkdir()
    (folder / "scheduler" / "scheduler_config.json").write_text(json.dumps({"prediction_type": prediction_type}))
    (folder / "model_index.json").write_text(json.dumps({"_class_name": PIPELINES[parts.arch.family]}))
    return folder


def score_distillation_run(model, latent: torch.Tensor, conditioning, generators) -> tuple:
    """Score distillation's value and latent gradient at `latent`, beside a direct computation with the same draws
    (`generators()` gives fresh generators of one seed): (value, gradient, noised, prediction)."""
    from mist.engine import objectives

    latent = latent.clone().requires_grad_(True)
    value = objectives.score_distillation(model, latent, conditioning, generators(), "fp32")
    value.sum().backward()
    noised = model.noised(latent.detach(), generators())
    with torch.no_grad():
        prediction = model.denoise(noised.latent, noised.timesteps, conditioning)
    return value.detach(), latent.grad, noised, prediction
