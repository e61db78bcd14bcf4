"""Where the time of one PGD step goes: a per-operator profile (torch.profiler, CPU) of one step of a method on the
full SD v1 architecture with random weights, forward and backward, grouped into operator classes.

    python benchmarks/profile_step.py --size 512 --precision fp32 [--method mist] [--mode fused]

One warm-up step, then one step counted by torch.utils.flop_counter and one profiled step (the method's loss and its
gradient to the image: a PGD step's work), all under the settings an attack holds on the CPU (mist.engine.cpu_tuning).
For each class (convolution forward, convolution backward (the gradient to the input, a transposed convolution: see
mist.models.frozen_conv), GroupNorm, SiLU, attention, matrix products, element-wise, layout conversions and copies,
other): the time spent in its operators (self time, so nothing is counted twice) and its share of the step. FLOPs come
from the flop counter, forward and backward together, per family (convolutions, attention, matrix products), with the
GFLOP/s each family achieved. Prints Markdown tables and the 15 costliest operators.

With `--split` (mist's fused or semantic mode), the same step is also run phase by phase, each phase timed and its
FLOPs counted on its own: the VAE encoder's forward, the UNet's forward (noising and the denoising loss), the UNet's
backward to the latent, and the encoder's backward to the image (given the textural and semantic gradients at the
latent together, as the single backward of a real step gives them). The text encoder takes no time in a step: it runs
once, when the model is loaded. Casts and copies are the "layout conversions and copies" class of the first table.
"""

from __future__ import annotations

import argparse
import re
import sys
import time
from contextlib import contextmanager, nullcontext
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench import build_full_size_model, count_cpu_attention_flops, machine, runnable_precisions  # noqa: E402

# Operator classes, matched in this order against the profiler's operator names.
CLASSES: tuple[tuple[str, str], ...] = (
    ("convolution backward", r"convolution_backward|conv.*backward|^aten::_convolution$|conv_transpose"),
    ("convolution forward", r"convolution|conv2d|mkldnn_convolution"),
    ("GroupNorm", r"group_norm"),
    ("SiLU", r"silu"),
    ("attention", r"scaled_dot_product|_flash_attention|softmax|baddbmm|bmm"),
    ("matrix products", r"addmm|^aten::mm$|matmul|linear"),
    ("layout conversions and copies", r"copy_|contiguous|_to_copy|clone|to_dense|reorder|^aten::to$"),
    ("element-wise", r"add|mul|sub|div|pow|exp|sqrt|clamp|neg|sum|mean|fill_|zero_|where|sign"),
)


# Families whose FLOPs the flop counter reports, and the classes whose time they take.
FAMILIES: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("convolutions", ("convolution forward", "convolution backward")),
    ("attention", ("attention",)),
    ("matrix products", ("matrix products",)),
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

    from torch.utils.flop_counter import FlopCounterMode

    from mist.common import images
    from mist.engine.config import ProtectConfig
    from mist.engine.cpu_tuning import attack_settings
    from mist.engine.objectives import PRECISION_DTYPES
    from mist.engine.pipeline import Protector

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--precision", default="fp32", choices=("fp32", "bf16"))
    parser.add_argument("--method", default="mist")
    parser.add_argument("--mode", default="fused", help="the mist method's mode (ignored by other methods)")
    parser.add_argument("--split", action="store_true", help="also time the step phase by phase (mist, fused mode)")
    args = parser.parse_args()
    if not runnable_precisions([args.precision], "cpu"):
        return 0
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
        loss(pixels, [torch.Generator().manual_seed(0)]).objective.sum().backward()  # the flop counter needs backward()

    count_cpu_attention_flops()
    with attack_settings(protector.device):
        step()  # warm-up
        with FlopCounterMode(display=False) as counter:
            step()
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            step()
    events = [e for e in prof.key_averages() if e.key != "ProfilerStep*"]
    total = sum(e.self_cpu_time_total for e in events)
    seconds: dict[str, float] = {}
    for event in events:
        label = operator_class(event.key)
        seconds[label] = seconds.get(label, 0.0) + event.self_cpu_time_total / 1e6
    flops: dict[str, float] = {}
    for op, count in counter.get_flop_counts().get("Global", {}).items():
        label = operator_class("aten::" + str(op).split(".")[-1])
        family = next((name for name, members in FAMILIES if label in members), "other")
        flops[family] = flops.get(family, 0.0) + count
    print(f"Machine: {machine()}; {torch.get_num_threads()} threads  ")
    print(f"Command: `python benchmarks/profile_step.py {' '.join(sys.argv[1:])}`  ")
    print(f"One profiled step (the loss and its gradient to the image), {total / 1e6:.1f} s of operator self time "
          f"(the profiler's own overhead included); {counter.get_total_flops() / 1e12:.3f} TFLOP counted.\n")
    print("| operator class | s | share |\n|---|---|---|")
    for label, spent in sorted(seconds.items(), key=lambda item: -item[1]):
        print(f"| {label} | {spent:.2f} | {100 * spent / (total / 1e6):.1f}% |")
    print("\n| family | GFLOP (forward and backward) | s | GFLOP/s |\n|---|---|---|---|")
    for family, members in FAMILIES:
        spent = sum(seconds.get(label, 0.0) for label in members)
        rate = f"{flops.get(family, 0.0) / 1e9 / spent:.1f}" if spent else ""
        print(f"| {family} | {flops.get(family, 0.0) / 1e9:.1f} | {spent:.2f} | {rate} |")
    print("\n| operator | class | calls | self s |\n|---|---|---|---|")
    for event in sorted(events, key=lambda e: -e.self_cpu_time_total)[:15]:
        print(f"| {event.key} | {operator_class(event.key)} | {event.count} | {event.self_cpu_time_total / 1e6:.2f} |")
    if args.split:
        with attack_settings(protector.device):
            print_split(protector, x, args.precision)
    return 0


