"""Purifications: what a mimic does to a protected image before using it, as the robustness studies test them
(Hönig et al. 2024, "Adversarial perturbations cannot reliably protect artists from generative AI"; IMPRESS, Cao et al.
2023; DiffPure, Nie et al. 2022; GrIDPure, Zhao et al. 2024; AdverseCleaner, lllyasviel 2023).

Each purification is named and parametrised as `kind:value` (`jpeg:75`, `resize:0.5`); `parse_purifications` reads a
comma list of them. Each works on an 8-bit RGB PIL image and returns one of the same size. A purification that needs
weights this machine does not have is kept in the list and reports why it is skipped (`Purification.problem`); Mist
never downloads anything for it.
"""

from __future__ import annotations

import io
import threading
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

if TYPE_CHECKING:  # numpy, Pillow and OpenCV are imported where used: the command line reads KINDS for its help
    import numpy as np
    import torch
    from PIL import Image

    from mist.models import StableDiffusion

# The suite run when none is named: the studies' purifications, strongest settings included. Noisy x4 upscaling runs
# where the upscaler's weights are found, and is listed as skipped, with why, where they are not.
DEFAULT_PURIFY = ("jpeg:95,jpeg:75,jpeg:50,resize:0.5,jpeg-resize:75,blur:1,noise:8,crop:0.9,adverse:64,sdedit:0.2,"
                  "vae,impress,upscale:0.05")
X4_UPSCALER_REPOSITORY = "stabilityai/stable-diffusion-x4-upscaler"


@dataclass(frozen=True)
class Context:
    """What some purifications need besides the image: the SD model (SDEdit), the seed of their random draws, the
    folder of the SD x4 upscaler as the settings name it (None: the Hugging Face cache's snapshot), and the networks a
    purification loaded for the images still to come (`held`; `release` frees them)."""

    model: StableDiffusion | None
    seed: int
    cancel: threading.Event | None = None  # once set, a purification through the model stops at its next step
    upscaler: Path | None = None
    held: dict[str, Any] = field(default_factory=dict, compare=False, repr=False)

    def release(self) -> None:
        """Forget the networks purifications loaded (the x4 upscaler) and give their memory back to the device."""
        if not self.held:
            return
        import gc

        import torch

        self.held.clear()
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


@dataclass(frozen=True)
class Kind:
    """One kind of purification: its default value, the allowed range of the value, what it does, how to name it."""

    default: float | None
    low: float
    high: float
    apply: Callable[[Image.Image, float, Context], Image.Image]
    label: str  # with {value} for the value
    # why it cannot run on this machine, or None, given the x4 upscaler's folder as the settings name it
    unavailable: Callable[[Path | None], str | None] = lambda upscaler: None


@dataclass(frozen=True)
class Purification:
    """A purification as named by the user: `kind` with its `value` (None for kinds without one)."""

    kind: str
    value: float | None

    @property
    def name(self) -> str:
        """`kind:value` as the user would type it (`jpeg:75`)."""
        return self.kind if self.value is None else f"{self.kind}:{self.value:g}"

    @property
    def label(self) -> str:
        """A short human name (`JPEG q75`)."""
        return KINDS[self.kind].label.format(value=self.value if self.value is None else f"{self.value:g}")

    def problem(self, upscaler: Path | None = None) -> str | None:
        """Why this purification is skipped on this machine (weights absent), or None when it runs; `upscaler`: the x4
        upscaler's folder as the settings name it (None: looked for in the Hugging Face cache)."""
        return KINDS[self.kind].unavailable(upscaler)

    def __call__(self, image: Image.Image, context: Context) -> Image.Image:
        return KINDS[self.kind].apply(image, self.value, context)


NONE = Purification("none", None)  # the image as it is: every purified result is compared with this baseline


