"""Mist: protect artworks from AI mimicry with Mist v1.2's adversarial perturbation against Stable Diffusion.

The Python API is `mist.protect` and `mist.evaluate` (see `mist.faces.api`); importing this package loads no model,
changes no settings and imports neither PyTorch nor diffusers: `mist.protect` brings them in on first use, so the
command line can check its options (and print its help) at once.
"""

from __future__ import annotations

from typing import Any

from mist.engine.config import ProtectConfig
from mist.version import __version__

__all__ = ["ProtectConfig", "__version__", "evaluate", "protect"]


def __getattr__(name: str) -> Any:
    """`mist.protect` and `mist.evaluate`, imported on first use (module-level __getattr__, PEP 562)."""
    if name in ("protect", "evaluate"):
        from mist.faces import api

        return getattr(api, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
