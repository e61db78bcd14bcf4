"""Cost of one attack step of each protection method on the full Stable Diffusion v1 architecture with random weights.

Per method, in a fresh process (peak memory is per process): build the networks in the precision under test
(`bench.build_full_size_model`), protect one image for warm-up + `--steps` PGD steps through the real engine
(`mist.engine.pipeline.Protector`, each method with its default parameters unless `NAME:param=value` says otherwise),
and report the median seconds per timed step, the attack's peak memory (process RSS on the CPU after resetting the mark
once the model is built; max allocated on CUDA) and the FLOPs of one evaluation of the method's loss and its gradient
(torch.utils.flop_counter; the once-per-tile preparation such as a target's encoding is not included). Random weights
measure cost only, never protection strength.

    python benchmarks/methods.py --methods mist,advdm,photoguard,sds,mist2,pid --size 512 --precision bf16 --steps 1

Results are appended to benchmarks/RESULTS.md (a table per run, with the machine, the load average, the command and
the date).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

from bench import (answer_child, append_results, build_full_size_model, count_cpu_attention_flops, peak_rss_gb,
                   peak_rss_reset, run_children, runnable_precisions)


def parse_method(text: str) -> tuple[str, dict]:
    """`NAME` or `NAME:param=value:param=value` (values read as JSON when they parse, else as strings)."""
    name, *settings = text.split(":")
    params = {}
    for setting in settings:
        key, _, value = setting.partition("=")
        try:
            params[key] = json.loads(value)
        except json.JSONDecodeError:
            params[key] = value
    return name, params


def run_one(spec: dict) -> dict:
    """Measure one method in this process; returns the figures."""
    import torch
    from PIL import Image
    from torch.utils.flop_counter import FlopCounterMode

    from mist.common import images
    from mist.engine.config import ProtectConfig
    from mist.models.device import pick_device
    from mist.engine.objectives import PRECISION_DTYPES
    from mist.engine.pipeline import Protector

    load = " ".join(f"{v:.2f}" for v in os.getloadavg())  # when this method's measurement starts
    device = pick_device(spec["device"])
    torch.manual_seed(0)
    model = build_full_size_model(PRECISION_DTYPES[spec["precision"]])
    size = spec["size"]
    config = ProtectConfig(method=spec["method"], params=spec["params"], steps=spec["steps"] + 1, input_size=size,
                           precision=spec["precision"])
    protector = Protector(model, config, device, hand_over=True)  # as the CLI does
    image = Image.new("RGB", (size, size))
    image.putdata([((i * 7) % 256, (i * 13) % 256, (i * 29) % 256) for i in range(size**2)])
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    reset = peak_rss_reset()
    stamps = [time.perf_counter()]
    protector.protect(image, callback=lambda progress: stamps.append(time.perf_counter()))
    durations = [b - a for a, b in zip(stamps, stamps[1:], strict=False)]
    seconds = statistics.median(durations[1:])  # the first step includes the warm-up and the preparation
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated(device) / 1024**3
    else:
        peak = peak_rss_gb() if reset else float("nan")
    clean = images.image_to_tensor(image, (size, size))
    loss = protector.loss_for(clean, seed=0)
    x = clean.to(device).requires_grad_(True)
    count_cpu_attention_flops()
    with FlopCounterMode(display=False) as counter:
        loss(x, [torch.Generator().manual_seed(0)]).objective.sum().backward()
    flops = counter.get_total_flops()
    return {**spec, "load": load, "seconds": seconds, "peak_gb": peak, "tflop": flops / 1e12,
            "low_memory": protector.low_memory, "precision": protector.precision}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--methods", default="mist,advdm,advdm-,photoguard,sds,mist2,pid",
                        help="comma-separated NAME or NAME:param=value:... (default: every built-in method)")
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--precision", default="bf16")
    parser.add_argument("--steps", type=int, default=2, help="timed steps after one warm-up step (default: 2)")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return answer_child(args.child, run_one)
    if not runnable_precisions([args.precision], args.device):
        return 0
    methods = [parse_method(text) for text in args.methods.split(",") if text.strip()]
    specs = [{"method": name, "params": params, "size": args.size, "precision": args.precision, "steps": args.steps,
              "device": args.device} for name, params in methods]
    rows = run_children(__file__, specs, _row)
    append_results("Methods, run of ", HEADER, [_row(r) for r in rows])
    return 0 if len(rows) == len(methods) else 1


HEADER = ("| method | parameters | size | precision | checkpointing | s / step | attack peak GB | TFLOP / step "
          "| load average at start |\n|---|---|---|---|---|---|---|---|---|")


def _row(r: dict) -> str:
    params = ", ".join(f"{k}={v}" for k, v in r["params"].items()) or "defaults"
    return (f"| {r['method']} | {params} | {r['size']} | {r['precision']} | {'on' if r['low_memory'] else 'off'} "
            f"| {r['seconds']:.2f} | {r['peak_gb']:.2f} | {r['tflop']:.3f} | {r['load']} |")


if __name__ == "__main__":
    sys.exit(main())