def parse_purifications(text: str) -> list[Purification]:
    """The purifications of a comma list (`jpeg:75,resize:0.5,adverse`), in order, repeats dropped; "" gives none.
    Raises ValueError("purify: ...") for an unknown kind or a value out of its range."""
    result: list[Purification] = []
    for item in (part.strip() for part in text.split(",")):
        if not item:
            continue
        kind, _, given = item.partition(":")
        spec = KINDS.get(kind)
        if spec is None or kind == "none":
            known = ", ".join(k for k in KINDS if k != "none")
            raise ValueError(f"purify: unknown purification {kind!r} (known: {known})")
        if spec.default is None:
            if given:
                raise ValueError(f"purify: {kind} takes no value, got {item!r}")
            value = None
        else:
            try:
                value = float(given) if given else spec.default
            except ValueError:
                raise ValueError(f"purify: {item!r}: the value must be a number") from None
            if not spec.low <= value <= spec.high:
                raise ValueError(f"purify: {item!r}: the value must be between {spec.low:g} and {spec.high:g}")
        purification = Purification(kind, value)
        if purification not in result:
            result.append(purification)
    return result


# ------------------------------------------------------------------------------------------------- the purifications


def jpeg(image: Image.Image, quality: float, context: Context | None = None) -> Image.Image:
    """Encode as JPEG at `quality` (1..100, Pillow's scale and its default 4:2:0 chroma subsampling) and decode."""
    from PIL import Image

    buffer = io.BytesIO()
    image.convert("RGB").save(buffer, format="JPEG", quality=int(round(quality)))
    buffer.seek(0)
    return Image.open(buffer).convert("RGB")


def rescale(image: Image.Image, factor: float, context: Context | None = None) -> Image.Image:
    """Resize by `factor` and back to the original size, Lanczos both ways."""
    from PIL import Image

    small = (max(1, round(image.width * factor)), max(1, round(image.height * factor)))
    return image.resize(small, Image.Resampling.LANCZOS).resize(image.size, Image.Resampling.LANCZOS)


def jpeg_then_rescale(image: Image.Image, quality: float, context: Context | None = None) -> Image.Image:
    """JPEG at `quality`, then a 0.5x downscale and back (Lanczos): Hönig et al.'s cheapest strong purification."""
    return rescale(jpeg(image, quality), 0.5)


def gaussian_blur(image: Image.Image, sigma: float, context: Context | None = None) -> Image.Image:
    """Gaussian blur with standard deviation `sigma` pixels (kernel of 6 sigma, odd)."""
    import cv2
    import numpy as np
    from PIL import Image

    size = 2 * int(np.ceil(3 * sigma)) + 1
    return Image.fromarray(cv2.GaussianBlur(np.asarray(image), (size, size), sigmaX=sigma, sigmaY=sigma))


