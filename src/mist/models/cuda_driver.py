"""The NVIDIA driver on this machine, as `nvidia-smi` reports it, and the PyTorch wheel index built for that driver.

Standard library only, so that install.sh can ask it before anything is installed:

    python3 -I src/mist/models/cuda_driver.py     # prints "<driver CUDA version|none|unknown> <index URL|none>"

Where the mapping comes from: PyTorch publishes one wheel index per CUDA build, https://download.pytorch.org/whl/cuXYZ
(the commands on pytorch.org/get-started/locally and /previous-versions use them). `nvidia-smi` prints, in its banner,
the newest CUDA version the installed driver runs ("CUDA Version: 12.4"); a build for CUDA X needs a driver that
reports at least X (NVIDIA's CUDA compatibility guide). So the right index is the newest one at or below the driver's
version. Every index below carries a torch release new enough for Mist (2.5 or newer): cu118 up to torch 2.7, cu121
up to 2.5, cu124 up to 2.6, cu126 and cu128 the current releases.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

TORCH_INDEXES: dict[tuple[int, int], str] = {
    (11, 8): "https://download.pytorch.org/whl/cu118",
    (12, 1): "https://download.pytorch.org/whl/cu121",
    (12, 4): "https://download.pytorch.org/whl/cu124",
    (12, 6): "https://download.pytorch.org/whl/cu126",
    (12, 8): "https://download.pytorch.org/whl/cu128",
}
NVIDIA_PROC = Path("/proc/driver/nvidia")  # present whenever the NVIDIA kernel driver is loaded
SMI_TIMEOUT_S = 20.0  # nvidia-smi can take seconds on a busy multi-GPU host; a wedged driver must not hang Mist
_CUDA_VERSION = re.compile(r"CUDA Version\s*:\s*(\d+)\.(\d+)")


@dataclass(frozen=True)
class Driver:
    """What the machine says about its NVIDIA driver.

    present: an NVIDIA driver is installed (nvidia-smi answers, or the kernel module is loaded).
    cuda: the newest CUDA version it runs, as (major, minor); None when nvidia-smi did not say.
    detail: why `cuda` is unknown although a driver is present (nvidia-smi missing or failing), else "".
    """

    present: bool
    cuda: tuple[int, int] | None = None
    detail: str = ""


def parse_cuda_version(smi_output: str) -> tuple[int, int] | None:
    """The "CUDA Version: X.Y" of nvidia-smi's banner as (X, Y), or None if it is not there."""
    match = _CUDA_VERSION.search(smi_output)
    return (int(match.group(1)), int(match.group(2))) if match else None


def probe() -> Driver:
    """Run `nvidia-smi` (if on PATH) and look for the kernel driver; never raises."""
    loaded = NVIDIA_PROC.exists()
    command = shutil.which("nvidia-smi")
    if command is None:
        return Driver(loaded, None, "nvidia-smi is not installed" if loaded else "")
    try:
        done = subprocess.run([command], capture_output=True, text=True, timeout=SMI_TIMEOUT_S, check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return Driver(loaded, None, f"nvidia-smi failed ({exc})")
    if done.returncode != 0:
        first = (done.stdout + done.stderr).strip().splitlines()[:1]
        return Driver(loaded, None, f"nvidia-smi failed: {first[0] if first else f'exit code {done.returncode}'}")
    cuda = parse_cuda_version(done.stdout)
    return Driver(True, cuda, "" if cuda else "nvidia-smi did not report a CUDA version")


def torch_index(cuda: tuple[int, int]) -> str | None:
    """The newest PyTorch wheel index whose CUDA build this driver runs; None if the driver is older than all."""
    fitting = [version for version in TORCH_INDEXES if version <= cuda]
    return TORCH_INDEXES[max(fitting)] if fitting else None


def format_version(cuda: tuple[int, int]) -> str:
    return f"{cuda[0]}.{cuda[1]}"


def main() -> int:
    """Print "<driver CUDA version> <index URL>" for install.sh: "none none" without an NVIDIA driver, "unknown none"
    when a driver is present but its version could not be read, "<X.Y> none" when it is older than every build."""
    driver = probe()
    if not driver.present:
        print("none none")
    elif driver.cuda is None:
        print("unknown none")
    else:
        print(format_version(driver.cuda), torch_index(driver.cuda) or "none")
    return 0


if __name__ == "__main__":
    sys.exit(main())
