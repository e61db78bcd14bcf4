"""Speed and memory of one Mist attack step on the full Stable Diffusion v1 architecture with random weights.

Weight values do not change the cost, so no checkpoint is needed. Each configuration runs in a fresh process (peak
memory is per process): it builds the networks directly in the precision under test, protects one image for
warm-up + `--steps` PGD steps through the real engine (`mist.engine.pipeline.Protector`), and reports the median seconds
per step after the warm-up, the peak memory of the attack (process RSS on the CPU, read as VmHWM after resetting it once
the model is built; max allocated on CUDA), the FLOPs of one step (torch.utils.flop_counter), the GFLOP/s achieved, and
on the CPU that rate as a fraction of the machine's practical peak in the same precision (`peak.py`: the fastest of a
large matrix product and a SD-sized convolution, measured at the start of the run).

    python benchmarks/bench.py --steps 2 --modes fused --sizes 512 --precisions fp32,bf16 --memory off,on

bf16 is measured only on a CPU that computes it natively (AVX512-BF16 or AMX; elsewhere PyTorch emulates it, many
times slower): elsewhere the scripts here say so in one line and leave it out (`runnable_precisions`). An older CPU's
kernels can be measured on a newer one by holding PyTorch below its instruction sets, e.g.
`ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2` for AVX2 alone.

`--variants as-is,no-heap-reuse` measures each configuration as the engine runs it and with one of its levers
switched off, or with a layout or compiler tried instead (see VARIANTS), so that each lever's gain is read from one
run. The warm-up step's time is reported too: it includes one-time costs such as torch.compile's.

Results are appended to benchmarks/RESULTS.md (a table per run, with the machine, the command and the date).
"""

from __future__ import annotations

import argparse
import datetime
import itertools
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import time
from functools import partial
from pathlib import Path

RESULTS = Path(__file__).with_name("RESULTS.md")


def build_full_size_model(dtype, decoder: bool = False):
    """SD v1's encoder and UNet, allocated directly in `dtype` with scale-preserving random weights, and random
    prompt embeddings (the text encoder plays no part in the attack's cost). With `decoder`, the VAE decoder too,
    drawn after the rest (whose weights stay as without it)."""
    import torch
    from diffusers import UNet2DConditionModel

    from mist.models import SD_V1, StableDiffusion
    from mist.models.components import PROMPTS, latent_decoder, latent_encoder

    with torch.device("meta"):
        unet = UNet2DConditionModel(**SD_V1.unet).to(dtype)
        encoder = latent_encoder(SD_V1).to(dtype)
        vae_decoder = latent_decoder(SD_V1).to(dtype) if decoder else None
    generator = torch.Generator().manual_seed(0)
    for module in (unet, encoder):
        _fill_random(module, generator)
    embeddings = {p: torch.randn(1, 77, 768, generator=generator) for p in PROMPTS}
    if vae_decoder is not None:
        _fill_random(vae_decoder, generator)
    model = StableDiffusion(SD_V1, encoder, unet, embeddings, "random-sd-v1", random_weights=True, decoder=vae_decoder)
    for module in (m for m in (encoder, unet, vae_decoder) if m is not None):
        module.eval().requires_grad_(False)
    return model


def _fill_random(module, generator) -> None:
    """Materialise a meta-device module on the CPU with scale-preserving random weights: matrices and kernels
    normal over the square root of their fan-in, norm weights 1, biases 0."""
    import torch

    module.to_empty(device="cpu")
    with torch.no_grad():
        for name, parameter in module.named_parameters():
            if parameter.dim() > 1:
                fan_in = parameter[0].numel()
                parameter.copy_(torch.randn(parameter.shape, generator=generator) / math.sqrt(fan_in))
            else:
                parameter.fill_(1.0 if name.endswith("weight") else 0.0)


