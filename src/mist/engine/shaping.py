"""`--shape blur`: spectral shaping of a finished perturbation, after BlurGuard (Kim, Nam, Kim, Kim and Jeong,
"BlurGuard: A simple approach for robustifying image protection against AI-powered editing", NeurIPS 2025,
arXiv:2511.00143, github.com/jsu-kim/BlurGuard).

BlurGuard's observation: a protective perturbation is high-frequency noise that stands out in the image's spectrum,
so JPEG, blur and denoisers remove it; blurring it per region, each region just enough for the perturbed image's
power spectrum to stay close to the clean image's, makes it hard to tell from the image and harder to remove.

What this module does, per image, on delta = protected - clean:
1. For each sigma of SIGMAS (pixels), blur delta with a Gaussian of that sigma and scale it back up so its largest
   absolute value equals delta's (blurring alone would shrink it far below the budget), then clip to the budget.
2. Split the image into a grid of square cells of CELL pixels (the last row and column take the remainder).
   In each cell, compare the radially averaged power spectrum (log10, per integer frequency radius, DC left out) of
   the clean cell with that of the cell plus each candidate; the cell takes the smallest sigma whose largest
   difference over the radii is within TOLERANCE (log10 units), else the sigma with the smallest such difference.
   Textured cells, whose own spectrum hides noise, keep fine perturbations; flat cells get smooth ones.
3. The cells' choices are stitched, kept within the L-infinity budget and the mask, and added to the clean image.

How this differs from the paper (and its public code): BlurGuard segments the image with SAM and learns a log-sigma
per segment with Adam (against random noise, matching the whole image's radial log spectrum) and then runs its PGD
*through* the per-segment blur, so the attack optimises the blurred perturbation. Here the regions are a fixed grid
(no segmentation model), sigma is picked from a short ladder per cell by the spectral criterion above, and the blur is
applied once, after any method's attack, to its finished perturbation: cheap and method-agnostic, but the attack does
not adapt to the blur, so part of the objective's gain is traded away (benchmarks/robustness.py measures how much).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

# What `--shape` accepts.
SHAPES: tuple[str, ...] = ("blur",)

SIGMAS = (0.5, 1.0, 1.5, 2.0, 3.0)  # pixels: BlurGuard's sigmas start at 1 and move a few steps around it
CELL = 64  # pixels: side of the grid cells that stand in for BlurGuard's SAM segments
TOLERANCE = 0.3  # log10 power: the shaped cell's radial spectrum may differ from the clean one's by this factor (2x)


def shape_blur(clean: torch.Tensor, protected: torch.Tensor, radius: float,
               mask: torch.Tensor | None = None) -> torch.Tensor:
    """`protected` (N, 3, H, W) in [-1, 1] with its perturbation over `clean` shaped as described in the module's
    docstring; the result differs from `clean` by at most `radius` ([-1, 1] units) and only where `mask` (N or 1, 1,
    H, W; 1 = protect) is non-zero, and stays in [-1, 1]."""
    shaped, _ = shaped_perturbation(clean, protected - clean, radius)
    if mask is not None:
        shaped = shaped * (mask.to(shaped) > 0)
    return (clean + shaped).clamp(-1, 1)


def shaped_perturbation(clean: torch.Tensor, delta: torch.Tensor, radius: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The shaped perturbation (within [-radius, radius]) and the sigma each cell took, (N, rows, columns) pixels."""
    import torch

    from mist.engine.robust import gaussian_blur

    clean, delta = clean.float(), delta.float()
    peak = delta.abs().amax(dim=(1, 2, 3), keepdim=True)
    candidates = []
    for sigma in SIGMAS:
        blurred = gaussian_blur(delta, sigma)
        scale = peak / blurred.abs().amax(dim=(1, 2, 3), keepdim=True).clamp_min(1e-12)
        candidates.append((blurred * scale).clamp(-radius, radius))
    height, width = clean.shape[-2:]
    rows, columns = _cells(height), _cells(width)
    shaped = torch.empty_like(delta)
    chosen = torch.empty(clean.shape[0], len(rows), len(columns))
    for i, (top, bottom) in enumerate(rows):
        for j, (left, right) in enumerate(columns):
            window = (..., slice(top, bottom), slice(left, right))
            reference = _log_radial_power(clean[window])
            gaps = torch.stack([(_log_radial_power((clean + c).clamp(-1, 1)[window]) - reference).abs().amax(-1)
                                for c in candidates], 1)  # (N, sigmas)
            within = gaps <= TOLERANCE
            first = within.float().argmax(1)  # smallest sigma within the tolerance
            pick = torch.where(within.any(1), first, gaps.argmin(1))
            for n in range(clean.shape[0]):
                shaped[n][window] = candidates[int(pick[n])][n][window]
                chosen[n, i, j] = SIGMAS[int(pick[n])]
    return shaped, chosen


def _cells(length: int) -> list[tuple[int, int]]:
    """[start, end) spans of CELL pixels covering `length`; the last one takes the remainder (one span if short)."""
    count = max(1, length // CELL)
    return [(k * CELL, (k + 1) * CELL if k < count - 1 else length) for k in range(count)]


def _log_radial_power(x: torch.Tensor) -> torch.Tensor:
    """log10 of the power spectrum of x (N, C, h, w) summed over channels and averaged over each integer frequency
    radius from 1 to min(h, w) // 2: (N, radii)."""
    import torch

    h, w = x.shape[-2:]
    spectrum = torch.fft.fftshift(torch.fft.fft2(x - x.mean(dim=(-2, -1), keepdim=True)), dim=(-2, -1))
    power = (spectrum.abs() ** 2).sum(1).flatten(1)  # (N, h * w)
    fy = torch.arange(h, dtype=torch.float32) - h // 2
    fx = torch.arange(w, dtype=torch.float32) - w // 2
    radius = torch.sqrt(fy[:, None] ** 2 + fx[None, :] ** 2).round().long().flatten()
    bins = torch.arange(1, min(h, w) // 2 + 1)
    members = (radius[None, :] == bins[:, None]).float()  # (radii, h * w)
    mean = power @ members.T / members.sum(1)
    return torch.log10(mean + 1e-12)