def gaussian_noise(image: Image.Image, sigma: float, context: Context) -> Image.Image:
    """Add Gaussian noise of standard deviation `sigma` levels (0..255), seeded by the context, and round."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(context.seed)
    noisy = np.asarray(image, dtype=np.float64) + rng.normal(0.0, sigma, size=(image.height, image.width, 3))
    return Image.fromarray(np.clip(np.rint(noisy), 0, 255).astype(np.uint8))


def crop_and_resize(image: Image.Image, fraction: float, context: Context | None = None) -> Image.Image:
    """Keep the centred `fraction` of each side and resize it back to the full size (bicubic)."""
    from PIL import Image

    width, height = max(1, round(image.width * fraction)), max(1, round(image.height * fraction))
    left, top = (image.width - width) // 2, (image.height - height) // 2
    crop = image.crop((left, top, left + width, top + height))
    return crop.resize(image.size, Image.Resampling.BICUBIC)


def guided_filter(guide: np.ndarray, source: np.ndarray, radius: int, eps: float) -> np.ndarray:
    """He et al.'s guided filter (ECCV 2010, colour-guide form) of `source` (H, W, C) guided by `guide` (H, W, 3),
    both float in 0..255; `eps` regularises in squared levels. Written here with box filters because OpenCV's own
    (`cv2.ximgproc.guidedFilter`) is only in the opencv-contrib build."""
    import cv2
    import numpy as np

    def mean(x: np.ndarray) -> np.ndarray:
        return cv2.blur(x, (2 * radius + 1, 2 * radius + 1), borderType=cv2.BORDER_REFLECT)

    guide = guide.astype(np.float64)
    mean_i = mean(guide)
    covariance = np.empty(guide.shape[:2] + (3, 3))
    for a in range(3):
        for b in range(a, 3):
            covariance[..., a, b] = covariance[..., b, a] = (mean(guide[..., a] * guide[..., b])
                                                             - mean_i[..., a] * mean_i[..., b])
    inverse = np.linalg.inv(covariance + eps * np.eye(3))
    out = np.empty(source.shape, dtype=np.float64)
    for c in range(source.shape[2]):
        p = source[..., c].astype(np.float64)
        mean_p = mean(p)
        cross = np.stack([mean(guide[..., a] * p) - mean_i[..., a] * mean_p for a in range(3)], axis=-1)
        a_coef = np.einsum("...ij,...j->...i", inverse, cross)
        b_coef = mean_p - np.einsum("...i,...i->...", a_coef, mean_i)
        out[..., c] = np.einsum("...i,...i->...", mean(a_coef), guide) + mean(b_coef)
    return out


def adverse_cleaner(image: Image.Image, passes: float, context: Context | None = None) -> Image.Image:
    """AdverseCleaner: `passes` bilateral filters (diameter 5, sigma 8 in colour and space), then 4 guided filters
    (radius 4, eps 16) that restore the original's edges, as in lllyasviel's script."""
    import cv2
    import numpy as np
    from PIL import Image

    original = np.asarray(image.convert("RGB"))
    smoothed = original.copy()
    for _ in range(int(passes)):
        smoothed = cv2.bilateralFilter(smoothed, 5, 8, 8)
    result = smoothed.astype(np.float64)
    for _ in range(4):
        result = guided_filter(original, result, 4, 16)
    return Image.fromarray(np.clip(np.rint(result), 0, 255).astype(np.uint8))


def sdedit(image: Image.Image, strength: float, context: Context) -> Image.Image:
    """DiffPure-style regeneration through the user's SD checkpoint: noise the image to `strength` of the schedule and
    denoise it with DDIM, with no prompt and no guidance, at the image's size floored to multiples of 8."""
    import torch

    from mist.models.components import UNCONDITIONAL_PROMPT
    from mist.runner.evaluation.img2img import img2img

    def regenerated(x: torch.Tensor) -> torch.Tensor:
        return img2img(context.model, x, strength, [torch.Generator().manual_seed(context.seed)], guidance=1.0,
                       prompt=UNCONDITIONAL_PROMPT, cancel=context.cancel).images

    return _through_model("sdedit", image, context, regenerated)


def vae_round_trip(image: Image.Image, passes: float, context: Context) -> Image.Image:
    """A latent-space projection (after VAE-Trans, "Purify Once, Edit Freely", 2026): the image encoded by the SD
    checkpoint's VAE (its posterior mean, no sampling) and decoded, `passes` times. A perturbation that lives off the
    images the VAE can make is what it removes; nothing random is drawn."""
    import torch

    from mist.engine.objectives import PRECISION_DTYPES, vae_round_trip as round_trip

    def projected(x: torch.Tensor) -> torch.Tensor:
        model = context.model  # present: _through_model checks
        precision = next(name for name, dtype in PRECISION_DTYPES.items() if dtype == model.dtype)
        with torch.no_grad():
            for _ in range(int(passes)):
                x = round_trip(model, x.to(model.device), precision).clamp(-1.0, 1.0).cpu()
        return x

    return _through_model("vae", image, context, projected)


# IMPRESS's optimisation as Mist runs it (Mist's own defaults; the paper tunes them per experiment): Adam on the pixels
# in [-1, 1], the consistency term weighted 1, the similarity term weighted IMPRESS_WEIGHT above IMPRESS_BOUND.
IMPRESS_LEARNING_RATE = 0.01
IMPRESS_WEIGHT = 1.0
IMPRESS_BOUND = 0.1  # LPIPS, or 1 - SSIM where LPIPS's weights are absent


