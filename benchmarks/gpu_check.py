"""Every protection method on a CUDA GPU: seconds per PGD step and peak GPU memory at 512 x 512, per precision.

The full SD v1 architecture with random weights (the cost does not depend on the weights' values) is built once per
precision and shared by every method's Protector (each method gets the parts it declares). One warm-up step, then the
median of `--steps` timed steps (the GPU synchronised at each step's end). Peak memory is
`torch.cuda.max_memory_allocated` over the protection of one image, the model's weights included.

    python benchmarks/gpu_check.py --precisions bf16,fp16 --size 512 --steps 2
    python benchmarks/gpu_check.py --methods mist --precisions bf16 --compile yes --steps 5

`--compile no,yes` measures each method uncompiled and compiled (`--compile`), with its compile time.

Prints a Markdown table; `benchmarks/gpu-check.sh` runs it with the CUDA tests and keeps everything in one file.
"""

from __future__ import annotations

import argparse
import itertools
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench import build_full_size_model, machine  # noqa: E402


def measure(model, method: str, precision: str, size: int, steps: int, compile: bool = False) -> dict:
    """One method's figures on the GPU."""
    import torch
    from PIL import Image

    from mist.engine.config import ProtectConfig
    from mist.engine.pipeline import Protector

    device = torch.device("cuda")
    config = ProtectConfig(method=method, steps=steps + 1, input_size=size, precision=precision)
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats(device)
    protector = Protector(model, config, device, low_memory=False, compile=compile)
    image = Image.radial_gradient("L").convert("RGB").resize((size, size))
    stamps = [time.perf_counter()]

    def on_step(progress) -> None:
        torch.cuda.synchronize(device)
        stamps.append(time.perf_counter())

    result = protector.protect(image, callback=on_step)
    durations = [b - a for a, b in zip(stamps, stamps[1:], strict=False)][1:]  # the first includes the warm-up
    return {"method": method, "precision": precision, "size": size, "seconds": statistics.median(durations),
            "peak_gib": torch.cuda.max_memory_allocated(device) / 1024**3, "compiled": compile,
            "compile_seconds": result.compile_seconds}


def main() -> int:
    import torch

    from mist.engine.methods import list_methods
    from mist.engine.objectives import PRECISION_DTYPES

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--precisions", default="bf16,fp16")
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--steps", type=int, default=2, help="timed steps after one warm-up step")
    parser.add_argument("--methods", default="all", help="comma list, or all registered methods")
    parser.add_argument("--compile", default="no", help="uncompiled and/or compiled (--compile): no,yes")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("gpu_check.py: PyTorch sees no CUDA GPU", file=sys.stderr)
        return 2
    methods = [m.name for m in list_methods()] if args.methods == "all" else args.methods.split(",")
    print(f"Machine: {machine()}  \nCommand: `python benchmarks/gpu_check.py {' '.join(sys.argv[1:])}`\n")
    print("| method | precision | compiled | size | s / step | compile s | peak GPU memory GiB |\n"
          "|---|---|---|---|---|---|---|", flush=True)
    failed = 0
    for precision in args.precisions.split(","):
        torch.manual_seed(0)
        model = build_full_size_model(PRECISION_DTYPES[precision]).placed(torch.device("cuda"), in_place=True)
        for method, compiled in itertools.product(methods, args.compile.split(",")):
            try:
                r = measure(model, method, precision, args.size, args.steps, compiled == "yes")
            except Exception as exc:  # noqa: BLE001 - one failing method must not hide the others' figures
                failed += 1
                print(f"| {method} | {precision} | {compiled} | {args.size} | failed: {type(exc).__name__}: {exc} "
                      "| | |", flush=True)
                continue
            print(f"| {r['method']} | {r['precision']} | {compiled} | {r['size']} | {r['seconds']:.3f} "
                  f"| {r['compile_seconds']:.1f} | {r['peak_gib']:.2f} |", flush=True)
        del model
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
