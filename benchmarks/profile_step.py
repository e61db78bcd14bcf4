"""Where the time of one PGD step goes: a per-operator profile (torch.profiler, CPU) of one step of a method on the
full SD v1 architecture with random weights, forward and backward, grouped into operator classes.

    python benchmarks/profile_step.py --size 512 --precision fp32 [--method mist] [--mode fused]

One warm-up step, then one profiled step (the method's loss and its gradient to the image: a PGD step's work). For
each class (convolution forward, convolution backward, GroupNorm, SiLU, attention, matrix products, element-wise,
layout conversions and copies, other): the time spent in its operators (self time, so nothing is counted twice), its
share of the step, and for convolutions and matrix products the FLOPs the profiler counts and the GFLOP/s achieved.
Prints a Markdown table and the 15 costliest operators.
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench import build_full_size_model, machine  # noqa: E402

# Operator classes, matched in this order against the profiler's operator names.
CLASSES: tuple[tuple[str, str], ...] = (
    ("convolution backward", r"convolution_backward|conv.*backward"),
    ("convolution forward", r"convolution|conv2d|mkldnn_convolution"),
    ("GroupNorm", r"group_norm"),
    ("SiLU", r"silu"),
    ("attention", r"scaled_dot_product|_flash_attention|softmax|baddbmm|bmm"),
    ("matrix products", r"addmm|^aten::mm$|matmul|linear"),
    ("layout conversions and copies", r"copy_|contiguous|_to_copy|clone|to_dense|reorder|^aten::to$"),
    ("element-wise", r"add|mul|sub|div|pow|exp|sqrt|clamp|neg|sum|mean|fill_|zero_|where|sign"),
)


def operator_class(name: str) -> str:
    for label, pattern in CLASSES:
        if re.search(pattern, name):
            return label
    return "other"


def main() -> int:
    import torch
    from PIL import Image
    from torch.profiler import ProfilerActivity, profile

    from mist import images
    from mist.config import ProtectConfig
    from mist.objectives import PRECISION_DTYPES
    from mist.pipeline import Protector

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--precision", default="fp32", choices=("fp32", "bf16"))
    parser.add_argument("--method", default="mist")
    parser.add_argument("--mode", default="fused", help="the mist method's mode (ignored by other methods)")
    args = parser.parse_args()
    torch.manual_seed(0)
    model = build_full_size_model(PRECISION_DTYPES[args.precision])
    settings = {"mode": args.mode} if args.method == "mist" else {}
    config = ProtectConfig.of(method=args.method, steps=1, input_size=args.size, precision=args.precision, **settings)
    protector = Protector(model, config, low_memory=False, hand_over=True)
    image = Image.radial_gradient("L").convert("RGB").resize((args.size, args.size))
    x = images.image_to_tensor(image, (args.size, args.size))
    loss = protector.loss_for(x)  # prepared once, as for a whole attack (the target latent is not part of a step)

    def step() -> None:
        pixels = x.clone().requires_grad_(True)
        torch.autograd.grad(loss(pixels, [torch.Generator().manual_seed(0)]).objective.sum(), pixels)

    step()  # warm-up
    with profile(activities=[ProfilerActivity.CPU], with_flops=True) as prof:
        step()
    events = [e for e in prof.key_averages() if e.key != "ProfilerStep*"]
    total = sum(e.self_cpu_time_total for e in events)
    classes: dict[str, list[float]] = {}
    for event in events:
        entry = classes.setdefault(operator_class(event.key), [0.0, 0.0])
        entry[0] += event.self_cpu_time_total
        entry[1] += event.flops or 0
    print(f"Machine: {machine()}; {torch.get_num_threads()} threads  ")
    print(f"Command: `python benchmarks/profile_step.py {' '.join(sys.argv[1:])}`  ")
    print(f"One profiled step (the loss and its gradient to the image), {total / 1e6:.1f} s of operator self time. "
          "GFLOP as torch.profiler counts them: forward convolutions and matrix products only (its backward kernels "
          "report none).\n")
    print("| operator class | s | share | GFLOP | GFLOP/s |\n|---|---|---|---|---|")
    for label, (micros, flops) in sorted(classes.items(), key=lambda item: -item[1][0]):
        rate = f"{flops / 1e9 / (micros / 1e6):.1f}" if flops and micros else ""
        print(f"| {label} | {micros / 1e6:.2f} | {100 * micros / total:.1f}% | {flops / 1e9:.1f} | {rate} |")
    print("\n| operator | class | calls | self s | GFLOP |\n|---|---|---|---|---|")
    for event in sorted(events, key=lambda e: -e.self_cpu_time_total)[:15]:
        print(f"| {event.key} | {operator_class(event.key)} | {event.count} | {event.self_cpu_time_total / 1e6:.2f} "
              f"| {(event.flops or 0) / 1e9:.1f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
