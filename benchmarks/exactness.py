"""How exact float32 is, per memory layout, against float64, on the full SD v1 architecture with random weights.

For one image and fixed random draws it computes the fused gradient d(objective)/d(image) once in float64 (the
reference), then in float32 with the convolution weights and inputs in each layout: contiguous (what `--precision
fp32` uses) and channels-last (what the release used). For each: the gradient's relative L2 error against float64,
the fraction of pixels whose sign differs from float64's, and the median seconds per gradient (one PGD step's work)
after a warm-up.

    python benchmarks/exactness.py --size 256 --repeats 2 [--image painting.png]

Prints a Markdown section; paste it into benchmarks/RESULTS.md. Needs about 12 GB of memory at 256 x 256 (the
float64 model is dropped before the float32 runs).
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time
from pathlib import Path

import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench import build_full_size_model, machine  # noqa: E402

from mist.common import images  # noqa: E402
from mist.engine.config import ProtectConfig  # noqa: E402
from mist.engine.methods import TileInputs  # noqa: E402
from mist.engine.methods.mist import Mist  # noqa: E402
from mist.engine.methods.common import mist_target  # noqa: E402

LAYOUTS = ("contiguous", "channels-last")


def gradient(model, x: torch.Tensor) -> torch.Tensor:
    """The fused objective's gradient at x, with the same random draws every time."""
    y = images.image_to_tensor(mist_target(), (x.shape[3], x.shape[2]))
    objective = Mist(ProtectConfig().params, model, "fp32").prepare([TileInputs(x, y, seed=lambda stream: 2)])
    x = x.clone().requires_grad_(True)
    objective(x, [torch.Generator().manual_seed(1)]).objective.sum().backward()
    return x.grad.double()


def set_layout(model, layout: str) -> None:
    """Put `model`'s convolution weights and inputs in `layout`."""
    model.memory_format = torch.contiguous_format if layout == "contiguous" else torch.channels_last
    for module in (model.encoder, model.unet):
        module.to(memory_format=model.memory_format)


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=2, help="timed gradients per layout, after one warm-up")
    parser.add_argument("--image", type=Path, help="an RGB image (default: a synthetic gradient)")
    args = parser.parse_args()
    picture = images.read_image(args.image) if args.image else Image.radial_gradient("L").convert("RGB")
    x = images.image_to_tensor(picture, (args.size, args.size))
    model = build_full_size_model(torch.float32)

    wide = copy.deepcopy(model)
    wide.encoder.double()
    wide.unet.double()
    wide.text_embeddings = {k: v.double() for k, v in wide.text_embeddings.items()}
    started = time.perf_counter()
    reference = gradient(wide, x.double())
    reference_seconds = time.perf_counter() - started
    del wide

    lines = [f"Machine: {machine()}; load average at start {' '.join(map(str, _load()))}  ",
             f"Command: `python benchmarks/exactness.py {' '.join(sys.argv[1:])}`\n",
             f"Fused gradient at {args.size} x {args.size}, float64 reference ({reference_seconds:.0f} s):\n",
             "| float32 layout | relative L2 error vs float64 | signs differing from float64 | s / gradient |",
             "|---|---|---|---|"]
    print("\n".join(lines), flush=True)
    for layout in LAYOUTS:
        set_layout(model, layout)
        seconds = []
        for _ in range(args.repeats + 1):
            started = time.perf_counter()
            result = gradient(model, x)
            seconds.append(time.perf_counter() - started)
        error = ((result - reference).norm() / reference.norm()).item()
        differing = (result.sign() != reference.sign()).double().mean().item()
        lines.append(f"| {layout} | {error:.2e} | {differing:.2e} | {statistics.median(seconds[1:]):.1f} |")
        print(lines[-1], flush=True)
    print("\n".join(lines))
    return 0


def _load() -> tuple[float, ...]:
    try:
        with open("/proc/loadavg", encoding="ascii") as handle:
            return tuple(float(v) for v in handle.read().split()[:3])
    except OSError:
        return ()


if __name__ == "__main__":
    sys.exit(main())
