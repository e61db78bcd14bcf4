"""Whether the UNet ran with autograd recording: a spy on the model's noise prediction."""

from __future__ import annotations

import torch


def unet_grad_modes(model, monkeypatch) -> list[bool]:
    """A list that gets `torch.is_grad_enabled()` appended at each of `model`'s noise predictions from now on."""
    seen: list[bool] = []
    original = model.denoise
    monkeypatch.setattr(model, "denoise",
                        lambda *a, **k: seen.append(torch.is_grad_enabled()) or original(*a, **k))
    return seen
