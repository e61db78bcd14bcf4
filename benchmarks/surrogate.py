"""Cost of the surrogate-training methods (aspl, mist2-lora) on the full Stable Diffusion v1 architecture with random
weights: seconds per PGD step, seconds per fine-tuning step of the surrogate, and from them seconds per round at the
method's default schedule, with the attack's peak memory.

Per method, in a fresh process (`bench.run_children`): build the networks in the precision under test, then protect
one image through the real engine (`mist.engine.pipeline.Protector`) with one PGD step per round, so that the
fine-tuning runs early: aspl with `--steps 1` fine-tunes its clone `--surrogate-steps` times before its one PGD step;
mist2-lora needs `--steps 2` (it fine-tunes after a round). The fine-tuning calls are timed where they run
(`Surrogate.train`); the PGD steps are the rest of the attack's time, divided by their number (the first step's warm-up
included, so an upper bound). A round at the defaults is then
    aspl:       round_steps PGD steps + 2 x surrogate_steps fine-tuning steps (the clone on the clean images, the
                surrogate on the protected ones), defaults 10 + 2 x 10;
    mist2-lora: round_steps PGD steps + surrogate_steps fine-tuning steps, defaults 30 + 10.
Peak memory is the process's RSS peak during the attack after the model is built (max allocated on CUDA). Random
weights measure cost only, never protection strength.

    python benchmarks/surrogate.py --methods aspl,mist2-lora --size 512 --precision fp32 --surrogate-steps 1

Results are appended to benchmarks/RESULTS.md with the machine, the load average, the command and the date.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

from bench import (answer_child, append_results, build_full_size_model, peak_rss_gb, peak_rss_reset,
                   run_children, runnable_precisions)

PGD_STEPS = {"aspl": 1, "mist2-lora": 2}  # the fewest PGD steps that include one fine-tuning call


def run_one(spec: dict) -> dict:
    """Measure one method in this process; returns the figures."""
    import torch
    from PIL import Image

    from mist.engine.config import ProtectConfig
    from mist.models.device import pick_device
    from mist.engine.finetune import Surrogate
    from mist.engine.methods import get_method
    from mist.engine.objectives import PRECISION_DTYPES
    from mist.engine.pipeline import Protector

    load = " ".join(f"{v:.2f}" for v in os.getloadavg())
    device = pick_device(spec["device"])
    name, size, steps = spec["method"], spec["size"], PGD_STEPS[spec["method"]]
    torch.manual_seed(0)
    model = build_full_size_model(PRECISION_DTYPES[spec["precision"]])
    params = {"round_steps": 1, "surrogate_steps": spec["surrogate_steps"]}
    config = ProtectConfig(method=name, params=params, steps=steps, input_size=size, precision=spec["precision"])
    protector = Protector(model, config, device, hand_over=True)
    training: list[tuple[int, float]] = []  # (steps, seconds) per fine-tuning call
    original = Surrogate.train

    def timed(self, images, text, steps=None, generator=None, callback=None):
        started = time.perf_counter()
        losses = original(self, images, text, steps, generator, callback)
        training.append((len(losses), time.perf_counter() - started))
        return losses

    Surrogate.train = timed
    image = Image.new("RGB", (size, size))
    image.putdata([((i * 7) % 256, (i * 13) % 256, (i * 29) % 256) for i in range(size**2)])
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    reset = peak_rss_reset()
    started = time.perf_counter()
    protector.protect(image)
    total = time.perf_counter() - started
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated(device) / 1024**3
    else:
        peak = peak_rss_gb() if reset else float("nan")
    train_steps, train_seconds = sum(n for n, _ in training), sum(s for _, s in training)
    per_train = train_seconds / train_steps
    per_pgd = (total - train_seconds) / steps
    defaults = get_method(name).Params()
    per_round_train = (2 if name == "aspl" else 1) * defaults.surrogate_steps
    return {**spec, "load": load, "pgd_seconds": per_pgd, "train_seconds": per_train, "train_steps": train_steps,
            "round_seconds": defaults.round_steps * per_pgd + per_round_train * per_train,
            "round": f"{defaults.round_steps} PGD + {per_round_train} fine-tuning", "peak_gb": peak,
            "low_memory": protector.low_memory, "precision": protector.precision}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--methods", default="aspl,mist2-lora", help="comma-separated (default: %(default)s)")
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--precision", default="fp32")
    parser.add_argument("--surrogate-steps", type=int, default=1,
                        help="fine-tuning steps per call measured (default: %(default)s)")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return answer_child(args.child, run_one)
    if not runnable_precisions([args.precision], args.device):
        return 0
    names = [name.strip() for name in args.methods.split(",") if name.strip()]
    unknown = [name for name in names if name not in PGD_STEPS]
    if unknown:
        parser.error(f"--methods: {', '.join(unknown)} is not a surrogate-training method ({', '.join(PGD_STEPS)})")
    specs = [{"method": name, "size": args.size, "precision": args.precision, "device": args.device,
              "surrogate_steps": args.surrogate_steps} for name in names]
    rows = run_children(__file__, specs, _row)
    append_results("Surrogate-training methods, run of ", HEADER, [_row(r) for r in rows])
    return 0 if len(rows) == len(names) else 1


HEADER = ("| method | size | precision | checkpointing | s / PGD step | s / fine-tuning step | round at defaults "
          "| s / round at defaults | attack peak GB | load average at start |\n"
          "|---|---|---|---|---|---|---|---|---|---|")


def _row(r: dict) -> str:
    return (f"| {r['method']} | {r['size']} | {r['precision']} | {'on' if r['low_memory'] else 'off'} "
            f"| {r['pgd_seconds']:.1f} | {r['train_seconds']:.1f} | {r['round']} | {r['round_seconds']:.0f} "
            f"| {r['peak_gb']:.2f} | {r['load']} |")


if __name__ == "__main__":
    sys.exit(main())
