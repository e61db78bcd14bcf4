"""`mist doctor`: what this machine has, whether a model is found and intact, and the settings to use here.

The recommendation follows measured memory needs (benchmarks/RESULTS.md, 512 x 512 fused mode, process peak on a CPU):
the fastest setting whose need fits in the memory free on the device, keeping a margin for the rest of the system.
"""

from __future__ import annotations

import platform
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch

from mist.models.device import available_ram_bytes, cuda_problem, pick_device, resolve_precision
from mist.common.download import KNOWN_CHECKSUMS
from mist.runner.model_identity import model_sha256

# Peak memory (GiB) of a 512 x 512 fused attack step with SD v1, measured by benchmarks/bench.py on the CPU (process
# RSS, weights included); keyed by (precision, gradient checkpointing). GPU needs are lower: no Python heap on the card.
MEASURED_NEED_GIB = {("bf16", False): 4.7, ("bf16", True): 3.6, ("fp32", False): 9.0, ("fp32", True): 6.6}
MARGIN = 1.2  # leave a fifth for fragmentation, the system and other programs


@dataclass(frozen=True)
class Line:
    label: str
    value: str
    problem: bool = False


def model_check(where: Path) -> Line:
    """Whether the model is one Mist knows by checksum; the result is cached beside the file (keyed by size and
    modification time) so that the 4 GB hash is computed once."""
    if where.is_dir():
        return Line("model", f"{where} (diffusers folder; not checksummed)")
    digest = model_sha256(where)
    name = KNOWN_CHECKSUMS.get(digest)
    if name:
        return Line("model", f"{where} ({name}, checksum verified)")
    return Line("model", f"{where} (checksum {digest[:12]}... is not an official SD 1.x file: a fine-tune, or damaged)")


def recommend(device: torch.device, free_gib: float | None) -> str:
    precision = resolve_precision("auto", device)
    need_key = precision if precision == "fp32" else "bf16"  # fp16 needs what bf16 needs
    if free_gib is None:
        return f"--precision {precision} (free memory unknown: add --low-memory if it runs out)"
    for low_memory in (False, True):
        if MEASURED_NEED_GIB[(need_key, low_memory)] * MARGIN <= free_gib:
            return f"--precision {precision}" + (" --low-memory" if low_memory else " (no --low-memory needed)")
    return (f"--precision {precision} --low-memory --block-num 2 (only {free_gib:.1f} GiB free; 512 x 512 needs about "
            f"{MEASURED_NEED_GIB[(need_key, True)]:.1f} GiB even with --low-memory)")


def report(output_dir: Path, model_spec: str | None, device_name: str | None = None) -> list[Line]:
    from mist.version import __version__
    from mist.models import ModelNotFoundError, resolve_model
    from mist.models.locate import mist_command

    lines = [Line("mist", __version__), Line("python", f"{platform.python_version()} ({platform.platform()})"),
             Line("pytorch", f"{torch.__version__}, CUDA {torch.version.cuda or 'none'}")]
    problem = cuda_problem()
    if problem:
        lines.append(Line("cuda", f"{problem}. Mist would run on the CPU, many times slower", problem=True))
    try:
        device = pick_device(device_name)
    except ValueError as exc:
        return [*lines, Line("device", str(exc), problem=True)]
    if device.type == "cuda":
        free, total = torch.cuda.mem_get_info(device)
        free_gib = free / 1024**3
        lines.append(Line("gpu", f"{torch.cuda.get_device_name(device)}, {free_gib:.1f} of {total / 1024**3:.1f} "
                                 "GiB free"))
    else:
        available = available_ram_bytes()
        free_gib = available / 1024**3 if available else None
        memory = f"{free_gib:.1f} GiB RAM available" if free_gib else "RAM unknown"
        lines.append(Line("device", f"{device.type} (no CUDA GPU found), {memory}"))
    try:
        where = resolve_model(model_spec)
        lines.append(model_check(where) if isinstance(where, Path) else Line("model", f"{where} (NO protection)"))
    except ModelNotFoundError as exc:
        lines.append(Line("model", str(exc).splitlines()[0].rstrip(".") + f"; run: {mist_command()} download-model",
                          problem=True))
    folder = output_dir if output_dir.exists() else next((p for p in output_dir.parents if p.exists()), Path("."))
    disk = shutil.disk_usage(folder)
    lines.append(Line("disk", f"{disk.free / 1024**3:.1f} GiB free in {folder.resolve()}",
                      problem=disk.free < 1024**3))
    lines.append(Line("recommended", recommend(device, free_gib)))
    return lines
