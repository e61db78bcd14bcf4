"""Mimicries: what a mimic does with a set of images to copy them. `mist evaluate` runs every mimicry of its list on
the clean set and on the protected set, each after each purification, with the same seed, and compares the outputs.

A mimicry takes a set of images and returns one generated image (with its latent) per input image. Img2img (SDEdit)
works image by image; a fine-tuning mimicry (LoRA, textual inversion) trains on the whole set and samples one output
per image: any object with `name`, `label`, `strength` and `generate` fits (see `Mimicry`).
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol, Sequence

from mist.common.prompts import STYLE_PROMPT

if TYPE_CHECKING:
    import torch

    from mist.models import StableDiffusion
    from mist.runner.evaluation.img2img import Generated

# Mist's documented protocol: NovelAI-style img2img at these strengths.
DEFAULT_STRENGTHS = (0.25, 0.35, 0.5)


class Mimicry(Protocol):
    """name: how results name it (`img2img:0.35`); label: for people; strength: the img2img strength plotted on the
    x axis (None for mimicries without one)."""

    name: str
    label: str
    strength: float | None

    def generate(self, pictures: Sequence[torch.Tensor], seed: int) -> list[Generated]:
        """One output per picture ((1, 3, H, W) in [-1, 1]); the same seed gives the same random draws to the same
        position in any set of the same shapes."""
        ...


@dataclass(frozen=True)
class Img2ImgMimicry:
    """NovelAI-style img2img (SDEdit) with the user's SD checkpoint at `strength`, `steps` DDIM steps, guidance
    `guidance`, conditioned on `prompt` ("a painting" or "a photo")."""

    model: StableDiffusion
    strength: float
    steps: int = 50
    guidance: float = 7.5
    prompt: str = STYLE_PROMPT
    cancel: threading.Event | None = None  # once set, generation stops at its next DDIM step (`Cancelled`)

    @property
    def name(self) -> str:
        return f"img2img:{self.strength:g}"

    @property
    def label(self) -> str:
        return f"img2img strength {self.strength:g}"

    def generate(self, pictures: Sequence[torch.Tensor], seed: int) -> list[Generated]:
        import torch

        from mist.runner.evaluation.img2img import img2img

        return [img2img(self.model, picture, self.strength, [torch.Generator().manual_seed(seed)], steps=self.steps,
                        guidance=self.guidance, prompt=self.prompt, cancel=self.cancel) for picture in pictures]


def img2img_mimicries(model: StableDiffusion, strengths: Sequence[float], steps: int, guidance: float,
                      prompt: str, cancel: threading.Event | None = None) -> list[Mimicry]:
    """The img2img mimicries of the documented protocol, one per strength."""
    return [Img2ImgMimicry(model, strength, steps, guidance, prompt, cancel) for strength in strengths]


class _TrainedMimicry:
    """What the fine-tuning mimicries share: train on the whole set (`_trained`), then sample one image per input from
    the trained model with `steps` DDIM steps at guidance `guidance`, at the input's shape and with the same seed for
    the clean and the protected set. Sampling starts from pure noise, as a mimic samples a fine-tuned model: nothing
    of the input image enters it (img2img at strength 1, used before, kept sqrt(alpha_bar_T), about 7%, of the input's
    latent in its start). A set of several shapes trains at the first image's shape (the others resized bicubic for
    training only). Once `cancel` is set, training stops after its current step and sampling at its next DDIM step."""

    steps: int
    guidance: float
    cancel: threading.Event | None

    def _trained(self, training: torch.Tensor, seed: int) -> tuple[StableDiffusion, str]:
        """The model trained on `training` (N, 3, H, W) with `seed`, and the prompt to sample it with."""
        raise NotImplementedError

    def _stop_if_cancelled(self, step: int, loss: float) -> None:
        if self.cancel is not None and self.cancel.is_set():
            from mist.engine.attack import Cancelled

            raise Cancelled

    def generate(self, pictures: Sequence[torch.Tensor], seed: int) -> list[Generated]:
        import torch
        import torch.nn.functional as F

        from mist.runner.evaluation.img2img import txt2img

        height, width = pictures[0].shape[-2:]
        training = torch.cat([picture if picture.shape[-2:] == (height, width) else
                              F.interpolate(picture, size=(height, width), mode="bicubic").clamp(-1, 1)
                              for picture in pictures])
        model, prompt = self._trained(training, seed)
        return [txt2img(model, tuple(picture.shape[-2:]), [torch.Generator().manual_seed(seed)], steps=self.steps,
                        guidance=self.guidance, prompt=prompt, cancel=self.cancel)
                for picture in pictures]


@dataclass(frozen=True)
class LoraMimicry(_TrainedMimicry):
    """LoRA fine-tuning mimicry: LoRA adapters trained on the whole set (`mist.engine.finetune`, the trainer the `aspl`
    and `mist2-lora` methods use) conditioned on `prompt`, then one image sampled per input from the prompt with the
    adapted UNet (see `_TrainedMimicry`)."""

    model: StableDiffusion
    train_steps: int = 500
    rank: int = 4
    learning_rate: float = 1e-4
    steps: int = 50
    guidance: float = 7.5
    prompt: str = STYLE_PROMPT
    strength: None = None
    cancel: threading.Event | None = None

    @property
    def name(self) -> str:
        return "lora"

    @property
    def label(self) -> str:
        return f"LoRA ({self.train_steps} steps, rank {self.rank})"

    def _trained(self, training: torch.Tensor, seed: int) -> tuple[StableDiffusion, str]:
        import torch

        from mist.engine.finetune import FinetuneOptions, Surrogate

        options = FinetuneOptions(kind="lora", steps=self.train_steps, rank=self.rank,
                                  learning_rate=self.learning_rate, seed=seed)
        surrogate = Surrogate(self.model, options, generator=torch.Generator().manual_seed(seed))
        surrogate.train(training, self.model.conditioning(self.prompt), callback=self._stop_if_cancelled)
        return surrogate.model, self.prompt


@dataclass(frozen=True)
class TextualInversionMimicry(_TrainedMimicry):
    """Textual inversion mimicry (Gal et al. 2023, `mist.engine.inversion`): a new word learnt from the whole set, a
    style for the prompt "a painting", a subject for "a photo", then one image sampled per input from "a painting in
    the style of <word>" ("a photo of <word>") with the model itself (see `_TrainedMimicry`). Defaults: those of
    diffusers' documented textual inversion run (3000 steps of 4 images, learning rate 2e-3)."""

    model: StableDiffusion
    train_steps: int = 3000
    learning_rate: float = 2e-3
    steps: int = 50
    guidance: float = 7.5
    prompt: str = STYLE_PROMPT
    strength: None = None
    cancel: threading.Event | None = None

    @property
    def name(self) -> str:
        return "ti"

    @property
    def label(self) -> str:
        return f"textual inversion ({self.train_steps} steps)"

    def _trained(self, training: torch.Tensor, seed: int) -> tuple[StableDiffusion, str]:
        from mist.engine.inversion import InversionOptions, TextualInversion

        options = InversionOptions(learnable="style" if self.prompt == STYLE_PROMPT else "object",
                                   steps=self.train_steps, learning_rate=self.learning_rate, seed=seed)
        inversion = TextualInversion(self.model, options)
        inversion.train(training, callback=self._stop_if_cancelled)
        return inversion.sampling_model(), inversion.prompt
