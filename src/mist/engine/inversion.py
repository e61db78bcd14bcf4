"""Textual inversion (Gal et al., "An Image is Worth One Word: Personalizing Text-to-Image Generation using Textual
Inversion", ICLR 2023): a mimic teaches Stable Diffusion one new word for the style (or the subject) of a few images,
then writes that word into prompts. Mist's own validation protocol names it beside fine-tuning; `mist evaluate --ti`
runs it (`mist.runner.evaluation.mimicry.TextualInversionMimicry`).

Only the new word's embedding trains: one vector of D numbers (768 on SD v1). The placeholder `PLACEHOLDER` is added as
one new token after CLIP's 49408 (`mist.models.tokenizer.tokenizer_with`), and the text encoder is run through a copy
of its module tree that shares every weight with the model's (no memory) and whose token-embedding table has one more
row, the placeholder's, initialised from the embedding of an initializer word ("painting" for a style, "object" for a
subject). The UNet, the VAE and every weight of the text encoder, its embedding table included, stay frozen and are
never written, so the model is unchanged for its other users.

The loss is SD's training loss (`objectives.denoising_loss`): mean((eps_theta(z_t, t, c) - n) ** 2) for a posterior
sample z of a training image, t ~ U{0..999}, n ~ N(0, I), where c is the text encoder's output for a prompt picked at
random from templates holding the placeholder (`STYLE_TEMPLATES`, `OBJECT_TEMPLATES`, written for Mist in the manner
of the paper's: "a painting in the style of <mist-word>", ...). The gradient reaches the placeholder's row through the
UNet's cross-attention and the text encoder.

Defaults (`InversionOptions`) are those of the run documented with diffusers' example (examples/textual_inversion,
its README and textual_inversion.py): 3000 optimiser steps, each on 4 images (batch 1 with 4 gradient-accumulation
steps: here the 4 images run one at a time and their gradients add up, so memory is that of one image), learning
rate 5e-4 scaled by that effective batch (`--scale_lr`): 2e-3, held constant without warm-up; AdamW with betas
(0.9, 0.999), weight decay 1e-2 and eps 1e-8 and no gradient clipping (the script's defaults), and each image flipped
left-right with probability 0.5 (its data set's default). The script's bare argument defaults (batch 16, 5000 steps,
1e-4 unscaled) are not a run it documents, and a batch of 16 through the UNet's backward pass needs many times the
memory. diffusers decays the whole embedding table and then writes every other row back; decaying the placeholder's
row alone, as here, comes to the same numbers.

Random numbers come from the caller's `torch.Generator` (or `InversionOptions.seed`): per image, which image, whether
it is flipped, which template, then its posterior sample, t and n, in that order. Same seed, same result on a CPU.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Callable

import torch
from torch import nn

from mist.engine import objectives
from mist.engine.finetune import check_images, check_numbers, check_whole_numbers, sharing_copy, shuffled_indices
from mist.models.tokenizer import tokenize, tokenizer_with

if TYPE_CHECKING:
    from mist.models import StableDiffusion

PLACEHOLDER = "<mist-word>"
STYLE_TEMPLATES = (
    "a painting in the style of {}", "an artwork in the style of {}", "a picture in the style of {}",
    "a small painting in the style of {}", "a detailed painting in the style of {}", "a drawing in the style of {}",
)
OBJECT_TEMPLATES = (
    "a photo of {}", "a picture of {}", "a close-up photo of {}", "a photo of the {}", "a small photo of {}",
    "a bright photo of {}",
)
# What the placeholder stands for: its templates (the first one is the prompt to sample with) and initializer word.
LEARNABLES = {"style": (STYLE_TEMPLATES, "painting"), "object": (OBJECT_TEMPLATES, "object")}


@dataclass(frozen=True)
class InversionOptions:
    """How to learn the word (see the module's docstring for where the defaults come from).

    learnable: "style" or "object" (which templates and initializer word). steps: optimiser steps. images_per_step:
    images whose gradients add up before each step. learning_rate, weight_decay: AdamW's. flip: the probability that
    an image is flipped left-right. seed: of the generator `train` makes when it is given none.
    """

    learnable: str = "style"
    steps: int = 3000
    images_per_step: int = 4
    learning_rate: float = 2e-3
    weight_decay: float = 1e-2
    flip: float = 0.5
    seed: int = 0

    def __post_init__(self) -> None:
        if self.learnable not in LEARNABLES:
            raise ValueError(f"learnable: must be one of {', '.join(LEARNABLES)}, got {self.learnable!r}")
        check_whole_numbers(self, {"steps": 0, "seed": 0, "images_per_step": 1})
        check_numbers(self, ("learning_rate",), zero_allowed=("weight_decay", "flip"))
        if self.flip > 1:
            raise ValueError(f"flip: must be a probability from 0 to 1, got {self.flip!r}")


class TextualInversion:
    """A new word for `model` to learn (see the module's docstring): `train` it on images, then sample with `prompt`
    (the first template, holding the word) from `sampling_model()`. `model` itself is never changed."""

    def __init__(self, model: StableDiffusion, options: InversionOptions = InversionOptions(),
                 precision: str = "fp32") -> None:
        if model.text_encoder is None or model.unet is None:
            raise ValueError('textual inversion needs the model\'s UNet and text encoder (load it with the "unet" and '
                             '"text_model" parts)')
        self.model, self.options, self.precision = model, options, precision
        templates, initializer = LEARNABLES[options.learnable]
        self.prompt = templates[0].format(PLACEHOLDER)
        self.encoder = sharing_copy(model.text_encoder)
        table = self.encoder.get_input_embeddings()
        token = tokenizer_with(PLACEHOLDER).convert_tokens_to_ids(PLACEHOLDER)
        if token != table.num_embeddings:
            raise ValueError(f"text encoder: its embedding table has {table.num_embeddings} rows, CLIP's vocabulary "
                             f"{token}")
        start = table.weight[tokenize(initializer)[0, 1]].detach().float().clone()
        self.word = nn.Parameter(start)  # the placeholder's embedding, float32: the only trained weight
        self.encoder.set_input_embeddings(_GrownEmbedding(table, self.word))
        self._prompts = torch.cat([tokenize(template.format(PLACEHOLDER), PLACEHOLDER) for template in templates])

    def embedding(self, prompt: str) -> torch.Tensor:
        """The text encoder's last hidden state for `prompt`, which may hold the word: (1, 77, D), float32 on the
        CPU (as a model keeps its prompts' embeddings)."""
        with torch.no_grad():
            return self._encoded(tokenize(prompt, PLACEHOLDER)).cpu()

    def sampling_model(self) -> StableDiffusion:
        """The model (the same networks) with the embedding of `prompt` beside those of Mist's prompts, for the
        samplers that take a prompt by name (`mist.runner.evaluation.img2img.txt2img`)."""
        return replace(self.model, text_embeddings={**self.model.text_embeddings,
                                                    self.prompt: self.embedding(self.prompt)})

    def train(self, images: torch.Tensor, steps: int | None = None, generator: torch.Generator | None = None,
              callback: Callable[[int, float], None] | None = None) -> list[float]:
        """Learn the word from `images` (N, 3, H, W) in [-1, 1] for `steps` (default: the options') optimiser steps
        with a fresh AdamW; returns each step's loss (the mean over its images). Images are taken in random orders
        drawn from `generator` (default: seeded with the options' seed), each seen once before any is seen again.
        `callback(step, loss)` after each step (1-based): raising there stops the training after that step."""
        o = self.options
        check_images(images)
        generator = generator or torch.Generator().manual_seed(o.seed)
        optimizer = torch.optim.AdamW([self.word], lr=o.learning_rate, betas=(0.9, 0.999),
                                      weight_decay=o.weight_decay, eps=1e-8)
        images = images.detach().to(self.model.device)
        indices = shuffled_indices(images.shape[0], generator)
        losses = []
        for step in range(o.steps if steps is None else steps):
            total = 0.0
            for _ in range(o.images_per_step):
                loss = self._loss(images[next(indices)].unsqueeze(0), generator) / o.images_per_step
                loss.backward()
                total += loss.item()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            losses.append(total)
            if callback is not None:
                callback(step + 1, total)
        return losses

    def _loss(self, image: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """The denoising loss of one image (1, 3, H, W), maybe flipped, under a random template's prompt."""
        if torch.rand((), generator=generator).item() < self.options.flip:
            image = image.flip(-1)
        template = int(torch.randint(len(self._prompts), (), generator=generator))
        text = self._encoded(self._prompts[template : template + 1])
        with torch.no_grad():
            latent = objectives.encode(self.model, image, [generator], self.precision)
        return objectives.denoising_loss(self.model, latent, text, [generator], self.precision).mean()

    def _encoded(self, ids: torch.Tensor) -> torch.Tensor:
        """The text encoder's last hidden state (float32) for token ids (1, 77), the word's row in place."""
        device = self.model.device
        with objectives.autocast(device, self.precision):
            return self.encoder(ids.to(device)).last_hidden_state.float()


class _GrownEmbedding(nn.Module):
    """A token-embedding table with one row more: ids within `table` read it (frozen), the next id reads `row`."""

    def __init__(self, table: nn.Embedding, row: nn.Parameter) -> None:
        super().__init__()
        self.table, self.row = table, row

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        size = self.table.num_embeddings
        known = self.table(ids.clamp(max=size - 1))
        return torch.where((ids == size).unsqueeze(-1), self.row.to(known.dtype), known)
