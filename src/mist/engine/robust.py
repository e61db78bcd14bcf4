"""Protection that survives purification: expectation over transformation (EOT) around any method's loss, and
BlurGuard-style spectral shaping of a finished perturbation.

`robust_loss` wraps a method's loss so that every PGD step scores random, differentiable versions of the perturbed
image, the kind of processing a mimic applies before training (Athalye et al., "Synthesizing robust adversarial
examples", ICML 2018). Hönig et al. ("Adversarial perturbations cannot reliably protect artists from generative AI",
2024) show that JPEG, resizing, blur and noise followed by upscaling strip the protection of Mist, Glaze and
Anti-DreamBooth; these, and the diffusion purifications (DiffPure, GrIDPure, IMPRESS) whose effect they roughly
imitate, motivate the transforms offered here. `shape_blur` is the cheap alternative: it reshapes the
finished perturbation's spectrum like the image's (after BlurGuard, Kim et al., NeurIPS 2025).

Ranges of the random parameters (images in [-1, 1], sizes in pixels). The purification papers each test a few fixed
settings; the ranges below are chosen here to cover them, with the source of each end named where there is one:
- jpeg: quality uniform in [50, 95]. BlurGuard's JPEG reversal script compresses at quality 75; Sandoval-Segura et
  al. ("JPEG compressed images can bypass protections against AI editing", 2023) and Hönig et al. use JPEG as the
  simplest purification; 50 is the harsh end measured in benchmarks/RESULTS.md, 95 about what a careful upload keeps.
  The codec is approximated differentiably (see `jpeg_approx`).
- resize: down by a factor uniform in [0.5, 0.9], then back up: 0.5 is the 2x round trip the measurement applies
  (Hönig et al.'s noisy upscaling and GrIDPure also change the scale and restore it); 0.9 a mild rescale.
- blur: Gaussian, sigma uniform in [0.5, 1.5] px: mild blurs that leave an image worth training on (our choice).
- crop: a window keeping a side fraction uniform in [0.85, 1] at a random place, resized back: the random crops of
  DreamBooth/LoRA fine-tuning scripts at a size close to the image's (our choice of range).
- noise: additive Gaussian, standard deviation uniform in [0.01, 0.1] in [0, 1] units ([0.02, 0.2] in [-1, 1]
  units): Hönig et al.'s noisy upscaling starts by adding Gaussian noise; BlurGuard's noise reversal defaults to 0.1.
- upscale: a differentiable STAND-IN for Hönig et al.'s noisy upscaling (Gaussian noise, then the SD x4 upscaler,
  which regenerates the image and removes the noise). The noise is real: standard deviation uniform in [0.05, 0.1]
  in [0, 1] units ([0.1, 0.2] in [-1, 1] units), the range of the `upscale` purification. The upscaler is not: a
  diffusion sampler per EOT draw would cost tens of UNet passes, through weights Mist may not have, so its
  regeneration is replaced by a 0.5x bicubic round trip (antialiased down, back up), which averages the noise away
  together with the finest texture, as the upscaler does. It teaches the attack to survive noise plus smoothing,
  not the upscaler's own network.
- vae: the VAE round trip itself, no stand-in: the image encoded by the model's VAE (the posterior mean, no
  sampling) and decoded, as the `vae` purification of `mist evaluate` does in one pass (after VAE-Trans; IMPRESS
  and the diffusion purifications also pass the image through the VAE). It has no random parameter. It needs the
  VAE decoder, which protection otherwise never loads (`parts_needed`), and costs an encoder and a decoder pass,
  forward and backward, per draw.

Randomness: each image of a batch has its own CPU generator (a stream separate from the attack's, so a run without
`robust` draws exactly the numbers it drew before), and every evaluation draws from it in a fixed order: for each of
the `samples` draws, for each image in batch order, first the transform (an integer below the number of transforms,
`torch.randint`), then that transform's parameters as documented in its function (`vae` draws none). Numbers are
drawn on the CPU and then moved, so every device gets the same ones.

PyTorch is imported inside the functions: the command line reads TRANSFORMS before it loads PyTorch.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Callable, Sequence

if TYPE_CHECKING:
    import torch

    from mist.engine.methods import Loss, LossTerms
    from mist.models import StableDiffusion

# What `--robust` accepts, and its set when given no list (without `vae`: it needs the decoder and costs the most).
TRANSFORMS: tuple[str, ...] = ("jpeg", "resize", "blur", "crop", "noise", "upscale", "vae")
DEFAULT_TRANSFORMS: tuple[str, ...] = ("jpeg", "resize", "blur")

JPEG_QUALITY = (50.0, 95.0)
RESIZE_FACTOR = (0.5, 0.9)
BLUR_SIGMA = (0.5, 1.5)  # pixels
CROP_SIDE = (0.85, 1.0)  # fraction of each side kept
NOISE_STD = (0.02, 0.2)  # [-1, 1] units
UPSCALE_NOISE_STD = (0.1, 0.2)  # [-1, 1] units: 0.05 to 0.1 in [0, 1] units
UPSCALE_SMOOTHING = 0.5  # the factor of the bicubic round trip that stands in for the upscaler's regeneration


def parts_needed(transforms: Sequence[str]) -> frozenset[str]:
    """The model parts these transforms run through besides a method's own: the VAE decoder for `vae`."""
    return frozenset({"decoder"}) if "vae" in transforms else frozenset()


