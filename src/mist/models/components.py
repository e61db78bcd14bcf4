"""The parts of Stable Diffusion v1 that Mist differentiates through, behind a small interface.

Only the VAE *encoder* is kept (the decoder plays no part in the attack), the UNet predicts noise, and the text encoder
stays on the CPU: it runs once per prompt and its embedding is cached on the attack device.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from .architectures import Architecture
from .tokenizer import tokenize

TRAIN_TIMESTEPS = 1000


def latent_encoder(arch: Architecture) -> nn.Module:
    """SD's VAE encoder plus its 1x1 `quant_conv`, which together give the posterior's mean and log-variance."""
    from diffusers.models.autoencoders.vae import Encoder

    vae = arch.vae
    latent = vae["latent_channels"]
    module = nn.Module()
    module.encoder = Encoder(
        in_channels=vae["in_channels"],
        out_channels=latent,
        down_block_types=tuple(vae["down_block_types"]),
        block_out_channels=tuple(vae["block_out_channels"]),
        layers_per_block=vae["layers_per_block"],
        norm_num_groups=vae.get("norm_num_groups", 32),
        double_z=True,
    )
    module.quant_conv = nn.Conv2d(2 * latent, 2 * latent, 1)
    return module


def standard_normal(shape: torch.Size | tuple[int, ...], generator: torch.Generator | None,
                    like: torch.Tensor) -> torch.Tensor:
    """N(0, I) noise drawn on the CPU from `generator`, then moved: every device gets the same numbers for a seed."""
    return torch.randn(shape, generator=generator).to(device=like.device, dtype=like.dtype)


def scaled_linear_alphas_cumprod() -> torch.Tensor:
    """alpha_bar_t for t = 0..999 of SD v1's schedule: betas = linspace(sqrt(0.00085), sqrt(0.012), 1000) ** 2."""
    betas = torch.linspace(0.00085**0.5, 0.012**0.5, TRAIN_TIMESTEPS, dtype=torch.float64) ** 2
    return torch.cumprod(1.0 - betas, dim=0).float()


@dataclass
class StableDiffusion:
    """A loaded SD v1 model: encoder, UNet and text encoder with frozen weights, and where they came from.

    `source` names the file or folder (or `tiny-random`); `random_weights` is true for the test model, whose outputs
    protect nothing.
    """

    arch: Architecture
    encoder: nn.Module
    unet: nn.Module
    text_encoder: nn.Module
    source: str
    random_weights: bool = False
    alphas_cumprod: torch.Tensor = field(default_factory=scaled_linear_alphas_cumprod)
    _embeddings: dict[tuple[str, torch.device, torch.dtype], torch.Tensor] = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        for module in (self.encoder, self.unet, self.text_encoder):
            module.eval().requires_grad_(False)

    @property
    def device(self) -> torch.device:
        return next(self.unet.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.unet.parameters()).dtype

    def to(self, device: torch.device | str) -> StableDiffusion:
        """Move the encoder and UNet (the text encoder stays on the CPU: it runs once per prompt); returns self."""
        self.encoder.to(device)
        self.unet.to(device)
        self.alphas_cumprod = self.alphas_cumprod.to(device)
        return self

    def encode(self, x: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
        """A scaled sample of the encoder's diagonal-Gaussian posterior for images `x` in [-1, 1] (LDM's encoding)."""
        moments = self.encoder.quant_conv(self.encoder.encoder(x))
        mean, logvar = moments.chunk(2, dim=1)
        std = torch.exp(0.5 * logvar.clamp(-30.0, 20.0))
        noise = standard_normal(mean.shape, generator, like=mean)
        return (mean + std * noise) * self.arch.latent_scale

    def predict_noise(self, noisy_latent: torch.Tensor, timesteps: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        """The UNet's noise prediction eps_theta(z_t, t, c)."""
        return self.unet(noisy_latent, timesteps, encoder_hidden_states=text).sample

    def text_embedding(self, prompt: str) -> torch.Tensor:
        """CLIP's last hidden state for `prompt`, shape (1, 77, D), cached on the attack device and dtype."""
        key = (prompt, self.device, self.dtype)
        if key not in self._embeddings:
            with torch.no_grad():
                hidden = self.text_encoder(tokenize(prompt)).last_hidden_state
            self._embeddings[key] = hidden.to(device=self.device, dtype=self.dtype)
        return self._embeddings[key]
