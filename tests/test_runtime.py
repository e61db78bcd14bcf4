"""Options that change speed and memory but not the algorithm: precision, checkpointing, batching, devices."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from mist import device as devices
from mist.config import ProtectConfig
from mist.pipeline import Protector


def _pictures(count=3):
    return [Image.fromarray(np.random.default_rng(i).integers(0, 256, (70, 50, 3), dtype=np.uint8))
            for i in range(count)]


def test_checkpointing_changes_nothing_but_memory(tiny_model):
    config = ProtectConfig(steps=3, input_size=64, precision="fp32")
    plain = Protector(tiny_model, config, low_memory=False).protect(_pictures(1)[0]).image.tobytes()
    checkpointed = Protector(tiny_model, config, low_memory=True)
    model = checkpointed.model
    assert model.unet.is_gradient_checkpointing and model.encoder.encoder.gradient_checkpointing
    saved = checkpointed.protect(_pictures(1)[0]).image.tobytes()
    assert plain == saved


def test_batched_tiles_and_images_draw_the_same_random_numbers(tiny_model):
    """With no steps the result is the image plus its random start: batching must not change a single byte."""
    config = ProtectConfig(steps=0, input_size=64, block_num=2, precision="fp32")
    alone = [Protector(tiny_model, config).protect(p).image.tobytes() for p in _pictures()]
    together = Protector(tiny_model, config, batch_size=8).protect_many(_pictures())
    assert [r.image.tobytes() for r in together] == alone


@pytest.mark.parametrize("mode", ["textural", "semantic", "fused"])
def test_batched_results_stay_close_to_one_at_a_time(tiny_model, mode):
    """Batched kernels may round differently in the last bits, which can flip a rare sign step; nothing more."""
    config = ProtectConfig(steps=3, input_size=64, block_num=2, precision="fp32", mode=mode)
    alone = [np.asarray(Protector(tiny_model, config).protect(p).image, dtype=int) for p in _pictures()]
    together = Protector(tiny_model, config, batch_size=8).protect_many(_pictures())
    differing = np.mean([np.mean(a != np.asarray(r.image, dtype=int)) for a, r in zip(alone, together, strict=True)])
    assert differing < 0.01


def test_bf16_weights_and_autocast_keep_the_budget(tiny_model):
    picture = _pictures(1)[0]
    protector = Protector(tiny_model, ProtectConfig(steps=3, input_size=64, precision="bf16", epsilon=8))
    assert protector.model.dtype == torch.bfloat16
    out = np.asarray(protector.protect(picture).image, dtype=int)
    original = np.asarray(picture.resize((64, 64), Image.Resampling.BICUBIC), dtype=int)
    assert np.abs(out - original).max() <= 8


def test_auto_precision_follows_the_device(monkeypatch):
    cpu = torch.device("cpu")
    monkeypatch.setattr(devices, "cpu_has_fast_bf16", lambda: True)
    assert devices.resolve_precision("auto", cpu) == "bf16"
    monkeypatch.setattr(devices, "cpu_has_fast_bf16", lambda: False)
    assert devices.resolve_precision("auto", cpu) == "fp32"
    assert devices.resolve_precision("auto", torch.device("mps")) == "fp32"
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)
    assert devices.resolve_precision("auto", torch.device("cuda")) == "fp16"
    assert devices.resolve_precision("fp32", cpu) == "fp32"


def test_fp16_needs_a_gpu():
    with pytest.raises(ValueError, match="precision: fp16 needs a CUDA GPU"):
        devices.resolve_precision("fp16", torch.device("cpu"))


def test_checkpointing_is_on_by_default_only_where_memory_is_short(monkeypatch):
    from mist import pipeline as protect

    cpu = torch.device("cpu")
    monkeypatch.setattr(protect, "available_ram_bytes", lambda: 6 * 1024**3)
    assert protect.default_low_memory(cpu)
    monkeypatch.setattr(protect, "available_ram_bytes", lambda: 20 * 1024**3)
    assert not protect.default_low_memory(cpu)
    assert protect.default_low_memory(torch.device("mps"))

    class Card:
        def __init__(self, gib):
            self.total_memory = gib * 1024**3

    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device: Card(8))
    assert protect.default_low_memory(torch.device("cuda"))
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device: Card(24))
    assert not protect.default_low_memory(torch.device("cuda"))


def test_fast_mode_is_recorded_as_a_different_method(tiny_model, tmp_path):
    from mist.batch import FAST_ALGORITHM, output_metadata

    protector = Protector(tiny_model, ProtectConfig(input_size=64, fast=True))
    text = output_metadata("{}", "tiny-random", protector, tmp_path / "a.png", "0" * 64)
    assert text["mist:algorithm"] == FAST_ALGORITHM and "not Mist's exact method" in FAST_ALGORITHM


def test_weights_rounded_by_an_earlier_run_are_not_passed_off_as_fp32(tiny_model):
    Protector(tiny_model, ProtectConfig(input_size=64, precision="bf16"))
    with pytest.raises(ValueError, match="load it again"):
        Protector(tiny_model, ProtectConfig(input_size=64, precision="fp32"))
