"""Process settings that make an attack run faster on a CPU, held only while it runs.

An attack step allocates and frees the same large activations over and over (the VAE encoder's at 512 x 512 are 32
to 128 MB each in float32). glibc's malloc serves every block over 32 MB with a fresh `mmap` and hands it back to the
kernel on `free`, so each step faults in and zeroes several GB of new pages: on a 2-core EPYC that was 2.5 to 3
million page faults and 6 to 9 s of kernel time in a 30 to 37 s float32 step (benchmarks/RESULTS.md). While an attack
runs, `keep_freed_memory` has malloc serve large blocks from its heap and keep what is freed there, so later steps
reuse pages already mapped. The cost is a heap that holds on to its high-water mark until the attack ends, when the
previous behaviour is restored and the free memory returned to the kernel (`malloc_trim`), and that mark is higher
than the live data: glibc cannot reuse a freed block for a 64-byte-aligned request of the same size (PyTorch's), so
the heap grows around such holes for the first few steps before it settles (a fused 512 x 512 float32 attack: 1.5 GB
more peak, then flat; tests/test_cpu_tuning.py shows a settled pattern). Runs that asked for low memory skip it.

PyTorch runs one thread per physical core of the machine, whatever share of it the process may use. In a container
with a CPU quota, or under `taskset`, that is more threads than cores to run them, and every parallel region then waits
for threads the scheduler has parked. `attack_threads` lowers the count to the physical cores the process may use
(its affinity mask, capped by a cgroup CPU quota) while an attack runs; a count set by the user (OMP_NUM_THREADS,
MKL_NUM_THREADS or torch.set_num_threads below the default) is left as it is.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import math
import os
import threading
from contextlib import contextmanager, nullcontext
from functools import lru_cache
from pathlib import Path
from typing import Iterator

import torch

# mallopt(3) parameters (glibc's malloc.h)
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
_M_MMAP_MAX = -4
# What is restored after an attack: glibc's default number of mmapped blocks, and the mmap and trim thresholds that
# its own dynamic adjustment settles on once large blocks have been freed (setting any of them turns that off).
_RESTORED = ((_M_MMAP_MAX, 65536), (_M_MMAP_THRESHOLD, 32 * 1024 * 1024), (_M_TRIM_THRESHOLD, 64 * 1024 * 1024))
_KEPT = ((_M_MMAP_MAX, 0), (_M_TRIM_THRESHOLD, -1))  # -1: never trim (the value is read as an unsigned size)

_lock = threading.Lock()
_holders = 0


@lru_cache(maxsize=1)
def _glibc() -> ctypes.CDLL | None:
    """The C library when it is glibc (the only one whose malloc takes these settings), else None."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.gnu_get_libc_version  # noqa: B018 - only glibc has it
        libc.mallopt  # noqa: B018
        libc.malloc_trim  # noqa: B018
    except (OSError, AttributeError):
        return None
    return libc


def _apply(libc: ctypes.CDLL, settings: tuple[tuple[int, int], ...]) -> None:
    for parameter, value in settings:
        libc.mallopt(parameter, value)


@contextmanager
def keep_freed_memory() -> Iterator[None]:
    """While inside, large blocks come from malloc's heap and freed memory stays there for reuse (glibc only; a no-op
    elsewhere). Nested and concurrent uses share one setting, undone when the last one leaves."""
    global _holders
    libc = _glibc()
    if libc is None:
        yield
        return
    with _lock:
        if _holders == 0:
            _apply(libc, _KEPT)
        _holders += 1
    try:
        yield
    finally:
        with _lock:
            _holders -= 1
            if _holders == 0:
                _apply(libc, _RESTORED)
                libc.malloc_trim(0)


@contextmanager
def flush_denormals() -> Iterator[None]:
    """Treat denormal floats as zero while inside. Gradients only matter through their signs, and denormal arithmetic
    can slow a CPU step a hundredfold (seen with random-weight models in fused mode)."""
    torch.set_flush_denormal(True)
    try:
        yield
    finally:
        torch.set_flush_denormal(False)  # PyTorch's default; it offers no way to read the previous setting


def _read(path: Path) -> str | None:
    try:
        return path.read_text().strip()
    except OSError:
        return None


def _cgroup_cpus(root: Path) -> float | None:
    """The CPUs' worth of time a cgroup quota allows (cgroup v2 `cpu.max`, else v1 `cpu.cfs_quota_us`), None if none."""
    v2 = _read(root / "sys/fs/cgroup/cpu.max")
    if v2:
        quota, _, period = v2.partition(" ")
        return None if quota == "max" else int(quota) / int(period or 100000)
    for folder in ("cpu", "cpu,cpuacct"):
        quota, period = (_read(root / f"sys/fs/cgroup/{folder}/cpu.cfs_{name}_us") for name in ("quota", "period"))
        if quota and period and int(quota) > 0:
            return int(quota) / int(period)
    return None


def usable_cores(cpus: set[int] | None = None, root: Path = Path("/")) -> int | None:
    """Physical cores this process may run on: the distinct (package, core) pairs of the CPUs it may use (`cpus`,
    default its affinity mask), capped by a cgroup CPU quota rounded up. None when the topology cannot be read."""
    if cpus is None:
        try:
            cpus = os.sched_getaffinity(0)
        except (AttributeError, OSError):
            return None
    cores = set()
    for cpu in cpus:
        topology = root / f"sys/devices/system/cpu/cpu{cpu}/topology"
        core, package = _read(topology / "core_id"), _read(topology / "physical_package_id")
        if core is None or package is None:
            return None
        cores.add((package, core))
    quota = _cgroup_cpus(root)
    return max(1, min(len(cores), math.ceil(quota))) if quota else len(cores) or None


@contextmanager
def attack_threads() -> Iterator[None]:
    """While inside, PyTorch's thread count in this thread is at most `usable_cores()` (see the module's docstring)."""
    threads = torch.get_num_threads()
    user_set = any(os.environ.get(name) for name in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"))
    cores = None if user_set else usable_cores()
    if cores is None or threads <= cores:
        yield
        return
    torch.set_num_threads(cores)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


@contextmanager
def attack_settings(device: torch.device, reuse_heap: bool = True) -> Iterator[None]:
    """The settings above, while an attack runs on `device` (nothing changes for other devices); `reuse_heap` False
    leaves malloc as it is (for runs that asked for low memory)."""
    if device.type != "cpu":
        yield
        return
    with flush_denormals(), keep_freed_memory() if reuse_heap else nullcontext(), attack_threads():
        yield