PHASES = ("VAE encoder forward", "UNet forward (noising, denoising loss)", "UNet backward to the latent",
          "VAE encoder backward to the image")


def step_phases(protector, x, precision: str, phase) -> None:
    """One fused step of Mist's loss, phase by phase: each phase runs inside `phase(name)` (a context manager)."""
    import torch

    from mist.common.prompts import STYLE_PROMPT
    from mist.engine import objectives

    model = protector.model
    weight = protector.method.params.semantic_weight
    pixels = x.clone().requires_grad_(True)
    with phase(PHASES[0]):
        latent = objectives.encode(model, pixels, [torch.Generator().manual_seed(0)], precision)
    inner = latent.detach().requires_grad_(True)
    with phase(PHASES[1]):
        semantic = objectives.denoising_loss(model, inner, model.conditioning(STYLE_PROMPT),
                                             [torch.Generator().manual_seed(1)], precision)
    with phase(PHASES[2]):
        (semantic_gradient,) = torch.autograd.grad(semantic.sum(), inner)
    textural_gradient = 2 * latent.detach()  # d/dz of sum((z - target)^2) with a zero target: the cost is the same
    with phase(PHASES[3]):
        torch.autograd.grad(latent, pixels, textural_gradient - weight * semantic_gradient)


def print_split(protector, x, precision: str) -> None:
    """Time and count each phase of a fused step (after one untimed pass) and print a Markdown table."""
    from torch.utils.flop_counter import FlopCounterMode

    seconds: dict[str, float] = {}
    flops: dict[str, int] = {}

    @contextmanager
    def timed(name: str):
        started = time.perf_counter()
        yield
        seconds[name] = time.perf_counter() - started

    @contextmanager
    def counted(name: str):
        with FlopCounterMode(display=False) as counter:
            yield
        flops[name] = counter.get_total_flops()

    step_phases(protector, x, precision, lambda name: nullcontext())  # warm-up
    step_phases(protector, x, precision, timed)
    step_phases(protector, x, precision, counted)
    total = sum(seconds.values())
    print(f"\nThe step phase by phase ({total:.2f} s in all; the text encoder ran once, at load):\n")
    print("| phase | s | share | GFLOP | GFLOP/s |\n|---|---|---|---|---|")
    for name in PHASES:
        print(f"| {name} | {seconds[name]:.2f} | {100 * seconds[name] / total:.1f}% | {flops[name] / 1e9:.1f} | "
              f"{flops[name] / 1e9 / seconds[name]:.1f} |")


if __name__ == "__main__":
    sys.exit(main())
