"""The protection pipeline: a config and a loaded model turn PIL images into protected PIL images.

Per image: resize (or keep the aspect ratio), split into block_num x block_num tiles, and run masked PGD on each tile
against the matching tile of the target pattern and of the mask; stitch the tiles back, and with `original_size` carry
the perturbation to the input's own resolution. Tiles of the same size, from one image or several, may share an attack
batch (`batch_size`). Each tile draws its random numbers (random start, posterior samples, t and noise, and the target's
posterior sample) from generators seeded from the config's seed, a hash of its image's processed pixels and its tile
index: an image's result depends on its pixels and the settings only, not on its file name, the face that protects it,
or the other images of the run (though batched arithmetic can change its last bits: see `batch_size`); and different
images get unrelated perturbations.
"""

from __future__ import annotations

import hashlib
import time
from contextlib import contextmanager
from dataclasses import dataclass
from importlib import resources
from typing import Callable, Iterable, Sequence

import torch
from PIL import Image

from . import images
from .attack import StepInfo, masked_linf_pgd
from .config import ProtectConfig
from .device import resolve_precision
from .models import StableDiffusion
from .objectives import PRECISION_DTYPES, MistObjective, loss_scale, target_latent


@dataclass(frozen=True)
class Progress:
    """One finished PGD step of a `protect_many` call: `step` of `total` counts across its attack batches.
    Loss values are summed over the tiles of the current batch."""

    step: int
    total: int
    batch: int  # 0-based attack batch
    batches: int
    images: tuple[int, ...]  # indices (into the call's image list) of the images in this batch
    textural: float | None
    semantic: float | None
    objective: float


@dataclass(frozen=True)
class ProtectedImage:
    """A protected image and what the attack measured (losses summed over tiles; None where not computed)."""

    image: Image.Image  # at the processed size, or at the input's own size with original_size
    size: tuple[int, int]  # (width, height) processed
    textural_start: float | None
    textural_end: float | None
    semantic_start: float | None
    semantic_end: float | None
    seconds: float
    random_weights: bool


@dataclass
class _Tile:
    image: int
    index: int
    digest: str  # `pixel_digest` of its image's processed pixels
    pixels: torch.Tensor
    mask: torch.Tensor | None
    target: torch.Tensor | None  # its tile of the target pattern (None in semantic mode)
    size: tuple[int, int]  # processed size of its image
    start: tuple[float | None, float | None] = (None, None)  # (textural, semantic) at the first step
    end: tuple[float | None, float | None] = (None, None)  # and at the last step
    result: torch.Tensor | None = None


def default_target() -> Image.Image:
    """Mist's own target pattern (high-contrast rings and checks), shipped with the package."""
    with resources.files("mist").joinpath("assets/target_pattern.png").open("rb") as handle:
        return Image.open(handle).convert("RGB")


def pixel_digest(x: torch.Tensor) -> str:
    """SHA-256 (hex) of a pixel tensor's shape and float32 values: the identity of an image as it is protected."""
    values = x.detach().to("cpu", torch.float32).contiguous().numpy().astype("<f4", copy=False)
    digest = hashlib.sha256(repr(tuple(x.shape)).encode("ascii"))
    digest.update(values.tobytes())
    return digest.hexdigest()


def tile_seed(seed: int, digest: str, tile: int, stream: str = "attack") -> int:
    """The generator seed (0 .. 2**63 - 1) of tile `tile` of the image whose `pixel_digest` is `digest`; `stream`
    separates the attack's draws ("attack") from the target's posterior sample ("target")."""
    text = f"mist tile seed|{stream}|{seed}|{digest}|{tile}".encode("ascii")
    return int.from_bytes(hashlib.sha256(text).digest()[:8], "little") >> 1


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


