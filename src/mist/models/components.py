"""The parts of a Stable Diffusion model (1.x, 2.x, XL, 3.x; Flux) that Mist differentiates
through, behind a small interface that does not name the family: encode an image into the latent space, noise a
latent at a random training time (`noised`), the denoiser's training target there (`target`), and its prediction for
a noisy latent under a prompt's conditioning (`denoise`; `mist.models.conditioning` says what each family's is).

The VAE *encoder* is always kept; the VAE *decoder* plays no part in the attack and is loaded only when asked for (the
mimicry check of `mist evaluate` turns latents back into pictures); the UNet predicts noise, and the text encoder is
only used to embed Mist's prompts when the model is assembled, unless the "text_model" part asks to keep it (textual
inversion mimicry trains a new word through it).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field, replace
from functools import partial
from typing import Sequence

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from mist.common.prompts import OBJECT_PROMPT, STYLE_PROMPT
from mist.models.architectures import Architecture
from mist.models import noising
from mist.models.conditioning import Conditioning, embed_prompts, time_ids
from mist.models.frozen_conv import keep_no_convolution_inputs
from mist.models.lean_resnet import keep_one_tensor_per_norm
from mist.models.noising import Noised, standard_normal

TRAIN_TIMESTEPS = 1000
UNCONDITIONAL_PROMPT = ""  # the empty prompt: classifier-free guidance's unconditional branch (mimicry check)
PROMPTS = (STYLE_PROMPT, OBJECT_PROMPT, UNCONDITIONAL_PROMPT)


def latent_encoder(arch: Architecture) -> nn.Module:
    """SD's VAE encoder plus its 1x1 `quant_conv`, which together give the posterior's mean and log-variance. VAEs
    without the 1x1 convolution (SD 3.x's, Flux's: `use_quant_conv` false) get an identity in its place."""
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
        mid_block_add_attention=vae.get("mid_block_add_attention", True),
    )
    module.quant_conv = nn.Conv2d(2 * latent, 2 * latent, 1) if vae.get("use_quant_conv", True) else nn.Identity()
    return module


def latent_decoder(arch: Architecture) -> nn.Module:
    """SD's 1x1 `post_quant_conv` plus its VAE decoder, which together turn an unscaled latent into an image (an
    identity in place of the 1x1 convolution where `use_post_quant_conv` is false)."""
    from diffusers.models.autoencoders.vae import Decoder

    vae = arch.vae
    latent = vae["latent_channels"]
    module = nn.Module()
    module.post_quant_conv = nn.Conv2d(latent, latent, 1) if vae.get("use_post_quant_conv", True) else nn.Identity()
    module.decoder = Decoder(
        in_channels=latent,
        out_channels=vae["out_channels"],
        up_block_types=tuple(vae["up_block_types"]),
        block_out_channels=tuple(vae["block_out_channels"]),
        layers_per_block=vae["layers_per_block"],
        norm_num_groups=vae.get("norm_num_groups", 32),
        mid_block_add_attention=vae.get("mid_block_add_attention", True),
    )
    return module


def memory_format_for(dtype: torch.dtype) -> torch.memory_format:
    """The layout of convolution weights and inputs for weights of `dtype`: channels-last (NHWC) for bf16 and fp16,
    the layout oneDNN and cuDNN run fastest; the plain contiguous (NCHW) one for float32, because PyTorch's CPU
    GroupNorm on channels-last float32 input loses precision as the mean grows against the standard deviation (with
    SD v1 weights shaped like the reference's, a fused gradient was 6.8e-5 from float64 instead of 2.9e-6; see
    benchmarks/RESULTS.md), and a float32 run promises Mist v1.2's arithmetic. Half-precision rounding dwarfs that
    loss, so half-precision runs keep the faster layout."""
    return torch.channels_last if dtype in (torch.bfloat16, torch.float16) else torch.contiguous_format


def scaled_linear_alphas_cumprod() -> torch.Tensor:
    """alpha_bar_t for t = 0..999 of SD v1's schedule: betas = linspace(sqrt(0.00085), sqrt(0.012), 1000) ** 2."""
    betas = torch.linspace(0.00085**0.5, 0.012**0.5, TRAIN_TIMESTEPS, dtype=torch.float64) ** 2
    return torch.cumprod(1.0 - betas, dim=0).float()


