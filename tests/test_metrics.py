"""The evaluation's image metrics against independent implementations of their papers' definitions."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from mist.runner.evaluation.metrics import ssim


def wang_ssim(x: np.ndarray, y: np.ndarray) -> float:
    """SSIM as Wang et al. (2004) define it and their code, scikit-image and piq compute it: an 11 x 11 Gaussian
    window (sigma 1.5), K1 0.01, K2 0.03, averaged over the windows that lie wholly inside the image, then over the
    channels. x, y: (3, H, W) in 0..1."""
    g = np.exp(-((np.arange(11) - 5) ** 2) / (2 * 1.5**2))
    window = np.outer(g, g) / g.sum() ** 2
    windows = lambda image: np.lib.stride_tricks.sliding_window_view(image, (11, 11))  # noqa: E731
    mean = lambda image: (windows(image) * window).sum(axis=(-2, -1))  # noqa: E731
    values = []
    for a, b in zip(x, y, strict=True):
        ma, mb = mean(a), mean(b)
        va, vb, cov = mean(a * a) - ma**2, mean(b * b) - mb**2, mean(a * b) - ma * mb
        c1, c2 = 0.01**2, 0.03**2
        values.append(((2 * ma * mb + c1) * (2 * cov + c2) / ((ma**2 + mb**2 + c1) * (va + vb + c2))).mean())
    return float(np.mean(values))


@pytest.mark.parametrize("noise", [0.05, 0.3])
def test_ssim_is_wang_et_al_s_over_the_windows_inside_the_image(noise):
    """torchmetrics' mean also counts a border computed on reflected padding, which reads higher: Mist crops it."""
    generator = torch.Generator().manual_seed(0)
    a = torch.rand(2, 3, 40, 48, generator=generator) * 2 - 1
    b = (a + noise * torch.randn(2, 3, 40, 48, generator=generator)).clamp(-1, 1)
    ours = ssim(a, b)
    for i in range(2):
        expected = wang_ssim(((a[i] + 1) / 2).double().numpy(), ((b[i] + 1) / 2).double().numpy())
        assert ours[i].item() == pytest.approx(expected, abs=1e-5)
    assert ssim(a, a).tolist() == pytest.approx([1.0, 1.0])


def test_ssim_of_an_image_no_larger_than_its_window_is_the_padded_one():
    from torchmetrics.functional.image import structural_similarity_index_measure

    generator = torch.Generator().manual_seed(1)
    a, b = (torch.rand(1, 3, 8, 8, generator=generator) for _ in range(2))
    padded = structural_similarity_index_measure(a, b, data_range=1.0, reduction="none")
    assert ssim(a * 2 - 1, b * 2 - 1).item() == pytest.approx(padded.item(), abs=1e-6)


def test_ms_ssim_uses_the_scales_the_image_allows_and_vif_falls_with_noise():
    """MS-SSIM and VIF come from torchmetrics: identical images score 1, noisier copies score lower; MS-SSIM keeps as
    many of Wang et al.'s 5 scales as the image's smaller side allows (None below 11 pixels)."""
    from mist.runner.evaluation.metrics import ms_ssim, vif

    generator = torch.Generator().manual_seed(1)
    for side in (48, 200):
        a = torch.rand(1, 3, side, side, generator=generator) * 2 - 1
        light, heavy = ((a + noise * torch.randn(a.shape, generator=generator)).clamp(-1, 1) for noise in (0.05, 0.3))
        assert ms_ssim(a, a).item() == pytest.approx(1.0, abs=1e-5) and vif(a, a).item() == pytest.approx(1.0, abs=1e-3)
        assert 0 < ms_ssim(a, heavy).item() < ms_ssim(a, light).item() < 1
        assert 0 < vif(a, heavy).item() < vif(a, light).item() < 1
    assert ms_ssim(torch.zeros(1, 3, 10, 30), torch.zeros(1, 3, 10, 30)) is None
    assert vif(torch.zeros(1, 3, 40, 64), torch.zeros(1, 3, 40, 64)) is None  # too small for VIF's four scales
