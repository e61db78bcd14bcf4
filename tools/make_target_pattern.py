"""Draw Mist's default target pattern (src/mist/assets/target_pattern.png): run once, the PNG is shipped.

The textural loss pulls an image's latent toward this pattern's, so it wants sharp, dense, high-contrast structure at
several scales: concentric rings over a checkerboard, with diagonal stripes flipping the colours in alternate cells.
"""

from pathlib import Path

import numpy as np
from PIL import Image

SIZE = 512


def pattern(size: int = SIZE) -> np.ndarray:
    y, x = np.mgrid[0:size, 0:size].astype(np.float64)
    checker = ((x // 64 + y // 64) % 2).astype(bool)
    cell_x, cell_y = x % 64 - 32, y % 64 - 32
    rings = (np.hypot(cell_x, cell_y) // 6 % 2).astype(bool)
    stripes = ((x + y) // 11 % 2).astype(bool)
    bright = rings ^ checker ^ (stripes & ((x // 128 + y // 128) % 2).astype(bool))
    image = np.where(bright[..., None], [250, 245, 235], [15, 20, 30]).astype(np.uint8)
    return image


if __name__ == "__main__":
    out = Path(__file__).resolve().parents[1] / "src" / "mist" / "assets" / "target_pattern.png"
    Image.fromarray(pattern()).save(out, optimize=True)
    print(out)