def _uniform(generator: torch.Generator, low: float, high: float) -> float:
    import torch

    return low + (high - low) * torch.rand((), generator=generator).item()


def jpeg(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """JPEG at a quality drawn uniformly from JPEG_QUALITY (one uniform number)."""
    return jpeg_approx(x, _uniform(generator, *JPEG_QUALITY))


def resize(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Down by a factor drawn from RESIZE_FACTOR (one uniform number; antialiased bilinear), back up (bilinear)."""
    import torch.nn.functional as F

    factor = _uniform(generator, *RESIZE_FACTOR)
    height, width = x.shape[-2:]
    small = (max(1, round(height * factor)), max(1, round(width * factor)))
    down = F.interpolate(x, size=small, mode="bilinear", antialias=True, align_corners=False)
    return F.interpolate(down, size=(height, width), mode="bilinear", align_corners=False).clamp(-1, 1)


def blur(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Gaussian blur with sigma drawn from BLUR_SIGMA (one uniform number)."""
    return gaussian_blur(x, _uniform(generator, *BLUR_SIGMA))


def crop(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """A window keeping a side fraction drawn from CROP_SIDE (one uniform number, the same for both sides), at a place
    drawn uniformly (two more: top, then left), resized back bilinear."""
    import torch.nn.functional as F

    side = _uniform(generator, *CROP_SIDE)
    height, width = x.shape[-2:]
    h, w = max(1, round(height * side)), max(1, round(width * side))
    top = min(int(_uniform(generator, 0, height - h + 1)), height - h)
    left = min(int(_uniform(generator, 0, width - w + 1)), width - w)
    window = x[..., top : top + h, left : left + w]
    return F.interpolate(window, size=(height, width), mode="bilinear", align_corners=False).clamp(-1, 1)


def noise(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Additive Gaussian noise: its standard deviation drawn from NOISE_STD (one uniform number), then the noise
    itself (standard normal numbers of x's shape), clipped to the valid range."""
    return noise_with_std(x, _uniform(generator, *NOISE_STD), generator)


def noise_with_std(x: torch.Tensor, std: float, generator: torch.Generator) -> torch.Tensor:
    """x plus `std` times standard normal numbers of x's shape drawn from `generator`, clipped to [-1, 1]."""
    import torch

    field = torch.randn(tuple(x.shape), generator=generator).to(x)
    return (x + std * field).clamp(-1, 1)


def upscale(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Noisy upscaling's stand-in: Gaussian noise (its standard deviation drawn from UPSCALE_NOISE_STD, one uniform
    number, then standard normal numbers of x's shape), clipped, then down by UPSCALE_SMOOTHING (antialiased bicubic)
    and back up (bicubic), clipped."""
    import torch.nn.functional as F

    noisy = noise_with_std(x, _uniform(generator, *UPSCALE_NOISE_STD), generator)
    height, width = x.shape[-2:]
    small = (max(1, round(height * UPSCALE_SMOOTHING)), max(1, round(width * UPSCALE_SMOOTHING)))
    down = F.interpolate(noisy, size=small, mode="bicubic", antialias=True, align_corners=False)
    return F.interpolate(down, size=(height, width), mode="bicubic", align_corners=False).clamp(-1, 1)


def vae(x: torch.Tensor, model: StableDiffusion, precision: str) -> torch.Tensor:
    """The VAE round trip through `model` in `precision` (`mist.engine.objectives.vae_round_trip`), clipped, in x's
    dtype. Deterministic: it draws nothing."""
    from mist.engine.objectives import vae_round_trip

    return vae_round_trip(model, x, precision).clamp(-1, 1).to(x.dtype)


Transform = Callable[["torch.Tensor", "torch.Generator"], "torch.Tensor"]
_APPLY: dict[str, Transform] = {
    "jpeg": jpeg, "resize": resize, "blur": blur, "crop": crop, "noise": noise, "upscale": upscale}


def transform_functions(model: StableDiffusion | None, precision: str = "fp32") -> dict[str, Transform]:
    """Every transform by name as a function of (images, generator); `vae` runs through `model`'s VAE in `precision`
    and is left out without a model or where it was loaded without its decoder."""
    if model is None or model.decoder is None:
        return dict(_APPLY)
    return {**_APPLY, "vae": lambda x, generator: vae(x, model, precision)}


def robust_loss(loss: Loss, transforms: Sequence[str], samples: int, streams: Sequence[torch.Generator],
                model: StableDiffusion | None = None, precision: str = "fp32") -> Loss:
    """`loss` in expectation over random transforms: at each call, `samples` times, image i is replaced by one of
    `transforms` (names from TRANSFORMS) chosen and parametrised from `streams[i]` (a CPU generator), the batch is
    scored by `loss` with the caller's generators, and the objective and every term are averaged over the samples.
    `vae` runs through `model` in `precision` (the run's), and needs its decoder. Shapes stay (N, 3, H, W) in [-1, 1];
    every transform is differentiable (JPEG's rounding straight-through)."""
    apply = transform_functions(model, precision)
    unknown = [name for name in transforms if name not in TRANSFORMS]
    if unknown or not transforms:
        raise ValueError(f"robust: unknown transform {unknown[0]!r}" if unknown else "robust: no transforms")
    if "vae" in transforms and "vae" not in apply:
        raise ValueError("robust: vae needs the model's VAE decoder, which this model was loaded without")
    if samples < 1:
        raise ValueError(f"eot_samples: must be at least 1, got {samples}")
    chosen = tuple(transforms)

    def averaged(x: torch.Tensor, generators: Sequence[torch.Generator]) -> LossTerms:
        import torch

        from mist.engine.methods import LossTerms

        if len(streams) != x.shape[0]:
            raise ValueError(f"{len(streams)} transform streams for a batch of {x.shape[0]}")
        total: LossTerms | None = None
        for _ in range(samples):
            rows = []
            for row, stream in enumerate(streams):
                name = chosen[int(torch.randint(len(chosen), (), generator=stream))]
                rows.append(apply[name](x[row : row + 1], stream))
            terms = loss(torch.cat(rows), generators)
            total = terms if total is None else LossTerms(
                total.objective + terms.objective, {k: v + terms.terms[k] for k, v in total.terms.items()})
        return LossTerms(total.objective / samples, {k: v / samples for k, v in total.terms.items()})

    return averaged


# ---- differentiable JPEG ------------------------------------------------------------------------------------------

# The example quantisation tables of the JPEG standard (ITU-T T.81, Annex K), row by row, as libjpeg and Pillow use.
_LUMA_TABLE = (16, 11, 10, 16, 24, 40, 51, 61, 12, 12, 14, 19, 26, 58, 60, 55, 14, 13, 16, 24, 40, 57, 69, 56,
               14, 17, 22, 29, 51, 87, 80, 62, 18, 22, 37, 56, 68, 109, 103, 77, 24, 35, 55, 64, 81, 104, 113, 92,
               49, 64, 78, 87, 103, 121, 120, 101, 72, 92, 95, 98, 112, 100, 103, 99)
_CHROMA_TABLE = (17, 18, 24, 47, 99, 99, 99, 99, 18, 21, 26, 66, 99, 99, 99, 99, 24, 26, 56, 99, 99, 99, 99, 99,
                 47, 66, 99, 99, 99, 99, 99, 99) + (99,) * 32


def quantisation_table(base: tuple[int, ...], quality: float) -> torch.Tensor:
    """An 8 x 8 table at `quality` (1..100), scaled as libjpeg does (IJG), not rounded: quality may be fractional."""
    import torch

    quality = min(max(quality, 1.0), 100.0)
    scale = 5000 / quality if quality < 50 else 200 - 2 * quality
    table = torch.tensor(base, dtype=torch.float32).reshape(8, 8)
    return ((table * scale + 50) / 100).floor().clamp(min=1)


def _dct_matrix() -> torch.Tensor:
    """The orthonormal 8-point DCT-II matrix D (rows: frequencies): coefficients of a block B are D B D^T."""
    import torch

    k = torch.arange(8, dtype=torch.float64)
    matrix = torch.cos((2 * k[None, :] + 1) * k[:, None] * math.pi / 16) * math.sqrt(2 / 8)
    matrix[0] /= math.sqrt(2)
    return matrix.float()


def _round_straight_through(x: torch.Tensor) -> torch.Tensor:
    """Rounds in the forward pass, passes the gradient through unchanged (straight-through estimator, Bengio et al.)."""
    return x + (x.round() - x).detach()


def jpeg_approx(x: torch.Tensor, quality: float) -> torch.Tensor:
    """JPEG compression and decompression of x (N, 3, H, W) in [-1, 1] at `quality`, as a differentiable function:
    JFIF RGB -> YCbCr on 0..255 values, chroma averaged over 2 x 2 (4:2:0, Pillow's default), 8 x 8 block DCT,
    division by the IJG-scaled standard tables, rounding (straight-through), and the inverse path with bilinear
    chroma upsampling. Edges are padded by replication to whole blocks. Differs from libjpeg in the chroma filters
    and in working in floating point; Huffman coding is lossless and left out."""
    import torch
    import torch.nn.functional as F

    n, _, height, width = x.shape
    pad_h, pad_w = -height % 16, -width % 16
    rgb = F.pad((x.float() + 1) * 127.5, (0, pad_w, 0, pad_h), mode="replicate")
    r, g, b = rgb[:, 0], rgb[:, 1], rgb[:, 2]
    y = 0.299 * r + 0.587 * g + 0.114 * b
    cb = -0.168736 * r - 0.331264 * g + 0.5 * b + 128
    cr = 0.5 * r - 0.418688 * g - 0.081312 * b + 128
    chroma = F.avg_pool2d(torch.stack([cb, cr], 1), 2)
    dct = _dct_matrix().to(x.device)

    def compress(plane: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
        """Quantise and dequantise the 8 x 8 blocks of planes (M, h, w), h and w multiples of 8."""
        m, h, w = plane.shape
        blocks = (plane - 128).reshape(m, h // 8, 8, w // 8, 8).transpose(2, 3)
        coefficients = dct @ blocks @ dct.T
        table = table.to(x.device)
        restored = dct.T @ (_round_straight_through(coefficients / table) * table) @ dct
        return restored.transpose(2, 3).reshape(m, h, w) + 128

    y = compress(y, quantisation_table(_LUMA_TABLE, quality))
    chroma = compress(chroma.reshape(n * 2, *chroma.shape[-2:]), quantisation_table(_CHROMA_TABLE, quality))
    chroma = F.interpolate(chroma.reshape(n, 2, *chroma.shape[-2:]), scale_factor=2, mode="bilinear",
                           align_corners=False)
    cb, cr = chroma[:, 0] - 128, chroma[:, 1] - 128
    out = torch.stack([y + 1.402 * cr, y - 0.344136 * cb - 0.714136 * cr, y + 1.772 * cb], 1)
    return (out[..., :height, :width] / 127.5 - 1).clamp(-1, 1).to(x.dtype)


def gaussian_blur(x: torch.Tensor, sigma: float) -> torch.Tensor:
    """x (N, C, H, W) convolved per channel with a normalised Gaussian of `sigma` pixels (kernel out to 3 sigma,
    edges reflected)."""
    import torch
    import torch.nn.functional as F

    if sigma <= 0:
        return x
    half = max(1, math.ceil(3 * sigma))
    half = min(half, x.shape[-1] - 1, x.shape[-2] - 1)  # reflection padding needs fewer than the side
    offsets = torch.arange(-half, half + 1, dtype=torch.float32)
    kernel = torch.exp(-(offsets**2) / (2 * sigma**2))
    kernel = (kernel / kernel.sum()).to(x)
    channels = x.shape[1]
    padded = F.pad(x, (half, half, half, half), mode="reflect")
    rows = F.conv2d(padded, kernel.view(1, 1, 1, -1).expand(channels, 1, 1, -1), groups=channels)
    return F.conv2d(rows, kernel.view(1, 1, -1, 1).expand(channels, 1, -1, 1), groups=channels)
