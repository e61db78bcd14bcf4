"""Mist's version, as the installed package's metadata says; its own module so that every layer can name it without
importing the package's `__init__` (and through it the settings)."""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("mist-protect")
except PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0+unknown"
