"""The protection pipeline: a config and a loaded model turn PIL images into protected PIL images.

Per image: resize (or keep the aspect ratio), split into block_num x block_num tiles, and run masked PGD on each tile
against the matching tile of the target pattern and of the mask; stitch the tiles back. The target's latent is
computed once per image size and tile, and each tile draws its random numbers from its own generator seeded from the
config, so an image's result does not depend on what else is in the batch or in which order it comes.
"""

from __future__ import annotations

import time
from contextlib import contextmanager
from dataclasses import dataclass
from importlib import resources
from typing import Callable

import torch
from PIL import Image

from . import images
from .attack import StepInfo, masked_linf_pgd
from .config import ProtectConfig
from .models import StableDiffusion
from .objectives import MistObjective, target_latent


@dataclass(frozen=True)
class Progress:
    """One finished PGD step of one image: `step` of `total` counts across all its tiles."""

    step: int
    total: int
    tile: int  # 0-based, row-major
    tiles: int
    textural: float | None
    semantic: float | None
    objective: float


@dataclass(frozen=True)
class ProtectedImage:
    """A protected image and what the attack measured (losses summed over tiles; None where not computed)."""

    image: Image.Image
    size: tuple[int, int]  # (width, height) processed
    textural_start: float | None
    textural_end: float | None
    semantic_start: float | None
    semantic_end: float | None
    seconds: float
    random_weights: bool


def default_target() -> Image.Image:
    """Mist's own target pattern (high-contrast rings and checks), shipped with the package."""
    with resources.files("mist").joinpath("assets/target_pattern.png").open("rb") as handle:
        return Image.open(handle).convert("RGB")


@contextmanager
def flush_denormals(device: torch.device):
    """Treat denormal floats as zero on the CPU while attacking. Gradients only matter through their signs, and
    denormal arithmetic can slow a CPU step a hundredfold (seen with random-weight models in fused mode)."""
    if device.type != "cpu":
        yield
        return
    torch.set_flush_denormal(True)
    try:
        yield
    finally:
        torch.set_flush_denormal(False)  # PyTorch's default; it offers no way to read the previous setting


def tile_seed(seed: int, tile: int) -> int:
    """The generator seed of tile `tile` (tile 0 uses the config's seed itself)."""
    return (seed + 7919 * tile) % 2**63


class Protector:
    """A model placed on a device with one config's target and prompt prepared; `protect` handles one image."""

    def __init__(self, model: StableDiffusion, config: ProtectConfig, device: torch.device | None = None) -> None:
        self.config = config
        self.device = device or model.device
        self.model = model.to(self.device)
        self.target = images.read_image(config.target) if config.target else default_target()
        self.text = model.text_embedding(config.prompt) if config.mode != "textural" else None
        self._target_latents: dict[tuple[int, int, int], torch.Tensor] = {}

    def processed_size(self, image: Image.Image) -> tuple[int, int]:
        c = self.config
        return images.processed_size(image.width, image.height, c.input_size, c.block_num, c.keep_aspect)

    def protect(self, image: Image.Image, mask: Image.Image | None = None,
                callback: Callable[[Progress], None] | None = None) -> ProtectedImage:
        """Protect an RGB image; `mask` (any size, resized to fit) marks with pure white the pixels to protect."""
        c = self.config
        started = time.perf_counter()
        size = self.processed_size(image)
        x = images.image_to_tensor(image, size).to(self.device)
        mask_tensor = images.mask_to_tensor(mask, size).to(self.device) if mask is not None else None
        x_tiles = images.split_tiles(x, c.block_num)
        mask_tiles = images.split_tiles(mask_tensor, c.block_num) if mask_tensor is not None else None
        tiles = len(x_tiles)
        starts: list[StepInfo] = []
        ends: list[StepInfo] = []
        protected = []
        for index, tile in enumerate(x_tiles):
            objective = MistObjective(self.model, c.mode, c.semantic_weight,
                                      self._target_latent(size, index) if c.mode != "semantic" else None,
                                      self.text, c.precision)

            def on_step(info: StepInfo, index: int = index) -> None:
                if info.step == 1:
                    starts.append(info)
                if info.step == info.steps:
                    ends.append(info)
                if callback is not None:
                    callback(Progress(index * c.steps + info.step, tiles * c.steps, index, tiles,
                                      info.textural, info.semantic, info.objective))

            generator = torch.Generator().manual_seed(tile_seed(c.seed, index))
            with flush_denormals(self.device):
                protected.append(masked_linf_pgd(
                    tile, objective, radius=c.radius, step=c.step, steps=c.steps, generator=generator,
                    mask=mask_tiles[index] if mask_tiles is not None else None, callback=on_step,
                ))
        result = images.tensor_to_image(images.stitch_tiles(protected, c.block_num).cpu())
        return ProtectedImage(
            image=result, size=size,
            textural_start=_sum(s.textural for s in starts), textural_end=_sum(e.textural for e in ends),
            semantic_start=_sum(s.semantic for s in starts), semantic_end=_sum(e.semantic for e in ends),
            seconds=time.perf_counter() - started, random_weights=self.model.random_weights,
        )

    def _target_latent(self, size: tuple[int, int], tile: int) -> torch.Tensor:
        key = (*size, tile)
        if key not in self._target_latents:
            target = images.image_to_tensor(self.target, size).to(self.device)
            # Its own stream, so the target's posterior sample is not the same draw as the image's first one.
            generator = torch.Generator().manual_seed(tile_seed(self.config.seed, tile) ^ 1 << 62)
            tile_image = images.split_tiles(target, self.config.block_num)[tile]
            self._target_latents[key] = target_latent(self.model, tile_image, generator, self.config.precision)
        return self._target_latents[key]


def _sum(values) -> float | None:
    values = [v for v in values if v is not None]
    return sum(values) if values else None