def impress(image: Image.Image, steps: float, context: Context) -> Image.Image:
    """IMPRESS (Cao et al., NeurIPS 2023): the image made consistent with the checkpoint's VAE while staying like
    itself. Starting from the image x, `steps` Adam steps minimise mean((x' - D(E(x')))^2) + IMPRESS_WEIGHT *
    max(d(x', x) - IMPRESS_BOUND, 0), where E is the VAE's posterior mean and d is LPIPS when its weights are found
    locally, else 1 - SSIM (a weight-free stand-in, said in the report). A protection is a perturbation the VAE does
    not reproduce; this removes what of it the similarity term lets go. Stops at its next step once cancelled."""
    import torch

    from mist.engine.attack import Cancelled
    from mist.runner.evaluation.metrics import Lpips, lpips_problem, ssim

    model = context.model
    distance = Lpips() if lpips_problem() is None else (lambda a, b: 1 - ssim(a, b))

    def purified(x: torch.Tensor) -> torch.Tensor:
        original = x.to(model.device)
        moved = original.clone().requires_grad_(True)
        optimizer = torch.optim.Adam([moved], lr=IMPRESS_LEARNING_RATE)
        for _ in range(int(steps)):
            if context.cancel is not None and context.cancel.is_set():
                raise Cancelled
            mean, _ = model.posterior(moved)
            consistency = (moved - model.decode(model.scale_latent(mean))).pow(2).mean()
            likeness = torch.clamp(distance(moved, original) - IMPRESS_BOUND, min=0).sum()
            optimizer.zero_grad(set_to_none=True)
            (consistency + IMPRESS_WEIGHT * likeness).backward()
            optimizer.step()
            with torch.no_grad():
                moved.clamp_(-1.0, 1.0)
        return moved.detach().cpu()

    return _through_model("impress", image, context, purified)


