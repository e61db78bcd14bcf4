"""Shared fixtures: the tiny random Stable Diffusion stand-in and small real paintings."""

from __future__ import annotations

from pathlib import Path

import pytest
from PIL import Image

VANGOGH = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "vangogh"


@pytest.fixture(scope="session")
def tiny_model():
    """One tiny random model for the whole session: a Protector never changes the model it is given."""
    from mist.models.loading import build_random

    return build_random()


@pytest.fixture(scope="session")
def painting() -> Image.Image:
    """A real painting when ../shared is beside the checkout, else a deterministic colourful stand-in."""
    files = sorted(VANGOGH.glob("*.png")) if VANGOGH.is_dir() else []
    if files:
        return Image.open(files[0]).convert("RGB").resize((96, 96), Image.Resampling.BICUBIC)
    import numpy as np

    y, x = np.mgrid[0:96, 0:96]
    rgb = np.stack([x * 2.6, y * 2.6, (x + y) * 1.3], axis=-1) % 256
    return Image.fromarray(rgb.astype("uint8"))


@pytest.fixture(scope="session")
def painting_full() -> Image.Image:
    """The first real painting at its own size (512 px), for measures that need large natural images; skipped when
    ../shared is not beside the checkout."""
    files = sorted(VANGOGH.glob("*.png")) if VANGOGH.is_dir() else []
    if not files:
        pytest.skip(f"no paintings in {VANGOGH}")
    return Image.open(files[0]).convert("RGB")


@pytest.fixture(scope="session")
def noise_painting_file(tmp_path_factory) -> Path:
    """A 32 x 32 PNG of uniform noise (seed 0): the image the SD 3.x / Flux protection tests protect."""
    import numpy as np

    path = tmp_path_factory.mktemp("image") / "painting.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(path)
    return path