class Protector:
    """A model placed on a device, in the config's precision, with the target and prompt prepared.

    The Protector works on its own placement of `model` (`StableDiffusion.placed`) and never changes the caller's:
    weights already on the device in the precision asked for are shared, the others are converted into a copy (SD v1
    in bf16: 1.8 GB more, held while the Protector lives). `hand_over=True` says the caller made the model for this
    Protector alone (or owns and re-checks it, like the web UI's cache): it is then converted in place, weight by
    weight, and no second copy is made; the caller must not expect it unchanged afterwards.

    low_memory: gradient checkpointing in the encoder and the UNet (about 40% more time per step, a quarter less peak
        memory at 512 x 512 on a CPU); None turns it on where it is the default (see `default_low_memory`).
    batch_size: how many tiles (images, when block_num is 1) share one attack batch.
    """

    def __init__(self, model: StableDiffusion, config: ProtectConfig, device: torch.device | None = None, *,
                 low_memory: bool | None = None, batch_size: int = 1, hand_over: bool = False) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size: must be at least 1, got {batch_size}")
        self.config = config
        self.device = device or model.device
        self.precision = resolve_precision(config.precision, self.device)
        self.low_memory = default_low_memory(self.device) if low_memory is None else low_memory
        self.batch_size = batch_size
        self.model = model.placed(self.device, PRECISION_DTYPES[self.precision], in_place=hand_over)
        self.model.set_gradient_checkpointing(self.low_memory)
        self.target = images.read_image(config.target) if config.target else default_target()
        self.mask = images.read_image(config.mask) if config.mask else None
        self.text = self.model.text_embedding(config.prompt) if config.mode != "textural" else None

    def processed_size(self, image: Image.Image) -> tuple[int, int]:
        return self.config.processed_size(image.width, image.height)

    def protect(self, image: Image.Image, mask: Image.Image | None = None,
                callback: Callable[[Progress], None] | None = None) -> ProtectedImage:
        """Protect an RGB image; `mask` (any size; None: the config's mask, if any) marks the pixels to protect with
        pure white (see `protect_many`)."""
        return self.protect_many([image], [mask], callback)[0]

    def protect_many(self, pictures: Sequence[Image.Image], masks: Sequence[Image.Image | None] | None = None,
                     callback: Callable[[Progress], None] | None = None) -> list[ProtectedImage]:
        """Protect several images, batching their tiles `batch_size` at a time. Each image has its own mask (any size:
        it is resized bicubic to the processed size, and protection is where its red channel is then 255, as in Mist
        v1.2); where `masks` or an entry of it is None, the config's mask applies (none: the whole image)."""
        c = self.config
        started = time.perf_counter()
        masks = [self.mask if m is None else m for m in (masks if masks is not None else [None] * len(pictures))]
        uses_target = c.mode != "semantic"
        tiles: list[_Tile] = []
        processed: list[torch.Tensor] = []
        for number, (picture, mask) in enumerate(zip(pictures, masks, strict=True)):
            size = self.processed_size(picture)
            processed.append(images.image_to_tensor(picture, size))
            digest = pixel_digest(processed[-1])
            x = images.split_tiles(processed[-1], c.block_num)
            m = images.split_tiles(images.mask_to_tensor(mask, size), c.block_num) if mask is not None else None
            y = images.split_tiles(images.image_to_tensor(self.target, size), c.block_num) if uses_target else None
            tiles += [_Tile(number, k, digest, x[k], m[k] if m else None, y[k] if y else None, size)
                      for k in range(len(x))]
        batches = _batches(tiles, self.batch_size)
        for number, batch in enumerate(batches):
            self._attack(batch, number, len(batches), callback)
        seconds = (time.perf_counter() - started) / max(len(pictures), 1)
        results = []
        for number, picture in enumerate(pictures):
            own = [t for t in tiles if t.image == number]
            stitched = images.stitch_tiles([t.result for t in own], c.block_num)
            if c.original_size:
                output = carry_to_original(picture, processed[number], stitched, masks[number], c.radius)
            else:
                output = images.tensor_to_image(stitched)
            results.append(ProtectedImage(
                image=output, size=own[0].size,
                textural_start=_sum(t.start[0] for t in own), textural_end=_sum(t.end[0] for t in own),
                semantic_start=_sum(t.start[1] for t in own), semantic_end=_sum(t.end[1] for t in own),
                seconds=seconds, random_weights=self.model.random_weights,
            ))
        return results

    def _attack(self, batch: list[_Tile], number: int, batches: int,
                callback: Callable[[Progress], None] | None) -> None:
        c = self.config
        x = torch.cat([t.pixels for t in batch]).to(self.device)
        mask = None
        if any(t.mask is not None for t in batch):
            mask = torch.cat([t.mask if t.mask is not None else torch.ones_like(t.pixels[:, :1]) for t in batch])
        target = torch.cat([self._target_latent(t) for t in batch]) if c.mode != "semantic" else None
        objective = MistObjective(self.model, c.mode, c.semantic_weight, target, self.text, self.precision, c.fast)
        generators = [torch.Generator().manual_seed(tile_seed(c.seed, t.digest, t.index)) for t in batch]
        members = tuple(sorted({t.image for t in batch}))

        def on_step(info: StepInfo) -> None:
            for position, tile in enumerate(batch):
                if info.step == 1:
                    tile.start = _losses(info, position)
                if info.step == info.steps:
                    tile.end = _losses(info, position)
            if callback is not None:
                callback(Progress(number * c.steps + info.step, batches * c.steps, number, batches, members,
                                  _sum(info.textural or ()), _sum(info.semantic or ()), sum(info.objective)))

        with flush_denormals(self.device):
            out = masked_linf_pgd(x, objective, radius=c.radius, step=c.step, steps=c.steps, generators=generators,
                                  mask=None if mask is None else mask.to(self.device), callback=on_step,
                                  loss_scale=loss_scale(self.precision, c.mode))
        for position, tile in enumerate(batch):
            tile.result = out[position : position + 1].cpu()

    def _target_latent(self, tile: _Tile) -> torch.Tensor:
        """E(y) of the tile's target, with a posterior sample of its own stream (one encoder pass per tile: the draw
        depends on the image, so latents are not shared between images)."""
        generator = torch.Generator().manual_seed(tile_seed(self.config.seed, tile.digest, tile.index, "target"))
        return target_latent(self.model, tile.target.to(self.device), [generator], self.precision)


