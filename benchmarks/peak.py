"""This machine's practical peak: how fast its best kernels run a large matrix product and a SD-sized convolution,
per precision, so that a step's achieved FLOP/s can be read as a fraction of what the hardware does.

    python benchmarks/peak.py [--repeats 5]

Matrix product: 4096 x 4096 x 4096 (2 n^3 FLOP). Convolution: 3 x 3, 256 -> 256 channels, 128 x 128, batch 1
(2 * 256 * 256 * 9 * 128 * 128 FLOP), the shape of the VAE encoder's middle blocks at 512 x 512, in both memory
layouts, forward only. Each figure is the median of `--repeats` timed runs after one warm-up, with PyTorch's own
thread count (printed). Prints a Markdown table.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from functools import partial
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench import machine, runnable_precisions  # noqa: E402


def timed(run, repeats: int) -> float:
    """Median seconds of `run()` after one warm-up."""
    run()
    seconds = []
    for _ in range(repeats):
        started = time.perf_counter()
        run()
        seconds.append(time.perf_counter() - started)
    return statistics.median(seconds)


def measure(dtype, repeats: int = 5, size: int = 4096) -> list[tuple[str, str, float]]:
    """(kernel, layout, GFLOP/s) of this machine's best kernels in `dtype`, on the CPU with PyTorch's thread count."""
    import torch

    rows = []
    with torch.no_grad():
        a = torch.randn(size, size).to(dtype)
        b = torch.randn(size, size).to(dtype)
        seconds = timed(partial(torch.mm, a, b), repeats)
        rows.append((f"matrix product {size}^3", "-", 2 * size**3 / seconds / 1e9))
        for layout, memory_format in (("contiguous", torch.contiguous_format), ("channels-last", torch.channels_last)):
            conv = torch.nn.Conv2d(256, 256, 3, padding=1).to(dtype=dtype, memory_format=memory_format)
            x = torch.randn(1, 256, 128, 128).to(dtype=dtype, memory_format=memory_format)
            seconds = timed(partial(conv, x), repeats)
            rows.append(("conv 3x3 256ch 128x128", layout, 2 * 256 * 256 * 9 * 128 * 128 / seconds / 1e9))
    return rows


def peak_gflops(dtype, repeats: int = 5) -> float:
    """The practical peak in `dtype`: the fastest of the kernels `measure` runs."""
    return max(gflops for _, _, gflops in measure(dtype, repeats))


def main() -> int:
    import torch

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--size", type=int, default=4096, help="matrix side")
    parser.add_argument("--precisions", default="fp32,bf16",
                        help="bf16 is emulated, and very slow, on CPUs without AVX512-BF16 or AMX")
    args = parser.parse_args()
    dtypes = {name: {"fp32": torch.float32, "bf16": torch.bfloat16}[name]
              for name in runnable_precisions(args.precisions.split(","), "cpu")}
    print(f"Machine: {machine()}; {torch.get_num_threads()} threads  ")
    print(f"Command: `python benchmarks/peak.py {' '.join(sys.argv[1:])}`\n")
    print("| kernel | precision | layout | GFLOP/s |\n|---|---|---|---|")
    for name, dtype in dtypes.items():
        for kernel, layout, gflops in measure(dtype, args.repeats, args.size):
            print(f"| {kernel} | {name} | {layout} | {gflops:.1f} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
