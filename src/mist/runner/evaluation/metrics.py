"""How visible a perturbation is, and how far apart two images are: PSNR and SSIM (torchmetrics), the perturbation's
L-infinity and L2 size, and LPIPS where its network weights are already on this machine (never downloaded).

Images are (N, 3, H, W) float tensors in [-1, 1], the engine's convention; results are per image.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

# torchvision's AlexNet weights, which torchmetrics' LPIPS loads through torch.hub (its own linear layers ship with it).
LPIPS_BACKBONE = "alexnet-owt-7be5be79.pth"


def _unit(x: torch.Tensor) -> torch.Tensor:
    return ((x.float() + 1.0) / 2.0).clamp(0.0, 1.0)


def psnr(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Peak signal-to-noise ratio in dB (peak: the full 0..1 range), per image; inf for identical images."""
    from torchmetrics.functional.image import peak_signal_noise_ratio

    return torch.stack([peak_signal_noise_ratio(_unit(a[i : i + 1]), _unit(b[i : i + 1]), data_range=1.0)
                        for i in range(a.shape[0])])


SSIM_WINDOW = 11  # Gaussian window of Wang et al.'s SSIM (sigma 1.5)


def ssim(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Structural similarity (Wang et al. 2004; Gaussian window 11, sigma 1.5) on the 0..1 scale, per image:
    1 for identical images. Averaged over the pixels whose whole window lies inside the image, as Wang et al.'s code,
    scikit-image and piq do: torchmetrics' own mean also counts a 5-pixel border computed on reflected padding, which
    reads higher (0.8668 against 0.8538 on one pair of mimicry outputs). An image no larger than the window has no
    such pixel: its value is the padded one."""
    from torchmetrics.functional.image import structural_similarity_index_measure

    border = SSIM_WINDOW // 2
    _, maps = structural_similarity_index_measure(_unit(a), _unit(b), data_range=1.0, reduction="none",
                                                  kernel_size=SSIM_WINDOW, sigma=1.5, return_full_image=True)
    if min(maps.shape[-2:]) > 2 * border:
        maps = maps[..., border:-border, border:-border]
    return maps.flatten(1).mean(1)


MS_SSIM_BETAS = (0.0448, 0.2856, 0.3001, 0.2363, 0.1333)  # Wang et al. 2003's weights of its 5 scales


def ms_ssim(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor | None:
    """Multi-scale SSIM (Wang, Simoncelli & Bovik 2003; torchmetrics, Gaussian window 11, sigma 1.5) per image, on as
    many of its 5 scales as the image allows (each halving needs the smaller side above 10 x 2^(scales - 1) pixels:
    161 px for all 5, 11 px for 1); None for an image smaller than that."""
    from torchmetrics.functional.image import multiscale_structural_similarity_index_measure

    side = min(a.shape[-2:])
    scales = max((n for n in range(1, 6) if side > (SSIM_WINDOW - 1) * 2 ** (n - 1)), default=0)
    if not scales:
        return None
    return multiscale_structural_similarity_index_measure(_unit(a), _unit(b), data_range=1.0, reduction="none",
                                                          kernel_size=SSIM_WINDOW, sigma=1.5,
                                                          betas=MS_SSIM_BETAS[:scales])


VIF_MIN_SIDE = 41  # torchmetrics' VIF filters four scales: a smaller image has no room for them


def vif(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor | None:
    """Visual information fidelity (Sheikh & Bovik 2006, pixel domain; torchmetrics) of `b` as a copy of `a`, per image:
    1 for identical images, lower as information is lost; None for an image under VIF_MIN_SIDE pixels a side."""
    from torchmetrics.functional.image import visual_information_fidelity

    if min(a.shape[-2:]) < VIF_MIN_SIDE:
        return None

    return torch.stack([visual_information_fidelity(_unit(b[i : i + 1]), _unit(a[i : i + 1]))
                        for i in range(a.shape[0])])


def linf_levels(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Largest change of any pixel channel, in 0..255 levels (the unit of `--epsilon`), per image."""
    return ((a.float() - b.float()).abs() * 127.5).flatten(1).amax(1)


def l2_levels(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Euclidean norm of the perturbation in 0..255 levels, per image (grows with the image's size)."""
    return ((a.float() - b.float()) * 127.5).flatten(1).norm(dim=1)


def rmse_levels(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Root mean squared difference in 0..255 levels, per image (independent of the image's size)."""
    return ((a.float() - b.float()) * 127.5).flatten(1).pow(2).mean(1).sqrt()


def mean_squared(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Mean squared difference per image (for latents)."""
    return (a.float() - b.float()).flatten(1).pow(2).mean(1)


def torch_hub_checkpoints() -> Path:
    """Where torch.hub keeps downloaded weights ($TORCH_HOME/hub/checkpoints), without importing torch.hub."""
    home = os.environ.get("TORCH_HOME") or Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "torch"
    return Path(home).expanduser() / "hub" / "checkpoints"


def lpips_problem() -> str | None:
    """Why LPIPS cannot run here without a download (None: it can)."""
    weights = torch_hub_checkpoints() / LPIPS_BACKBONE
    if not weights.is_file():
        return f"LPIPS needs the AlexNet weights, not found at {weights} (Mist never downloads them)"
    try:
        import torchvision  # noqa: F401
    except ImportError:
        return "LPIPS needs torchvision, which is not installed"
    return None


class Lpips:
    """LPIPS distance (Zhang et al. 2018, AlexNet), per image; build only when `lpips_problem()` is None."""

    def __init__(self) -> None:
        from torchmetrics.image.lpip import LearnedPerceptualImagePatchSimilarity

        self.metric = LearnedPerceptualImagePatchSimilarity(net_type="alex", normalize=True, reduction="mean")

    def __call__(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return torch.stack([self.metric(_unit(a[i : i + 1]), _unit(b[i : i + 1])) for i in range(a.shape[0])])


def invisibility(clean: torch.Tensor, protected: torch.Tensor, lpips: Lpips | None = None) -> dict[str, float]:
    """How visible the protection of one image (1, 3, H, W) is: PSNR (dB), SSIM, MS-SSIM and VIF (where the image is
    large enough for them), L-infinity and L2 (0..255 levels), and LPIPS when given."""
    multi, fidelity = ms_ssim(clean, protected), vif(clean, protected)
    scores = {"psnr_db": psnr(clean, protected)[0].item(), "ssim": ssim(clean, protected)[0].item(),
              **({"ms_ssim": multi[0].item()} if multi is not None else {}),
              **({"vif": fidelity[0].item()} if fidelity is not None else {}),
              "linf_levels": linf_levels(clean, protected)[0].item(),
              "l2_levels": l2_levels(clean, protected)[0].item()}
    if lpips is not None:
        scores["lpips"] = lpips(clean, protected)[0].item()
    return scores