def carry_to_original(picture: Image.Image, processed: torch.Tensor, protected: torch.Tensor,
                      mask: Image.Image | None, radius: float) -> Image.Image:
    """The perturbation `protected - processed` (tensors in [-1, 1] at the processing size) carried to `picture`'s own
    size: resized bicubic, clipped to [-radius, radius] (radius in [-1, 1] units), zero outside `mask` (binarised at
    the picture's size as at the processing size), added to the picture's own pixels and clipped to the valid range.
    So the saved 8-bit image differs from the input by at most radius * 127.5 levels, and nowhere outside the mask."""
    delta = images.resize_tensor(protected - processed, picture.size).clamp(-radius, radius)
    if mask is not None:
        delta = delta * images.mask_to_tensor(mask, picture.size)
    return images.tensor_to_image((images.image_to_tensor(picture, picture.size) + delta).clamp(-1, 1))


def default_low_memory(device: torch.device) -> bool:
    """Gradient checkpointing costs about 40% more time per step and saves a quarter to a third of the peak memory
    (benchmarks/RESULTS.md), so it is on only where memory is short: a GPU with less than 12 GiB, a CPU machine with
    less than 8 GiB available, and Apple MPS (memory shared with the whole system)."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).total_memory < 12 * 1024**3
    if device.type == "cpu":
        available = available_ram_bytes()
        return available is not None and available < 8 * 1024**3
    return True


def available_ram_bytes() -> int | None:
    """MemAvailable from Linux's /proc/meminfo; None where that cannot be read."""
    try:
        with open("/proc/meminfo", encoding="ascii") as handle:
            for line in handle:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError):
        pass
    return None


def _batches(tiles: list[_Tile], batch_size: int) -> list[list[_Tile]]:
    """Consecutive groups of at most batch_size tiles of the same shape, in order of appearance."""
    groups: dict[tuple[int, ...], list[_Tile]] = {}
    for tile in tiles:
        groups.setdefault(tuple(tile.pixels.shape), []).append(tile)
    return [group[i : i + batch_size] for group in groups.values() for i in range(0, len(group), batch_size)]


def _losses(info: StepInfo, position: int) -> tuple[float | None, float | None]:
    """The (textural, semantic) losses of the tile at `position` of a batch's step."""
    return tuple(None if values is None else values[position] for values in (info.textural, info.semantic))


def _sum(values: Iterable[float | None]) -> float | None:
    """The sum of the values present; None when none is."""
    present = [v for v in values if v is not None]
    return sum(present) if present else None
