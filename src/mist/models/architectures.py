"""Shapes of the networks Mist attacks: Stable Diffusion v1 and a tiny stand-in for tests.

An architecture is pure data (keyword arguments for the diffusers / transformers classes), so the same loading code
builds the real 860M-parameter UNet or a few-kilobyte test model. The latent encoder always downsamples by 8, as SD's
does, so image-size rules are the same for both.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class Architecture:
    """Constructor arguments of the three trained components, plus the latent scale factor."""

    name: str
    unet: dict[str, Any]
    vae: dict[str, Any]
    text: dict[str, Any]
    latent_scale: float = 0.18215
    cross_attention_dim: int = field(init=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "cross_attention_dim", self.unet["cross_attention_dim"])


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
