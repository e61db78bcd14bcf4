"""How far bf16 and fast mode move Mist's attack away from the float32 exact one, on the full SD v1 architecture.

With random weights this measures arithmetic, not protection: (1) the fraction of pixels whose gradient sign agrees
with float32's at the same point and the same random draws, per mode; (2) the textural and (exact) semantic losses
reached after the same number of PGD steps from the same image and seed, for fp32, bf16 and fast mode.

    python benchmarks/agreement.py --size 256 --steps 5 [--image painting.png]

Prints a Markdown section; paste it into benchmarks/RESULTS.md.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench import build_full_size_model, machine  # noqa: E402

from mist.common import images  # noqa: E402
from mist.engine.config import ProtectConfig  # noqa: E402
from mist.engine.pipeline import Protector  # noqa: E402


def gradient(protector: Protector, x: torch.Tensor) -> torch.Tensor:
    """d objective / d x at x, with fixed random draws."""
    objective = protector.loss_for(x, seed=0)
    x = x.clone().requires_grad_(True)
    objective(x, [torch.Generator().manual_seed(1)]).objective.sum().backward()
    return x.grad


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--image", type=Path, help="an RGB image (default: a synthetic gradient)")
    args = parser.parse_args()
    picture = images.read_image(args.image) if args.image else Image.radial_gradient("L").convert("RGB")
    x = images.image_to_tensor(picture, (args.size, args.size))
    model = build_full_size_model(torch.float32)  # each Protector places its own copy; this one stays float32

    def protector(precision: str, **settings) -> Protector:
        config = ProtectConfig.of(precision=precision, input_size=args.size, steps=args.steps, **settings)
        return Protector(model, config)

    lines = [f"Machine: {machine()}  ", f"Command: `python benchmarks/agreement.py {' '.join(sys.argv[1:])}`\n",
             "| mode | gradient sign agreement, bf16 vs fp32 | sign agreement, fast vs exact (fp32) |", "|---|---|---|"]
    for mode in ("textural", "semantic", "fused"):
        reference = gradient(protector("fp32", mode=mode), x).sign()
        bf16 = (gradient(protector("bf16", mode=mode), x).sign() == reference).float().mean().item()
        fast = "n/a" if mode == "textural" else \
            f"{(gradient(protector('fp32', mode=mode, fast=True), x).sign() == reference).float().mean().item():.4f}"
        lines.append(f"| {mode} | {bf16:.4f} | {fast} |")
        print(lines[-1], flush=True)
    lines += ["", f"Fused mode, {args.steps} steps, same image and seed (losses summed over the image, at the first "
              "and the last step's starting point; the semantic loss is the exact one in every run):\n",
              "| run | textural start | textural end | semantic start | semantic end | s / step |",
              "|---|---|---|---|---|---|"]
    for name, precision, fast in (("fp32 exact", "fp32", False), ("bf16 exact", "bf16", False),
                                  ("fp32 fast (SDS)", "fp32", True), ("bf16 fast (SDS)", "bf16", True)):
        started = time.perf_counter()
        result = protector(precision, fast=fast).protect(picture)
        seconds = (time.perf_counter() - started) / args.steps
        lines.append(f"| {name} | {result.start['textural']:.2f} | {result.end['textural']:.2f} | "
                     f"{result.start['semantic']:.5f} | {result.end['semantic']:.5f} | {seconds:.1f} |")
        print(lines[-1], flush=True)
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
