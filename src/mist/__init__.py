"""Mist: protect artworks from AI mimicry with Mist v1.2's adversarial perturbation against Stable Diffusion.

The Python API is `mist.protect` (see `mist.api`); importing this package loads no model and changes no settings.
"""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("mist-protect")
except PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0+unknown"

from .api import protect  # noqa: E402
from .config import ProtectConfig  # noqa: E402

__all__ = ["ProtectConfig", "__version__", "protect"]
