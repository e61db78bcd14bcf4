"""Purifications: what a mimic does to a protected image before using it, as the robustness studies test them
(Hönig et al. 2024, "Adversarial perturbations cannot reliably protect artists from generative AI"; IMPRESS, Cao et al.
2023; DiffPure, Nie et al. 2022; AdverseCleaner, lllyasviel 2023).

Each purification is named and parametrised as `kind:value` (`jpeg:75`, `resize:0.5`); `parse_purifications` reads a
comma list of them. Each works on an 8-bit RGB PIL image and returns one of the same size. A purification that needs
weights this machine does not have is kept in the list and reports why it is skipped (`Purification.problem`); Mist
never downloads anything for it.
"""

from __future__ import annotations

import io
import threading
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable

if TYPE_CHECKING:  # numpy, Pillow and OpenCV are imported where used: the command line reads KINDS for its help
    import numpy as np
    import torch
    from PIL import Image

    from mist.models import StableDiffusion

# The suite run when none is named: the studies' purifications that run here, strongest settings included. Noisy x4
# upscaling is not in it while it is not implemented (named, it is listed as skipped, with why).
DEFAULT_PURIFY = ("jpeg:95,jpeg:75,jpeg:50,resize:0.5,jpeg-resize:75,blur:1,noise:8,crop:0.9,adverse:64,sdedit:0.2,"
                  "vae,impress")
X4_UPSCALER_REPOSITORY = "stabilityai/stable-diffusion-x4-upscaler"


@dataclass(frozen=True)
class Context:
    """What some purifications need besides the image: the SD model (SDEdit) and the seed of their random draws."""

    model: StableDiffusion | None
    seed: int
    cancel: threading.Event | None = None  # once set, a purification through the model stops at its next step


@dataclass(frozen=True)
class Kind:
    """One kind of purification: its default value, the allowed range of the value, what it does, how to name it."""

    default: float | None
    low: float
    high: float
    apply: Callable[[Image.Image, float, Context], Image.Image] | None  # None: never runs here (see `unavailable`)
    label: str  # with {value} for the value
    unavailable: Callable[[], str | None] = lambda: None  # why it cannot run on this machine, or None


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

    def problem(self) -> str | None:
        """Why this purification is skipped on this machine (weights absent), or None when it runs."""
        return KINDS[self.kind].unavailable()

    def __call__(self, image: Image.Image, context: Context) -> Image.Image:
        apply = KINDS[self.kind].apply
        if apply is None:
            raise RuntimeError(f"{self.name}: {self.problem()}")
        return apply(image, self.value, context)


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

    def projected(x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            for _ in range(int(passes)):
                mean, _ = context.model.posterior(x.to(context.model.device))
                x = context.model.decode(mean * context.model.arch.latent_scale).clamp(-1.0, 1.0).cpu()
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
            consistency = (moved - model.decode(mean * model.arch.latent_scale)).pow(2).mean()
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


def _upscaler_unavailable() -> str | None:
    from mist.models.locate import hf_cache_dir

    folder = hf_cache_dir() / ("models--" + X4_UPSCALER_REPOSITORY.replace("/", "--"))
    if not folder.is_dir():
        return f"the SD x4 upscaler ({X4_UPSCALER_REPOSITORY}) is not at {folder} (Mist never downloads it)"
    return "noisy upscaling through the SD x4 upscaler is not implemented in this release"


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
    "upscale": Kind(None, 0, 0, None, "noisy x4 upscaling", _upscaler_unavailable),
}
