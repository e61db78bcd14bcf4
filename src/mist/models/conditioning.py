"""What a family's denoiser is conditioned on, made once per prompt from its text encoders.

- SD 1.x: CLIP ViT-L/14's last hidden state, prompts padded with the end marker (49407).
- SD 2.x: the last hidden state of OpenCLIP ViT-H/14's text tower built with 23 of its 24 layers (the penultimate
  layer, then the final layer norm, as SD 2.x's FrozenOpenCLIPEmbedder reads it), prompts padded with 0 as OpenCLIP
  pads.
- SDXL: the penultimate hidden states (no final layer norm) of CLIP ViT-L/14 (padded with the end marker) and of
  OpenCLIP ViT-bigG/14 (padded with 0) side by side (768 + 1280 = 2048 wide), and bigG's projected pooled embedding
  (1280); the empty prompt is all zeros, as SDXL base's pipelines make it (`force_zeros_for_empty_prompt`). The UNet
  also takes six "time ids" per image, (original height, width, crop top, left, target height, width): here the size
  of the picture the UNet sees (8 times the latent's), uncropped, as SDXL was trained on pictures shown whole.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable

import torch
from torch import nn

from mist.models.tokenizer import END_OF_TEXT, tokenize

OPEN_CLIP_PAD = 0  # OpenCLIP's tokenizer pads with id 0 (the "!" symbol), not with the end marker
_PADS = {"sd1": (None,), "sd2": (OPEN_CLIP_PAD,), "sdxl": (END_OF_TEXT, OPEN_CLIP_PAD)}


@dataclass(frozen=True)
class Conditioning:
    """One prompt's conditioning: `states` (rows, 77, D), the token states the UNet cross-attends to, and `pooled`
    (rows, P), the pooled text embedding SDXL's UNet also takes (None for SD 1.x and 2.x). Rows: 1, or one per image."""

    states: torch.Tensor
    pooled: torch.Tensor | None = None

    @classmethod
    def of(cls, value: Conditioning | torch.Tensor) -> Conditioning:
        """`value` itself, or a bare (rows, 77, D) tensor of token states as the conditioning of SD 1.x / 2.x."""
        return value if isinstance(value, Conditioning) else cls(value)

    def batched(self, rows: int) -> Conditioning:
        """This conditioning expanded to `rows` rows (no copy)."""
        pooled = None if self.pooled is None else self.pooled.expand(rows, -1)
        return Conditioning(self.states.expand(rows, -1, -1), pooled)

    def joined(self, other: Conditioning) -> Conditioning:
        """This conditioning's rows, then `other`'s (classifier-free guidance's two halves)."""
        pooled = None if self.pooled is None else torch.cat([self.pooled, other.pooled])
        return Conditioning(torch.cat([self.states, other.states]), pooled)


def embed_prompts(family: str, text: nn.Module, prompts: Iterable[str]
                  ) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """The token states and (SDXL) pooled embeddings of `prompts`, float32 on the CPU, made by `family`'s text
    encoder `text` (SDXL: an `nn.ModuleList` of its two towers)."""
    states, pooled = {}, {}
    with torch.no_grad():
        for prompt in prompts:
            if family == "sdxl":
                states[prompt], pooled[prompt] = _sdxl_embedding(text, prompt)
            else:
                states[prompt] = text(tokenize(prompt, pad=_PADS[family][0])).last_hidden_state.float()
    return states, pooled


def _sdxl_embedding(towers: nn.Module, prompt: str) -> tuple[torch.Tensor, torch.Tensor]:
    """SDXL's token states (1, 77, 2048) and pooled embedding (1, 1280) of `prompt`; zeros for the empty prompt."""
    outputs = [tower(tokenize(prompt, pad=pad), output_hidden_states=True)
               for tower, pad in zip(towers, _PADS["sdxl"], strict=True)]
    states = torch.cat([output.hidden_states[-2] for output in outputs], dim=-1).float()
    pooled = outputs[-1].text_embeds.float()
    if prompt == "":
        return torch.zeros_like(states), torch.zeros_like(pooled)
    return states, pooled


def time_ids(latent: torch.Tensor) -> torch.Tensor:
    """SDXL's six time ids per image of `latent` (N, C, h, w): (8h, 8w, 0, 0, 8h, 8w), float32 on its device."""
    height, width = 8 * latent.shape[-2], 8 * latent.shape[-1]
    row = torch.tensor([height, width, 0, 0, height, width], dtype=torch.float32, device=latent.device)
    return row.expand(latent.shape[0], -1)