def count_cpu_attention_flops() -> None:
    """Give torch.utils.flop_counter formulas for PyTorch's CPU flash-attention kernels, which it does not count (it has
    them for the CUDA kernels only): the same ones it uses for scaled-dot-product attention elsewhere."""
    import torch
    from torch.utils import flop_counter

    aten = torch.ops.aten
    if aten._scaled_dot_product_flash_attention_for_cpu in flop_counter.flop_registry:
        return

    @flop_counter.register_flop_formula(aten._scaled_dot_product_flash_attention_for_cpu)
    def _forward(query, key, value, *args, out_shape=None, **kwargs) -> int:
        return flop_counter.sdpa_flop_count(query, key, value)

    @flop_counter.register_flop_formula(aten._scaled_dot_product_flash_attention_for_cpu_backward)
    def _backward(grad_out, query, key, value, *args, out_shape=None, **kwargs) -> int:
        return flop_counter.sdpa_backward_flop_count(grad_out, query, key, value)


def peak_rss_reset() -> bool:
    """Reset the kernel's peak-RSS mark of this process (Linux), so VmHWM then measures only what follows."""
    try:
        with open("/proc/self/clear_refs", "w") as handle:
            handle.write("5")
        return True
    except OSError:
        return False


def peak_rss_gb() -> float:
    with open("/proc/self/status") as handle:
        for line in handle:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024**2
    return float("nan")


def _without_heap_reuse(protector) -> None:
    from mist.engine import cpu_tuning

    cpu_tuning._KEPT = ()  # the attack leaves glibc's malloc as it is


def _without_input_free_convolutions(protector) -> None:
    from mist.models import components

    components.keep_no_convolution_inputs = lambda network: None  # convolutions keep their inputs, as nn.Conv2d does


def _channels_last(protector) -> None:
    import torch

    from mist.models import components

    components.memory_format_for = lambda dtype: torch.channels_last  # every precision, float32 included


def _contiguous(protector) -> None:
    import torch

    from mist.models import components

    components.memory_format_for = lambda dtype: torch.contiguous_format  # every precision, bf16 included


# Variants of the engine a measuring process can run: each is called before the model is built (protector None) and
# again once the Protector has placed it. "compiled" is the engine's own option (`--compile`), passed to the Protector.
VARIANTS = {"as-is": lambda protector: None, "no-heap-reuse": _without_heap_reuse,
            "no-frozen-conv": _without_input_free_convolutions, "channels-last": _channels_last,
            "contiguous": _contiguous,
            "compiled": lambda protector: None}


def run_one(spec: dict) -> dict:
    """Measure one configuration in this process; returns the figures."""
    import torch
    from PIL import Image
    from torch.utils.flop_counter import FlopCounterMode

    from mist.engine.config import ProtectConfig
    from mist.models.device import pick_device
    from mist.engine.objectives import PRECISION_DTYPES
    from mist.engine.pipeline import Protector

    variant = VARIANTS[spec["variant"]]
    variant(None)
    device = pick_device(spec["device"])
    torch.manual_seed(0)
    model = build_full_size_model(PRECISION_DTYPES[spec["precision"]])
    config = ProtectConfig.of(mode=spec["mode"], steps=spec["steps"] + 1, input_size=spec["size"],
                              block_num=spec["blocks"], precision=spec["precision"], fast=spec["fast"])
    protector = Protector(model, config, device, low_memory=spec["low_memory"], hand_over=True,  # as the CLI does
                          compile=spec["variant"] == "compiled")
    variant(protector)
    image = Image.new("RGB", (spec["size"], spec["size"]))
    image.putdata([((i * 7) % 256, (i * 13) % 256, (i * 29) % 256) for i in range(spec["size"] ** 2)])
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    reset = peak_rss_reset()
    stamps = [time.perf_counter()]
    result = protector.protect(image, callback=lambda progress: stamps.append(time.perf_counter()))
    steps_per_tile = config.steps
    durations = [b - a for a, b in zip(stamps, stamps[1:], strict=False)]
    # Each tile's first step includes its warm-up (and the first tile's, the target latent): drop them.
    timed = [d for i, d in enumerate(durations) if i % steps_per_tile != 0]
    seconds = statistics.median(timed) * spec["blocks"] ** 2
    first = durations[0]
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated(device) / 1024**3
    else:
        peak = peak_rss_gb() if reset else float("nan")
    tile = spec["size"] // spec["blocks"]
    x = torch.zeros(1, 3, tile, tile, device=device).uniform_(-1, 1).requires_grad_(True)
    objective = protector.loss_for(x.detach(), seed=0)  # one tile's loss, its target resized to the tile
    count_cpu_attention_flops()
    with FlopCounterMode(display=False) as counter:
        objective(x, [torch.Generator().manual_seed(0)]).objective.sum().backward()
    flops = counter.get_total_flops() * spec["blocks"] ** 2
    return {**spec, "seconds": seconds, "peak_gb": peak, "tflop": flops / 1e12, "gflops": flops / 1e9 / seconds,
            "process_peak_gb": _process_peak_gb(), "device_type": device.type, "first_seconds": first,
            "compile_seconds": result.compile_seconds}


