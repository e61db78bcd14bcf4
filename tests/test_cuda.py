"""What only a CUDA GPU can show: the engine on the GPU in each precision, against the CPU's float32 run.

Skipped where PyTorch sees no CUDA GPU (this project's CI machines); `benchmarks/gpu-check.sh` runs them on a GPU
machine. The tiny random model keeps them to seconds.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from mist.models import device as devices
from mist.engine.config import ProtectConfig
from mist.runner.jobs import ModelCache
from mist.engine.methods import list_methods
from mist.engine.pipeline import Protector

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def _painting(size: int = 64) -> Image.Image:
    rng = np.random.default_rng(0)
    return Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8))


def _pixels(result) -> np.ndarray:
    return np.asarray(result.image, dtype=int)


def test_auto_precision_and_memory_policy_read_this_gpu():
    cuda = torch.device("cuda")
    native_bf16 = torch.cuda.get_device_capability(cuda) >= devices.BF16_MIN_CAPABILITY
    assert devices.resolve_precision("auto", cuda) == ("bf16" if native_bf16 else "fp16")
    big = torch.cuda.get_device_properties(cuda).total_memory >= 12 * 1024**3
    assert devices.default_low_memory(cuda) == (not big)


def test_the_gpu_in_float32_takes_the_cpus_steps(tiny_model):
    """Random numbers are drawn on the CPU for every device, so a float32 run on the GPU steps like the CPU's: only
    the rare pixel whose gradient sign differs by rounding moves otherwise."""
    config = ProtectConfig(steps=3, input_size=64, precision="fp32")
    cpu = _pixels(Protector(tiny_model, config, torch.device("cpu")).protect(_painting()))
    gpu = _pixels(Protector(tiny_model, config, torch.device("cuda")).protect(_painting()))
    assert np.mean(cpu != gpu) < 0.02


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_half_precision_on_the_gpu_keeps_the_budget_and_the_direction(tiny_model, precision):
    if precision == "bf16" and torch.cuda.get_device_capability() < devices.BF16_MIN_CAPABILITY:
        pytest.skip("no native bf16 on this GPU")
    painting = _painting()
    reference = Protector(tiny_model, ProtectConfig(steps=3, input_size=64, precision="fp32")).protect(painting)
    half = Protector(tiny_model, ProtectConfig(steps=3, input_size=64, precision=precision),
                     torch.device("cuda")).protect(painting)
    original = np.asarray(painting, dtype=int)
    assert np.abs(_pixels(half) - original).max() <= 16
    for name, value in reference.end.items():
        assert half.end[name] == pytest.approx(value, rel=0.05), name


@pytest.mark.parametrize("method", [m.name for m in list_methods()])
def test_every_method_runs_on_the_gpu_in_fp16_without_underflow(tiny_model, method, caplog):
    """fp16 is what GPUs older than Ampere get: every method's gradient must survive it (no all-zero signs)."""
    result = Protector(tiny_model, ProtectConfig(method=method, steps=2, input_size=64, precision="fp16"),
                       torch.device("cuda")).protect(_painting())
    assert all(np.isfinite(value) for value in result.end.values())
    assert "exactly zero" not in caplog.text


def test_the_model_cache_places_the_model_once_on_the_gpu():
    models = ModelCache("tiny-random", "cuda")
    first = models.protector(ProtectConfig(input_size=64, precision="bf16"))
    second = models.protector(ProtectConfig(input_size=64, precision="bf16"))
    assert first.model.device.type == "cuda" and models.loads == 1
    assert first.model.encoder is second.model.encoder  # the same weights serve the second job


def test_the_command_line_protects_on_the_gpu(tmp_path):
    from mist.faces.cli import main

    source = tmp_path / "a.png"
    _painting(48).save(source)
    code = main(["protect", str(source), "-o", str(tmp_path / "out"), "--model", "tiny-random", "--device", "cuda",
                 "--steps", "2", "--input-size", "32", "--quiet"])
    assert code == 0 and (tmp_path / "out" / "a.png").is_file()
