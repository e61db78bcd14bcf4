"""Choosing the device the attack runs on."""

from __future__ import annotations

import torch


def pick_device(name: str | None = None) -> torch.device:
    """`name` as a torch device, or for None / "auto" the best present: CUDA, then Apple MPS, then the CPU."""
    if name not in (None, "", "auto"):
        device = torch.device(name)
        if device.type == "cuda" and not torch.cuda.is_available():
            raise ValueError(f"device: {name} was asked for, but PyTorch sees no CUDA GPU")
        return device
    if torch.cuda.is_available():
        return torch.device("cuda")
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")
