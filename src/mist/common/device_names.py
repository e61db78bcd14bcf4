"""The device names a user may type (`--device`), checked without importing PyTorch, so that a typo is refused at once
with the other options; whether the named device is present is `mist.models.device.pick_device`'s check."""

from __future__ import annotations

import re

DEVICE_NAMES = "auto, cpu, cuda, cuda:N (N = 0, 1, ...) or mps"
_DEVICE_NAME = re.compile(r"auto|cpu|mps|cuda(:\d+)?")


def check_device_name(name: str | None) -> str:
    """`name` in canonical form ("auto" for None or an empty name); ValueError("device: ...") when it names no device
    Mist can run on."""
    canonical = (name or "").strip().lower() or "auto"
    if not _DEVICE_NAME.fullmatch(canonical):
        raise ValueError(f"device: {name!r} is not a device Mist can use; use {DEVICE_NAMES}")
    return canonical
