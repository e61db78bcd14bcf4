"""Process settings that make an attack run faster on a CPU, held only while it runs.

An attack step allocates and frees the same large activations over and over (the VAE encoder's at 512 x 512 are 32
to 128 MB each in float32). glibc's malloc serves every block over 32 MB with a fresh `mmap` and hands it back to the
kernel on `free`, so each step faults in and zeroes several GB of new pages: on a 2-core EPYC that was 2.5 to 3
million page faults and 6 to 9 s of kernel time in a 30 to 37 s float32 step (benchmarks/RESULTS.md). While an attack
runs, `keep_freed_memory` has malloc serve large blocks from its heap and keep what is freed there, so later steps
reuse pages already mapped. The cost is a heap that holds on to its high-water mark until the attack ends, when the
previous behaviour is restored and the free memory returned to the kernel (`malloc_trim`).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import threading
from contextlib import contextmanager
from functools import lru_cache
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


@contextmanager
def attack_settings(device: torch.device) -> Iterator[None]:
    """The settings above, while an attack runs on `device` (nothing changes for other devices)."""
    if device.type != "cpu":
        yield
        return
    with flush_denormals(), keep_freed_memory():
        yield
