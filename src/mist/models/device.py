"""The device a run uses, its arithmetic (precision) and its memory policy (gradient checkpointing)."""

from __future__ import annotations

import os
import re

import torch

from mist.models import cuda_driver
from mist.common.device_names import check_device_name


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
    """Whether this CPU computes bfloat16 natively (x86 AVX512-BF16 or AMX, read from Linux's /proc/cpuinfo) and this
    process may use it: `ATEN_CPU_CAPABILITY` and oneDNN's `ONEDNN_MAX_CPU_ISA` (or `DNNL_MAX_CPU_ISA`) can hold
    PyTorch to older instruction sets, e.g. to measure an AVX2-only CPU's kernels on a newer one."""
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="replace") as handle:
            flags = next((line for line in handle if line.startswith("flags")), "")
    except OSError:
        return False
    return any(flag in flags.split() for flag in ("avx512_bf16", "amx_bf16")) and not bf16_capped()


# oneDNN's names for the instruction sets that hold bf16 arithmetic (with DEFAULT: no cap), as ONEDNN_MAX_CPU_ISA
# takes them; any other value caps oneDNN below them.
_BF16_ONEDNN_ISAS = frozenset({"DEFAULT", "ALL", "AVX512_CORE_BF16", "AVX512_CORE_FP16", "AVX512_CORE_AMX",
                               "AVX512_CORE_AMX_FP16", "AVX10_1_512", "AVX10_1_512_AMX", "AVX10_1_512_AMX_FP16",
                               "AVX10_2_512", "AVX10_2_512_AMX_2"})


def bf16_capped() -> bool:
    """Whether this process is held below the instruction sets with bf16 arithmetic: PyTorch's own kernels below
    AVX-512, or oneDNN's (convolutions, matrix products) below AVX512-BF16."""
    if torch.backends.cpu.get_cpu_capability() != "AVX512":
        return True
    cap = os.environ.get("ONEDNN_MAX_CPU_ISA") or os.environ.get("DNNL_MAX_CPU_ISA")
    return cap is not None and cap.strip().upper() not in _BF16_ONEDNN_ISAS


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


def cuda_problem() -> str | None:
    """Why PyTorch cannot use this machine's NVIDIA GPU, in one sentence; None when CUDA works or there is no NVIDIA
    driver. Runs `nvidia-smi` (a fraction of a second) only when CUDA is unavailable."""
    if torch.cuda.is_available():
        return None
    driver = cuda_driver.probe()
    if not driver.present:
        return None
    try:
        torch.cuda.init()  # raises with PyTorch's own reason (no driver found, too old, initialisation failed)
        reason = ""
    except Exception as exc:  # noqa: BLE001 - any failure here is the answer we are looking for
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return explain_cuda_problem(torch.__version__, torch.version.cuda, driver, reason,
                                os.environ.get("CUDA_VISIBLE_DEVICES"))


def explain_cuda_problem(torch_version: str, torch_cuda: str | None, driver: cuda_driver.Driver, reason: str,
                         visible_devices: str | None) -> str:
    """The sentence `cuda_problem` returns, from what it found (separate so that every case can be tested).

    torch_cuda: the CUDA version PyTorch was built for (`torch.version.cuda`), None for a CPU-only build.
    reason: PyTorch's own error from initialising CUDA, or "".
    """
    driver_cuda = cuda_driver.format_version(driver.cuda) if driver.cuda else None
    index = cuda_driver.torch_index(driver.cuda) if driver.cuda else None
    if index:
        fix = (f"reinstall PyTorch for this driver (rerun install.sh, or pip install --force-reinstall torch "
               f"--index-url {index})")
    elif driver.cuda:
        oldest = cuda_driver.format_version(min(cuda_driver.TORCH_INDEXES))
        fix = f"this driver is older than every PyTorch build Mist runs on (CUDA {oldest}): ask for a newer driver"
    else:
        fix = "rerun install.sh, which picks the PyTorch build for this driver"
    intro = "an NVIDIA GPU is present but PyTorch cannot use it"
    if visible_devices is not None and visible_devices.strip() in ("", "-1", "none", "NoDevFiles"):
        return f"{intro}: CUDA_VISIBLE_DEVICES={visible_devices!r} hides every GPU"
    if torch_cuda is None:
        return f"{intro}: PyTorch {torch_version} is a CPU-only build; {fix}"
    if driver_cuda is not None and _version_tuple(torch_cuda) > driver.cuda:
        return (f"{intro}: PyTorch {torch_version} is built for CUDA {torch_cuda}, but the NVIDIA driver supports "
                f"CUDA {driver_cuda} at most; {fix}")
    known = f"driver supports CUDA {driver_cuda}" if driver_cuda else driver.detail or "driver version unknown"
    return f"{intro} ({reason or 'torch.cuda.is_available() is False'}; PyTorch built for CUDA {torch_cuda}, {known})"


def _version_tuple(version: str) -> tuple[int, ...]:
    return tuple(int(part) for part in re.findall(r"\d+", version)[:2])


def default_low_memory(device: torch.device) -> bool:
    """Gradient checkpointing costs about 40% more time per step and saves a quarter to a third of the peak memory
    (benchmarks/RESULTS.md), so it is on only where memory is short: a GPU with less than 12 GiB, a CPU machine with
    less than 8 GiB available, and Apple MPS (memory shared with the whole system)."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).total_memory < 12 * 1024**3
    if device.type == "cpu":
        available = available_ram_bytes()
        return available is not None and available < 8 * 1024**3
    return True


def available_ram_bytes() -> int | None:
    """MemAvailable from Linux's /proc/meminfo; None where that cannot be read."""
    try:
        with open("/proc/meminfo", encoding="ascii") as handle:
            for line in handle:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError):
        pass
    return None
