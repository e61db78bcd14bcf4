"""The protection pipeline: a config and a loaded model turn PIL images into protected PIL images, whatever the method.

Per image: resize (or keep the aspect ratio), split into block_num x block_num tiles, and run masked PGD on each tile
with the method's loss, prepared from the tile and the matching tile of the method's target image, within the matching
tile of the mask; stitch the tiles back, and with `original_size` carry the perturbation to the input's own
resolution. Tiles of the same size, from one image or several, may share an attack batch (`batch_size`). Each tile
draws its random numbers (the random start, the loss's draws, and the method's own streams such as a target's posterior
sample) from generators seeded from the config's seed, a hash of its image's processed pixels and its tile index: an
image's result depends on its pixels and the settings only, not on its file name, the face that protects it, or the
other images of the run (though batched arithmetic can change its last bits: see `batch_size`); and different images
get unrelated perturbations. A tile whose mask protects none of its pixels is not attacked (PGD would return it as it
is, and no other tile draws from its generators), so a mask that leaves tiles of `block_num` out costs only the tiles
it touches.
"""

from __future__ import annotations

import hashlib
import time
from dataclasses import dataclass, field
from functools import cached_property, partial
from typing import Callable, Iterable, Sequence

import torch
from PIL import Image

from mist.common import images
from mist.engine.attack import StepInfo, masked_linf_pgd
from mist.engine.compiling import check_can_compile, compile_networks, compile_seconds
from mist.engine.config import ProtectConfig
from mist.engine.cpu_tuning import attack_settings
from mist.engine.ensemble import draws_scale, ensemble_loss, load_members, source_label, unique_labels
from mist.engine.ensemble_checks import ensemble_refusal, ensemble_side_multiple
from mist.models.device import default_low_memory, resolve_precision
from mist.engine.methods import Loss, SurrogateLoss, TileInputs, get_method
from mist.models import StableDiffusion
from mist.models.architectures import FAMILIES
from mist.models.families import refuse_denoiser_parts
from mist.engine.objectives import PRECISION_DTYPES
from mist.engine.robust import robust_loss
from mist.engine.shaping import shape_blur


@dataclass(frozen=True)
class Progress:
    """One finished PGD step of a `protect_many` call: `step` of `total` counts across its attack batches.
    The objective and the method's named terms are summed over the tiles of the current batch."""

    step: int
    total: int
    batch: int  # 0-based attack batch
    batches: int
    images: tuple[int, ...]  # indices (into the call's image list) of the images in this batch
    objective: float
    terms: dict[str, float]


@dataclass(frozen=True)
class ProtectedImage:
    """A protected image and what the attack measured: the objective and the method's named terms at the first and
    the last step, summed over tiles."""

    image: Image.Image  # at the processed size, or at the input's own size with original_size
    size: tuple[int, int]  # (width, height) processed
    start: dict[str, float]  # "objective" and each term
    end: dict[str, float]
    seconds: float  # wall time of the protect_many call that made it, per image of the call
    random_weights: bool
    compile_seconds: float = 0.0  # the part of `seconds` spent compiling (with `compile`): a one-time cost per size


@dataclass
class _Tile:
    image: int
    index: int
    digest: str  # `pixel_digest` of its image's processed pixels
    pixels: torch.Tensor
    mask: torch.Tensor | None
    target: torch.Tensor | None  # its tile of the method's target image (None: the method has none)
    size: tuple[int, int]  # processed size of its image
    start: dict[str, float] = field(default_factory=dict)  # objective and terms at the first step
    end: dict[str, float] = field(default_factory=dict)  # and at the last step
    result: torch.Tensor | None = None

    def seed(self, seed: int, stream: str) -> int:
        return tile_seed(seed, self.digest, self.index, stream)


def pixel_digest(x: torch.Tensor) -> str:
    """SHA-256 (hex) of a pixel tensor's shape and float32 values: the identity of an image as it is protected."""
    values = x.detach().to("cpu", torch.float32).contiguous().numpy().astype("<f4", copy=False)
    digest = hashlib.sha256(repr(tuple(x.shape)).encode("ascii"))
    digest.update(values.tobytes())
    return digest.hexdigest()


def tile_seed(seed: int, digest: str, tile: int, stream: str = "attack") -> int:
    """The generator seed (0 .. 2**63 - 1) of tile `tile` of the image whose `pixel_digest` is `digest`; `stream`
    separates the attack's draws ("attack": the random start and the loss's draws) from a method's own streams (such as
    "target", the target's posterior sample)."""
    text = f"mist tile seed|{stream}|{seed}|{digest}|{tile}".encode("ascii")
    return int.from_bytes(hashlib.sha256(text).digest()[:8], "little") >> 1


