"""Optional compilation of the networks an attack runs: `torch.compile` with its inductor backend (`--compile`).

Compiling turns the VAE encoder's and the UNet's forward and backward passes into generated kernels that fuse the small
operations between the convolutions and matrix products (normalisation, activations, element-wise arithmetic). It
costs minutes the first time a model meets an image size (on two CPU cores: about 6 min at 512 x 512), and about a
minute when the compiled code comes from inductor's cache on disk. Mist keeps that cache in its home folder, where a
cloud install's models live, so it outlives a server's restart; `TORCHINDUCTOR_CACHE_DIR` chooses another folder.

Compiled arithmetic is float32 (or the precision asked for) as before, but its fused kernels sum in another order: the
result may differ from the uncompiled one in the last bits, like a different batch size.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import sys
import sysconfig
import warnings
from pathlib import Path

import torch

from mist.models import StableDiffusion
from mist.models.locate import mist_home

CACHE_ENV = "TORCHINDUCTOR_CACHE_DIR"
CPP_COMPILERS = ("c++", "g++", "clang++", "cl")


def cache_folder() -> Path | None:
    """Where inductor keeps what it compiled: `$TORCHINDUCTOR_CACHE_DIR` when set, else `cache/inductor` under Mist's
    home when it is known, else None (PyTorch's own default, a folder in the system's temporary files)."""
    chosen = os.environ.get(CACHE_ENV, "").strip()
    if chosen:
        return Path(chosen).expanduser()
    home = mist_home()
    return home / "cache" / "inductor" if home is not None else None


def compile_problem(device: torch.device) -> str | None:
    """Why `torch.compile` cannot compile for `device` on this machine (a one-line reason), or None when it can."""
    if device.type == "cpu":
        compilers = [os.environ["CXX"]] if os.environ.get("CXX") else list(CPP_COMPILERS)
        if not any(shutil.which(name) for name in compilers):
            return ("it compiles C++ for the CPU and no C++ compiler was found on PATH "
                    f"({', '.join(compilers)}; on Debian or Ubuntu: apt install g++)")
        headers = Path(sysconfig.get_paths()["include"]) / "Python.h"
        if not headers.is_file():
            return (f"it builds Python extensions and this Python ({sys.executable}) has no C headers at "
                    f"{headers.parent} (on Debian or Ubuntu: apt install python3-dev)")
        return None
    if device.type == "cuda":
        if importlib.util.find_spec("triton") is None:
            return "it generates Triton kernels for NVIDIA GPUs and Triton is not installed (pip install triton)"
        return None
    return f"Mist does not compile for {device.type} devices"


def check_can_compile(device: torch.device) -> None:
    """ValueError("compile: <why>") when `torch.compile` cannot compile for `device` here (see `compile_problem`)."""
    problem = compile_problem(device)
    if problem:
        raise ValueError(f"compile: {problem}")


def compile_networks(model: StableDiffusion) -> None:
    """Compile, in place, the networks of `model` that protection runs (the encoder's convolution stack and the UNet);
    each compiles on its first call, for the input shapes it meets. Inductor's cache goes to `cache_folder()`."""
    folder = cache_folder()
    if folder is not None:
        os.environ[CACHE_ENV] = str(folder)  # read by inductor whenever it opens its cache
    # diffusers' upsampling asks `is_torch_version` (an lru_cache of the installed version, constant for the run) in its
    # forward pass; Dynamo traces through the cache and warns that it might be stale, which here it cannot be.
    warnings.filterwarnings("ignore", message="Dynamo detected a call to a `functools.lru_cache`-wrapped function",
                            category=UserWarning)
    model.encoder.encoder.compile()
    if model.unet is not None:
        model.unet.compile()


def compile_seconds() -> float:
    """Seconds this process has spent compiling so far: forward graphs, and backward graphs (compiled lazily, on their
    first backward pass), loading from the cache included. From PyTorch's own compile-time counters."""
    from torch._dynamo.utils import calculate_time_spent

    spent = calculate_time_spent()
    return spent.get("entire_frame_compile", 0.0) + spent.get("entire_backward_compile", 0.0)