@dataclass
class StableDiffusion:
    """A loaded Stable Diffusion model: VAE encoder and UNet with frozen weights, the text embeddings of the prompts
    Mist uses, and where it came from.

    The text encoder runs once, when the model is assembled, for "a painting", "a photo" and the empty prompt; it is
    then dropped, which saves its 123M parameters for the whole run, unless the "text_model" part keeps it (frozen,
    as `text_encoder`: textual inversion needs it). A model loaded for methods that need only the
    encoder has no UNet (None) and no embeddings (see `parts`); the VAE decoder is None unless "decoder" was asked for
    (evaluation asks, protection never does). `source` names the file or folder (or `tiny-random`); `random_weights`
    is true for the test model, whose outputs protect nothing. SD 2.x and SDXL load whole (`arch.family`; SDXL keeps
    the pooled embeddings of its prompts too, `pooled_embeddings`); SD 3.x and Flux hold their transformer in `unet`
    (`flow_denoisers`), pooled embeddings too, and latents shifted as well as scaled (`scale_latent`); from a single
    file their VAE alone.
    """

    arch: Architecture
    encoder: nn.Module
    unet: nn.Module | None
    text_embeddings: dict[str, torch.Tensor]  # prompt -> (1, 77, D) float32 on the CPU; empty without a text encoder
    source: str
    random_weights: bool = False
    alphas_cumprod: torch.Tensor = field(default_factory=scaled_linear_alphas_cumprod)
    memory_format: torch.memory_format = torch.contiguous_format  # of the convolution weights and the inputs
    decoder: nn.Module | None = None  # `latent_decoder`; None unless the "decoder" part was loaded
    text_encoder: nn.Module | None = None  # CLIP's text encoder; None unless the "text_model" part was loaded
    pooled_embeddings: dict[str, torch.Tensor] = field(default_factory=dict)  # prompt -> (1, P): SDXL's only

    def __post_init__(self) -> None:
        for module in self._networks():
            keep_no_convolution_inputs(module)  # gradients go to the image only: see frozen_conv
            keep_one_tensor_per_norm(module)  # see lean_resnet

    @classmethod
    def assemble(cls, arch: Architecture, encoder: nn.Module, unet: nn.Module | None, text_encoder: nn.Module | None,
                 source: str, random_weights: bool = False, decoder: nn.Module | None = None,
                 keep_text_encoder: bool = False) -> StableDiffusion:
        """Freeze the networks and embed the prompts; `text_encoder` is kept only with `keep_text_encoder`. None: a
        part not loaded."""
        embeddings, pooled = {}, {}
        if text_encoder is not None:
            text_encoder.eval().requires_grad_(False)
            embeddings, pooled = embed_prompts(arch.family, text_encoder, PROMPTS)
        for module in (encoder, unet, decoder):
            if module is not None:
                module.eval().requires_grad_(False)
        return cls(arch, encoder, unet, embeddings, source, random_weights, decoder=decoder,
                   text_encoder=text_encoder if keep_text_encoder else None, pooled_embeddings=pooled)

    @property
    def parts(self) -> frozenset[str]:
        """The parts loaded ("encoder", and "unet", "text_encoder", "decoder", "text_model" when they were asked
        for)."""
        return frozenset({"encoder"} | ({"unet"} if self.unet is not None else set())
                         | ({"text_encoder"} if self.text_embeddings else set())
                         | ({"decoder"} if self.decoder is not None else set())
                         | ({"text_model"} if self.text_encoder is not None else set()))

    @property
    def device(self) -> torch.device:
        return next(self.encoder.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        """The narrowest type of the encoder's and denoiser's weights (an SD 3.x or Flux transformer is read in the
        run's type, its VAE in float32)."""
        types = [next(module.parameters()).dtype for module in (self.encoder, self.unet) if module is not None]
        return min(types, key=lambda kind: torch.finfo(kind).bits)

    def _networks(self) -> list[nn.Module]:
        return [module for module in (self.encoder, self.unet, self.decoder, self.text_encoder) if module is not None]

    def placed(self, device: torch.device | str, dtype: torch.dtype | None = None, *,
               in_place: bool = False) -> StableDiffusion:
        """This model's networks on `device` with weights of `dtype` (None: as they are), in the memory layout that
        dtype runs best and exactly in (`memory_format_for`).

        By default this model is left as it is: the result is a new StableDiffusion that shares every weight already
        where and as asked (no memory) and holds converted copies of the others (their size in the new type: SD v1's
        encoder and UNet take 3.6 GB in float32, 1.8 GB in bf16 or fp16). With `in_place` this model itself is
        converted weight by weight and returned, so no second copy is ever held: for a model made for one user.

        Casting to a wider type than the weights have is refused: float32 weights once rounded to bf16 stay rounded,
        and a "float32" run on them would silently not be one."""
        dtype = dtype or self.dtype
        if torch.finfo(dtype).bits > torch.finfo(self.dtype).bits:
            raise ValueError(f"precision: this model's weights are {self.dtype}; load it again to run in {dtype}")
        layout = memory_format_for(dtype)
        if in_place:
            for module in self._networks():  # each asked for its own type: self.dtype follows the encoder, cast first
                if any(p.is_floating_point() and p.dtype != dtype for p in module.parameters()):
                    module.to(dtype=dtype)  # only where needed: diffusers warns on every cast, even to the same type
                module.to(device=device, memory_format=layout)
            self.alphas_cumprod = self.alphas_cumprod.to(device)
            self.memory_format = layout
            return self

        def convert(tensor: torch.Tensor) -> torch.Tensor:
            kind = dtype if tensor.is_floating_point() else tensor.dtype
            if tensor.dim() == 4:
                return tensor.to(device=device, dtype=kind, memory_format=layout)
            return tensor.to(device=device, dtype=kind)

        # deepcopy takes each tensor from `memo` when it is there: the module objects are copied, the weights that
        # need no conversion are shared, and no full-size copy in the old type is ever made.
        memo: dict[int, object] = {}
        for module in self._networks():
            for parameter in module.parameters():
                moved = convert(parameter)
                memo[id(parameter)] = parameter if moved is parameter else nn.Parameter(moved, requires_grad=False)
            for buffer in module.buffers():
                memo[id(buffer)] = convert(buffer)
        return replace(self, encoder=copy.deepcopy(self.encoder, memo), unet=copy.deepcopy(self.unet, memo),
                       decoder=copy.deepcopy(self.decoder, memo), text_encoder=copy.deepcopy(self.text_encoder, memo),
                       text_embeddings=dict(self.text_embeddings),
                       alphas_cumprod=self.alphas_cumprod.to(device), memory_format=layout)

    def set_gradient_checkpointing(self, enabled: bool) -> None:
        """Recompute activations in the backward pass instead of keeping them: the encoder per down block, the UNet
        per block. Costs about one more forward pass; saves most activation memory."""
        if self.unet is not None and enabled:
            self.unet.enable_gradient_checkpointing()
        elif self.unet is not None:
            self.unet.disable_gradient_checkpointing()
        self.encoder.encoder.gradient_checkpointing = enabled
        self.encoder.encoder._gradient_checkpointing_func = partial(checkpoint, use_reentrant=False)

    def posterior(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The mean and log-variance (float32, unscaled, log-variance clamped to [-30, 20] as LDM does) of the encoder's
        diagonal-Gaussian posterior for images `x` in [-1, 1]."""
        pixels = x.to(self.dtype).contiguous(memory_format=self.memory_format)
        moments = self.encoder.quant_conv(self.encoder.encoder(pixels))
        mean, logvar = moments.float().chunk(2, dim=1)
        return mean, logvar.clamp(-30.0, 20.0)

    def scale_latent(self, unscaled: torch.Tensor) -> torch.Tensor:
        """The model's latent of an encoder output (a posterior mean or sample): (z - shift) * scale, with the
        family's shift (0 for SD 1.x, 2.x and XL) and scale factors."""
        return (unscaled - self.arch.latent_shift) * self.arch.latent_scale

    def unscale_latent(self, latent: torch.Tensor) -> torch.Tensor:
        """The inverse of `scale_latent`: latent / scale + shift, what the VAE decoder takes."""
        return latent / self.arch.latent_scale + self.arch.latent_shift

    def encode(self, x: torch.Tensor, generators: Sequence[torch.Generator]) -> torch.Tensor:
        """Scaled samples of the encoder's diagonal-Gaussian posterior for images `x` in [-1, 1] (LDM's encoding,
        `scale_latent`); image i's sample noise comes from generators[i]."""
        mean, logvar = self.posterior(x)
        std = torch.exp(0.5 * logvar)
        noise = standard_normal(mean.shape, generators, like=mean)
        return self.scale_latent(mean + std * noise)

    def decode(self, latent: torch.Tensor) -> torch.Tensor:
        """Images in [-1, 1] (float32, not clipped) that the VAE decoder makes of scaled latents (LDM's decoding:
        `unscale_latent`, `post_quant_conv`, decoder)."""
        if self.decoder is None:
            raise ValueError("this model was loaded without its VAE decoder (load it with the \"decoder\" part)")
        unscaled = self.unscale_latent(latent).to(self.dtype).contiguous(memory_format=self.memory_format)
        return self.decoder.decoder(self.decoder.post_quant_conv(unscaled)).float()

    def noised(self, latent: torch.Tensor, generators: Sequence[torch.Generator]) -> Noised:
        """`latent` noised at a random training time, as this model was trained (`noising.diffusion_noised`: t and
        then n drawn from each image's generator; SD 3.x and Flux: `noising.flow_noised`)."""
        if self.arch.prediction_type == "flow":
            return noising.flow_noised(noising.FlowShift.of(self.arch.schedule), latent, generators)
        return noising.diffusion_noised(self.alphas_cumprod, latent, generators)

    def target(self, noised: Noised) -> torch.Tensor:
        """What this model's denoiser is trained to predict at `noised`: the noise, or v (`arch.prediction_type`)."""
        return noising.target(self.arch.prediction_type, noised)

    def as_noise(self, prediction: torch.Tensor, noised: Noised) -> torch.Tensor:
        """The noise that this model's `prediction` at `noised` implies (the prediction itself for noise
        predictors)."""
        return noising.as_noise(self.arch.prediction_type, prediction, noised)

    def denoise(self, noisy_latent: torch.Tensor, timesteps: torch.Tensor,
                conditioning: Conditioning | torch.Tensor) -> torch.Tensor:
        """The UNet's prediction (the noise or v: `target`) for z_t at `timesteps` under `conditioning`, with one row
        per latent (a bare tensor: SD 1.x's or 2.x's token states). SDXL's UNet also gets the pooled embedding and the
        time ids of the latent's picture size (`conditioning.time_ids`); SD 3.x's and Flux's transformers the token
        states and the pooled embedding (`flow_denoisers`)."""
        if self.unet is None:
            raise ValueError("this model was loaded without its UNet (the method declared it does not need it)")
        conditioning = Conditioning.of(conditioning)
        latent = noisy_latent.to(self.dtype).contiguous(memory_format=self.memory_format)
        if self.arch.prediction_type == "flow":
            return self.unet(latent, timesteps, conditioning.states.to(self.dtype), conditioning.pooled.to(self.dtype))
        added = {}
        if self.arch.unet.get("addition_embed_type") == "text_time":
            if conditioning.pooled is None:
                raise ValueError("an SDXL UNet needs the pooled text embedding beside the token states")
            added = {"added_cond_kwargs": {"text_embeds": conditioning.pooled.to(self.dtype),
                                           "time_ids": time_ids(latent).to(self.dtype)}}
        return self.unet(latent, timesteps, encoder_hidden_states=conditioning.states.to(self.dtype), **added).sample

    def conditioning(self, prompt: str) -> Conditioning:
        """The conditioning of "a painting", "a photo" or the empty prompt, one row, on the model's device."""
        pooled = self.pooled_embeddings.get(prompt)
        return Conditioning(self.text_embedding(prompt), None if pooled is None else pooled.to(self.device))

    def text_embedding(self, prompt: str) -> torch.Tensor:
        """The token states of "a painting" or "a photo", shape (1, 77, D), on the model's device (CLIP's last hidden
        state for SD 1.x; see `mist.models.conditioning` for the others)."""
        if prompt not in self.text_embeddings:
            raise ValueError(f"this model has no embedding of {prompt!r} (loaded without its text encoder?)")
        return self.text_embeddings[prompt].to(self.device)
