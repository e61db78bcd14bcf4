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


def cpu_has_fast_bf16() -> bool:
    """Whether this CPU computes bfloat16 natively (x86 AVX512-BF16 or AMX), read from Linux's /proc/cpuinfo."""
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="replace") as handle:
            flags = next((line for line in handle if line.startswith("flags")), "")
    except OSError:
        return False
    return any(flag in flags.split() for flag in ("avx512_bf16", "amx_bf16"))


# bf16 arithmetic units arrived with compute capability 8.0 (Ampere: A100, RTX 30xx). Older GPUs (T4, V100,
# RTX 20xx) report bf16 as supported because PyTorch emulates it, slowly; they run fp16 instead.
BF16_MIN_CAPABILITY = (8, 0)


def resolve_precision(precision: str, device: torch.device) -> str:
    """The precision `auto` stands for on `device`, and a check of an explicit one.

    auto: bf16 on CUDA GPUs of compute capability 8.0 or more, fp16 on older ones; bf16 on CPUs with native bf16;
    fp32 elsewhere (older CPUs, Apple MPS). The reasons and the measurements behind them are in benchmarks/RESULTS.md.
    """
    if precision == "auto":
        if device.type == "cuda":
            return "bf16" if torch.cuda.get_device_capability(device) >= BF16_MIN_CAPABILITY else "fp16"
        if device.type == "cpu" and cpu_has_fast_bf16():
            return "bf16"
        return "fp32"
    if precision == "fp16" and device.type != "cuda":
        raise ValueError(f"precision: fp16 needs a CUDA GPU (this run is on {device.type}); use bf16 or fp32")
    return precision
