"""No-reference quality of the mimicry outputs: how far an image's natural-scene statistics are from those of
undistorted photographs, without a reference image. Higher = worse for both: a protection that degrades what a mimic
gets raises them on the protected images' mimicries.

BRISQUE (Mittal, Moorthy & Bovik 2012) through the `brisque` package, whose trained SVM and feature scaling ship in
the package; NIQE (Mittal, Soundararajan & Bovik 2013) through scikit-video, whose model of natural-image statistics
(96-pixel patches) ships in the package, so NIQE needs images over 192 pixels a side. Nothing is downloaded. Both
packages predate NumPy 2: the small shims below are all they need.
"""

from __future__ import annotations

import importlib.util
import threading
import warnings
from contextlib import contextmanager
from functools import cache
from typing import TYPE_CHECKING, Iterator, Sequence

from mist.common import images

if TYPE_CHECKING:
    import numpy as np
    import torch

NIQE_MIN_SIDE = 194  # scikit-video's NIQE needs more than two of its 96-pixel patches a side
PACKAGES = {"BRISQUE": ("brisque", "brisque"), "NIQE": ("skvideo", "scikit-video")}  # metric: (module, package)
_SHIM_LOCK = threading.Lock()


def quality_problems() -> dict[str, str]:
    """Why BRISQUE or NIQE cannot run here (by name; empty: both can)."""
    return {metric: f"needs the {package} package: pip install 'mist-protect[quality]' (needs a C++ compiler)"
            for metric, (module, package) in PACKAGES.items() if importlib.util.find_spec(module) is None}


@cache
def _brisque_model():
    """The `brisque` package's evaluator with its shipped SVM; it returns its 36 features as 1-element arrays, which
    NumPy 2 no longer turns into floats, so they are flattened first."""
    import numpy as np
    from brisque import BRISQUE

    class FlatBrisque(BRISQUE):
        def calculate_brisque_features(self, image, kernel_size=7, sigma=7 / 6):
            features = super().calculate_brisque_features(image, kernel_size=kernel_size, sigma=sigma)
            return np.concatenate([np.ravel(f) for f in features]).astype(np.float64)

    return FlatBrisque(url=False)


def brisque(rgb: np.ndarray) -> float:
    """BRISQUE of an RGB image (H, W, 3) uint8: about 0 (pristine) to 100 (badly distorted)."""
    return float(_brisque_model().score(rgb))


@contextmanager
def _old_names() -> Iterator[None]:
    """scikit-video 1.1.11's NIQE calls `np.int` (gone since NumPy 1.24) and `scipy.misc.imresize` (gone since SciPy
    1.3): lend them for the call, then take them back."""
    import numpy as np

    with warnings.catch_warnings():  # SciPy 1.x warns that scipy.misc goes in 2.0
        warnings.simplefilter("ignore", DeprecationWarning)
        import scipy.misc

    def imresize(image: np.ndarray, scale: float, interp: str = "bicubic", mode: str = "F") -> np.ndarray:
        from PIL import Image

        picture = Image.fromarray(np.asarray(image, dtype=np.float32))
        size = (int(picture.width * scale), int(picture.height * scale))
        return np.asarray(picture.resize(size, Image.Resampling.BICUBIC), dtype=np.float32)

    with _SHIM_LOCK:
        np.int, scipy.misc.imresize = int, imresize  # type: ignore[attr-defined]
        try:
            yield
        finally:
            del np.int, scipy.misc.imresize


def niqe(rgb: np.ndarray) -> float | None:
    """NIQE of an RGB image (H, W, 3) uint8, on its luma: lower is more natural (about 3 to 5 for good photographs);
    None under NIQE_MIN_SIDE pixels a side."""
    import numpy as np
    from PIL import Image

    if min(rgb.shape[:2]) < NIQE_MIN_SIDE:
        return None
    luma = np.asarray(Image.fromarray(rgb).convert("L"), dtype=np.float32)
    with _old_names(), warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        from skvideo.measure import niqe as skvideo_niqe

        return float(skvideo_niqe(luma)[0])


def mean_quality(pictures: Sequence[torch.Tensor], problems: dict[str, str]) -> dict[str, float | None]:
    """Mean BRISQUE and NIQE ("brisque", "niqe") over `pictures` ((1, 3, H, W) in [-1, 1]); None for a metric that
    cannot run here (`problems`) or on pictures this small."""
    import numpy as np

    arrays = [np.asarray(images.tensor_to_image(picture)) for picture in pictures]
    means: dict[str, float | None] = {}
    for name, metric in (("BRISQUE", brisque), ("NIQE", niqe)):
        values = [] if name in problems else [metric(rgb) for rgb in arrays]
        means[name.lower()] = None if not values or None in values else float(np.mean(values))
    return means
