"""The test helper that writes modules in the original SD v1 checkpoint layout round-trips through diffusers' reader."""

from __future__ import annotations

import pytest
import torch
from diffusers import AutoencoderKL, UNet2DConditionModel
from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint, convert_ldm_vae_checkpoint
from transformers import CLIPTextConfig, CLIPTextModel

from mist.models.architectures import SD_V1, TINY
from support.original_layout import to_original_layout

TEXT_PREFIX = "cond_stage_model.transformer."


def _build(arch):
    return UNet2DConditionModel(**arch.unet), AutoencoderKL(**arch.vae), CLIPTextModel(CLIPTextConfig(**arch.text))


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    return _build(TINY)


def _assert_same(converted: dict, expected: dict) -> None:
    assert set(converted) == set(expected)
    for key, tensor in expected.items():
        assert converted[key].shape == tensor.shape, key
        assert torch.equal(converted[key], tensor), key


def _text_weights(state: dict) -> dict:
    """What the product's loader reads: strip the prefix, put `text_model.` back where it is absent (NovelAI)."""
    out = {}
    for key, tensor in state.items():
        if key.startswith(TEXT_PREFIX):
            key = key.removeprefix(TEXT_PREFIX)
            out[key if key.startswith("text_model.") else "text_model." + key] = tensor
    return out


def _without_text_model_level(state: dict) -> dict:
    # transformers 5's CLIPTextModel has no `text_model` submodule; transformers 4's has
    return {k.removeprefix("text_model."): v for k, v in state.items() if not k.endswith("position_ids")}


@pytest.mark.parametrize("novelai", [False, True])
def test_tiny_round_trips_through_diffusers_conversion(tiny, novelai):
    unet, vae, text = tiny
    state = to_original_layout(unet, vae, text, novelai=novelai)
    assert all(k.startswith(("model.diffusion_model.", "first_stage_model.", TEXT_PREFIX)) for k in state)
    assert any(k.startswith(TEXT_PREFIX + "text_model.") for k in state) is not novelai

    _assert_same(convert_ldm_unet_checkpoint(state, dict(unet.config)), unet.state_dict())
    _assert_same(convert_ldm_vae_checkpoint(state, dict(vae.config)), vae.state_dict())
    loaded = _text_weights(state)
    assert all(k.startswith("text_model.") for k in loaded)
    _assert_same(_without_text_model_level(loaded), _without_text_model_level(text.state_dict()))
    assert state["first_stage_model.encoder.mid.attn_1.q.weight"].shape[2:] == (1, 1)


def test_sd_v1_key_counts_match_the_real_checkpoint():
    with torch.device("meta"):
        state = to_original_layout(*_build(SD_V1))
    prefixes = ("model.diffusion_model.", "first_stage_model.", TEXT_PREFIX)
    counts = {p: sum(k.startswith(p) for k in state) for p in prefixes}
    assert counts == {"model.diffusion_model.": 686, "first_stage_model.": 248, TEXT_PREFIX: 196}
    # a few names every sd-v1-4.ckpt reader relies on
    for key in ("model.diffusion_model.input_blocks.3.0.op.weight",
                "model.diffusion_model.output_blocks.2.1.conv.weight",
                "model.diffusion_model.output_blocks.5.2.conv.weight",
                "model.diffusion_model.middle_block.1.proj_in.weight",
                "first_stage_model.decoder.up.0.block.0.nin_shortcut.weight",
                "first_stage_model.encoder.mid.attn_1.proj_out.weight",
                TEXT_PREFIX + "text_model.final_layer_norm.weight"):
        assert key in state, key


def test_other_shapes_round_trip():
    unet_args = dict(TINY.unet, block_out_channels=(32, 32, 64), layers_per_block=2,
                     down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
                     up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"))
    vae_args = dict(TINY.vae, block_out_channels=(8, 16), layers_per_block=3,
                    down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2)
    torch.manual_seed(0)
    unet, vae = UNet2DConditionModel(**unet_args), AutoencoderKL(**vae_args)
    state = to_original_layout(unet, vae, CLIPTextModel(CLIPTextConfig(**TINY.text)))
    _assert_same(convert_ldm_unet_checkpoint(state, dict(unet.config)), unet.state_dict())
    _assert_same(convert_ldm_vae_checkpoint(state, dict(vae.config)), vae.state_dict())