def _process_peak_gb() -> float:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2


_ISA_FLAGS = ("avx2", "avx512f", "avx512_bf16", "amx_bf16")  # the flags that decide which kernels run
_ISA_CAPS = ("ATEN_CPU_CAPABILITY", "ONEDNN_MAX_CPU_ISA", "DNNL_MAX_CPU_ISA", "MKL_ENABLE_INSTRUCTIONS")


def machine() -> str:
    """The machine in one line: CPU model and the instruction-set flags that decide its kernels (and any variable
    holding this process below them), cores, memory, GPU, Python and torch."""
    import torch

    cpu, flags = platform.processor() or platform.machine(), []
    try:
        with open("/proc/cpuinfo") as handle:
            lines = handle.read().splitlines()
        cpu = next(line.split(":", 1)[1].strip() for line in lines if line.startswith("model name"))
        flags = next(line for line in lines if line.startswith("flags")).split()
    except (OSError, StopIteration):
        pass
    cpu += f" ({' '.join(flag for flag in _ISA_FLAGS if flag in flags) or 'none of ' + '/'.join(_ISA_FLAGS)})"
    held = [f"{name}={os.environ[name]}" for name in _ISA_CAPS if os.environ.get(name)]
    cpu += f", held below them: {' '.join(held)}" if held else ""
    memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 1024**3
    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else "no GPU"
    return (f"{cpu}, {os.cpu_count()} cores, {memory:.0f} GiB RAM, {gpu}; Python {platform.python_version()}, "
            f"torch {torch.__version__}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=3, help="timed steps after one warm-up step (default: 3)")
    parser.add_argument("--modes", default="textural,semantic,fused")
    parser.add_argument("--sizes", default="256,512,768")
    parser.add_argument("--blocks", default="1,2")
    parser.add_argument("--precisions", default="fp32,bf16")
    parser.add_argument("--memory", default="off,on", help="gradient checkpointing off and/or on")
    parser.add_argument("--fast", default="no", help="exact and/or score-distillation semantic gradient: no,yes")
    parser.add_argument("--variants", default="as-is", help=f"one configuration each: {', '.join(VARIANTS)}")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return answer_child(args.child, run_one)

    def split(text):
        return [v.strip() for v in text.split(",") if v.strip()]

    unknown = set(split(args.variants)) - set(VARIANTS)
    if unknown:
        parser.error(f"--variants: unknown {', '.join(sorted(unknown))} (known: {', '.join(VARIANTS)})")
    specs = []
    for mode, size, blocks, precision, memory, fast, variant in itertools.product(
            split(args.modes), map(int, split(args.sizes)), map(int, split(args.blocks)),
            runnable_precisions(split(args.precisions), args.device),
            split(args.memory), split(args.fast), split(args.variants)):
        if fast == "yes" and mode == "textural":
            continue  # fast mode only changes the semantic gradient
        specs.append({"mode": mode, "size": size, "blocks": blocks, "precision": precision,
                      "low_memory": memory == "on", "fast": fast == "yes", "steps": args.steps,
                      "device": args.device, "variant": variant})
    peaks = cpu_peaks(sorted({spec["precision"] for spec in specs}))
    rows = run_children(__file__, specs, partial(_row, peaks=peaks))
    append_results("Run of ", HEADER, [_row(r, peaks) for r in rows])
    return 0 if len(rows) == len(specs) else 1


def runnable_precisions(precisions: list[str], device: str = "auto") -> list[str]:
    """`precisions` less bf16 where it would run on a CPU without native bf16 (PyTorch emulates it there, many times
    slower: nothing worth measuring), said in one line; on a GPU, or a CPU with AVX512-BF16 or AMX, all of them."""
    from mist.models.device import cpu_has_fast_bf16, pick_device

    if "bf16" not in precisions or pick_device(device).type != "cpu" or cpu_has_fast_bf16():
        return precisions
    print("bf16 skipped: this CPU has no native bf16 (AVX512-BF16 or AMX), or this process is held below it "
          "(ATEN_CPU_CAPABILITY, ONEDNN_MAX_CPU_ISA)", flush=True)
    return [precision for precision in precisions if precision != "bf16"]


def cpu_peaks(precisions: list[str]) -> dict[str, float]:
    """This CPU's practical peak GFLOP/s per precision (`peak.peak_gflops`), printed as measured."""
    import torch

    from mist.engine.objectives import PRECISION_DTYPES
    from peak import peak_gflops

    peaks = {}
    for precision in precisions:
        peaks[precision] = peak_gflops(PRECISION_DTYPES[precision])
        print(f"CPU peak, {precision}: {peaks[precision]:.1f} GFLOP/s ({torch.get_num_threads()} threads)", flush=True)
    return peaks


RESULT = "RESULT "  # how a measuring process's line with its figures begins


def answer_child(spec: str, run_one) -> int:
    """The measuring process's side of `run_children`: print `run_one(spec)`'s figures for the parent to read."""
    print(RESULT + json.dumps(run_one(json.loads(spec))), flush=True)
    return 0


def run_children(script: str, specs: list[dict], row) -> list[dict]:
    """Measure each spec in a fresh process (`script --child SPEC`, which answers with `answer_child`): peak memory is
    per process. Prints each result as `row(result)` as it comes, and each failure with the end of its error output."""
    rows = []
    for spec in specs:
        started = time.perf_counter()
        done = subprocess.run([sys.executable, script, "--child", json.dumps(spec)], capture_output=True, text=True)
        lines = [line for line in done.stdout.splitlines() if line.startswith(RESULT)]
        if done.returncode or not lines:
            print(f"failed: {spec}\n{done.stderr[-2000:]}", file=sys.stderr)
            continue
        rows.append(json.loads(lines[-1][len(RESULT):]))
        print(f"{row(rows[-1])}  ({time.perf_counter() - started:.0f} s)", flush=True)
    return rows


HEADER = ("| mode | size | blocks | precision | checkpointing | semantic gradient | variant | s / step "
          "| warm-up step s | compile s | attack peak GB | process peak GB | TFLOP / step | GFLOP/s | of CPU peak |\n"
          "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")


def _row(r: dict, peaks: dict[str, float]) -> str:
    peak = peaks.get(r["precision"]) if r["device_type"] == "cpu" else None
    share = f"{r['gflops'] / peak:.0%} of {peak:.0f}" if peak else "n/a"
    return (f"| {r['mode']} | {r['size']} | {r['blocks']} | {r['precision']} | {'on' if r['low_memory'] else 'off'} "
            f"| {'fast (SDS)' if r['fast'] else 'exact'} | {r['variant']} | {r['seconds']:.2f} "
            f"| {r['first_seconds']:.1f} | {r['compile_seconds']:.1f} | {r['peak_gb']:.2f} "
            f"| {r['process_peak_gb']:.2f} | {r['tflop']:.3f} | {r['gflops']:.1f} | {share} |")


def append_results(title: str, header: str, rows: list[str]) -> None:
    """Append a table to RESULTS.md: `title` with the time, the machine and the command that ran, then the rows."""
    if not rows:
        return
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    command = " ".join(["python", f"benchmarks/{Path(sys.argv[0]).name}", *sys.argv[1:]])
    block = [f"\n## {title}{stamp}\n", f"Machine: {machine()}  ", f"Command: `{command}`\n", header, *rows, ""]
    if not RESULTS.exists():
        RESULTS.write_text("# Benchmark results\n\nWritten by `benchmarks/bench.py`; see its docstring for what is "
                           "measured and how.\n", encoding="utf-8")
    with RESULTS.open("a", encoding="utf-8") as handle:
        handle.write("\n".join(block))


if __name__ == "__main__":
    sys.exit(main())
