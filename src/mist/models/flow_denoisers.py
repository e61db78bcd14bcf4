"""SD 3.x's and Flux's transformers behind one call: (z_s, time s * 1000, token states, pooled embedding) -> the
predicted velocity, shaped as the latent.

SD 3.x's MMDiT (diffusers' SD3Transformer2DModel) cuts the latent into 2 x 2 patches itself and takes the time as it
is. Flux's (FluxTransformer2DModel) takes the latent already packed into 2 x 2 patches (a sequence of 4C-wide tokens),
the rotary positions of each image token (0, row, column) and of each text token (all 0), and its time divided by 1000
(it multiplies by 1000 inside); Flux dev also takes a guidance strength (guidance distillation), which Mist sets to
3.5, the value its model card and diffusers' FluxPipeline use; schnell has no guidance input.
"""

from __future__ import annotations

import torch
from torch import nn

FLUX_GUIDANCE = 3.5


def _check_even(latent: torch.Tensor) -> None:
    if latent.shape[-2] % 2 or latent.shape[-1] % 2:
        raise ValueError(f"image size: SD 3.x and Flux cut the latent into 2 x 2 patches, so the image's sides must be "
                         f"multiples of 16 pixels (the latent is {latent.shape[-2]} x {latent.shape[-1]})")


def _check_positions(latent: torch.Tensor, table: int | None) -> None:
    """ValueError when the latent has more 2 x 2 patches a side than SD 3.x's table of positions covers (`table`:
    192 for SD 3 medium, 384 for SD 3.5 medium: sides up to 3072 and 6144 pixels)."""
    if table is not None and max(latent.shape[-2:]) // 2 > table:
        raise ValueError(f"image size: this SD 3.x transformer places at most {table} patches a side, so the image's "
                         f"sides may be at most {table * 16} pixels (the latent is {latent.shape[-2]} x "
                         f"{latent.shape[-1]}); choose a smaller input size")


def _per_image(timesteps: torch.Tensor, latent: torch.Tensor) -> torch.Tensor:
    """One time per image of `latent`, in its type (a sampler's step gives a single time for the batch)."""
    return timesteps.to(latent.dtype).reshape(-1).expand(latent.shape[0])


class _Denoiser(nn.Module):
    """The wrapped `transformer`, with its gradient checkpointing switches."""

    def __init__(self, transformer: nn.Module) -> None:
        super().__init__()
        self.transformer = transformer

    def enable_gradient_checkpointing(self) -> None:
        self.transformer.enable_gradient_checkpointing()

    def disable_gradient_checkpointing(self) -> None:
        self.transformer.disable_gradient_checkpointing()


class SD3Denoiser(_Denoiser):
    """SD 3.x's MMDiT as a velocity predictor."""

    def forward(self, latent: torch.Tensor, timesteps: torch.Tensor, states: torch.Tensor,
                pooled: torch.Tensor) -> torch.Tensor:
        _check_even(latent)
        _check_positions(latent, self.transformer.config.pos_embed_max_size)
        return self.transformer(hidden_states=latent, encoder_hidden_states=states, pooled_projections=pooled,
                                timestep=_per_image(timesteps, latent), return_dict=False)[0]


class FluxDenoiser(_Denoiser):
    """Flux's transformer as a velocity predictor; `guidance` is dev's guidance strength (None for schnell)."""

    def __init__(self, transformer: nn.Module, guidance: float | None) -> None:
        super().__init__(transformer)
        self.guidance = guidance

    def forward(self, latent: torch.Tensor, timesteps: torch.Tensor, states: torch.Tensor,
                pooled: torch.Tensor) -> torch.Tensor:
        _check_even(latent)
        n, c, h, w = latent.shape
        packed = latent.reshape(n, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5).reshape(n, h * w // 4, 4 * c)
        image_ids = torch.zeros(h // 2, w // 2, 3, device=latent.device, dtype=latent.dtype)
        image_ids[..., 1] = torch.arange(h // 2, device=latent.device)[:, None]
        image_ids[..., 2] = torch.arange(w // 2, device=latent.device)[None, :]
        text_ids = torch.zeros(states.shape[1], 3, device=latent.device, dtype=latent.dtype)
        guidance = None
        if self.guidance is not None:
            guidance = torch.full((n,), self.guidance, device=latent.device, dtype=latent.dtype)
        out = self.transformer(hidden_states=packed, encoder_hidden_states=states, pooled_projections=pooled,
                               timestep=_per_image(timesteps, latent) / 1000, img_ids=image_ids.reshape(-1, 3),
                               txt_ids=text_ids, guidance=guidance, return_dict=False)[0]
        return out.reshape(n, h // 2, w // 2, c, 2, 2).permute(0, 3, 1, 4, 2, 5).reshape(n, c, h, w)
