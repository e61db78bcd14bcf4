"""Choosing the device the attack runs on."""

from __future__ import annotations

import torch

from .device_names import check_device_name


def pick_device(name: str | None = None) -> torch.device:
    """`name` as a torch device, or for None / "auto" the best present: CUDA, then Apple MPS, then the CPU.

    Raises ValueError("device: ...") for a name that is not a device, or a device this machine does not have (no CUDA,
    a CUDA index past the last GPU, no MPS), so the run stops before a model is loaded.
    """
    name = check_device_name(name)
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if _mps_available():
            return torch.device("mps")
        return torch.device("cpu")
    device = torch.device(name)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device: {name} was asked for, but PyTorch sees no CUDA GPU")
        count = torch.cuda.device_count()
        if device.index is not None and device.index >= count:
            raise ValueError(f"device: {name} was asked for, but PyTorch sees {count} CUDA GPU(s): "
                             f"{', '.join(f'cuda:{i}' for i in range(count))}")
    if device.type == "mps" and not _mps_available():
        raise ValueError(f"device: {name} (an Apple GPU) was asked for, but this machine has none that PyTorch can use")
    return device


def _mps_available() -> bool:
    return getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available()


def cpu_has_fast_bf16() -> bool:
    """Whether this CPU computes bfloat16 natively (x86 AVX512-BF16 or AMX), read from Linux's /proc/cpuinfo."""
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="replace") as handle:
            flags = next((line for line in handle if line.startswith("flags")), "")
    except OSError:
        return False
    return any(flag in flags.split() for flag in ("avx512_bf16", "amx_bf16"))


def resolve_precision(precision: str, device: torch.device) -> str:
    """The precision `auto` stands for on `device`, and a check of an explicit one.

    auto: bf16 on CUDA GPUs that support it (else fp16) and on CPUs with native bf16; fp32 elsewhere (older CPUs,
    Apple MPS). The reasons and the measurements behind them are in benchmarks/RESULTS.md.
    """
    if precision == "auto":
        if device.type == "cuda":
            return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
        if device.type == "cpu" and cpu_has_fast_bf16():
            return "bf16"
        return "fp32"
    if precision == "fp16" and device.type != "cuda":
        raise ValueError(f"precision: fp16 needs a CUDA GPU (this run is on {device.type}); use bf16 or fp32")
    return precision
