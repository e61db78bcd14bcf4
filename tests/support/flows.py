"""Tiny random SD 3.x and Flux models in their real designs (SD3Transformer2DModel, FluxTransformer2DModel with
guidance, CLIP towers with projections, a T5 encoder with a word-level tokenizer built here), saved as diffusers
folders for tests to load back through a user's path."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from diffusers import AutoencoderKL, FluxTransformer2DModel, SD3Transformer2DModel
from transformers import (CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, PreTrainedTokenizerFast,
                          T5Config, T5EncoderModel)

from mist.models.architectures import TINY
from support.families import PIPELINES, tiny_vae

T5_WIDTH = 64
_WORDS = ["<pad>", "</s>", "<unk>", "a", "painting", "photo"]
_CLIP = {**TINY.text, "projection_dim": 16}
SD3_TRANSFORMER = dict(sample_size=8, patch_size=2, in_channels=16, num_layers=2, attention_head_dim=8,
                       num_attention_heads=2, joint_attention_dim=T5_WIDTH, caption_projection_dim=16,
                       pooled_projection_dim=32, out_channels=16, pos_embed_max_size=16)
FLUX_TRANSFORMER = dict(patch_size=1, in_channels=64, num_layers=1, num_single_layers=1, attention_head_dim=16,
                        num_attention_heads=2, joint_attention_dim=T5_WIDTH, pooled_projection_dim=32,
                        axes_dims_rope=(4, 6, 6))
# Each kind's scheduler config, as the published folders state it (SD 3 medium / 3.5; Flux dev; Flux schnell).
SCHEDULERS = {"sd3": {"shift": 3.0},
              "flux": {"shift": 3.0, "use_dynamic_shifting": True, "base_shift": 0.5, "max_shift": 1.15,
                       "base_image_seq_len": 256, "max_image_seq_len": 4096},
              "schnell": {"shift": 1.0, "use_dynamic_shifting": False}}


@dataclass
class Parts:
    """A tiny model's modules: transformer, VAE, CLIP towers (in folder order) and T5 (None: a folder without it)."""

    family: str
    transformer: torch.nn.Module
    vae: AutoencoderKL
    clips: list
    t5: T5EncoderModel | None


def t5_tokenizer() -> PreTrainedTokenizerFast:
    """A word-level tokenizer of a few words that ends each prompt with </s> (1) and pads with <pad> (0), as T5's."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors

    inner = Tokenizer(models.WordLevel({w: i for i, w in enumerate(_WORDS)}, unk_token="<unk>"))
    inner.pre_tokenizer = pre_tokenizers.Whitespace()
    inner.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=inner, pad_token="<pad>", eos_token="</s>", unk_token="<unk>")


def tiny_parts(family: str, seed: int = 0, guidance: bool = True, t5: bool = True) -> Parts:
    vae = tiny_vae(family, seed)
    torch.manual_seed(seed)
    if family == "sd3":
        transformer = SD3Transformer2DModel(**SD3_TRANSFORMER)
        clips = [CLIPTextModelWithProjection(CLIPTextConfig(**_CLIP)),
                 CLIPTextModelWithProjection(CLIPTextConfig(**{**_CLIP, "hidden_act": "gelu", "pad_token_id": 0}))]
    else:
        transformer = FluxTransformer2DModel(**FLUX_TRANSFORMER, guidance_embeds=guidance)
        clips = [CLIPTextModel(CLIPTextConfig(**_CLIP))]
    encoder = T5EncoderModel(T5Config(vocab_size=len(_WORDS), d_model=T5_WIDTH, d_kv=8, d_ff=32, num_layers=1,
                                      num_heads=2)) if t5 else None
    return Parts(family, transformer.eval(), vae, [c.eval() for c in clips], encoder.eval() if t5 else None)


def save_folder(folder: Path, parts: Parts, scheduler: str | None = None) -> Path:
    """The model as a diffusers folder: transformer/, vae/, text encoders and tokenizers in the family's sub-folders
    (CLIP-G's tokenizer pads with "!", as the published SD 3 folders' tokenizer_2), scheduler and model_index.json."""
    parts.transformer.save_pretrained(folder / "transformer")
    parts.vae.save_pretrained(folder / "vae")
    pads = ["<|endoftext|>", "!"]
    for number, clip in enumerate(parts.clips):
        suffix = f"_{number + 1}" if number else ""
        clip.save_pretrained(folder / f"text_encoder{suffix}")
        (folder / f"tokenizer{suffix}").mkdir()
        (folder / f"tokenizer{suffix}" / "special_tokens_map.json").write_text(json.dumps({"pad_token": pads[number]}))
    t5 = "3" if parts.family == "sd3" else "2"
    if parts.t5 is not None:
        parts.t5.save_pretrained(folder / f"text_encoder_{t5}")
        t5_tokenizer().save_pretrained(folder / f"tokenizer_{t5}")
    (folder / "scheduler").mkdir()
    (folder / "scheduler" / "scheduler_config.json").write_text(json.dumps(SCHEDULERS[scheduler or parts.family]))
    (folder / "model_index.json").write_text(json.dumps({"_class_name": PIPELINES[parts.family]}))
    return folder
