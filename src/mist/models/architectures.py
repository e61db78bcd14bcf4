"""Shapes of the networks Mist attacks: Stable Diffusion v1, a tiny stand-in for tests, the denoisers and text
encoders of SD 2.x and SDXL, and the latent spaces of the families whose VAE encoder alone is attacked (SD 3.x, Flux).

An architecture is pure data (keyword arguments for the diffusers / transformers classes), so the same loading code
builds the real 860M-parameter UNet or a few-kilobyte test model. The latent encoder always downsamples by 8, as SD's
does, so image-size rules are the same for both.

A family's latent is z = (mean - shift) * scale, mean the VAE posterior's mean. The scale and shift factors and channel
counts are those of each family's published diffusers VAE config (`scaling_factor`, `shift_factor`), checked against
the reference code: SD 1.x / 2.x 4 channels, 0.18215, no shift (the LDM configs' `scale_factor`); SDXL 4 channels,
0.13025 (stabilityai/stable-diffusion-xl-base-1.0's vae/config.json); SD 3.x 16 channels, 1.5305, shift 0.0609
(Stability-AI/sd3.5, sd3_impls.py `SD3LatentFormat`); Flux 16 channels, 0.3611, shift 0.1159 (black-forest-labs/flux,
src/flux/modules/autoencoder.py encodes `scale_factor * (z - shift_factor)`; its util.py gives the values). diffusers'
SD3 and Flux img2img pipelines apply `(latents - shift_factor) * scaling_factor` the same way. SD 3.x's and Flux's VAEs
have no 1x1 `quant_conv` / `post_quant_conv`. The configs Mist reads single files with ship in assets/ (vae_*.json).

SD 2.x's and SDXL's UNets and text encoders ship as assets/denoiser_*.json, written from the published model cards and
configs: SD 2.x a UNet of SD 1.x's widths with 64-channel attention heads ((5, 10, 20, 20) heads), linear projections
and 1024-wide cross-attention, conditioned on OpenCLIP ViT-H/14's text tower (1024 wide, GELU) of which SD 2.x reads
the penultimate layer, so the tower is built with 23 of its 24 layers and its final layer norm (as diffusers' converted
folders are); SDXL base a three-level UNet (320, 640, 1280; transformer depths 1, 2, 10) with 2048-wide cross-attention
and the "text_time" added embedding (pooled text 1280 + six time ids of 256 each = 2816), conditioned on CLIP ViT-L/14
and OpenCLIP ViT-bigG/14 (1280 wide, 32 layers, with its text projection for the pooled embedding). Both families keep
SD 1.x's training schedule (1000 scaled-linear steps); SD 2.x's 768-pixel models predict v instead of the noise.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any


@dataclass(frozen=True)
class Architecture:
    """Constructor arguments of the trained components, the latent scale and shift factors, the family (`FAMILIES`)
    the model belongs to and what its denoiser predicts (`prediction_type`, in diffusers' words: "epsilon", the
    noise, "v_prediction", or "flow": SD 3.x's and Flux's velocity, whose `unet` is their transformer's config and
`schedule` their scheduler's, which says how the training time is shifted). `text_2` is SDXL's second text encoder
(empty for the others). An encoder-only
    architecture (a family whose denoiser Mist cannot run yet) has empty `unet` and `text`, and no cross-attention
    width."""

    name: str
    unet: dict[str, Any]
    vae: dict[str, Any]
    text: dict[str, Any]
    latent_scale: float = 0.18215
    latent_shift: float = 0.0
    family: str = "sd1"
    text_2: dict[str, Any] = field(default_factory=dict)
    prediction_type: str = "epsilon"
    schedule: dict[str, Any] = field(default_factory=dict)
    cross_attention_dim: int | None = field(init=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "cross_attention_dim", self.unet.get("cross_attention_dim"))


_CLIP_VOCAB = 49408  # size of the CLIP BPE vocabulary shipped in assets/, shared by both shapes

SD_V1 = Architecture(
    name="stable-diffusion-v1",
    unet=dict(
        sample_size=64,
        in_channels=4,
        out_channels=4,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        block_out_channels=(320, 640, 1280, 1280),
        layers_per_block=2,
        cross_attention_dim=768,
        attention_head_dim=8,
    ),
    vae=dict(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(128, 256, 512, 512),
        layers_per_block=2,
        latent_channels=4,
        norm_num_groups=32,
        sample_size=512,
    ),
    text=dict(
        vocab_size=_CLIP_VOCAB,
        hidden_size=768,
        intermediate_size=3072,
        num_hidden_layers=12,
        num_attention_heads=12,
        max_position_embeddings=77,
        hidden_act="quick_gelu",
        projection_dim=768,
        bos_token_id=49406,
        eos_token_id=49407,
        pad_token_id=49407,
    ),
)

TINY = Architecture(
    name="tiny-random",
    unet=dict(
        sample_size=8,
        in_channels=4,
        out_channels=4,
        # Cross-attention at the lower resolution only: at full latent resolution attention dominates a tiny model's
        # cost (4096 tokens for a 512 x 512 image), which would make smoke runs slow for no benefit.
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        block_out_channels=(32, 64),
        layers_per_block=1,
        cross_attention_dim=32,
        attention_head_dim=8,
        norm_num_groups=32,
    ),
    vae=dict(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(8, 16, 16, 16),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=8,
        sample_size=64,
    ),
    text=dict(
        vocab_size=_CLIP_VOCAB,
        hidden_size=32,
        intermediate_size=37,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=77,
        hidden_act="quick_gelu",
        projection_dim=32,
        bos_token_id=49406,
        eos_token_id=49407,
        pad_token_id=49407,
    ),
)


# What the refusal of a denoiser-side run on an encoder-only family names as what does work.
ENCODER_SIDE_METHODS = "photoguard, pid, mist --mode textural"


@dataclass(frozen=True)
class Family:
    """A model family Mist loads: `key` (sd1, sd2, sdxl, sd3, flux), its `title` for messages, the diffusers VAE config
    shipped for it (`vae_asset` in assets/; None: SD v1's VAE, which SD 2.x shares), and whether the denoiser-side
    methods support it (all five; SD 3.x and Flux from diffusers folders only, their single files through the VAE
    encoder alone). `denoiser_asset` names the shipped UNet and text encoder configs of a family whose single files
    Mist reads whole (None: SD 1.x, whose shapes are `SD_V1`, or a family whose single files Mist does not read
    whole). `flow`: a rectified-flow transformer family (SD 3.x, Flux)."""

    key: str
    title: str
    vae_asset: str | None
    denoiser: bool
    denoiser_asset: str | None = None
    flow: bool = False

    def vae_config(self) -> dict[str, Any]:
        """The family's VAE config (diffusers' AutoencoderKL keyword arguments, `scaling_factor` and `shift_factor`
        included), a fresh copy."""
        if self.vae_asset is None:
            return {**SD_V1.vae, "scaling_factor": SD_V1.latent_scale}
        return json.loads(_asset_text(self.vae_asset))

    def denoiser_configs(self) -> dict[str, Any]:
        """The shipped shapes of the family's UNet and text encoders ("unet", "text", and "text_2" where there is a
        second), a fresh copy; ValueError for a family whose denoiser Mist does not run."""
        if self.denoiser_asset is None:
            raise ValueError(f"{self.title}: Mist does not run its denoiser")
        return json.loads(_asset_text(self.denoiser_asset))


@lru_cache(maxsize=None)
def _asset_text(name: str) -> str:
    from importlib import resources

    return resources.files("mist.models").joinpath(f"assets/{name}").read_text(encoding="utf-8")


FAMILIES = {family.key: family for family in (
    Family("sd1", "Stable Diffusion 1.x", None, denoiser=True),
    Family("sd2", "Stable Diffusion 2.x", None, denoiser=True, denoiser_asset="denoiser_sd2.json"),
    Family("sdxl", "Stable Diffusion XL", "vae_sdxl.json", denoiser=True, denoiser_asset="denoiser_sdxl.json"),
    Family("sd3", "Stable Diffusion 3.x", "vae_sd3.json", denoiser=True, flow=True),
    Family("flux", "Flux.1", "vae_flux.json", denoiser=True, flow=True),
)}


def encoder_only(family: Family, vae: dict[str, Any], name: str) -> Architecture:
    """The architecture of a `family` model of which only the VAE is used, `vae` its config (the scale and shift
    factors it lacks are the family's)."""
    defaults = family.vae_config()
    scale = vae.get("scaling_factor") or defaults["scaling_factor"]
    shift = vae.get("shift_factor", defaults.get("shift_factor")) or 0.0
    return Architecture(name=name, unet={}, vae=vae, text={}, latent_scale=float(scale), latent_shift=float(shift),
                        family=family.key)


def whole(family: Family, vae: dict[str, Any], name: str, prediction_type: str = "epsilon",
          shapes: Architecture | None = None) -> Architecture:
    """The architecture of a whole `family` model (SD 2.x, SDXL): `vae` its VAE config, the UNet and text encoders
    those of `shapes` (a test's tiny model) or else the family's shipped configs, and its `prediction_type`."""
    if shapes is None:
        shipped = family.denoiser_configs()
        shapes = Architecture(name=name, unet=shipped["unet"], vae=vae, text=shipped["text"],
                              text_2=shipped.get("text_2", {}))
    scale = vae.get("scaling_factor") or family.vae_config()["scaling_factor"]
    return Architecture(name=name, unet=shapes.unet, vae=vae, text=shapes.text, latent_scale=float(scale),
                        family=family.key, text_2=shapes.text_2, prediction_type=prediction_type)
