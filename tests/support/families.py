"""Tiny random VAEs of each model family (SD 1.x, SD 2.x, SDXL, SD 3.x, Flux) in their real designs, saved in each
family's real layouts (a diffusers folder, an original single file) for tests to load back through a user's path."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from diffusers import AutoencoderKL
from safetensors.torch import save_file

from mist.models.architectures import TINY
from support.original_layout import vae_to_original_layout

# Each family's latent space as its published VAE config and reference code state it (see architectures.py).
PUBLISHED = {"sd1": (4, 0.18215, 0.0, True), "sd2": (4, 0.18215, 0.0, True), "sdxl": (4, 0.13025, 0.0, True),
             "sd3": (16, 1.5305, 0.0609, False), "flux": (16, 0.3611, 0.1159, False)}
PIPELINES = {"sd2": "StableDiffusionPipeline", "sdxl": "StableDiffusionXLPipeline",
             "sd3": "StableDiffusion3Pipeline", "flux": "FluxPipeline"}


def tiny_vae(family: str, seed: int = 0) -> AutoencoderKL:
    """A tiny random AutoencoderKL of `family`'s design: 4 latent channels with 1x1 quant convolutions, or 16
    without; four levels (downsampling by 8, as the real ones) of 32 channels (the 32 groups real VAEs norm with).
    Its posterior is made narrow, as a trained VAE's is (log-variance about -8, not a random one's 0), so that a
    posterior sample is close to the mean, as with real weights."""
    channels, scale, shift, quant = PUBLISHED[family]
    torch.manual_seed(seed)
    vae = AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 4,
                        up_block_types=("UpDecoderBlock2D",) * 4, block_out_channels=(32, 32, 32, 32),
                        layers_per_block=1, latent_channels=channels, norm_num_groups=32, sample_size=64,
                        scaling_factor=scale, shift_factor=shift or None, use_quant_conv=quant,
                        use_post_quant_conv=quant).eval()
    last = vae.quant_conv if quant else vae.encoder.conv_out
    with torch.no_grad():
        last.bias[channels:] -= 8.0
    return vae


def marker(*shape: int) -> torch.Tensor:
    return torch.zeros(shape)


# Key names (with small stand-in tensors) that the family's original single file has beside its VAE.
def _sd2_keys() -> dict[str, torch.Tensor]:
    return {"model.diffusion_model.input_blocks.0.0.weight": marker(8, 4, 3, 3),
            "cond_stage_model.model.token_embedding.weight": marker(8, 16)}


def _sdxl_keys() -> dict[str, torch.Tensor]:
    return {"model.diffusion_model.input_blocks.0.0.weight": marker(8, 4, 3, 3),
            "conditioner.embedders.0.transformer.text_model.embeddings.token_embedding.weight": marker(8, 16),
            "conditioner.embedders.1.model.token_embedding.weight": marker(8, 16)}


def _sd3_keys() -> dict[str, torch.Tensor]:
    return {"model.diffusion_model.joint_blocks.0.context_block.adaLN_modulation.1.bias": marker(16),
            "text_encoders.clip_l.transformer.text_model.embeddings.token_embedding.weight": marker(8, 16)}


FILE_LAYOUTS = {"sd2": (_sd2_keys, "first_stage_model."), "sdxl": (_sdxl_keys, "first_stage_model."),
                "sd3": (_sd3_keys, "first_stage_model."), "flux": (dict, "")}  # flux: ae.safetensors, bare keys


def save_folder(folder: Path, family: str, vae: AutoencoderKL) -> Path:
    """A diffusers folder of `family` holding `vae` (what an encoder-side method reads) and model_index.json; for
    SD 1.x also the configs (not the weights) of the tiny UNet and text encoder, which its loader checks."""
    vae.save_pretrained(folder / "vae")
    (folder / "model_index.json").write_text(json.dumps({"_class_name": PIPELINES.get(family,
                                                                                     "StableDiffusionPipeline")}))
    if family == "sd1":
        for part, config in (("unet", TINY.unet), ("text_encoder", TINY.text)):
            (folder / part).mkdir()
            (folder / part / "config.json").write_text(json.dumps(config))
    if family == "sd2":  # SD 2.x shares SD 1.x's pipeline class: its 1024-wide text encoder tells it
        (folder / "text_encoder").mkdir()
        (folder / "text_encoder" / "config.json").write_text(json.dumps({"hidden_size": 1024}))
    return folder


def save_single_file(path: Path, family: str, vae: AutoencoderKL) -> Path:
    """`vae` in `family`'s original single-file layout, beside the key names that file has."""
    extra, prefix = FILE_LAYOUTS[family]
    save_file({**extra(), **vae_to_original_layout(vae, prefix)}, str(path))
    return path