def _through_model(name: str, image: Image.Image, context: Context,
                   transform: Callable[[torch.Tensor], torch.Tensor]) -> Image.Image:
    """`transform` of the image as a tensor in [-1, 1] at its size floored to multiples of 8, back at its own size."""
    from PIL import Image

    from mist.common import images as image_io

    if context.model is None:
        raise RuntimeError(f"{name} needs the Stable Diffusion model")
    size = (max(8, image.width // 8 * 8), max(8, image.height // 8 * 8))
    result = image_io.tensor_to_image(transform(image_io.image_to_tensor(image, size)))
    return result if result.size == image.size else result.resize(image.size, Image.Resampling.BICUBIC)


# Noisy upscaling as Mist runs it. Hönig et al. caption each image and hand the x4 upscaler a noise level of 320
# through their own fork of diffusers' pipeline; Mist gives no prompt and the stock pipeline's noise level.
UPSCALE_STEPS = 20  # denoising steps of the upscaler's own scheduler (diffusers' pipeline defaults to 75)
UPSCALE_NOISE_LEVEL = 20  # the low-resolution image's noise augmentation the upscaler adds and is told (0..350)
UPSCALE_MAX_SIDE = 512  # a longer side is downsized to this first: the upscaler's output is at most 2048 px


def noisy_upscale(image: Image.Image, sigma: float, context: Context) -> Image.Image:
    """Noisy upscaling (Hönig et al. 2024): Gaussian noise of standard deviation `sigma` on the 0..1 scale (seeded by
    the context, clipped and rounded to 8 bits), then the Stable Diffusion x4 upscaler with an empty prompt and no
    guidance (UPSCALE_STEPS steps, seeded by the context), then a bicubic resize back to the image's size. An image
    whose longer side is above UPSCALE_MAX_SIDE is downsized to it (Lanczos) before the noise. Stops at the
    upscaler's next step once cancelled."""
    import torch
    from PIL import Image

    from mist.engine.attack import Cancelled

    def stop_if_cancelled(*step: object) -> None:
        if context.cancel is not None and context.cancel.is_set():
            raise Cancelled

    pipeline = _x4_upscaler(context)
    picture = image.convert("RGB")
    scale = min(1.0, UPSCALE_MAX_SIDE / max(picture.size))
    if scale < 1:
        picture = picture.resize((max(1, round(picture.width * scale)), max(1, round(picture.height * scale))),
                                 Image.Resampling.LANCZOS)
    noisy = gaussian_noise(picture, sigma * 255, context)
    stop_if_cancelled()
    with torch.no_grad():
        upscaled = pipeline(prompt="", image=noisy, num_inference_steps=UPSCALE_STEPS, guidance_scale=1.0,
                            noise_level=UPSCALE_NOISE_LEVEL, generator=torch.Generator().manual_seed(context.seed),
                            callback=stop_if_cancelled, callback_steps=1).images[0]
    return upscaled.resize(image.size, Image.Resampling.BICUBIC)


def _x4_upscaler(context: Context) -> Any:
    """The x4 upscaler's diffusers pipeline on the model's device (the CPU without a model), in the model's dtype:
    loaded offline and from safetensors only the first time the context needs it, then held until `release`."""
    if "upscale" not in context.held:
        import torch
        from diffusers import StableDiffusionUpscalePipeline

        folder = _upscaler_folder(context.upscaler)
        if folder is None:
            raise RuntimeError(f"upscale: {_upscaler_unavailable(context.upscaler)}")
        try:
            pipeline = StableDiffusionUpscalePipeline.from_pretrained(folder, local_files_only=True,
                                                                      use_safetensors=True)
        except (OSError, ValueError) as exc:
            raise ValueError(f"{folder}: cannot load the SD x4 upscaler: {str(exc).splitlines()[0]}") from None
        pipeline.set_progress_bar_config(disable=True)
        model = context.model
        context.held["upscale"] = pipeline.to(model.device if model is not None else torch.device("cpu"),
                                              model.dtype if model is not None else torch.float32)
    return context.held["upscale"]


def _upscaler_folder(upscaler: Path | None) -> Path | None:
    """The x4 upscaler's diffusers folder: `upscaler` when named, else the Hugging Face cache's snapshot of
    X4_UPSCALER_REPOSITORY (the one its refs/main names) when it holds the pipeline; None when neither."""
    from mist.models.locate import hf_snapshot

    if upscaler is not None:
        return upscaler
    snapshot = hf_snapshot(X4_UPSCALER_REPOSITORY)
    return snapshot if snapshot is not None and (snapshot / "model_index.json").is_file() else None


def _upscaler_unavailable(upscaler: Path | None) -> str | None:
    from mist.models.locate import hf_repository_dir

    if _upscaler_folder(upscaler) is not None:
        return None
    return (f"the SD x4 upscaler is not on this machine: give --upscaler FOLDER (a diffusers folder of "
            f"{X4_UPSCALER_REPOSITORY}) or place its snapshot in {hf_repository_dir(X4_UPSCALER_REPOSITORY)} "
            "(Mist never downloads it)")


# The share of GrIDPure's input blended back into its purified result (Zhao et al.'s gamma, their default).
GRIDPURE_BLEND = 0.1


def gridpure(image: Image.Image, strength: float, context: Context) -> Image.Image:
    """GrIDPure-style grid purification (Zhao et al. 2024, "Can protective perturbation safeguard personal data from
    being exploited by stable diffusion?"), one round: each overlapping square tile of `grid_tile`'s side (half the
    shorter side) and a mosaic of the image's four corners is regenerated by `sdedit` at `strength` (tile i with the
    seed plus i), the results are averaged where they overlap (`grid_purified`), and GRIDPURE_BLEND of the image is
    blended back. The authors' published command runs 20 rounds of 10 of 1000 steps through a pixel-space ImageNet
    model; Mist runs one round through the user's SD checkpoint (latent space, DDIM), at DiffPure's strength by
    default."""
    import numpy as np
    from PIL import Image

    picture = image.convert("RGB")

    def purify_tile(tile: Image.Image, index: int) -> Image.Image:
        return sdedit(tile, strength, replace(context, seed=context.seed + index))

    blended = ((1 - GRIDPURE_BLEND) * grid_purified(picture, purify_tile)
               + GRIDPURE_BLEND * np.asarray(picture, dtype=np.float64))
    return Image.fromarray(np.clip(np.rint(blended), 0, 255).astype(np.uint8))


def grid_tile(size: tuple[int, int]) -> int:
    """GrIDPure's tile side for an image of `size` (width, height): half the shorter side floored to a multiple of 8
    (at least 8, at most the shorter side): 256 for a 512 x 512 image."""
    shorter = min(size)
    return min(shorter, max(8, shorter // 2 // 8 * 8))


def grid_offsets(length: int, tile: int) -> list[int]:
    """Where tiles of side `tile` start along a side of `length` pixels: every half tile, and one flush with the
    far end (0, 128, 256 for 512 and 256)."""
    offsets = list(range(0, length - tile + 1, max(1, tile // 2)))
    return offsets if offsets[-1] == length - tile else offsets + [length - tile]


def grid_purified(image: Image.Image, purify_tile: Callable[[Image.Image, int], Image.Image]) -> np.ndarray:
    """`image` (RGB) with each grid tile and the corner mosaic replaced by `purify_tile(tile, index)` (a picture of
    the tile's size), averaged where they overlap: an (H, W, 3) float array in 0..255. The tiles cover the image, so
    an identity `purify_tile` gives the image back exactly."""
    import numpy as np

    tile = grid_tile(image.size)
    boxes = [(left, top, left + tile, top + tile) for top in grid_offsets(image.height, tile)
             for left in grid_offsets(image.width, tile)]
    total = np.zeros((image.height, image.width, 3))
    count = np.zeros((image.height, image.width, 1))
    for index, (left, top, right, bottom) in enumerate(boxes):
        total[top:bottom, left:right] += np.asarray(purify_tile(image.crop((left, top, right, bottom)), index))
        count[top:bottom, left:right] += 1
    corner = tile // 2
    if corner:
        _add_corner_mosaic(image, corner, lambda mosaic: purify_tile(mosaic, len(boxes)), total, count)
    return total / count


def _add_corner_mosaic(image: Image.Image, corner: int, purify: Callable[[Image.Image], Image.Image],
                       total: np.ndarray, count: np.ndarray) -> None:
    """GrIDPure's extra tile: the image's four `corner`-pixel corners pasted into one square, purified, and each
    added back to its corner (`total`, `count`), where the grid's tiles overlap least."""
    import numpy as np
    from PIL import Image

    right, bottom = image.width - corner, image.height - corner
    places = [((0, 0), (0, 0)), ((right, 0), (corner, 0)), ((0, bottom), (0, corner)),
              ((right, bottom), (corner, corner))]
    mosaic = Image.new("RGB", (2 * corner, 2 * corner))
    for (left, top), spot in places:
        mosaic.paste(image.crop((left, top, left + corner, top + corner)), spot)
    cleaned = np.asarray(purify(mosaic), dtype=np.float64)
    for (left, top), (x, y) in places:
        total[top:top + corner, left:left + corner] += cleaned[y:y + corner, x:x + corner]
        count[top:top + corner, left:left + corner] += 1


KINDS: dict[str, Kind] = {
    "none": Kind(None, 0, 0, lambda image, value, context: image, "no purification"),
    "jpeg": Kind(75, 1, 100, jpeg, "JPEG q{value}"),
    "resize": Kind(0.5, 0.05, 1, rescale, "resize {value}x and back"),
    "jpeg-resize": Kind(75, 1, 100, jpeg_then_rescale, "JPEG q{value} + resize 0.5x"),
    "blur": Kind(1, 0.1, 20, gaussian_blur, "Gaussian blur {value} px"),
    "noise": Kind(8, 0.1, 128, gaussian_noise, "Gaussian noise {value}/255"),
    "crop": Kind(0.9, 0.1, 1, crop_and_resize, "crop {value} + resize"),
    "adverse": Kind(64, 0, 256, adverse_cleaner, "AdverseCleaner ({value} bilateral)"),
    "sdedit": Kind(0.2, 0.01, 1, sdedit, "SDEdit {value}"),
    "vae": Kind(1, 1, 10, vae_round_trip, "VAE round trip x{value}"),
    "impress": Kind(100, 1, 10000, impress, "IMPRESS ({value} steps)"),
    "upscale": Kind(0.05, 0, 0.25, noisy_upscale, "noise {value} + x4 upscaling", _upscaler_unavailable),
    "gridpure": Kind(0.1, 0.01, 1, gridpure, "GrIDPure {value}"),
}