class Protector:
    """A model placed on a device, in the config's precision, with the config's method ready to prepare its losses.

    The Protector works on its own placement of `model` (`StableDiffusion.placed`) and never changes the caller's:
    weights already on the device in the precision asked for are shared, the others are converted into a copy (SD v1
    in bf16: 1.8 GB more, held while the Protector lives). `hand_over=True` says the caller made the model for this
    Protector alone (or owns and re-checks it, like the web UI's cache): it is then converted in place, weight by
    weight, and no second copy is made; the caller must not expect it unchanged afterwards.

    low_memory: gradient checkpointing in the encoder and the UNet (about 40% more time per step, a quarter less peak
        memory at 512 x 512 on a CPU); None turns it on where it is the default (see `default_low_memory`).
    batch_size: how many tiles (images, when block_num is 1) share one attack batch.
    compile: compile the encoder and the UNet with torch.compile (`mist.engine.compiling`): minutes the first time a
    size is
        met; on a 2-core CPU, steps no faster and a 0.2 to 1.1 GB lower peak (not measured on a GPU).
        ValueError("compile: ...") where this machine cannot compile.

    With the config's `against` models, each is loaded with the parts the method reads (checked first:
    `mist.engine.ensemble_checks`) and every attack fools them all at once (`mist.engine.ensemble`); `ensemble` names
    the members, the run's model first (empty without `against`).
    """

    def __init__(self, model: StableDiffusion, config: ProtectConfig, device: torch.device | None = None, *,
                 low_memory: bool | None = None, batch_size: int = 1, hand_over: bool = False,
                 compile: bool = False) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size: must be at least 1, got {batch_size}")
        if compile:
            check_can_compile(device or model.device)
        self.config = config
        self.device = device or model.device
        self.precision = resolve_precision(config.precision, self.device)
        self.low_memory = default_low_memory(self.device) if low_memory is None else low_memory
        self.batch_size = batch_size
        self.model = model.placed(self.device, PRECISION_DTYPES[self.precision], in_place=hand_over)
        self.model.set_gradient_checkpointing(self.low_memory)
        self.compiled = compile
        if compile:
            compile_networks(self.model)
        method = get_method(config.method)
        needed = method.parts_for(config.params)
        refuse_denoiser_parts(model.source, FAMILIES[model.arch.family], needed)
        if not needed <= self.model.parts:
            missing = ", ".join(sorted(needed - model.parts))
            raise ValueError(f"method: {method.name} needs the model's {missing}, which this model was loaded without")
        if not config.parts <= self.model.parts:
            raise ValueError("robust: vae needs the model's VAE decoder, which this model was loaded without")
        self.method = method(config.params, self.model, self.precision)
        self.target = self.method.target_image()
        refused = ensemble_refusal(config, self.model)
        if refused:
            raise ValueError(refused)
        self.members = load_members(config, self.device, self.precision, self.low_memory)
        self.side_multiple = ensemble_side_multiple(config, FAMILIES[model.arch.family])[0]
        self.ensemble = unique_labels([source_label(model.source)] + [m.label for m in self.members]
                                      ) if self.members else []

    @cached_property
    def mask(self) -> Image.Image | None:
        """The config's mask image (read when first needed: callers that give every image its mask never read it)."""
        return images.read_image(self.config.mask) if self.config.mask else None

    def processed_size(self, image: Image.Image) -> tuple[int, int]:
        return self.config.processed_size(image.width, image.height, self.side_multiple)

    def loss_for(self, x: torch.Tensor, seed: int = 0) -> Loss:
        """The method's loss for scoring the images `x` (N, 3, H, W) in [-1, 1] whole, at their own size (the target
        image resized to it), with its prepare-time draws (such as the target's posterior sample) seeded from `seed`:
        for measuring images (benchmarks, evaluation), not for protecting them."""
        target = None if self.target is None else images.image_to_tensor(self.target, (x.shape[3], x.shape[2]))
        return self.method.prepare([
            TileInputs(clean=x[i : i + 1].to(self.device), target=None if target is None else target.to(self.device),
                       seed=lambda stream: seed) for i in range(x.shape[0])])

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
        compiling_before = compile_seconds() if self.compiled else 0.0
        masks = list(masks) if masks is not None else [None] * len(pictures)
        masks = [self.mask if m is None else m for m in masks]
        uses_target = self.target is not None
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
        for tile in tiles:
            if tile.mask is not None and not bool(tile.mask.any()):
                tile.result = tile.pixels  # nothing of this tile is protected: PGD would return it as it is
        batches = _batches([t for t in tiles if t.result is None], self.batch_size)
        for number, batch in enumerate(batches):
            self._attack(batch, number, len(batches), callback)
        seconds = (time.perf_counter() - started) / max(len(pictures), 1)
        compiling = ((compile_seconds() - compiling_before) / max(len(pictures), 1)) if self.compiled else 0.0
        results = []
        for number, picture in enumerate(pictures):
            own = [t for t in tiles if t.image == number]
            stitched = images.stitch_tiles([t.result for t in own], c.block_num)
            if c.original_size:
                output = carry_to_original(picture, processed[number], stitched, masks[number], c.radius)
            else:
                output = images.tensor_to_image(stitched)
            results.append(ProtectedImage(image=output, size=own[0].size, start=_summed(t.start for t in own),
                                          end=_summed(t.end for t in own), seconds=seconds,
                                          random_weights=self.model.random_weights, compile_seconds=compiling))
        return results

    def _attack(self, batch: list[_Tile], number: int, batches: int,
                callback: Callable[[Progress], None] | None) -> None:
        c = self.config
        x = torch.cat([t.pixels for t in batch]).to(self.device)
        mask = None
        if any(t.mask is not None for t in batch):
            mask = torch.cat([t.mask if t.mask is not None else torch.ones_like(t.pixels[:, :1]) for t in batch])
        inputs = [TileInputs(clean=t.pixels.to(self.device), seed=partial(t.seed, c.seed),
                             target=None if t.target is None else t.target.to(self.device)) for t in batch]
        loss = self.method.prepare(inputs)
        if self.members:  # each member prepares from the same tiles through its own model
            scales = [torch.Generator().manual_seed(t.seed(c.seed, "scale")) for t in batch] if draws_scale(c) else None
            loss = ensemble_loss([(self.ensemble[0], loss)] + [(m.label, m.method.prepare(inputs))
                                                                for m in self.members], c.against_combine, scales)
        generators = [torch.Generator().manual_seed(t.seed(c.seed, "attack")) for t in batch]
        before_step = loss.before_step if isinstance(loss, SurrogateLoss) else None
        if c.robust:  # the transforms draw from a stream of their own: the attack's draws stay as without robust
            loss = robust_loss(loss, c.robust, c.eot_samples,
                               [torch.Generator().manual_seed(t.seed(c.seed, "robust")) for t in batch], self.model,
                               self.precision)
        members = tuple(sorted({t.image for t in batch}))

        def on_step(info: StepInfo) -> None:
            for position, tile in enumerate(batch):
                values = {"objective": info.objective[position]}
                values.update({name: per_tile[position] for name, per_tile in info.terms.items()})
                if info.step == 1:
                    tile.start = values
                if info.step == info.steps:
                    tile.end = values
            if callback is not None:
                callback(Progress(number * c.steps + info.step, batches * c.steps, number, batches, members,
                                  sum(info.objective), {name: sum(v) for name, v in info.terms.items()}))

        with attack_settings(self.device, reuse_heap=not self.low_memory):
            out = masked_linf_pgd(x, loss, radius=c.radius, step=c.step, steps=c.steps, generators=generators,
                                  mask=None if mask is None else mask.to(self.device), callback=on_step,
                                  loss_scale=self.method.loss_scale(), before_step=before_step, start=c.start,
                                  schedule=c.step_schedule)
        if c.shape == "blur":  # the step values reported above are those of the attack, before the shaping
            out = shape_blur(x, out, c.radius, None if mask is None else mask.to(self.device))
        for position, tile in enumerate(batch):
            tile.result = out[position : position + 1].cpu()


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


def _batches(tiles: list[_Tile], batch_size: int) -> list[list[_Tile]]:
    """Consecutive groups of at most batch_size tiles of the same shape, in order of appearance."""
    groups: dict[tuple[int, ...], list[_Tile]] = {}
    for tile in tiles:
        groups.setdefault(tuple(tile.pixels.shape), []).append(tile)
    return [group[i : i + batch_size] for group in groups.values() for i in range(0, len(group), batch_size)]


def _summed(values: Iterable[dict[str, float]]) -> dict[str, float]:
    """Per name, the sum over tiles of their values."""
    total: dict[str, float] = {}
    for tile in values:
        for name, value in tile.items():
            total[name] = total.get(name, 0.0) + value
    return total
