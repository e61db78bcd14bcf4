"""Cost of one PGD step per model family and method kind, on each family's full-size architecture with random weights.

    python benchmarks/families.py --steps 2 [--configs sd1-encoder,sdxl-denoiser-1024,...] [--precision auto]

Encoder side (photoguard, pid, mist --mode textural): the VAE encoder forward and backward to the image, for the VAE of
SD 1.x and 2.x (the same), SDXL, SD 3.x and Flux, built from the configs Mist ships. Denoiser side (mist's semantic and
fused modes, advdm, sds...): the encoder, then the denoiser forward and backward to the image through the latent, for
the SD 2.x UNet (865M parameters: cross-attention 1024 wide, linear projections, head dims 5/10/20/20), the SDXL base
UNet (2.6B: three levels, 1/2/10 transformer layers, cross-attention 2048 wide, with random "text_time" added
conditioning: a pooled text embedding and six size numbers), SD 3.5 medium's MMDiT (2.2B: 24 joint blocks of 24 heads
of 64, the first 13 with a second image attention; 333 text tokens) and Flux dev's transformer (11.9B: 19 double and
38 single blocks of 24 heads of 128; 512 text tokens; guidance input), all from their published architecture numbers,
the transformers behind the wrappers Mist runs them through. The step is the loss of the kind written out (a squared
distance of the scaled posterior mean; the prediction's mean squared error from its target, noise for a UNet or
velocity for a flow, of a sampled, noised latent, plus that distance), not the engine's Protector: `bench.py` measures
the engine's own SD 1.x step.

Each configuration runs in a fresh process: the networks are allocated directly in the precision (bf16 where the CPU has
avx512_bf16 or amx_bf16, else fp32; channels-last in bf16 as the engine places them), one step is counted by
torch.utils.flop_counter (CPU attention kernels included, `bench.count_cpu_attention_flops`) and serves as warm-up, then
`--steps` steps are timed (median reported). Peak memory is the process's VmHWM, reset once the weights exist (the
attack's) and over the whole process. A process whose memory passes `--memory-cap-gb` (default: the memory available
when the run starts, less 1 GB), or that leaves the machine (shared) under 1 GB available, is stopped, and one whose
weights alone are over the cap is not started: its FLOPs are counted on the meta device (shapes only, first, in a
process of its own) and the table says why it was not measured. The load average
(`/proc/loadavg`) is read before and after each configuration, as the machine may be shared. Results are appended to
benchmarks/RESULTS.md.
"""

from __future__ import annotations

import argparse
import datetime
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from mist.models.architectures import FAMILIES  # noqa: E402

from bench import (RESULT, RESULTS, _fill_random, answer_child, count_cpu_attention_flops, machine,  # noqa: E402
                   peak_rss_gb, peak_rss_reset)

# The published UNet designs (diffusers UNet2DConditionModel arguments), as Mist ships them to read single files with:
# SD 2.x: stabilityai/stable-diffusion-2-1's (and 2-base's) UNet; SDXL: stabilityai/stable-diffusion-xl-base-1.0's.
UNETS = {key: FAMILIES[key].denoiser_configs()["unet"] for key in ("sd2", "sdxl")}
# The published transformer designs (diffusers' SD3Transformer2DModel / FluxTransformer2DModel arguments), from
# stabilityai/stable-diffusion-3.5-medium's and black-forest-labs/FLUX.1-dev's transformer/config.json; Mist reads
# them from a folder's config or a file's weights, so it ships no copy.
TRANSFORMERS = {
    "sd3": {"sample_size": 128, "patch_size": 2, "in_channels": 16, "out_channels": 16, "num_layers": 24,
            "attention_head_dim": 64, "num_attention_heads": 24, "joint_attention_dim": 4096,
            "caption_projection_dim": 1536, "pooled_projection_dim": 2048, "pos_embed_max_size": 384,
            "qk_norm": "rms_norm", "dual_attention_layers": tuple(range(13))},
    "flux": {"patch_size": 1, "in_channels": 64, "num_layers": 19, "num_single_layers": 38, "attention_head_dim": 128,
             "num_attention_heads": 24, "joint_attention_dim": 4096, "pooled_projection_dim": 768,
             "guidance_embeds": True, "axes_dims_rope": (16, 56, 56)},
}
# Text tokens the transformers attend to: SD 3.x's CLIP-L + CLIP-G (77, padded to T5's width) beside T5's 256 (the
# pipeline's default length); Flux dev's T5 512.
TEXT_TOKENS = {"sd3": 77 + 256, "flux": 512}
PROMPT_TOKENS = 77
POOLED_WIDTH = 1280  # SDXL's pooled text embedding (OpenCLIP-G's projection); 6 size numbers make up the rest of 2816
# What each family's VAE row stands for (SD 2.x's VAE is SD 1.x's).
ENCODER_TITLES = {"sd1": "SD 1.x / 2.x", "sdxl": "SDXL", "sd3": "SD 3.x", "flux": "Flux.1"}
DENOISER_TITLES = {"sd2": "SD 2.x", "sdxl": "SDXL base", "sd3": "SD 3.5 medium", "flux": "Flux.1 dev"}
MIN_AVAILABLE_GB = 1.0  # a measuring process is stopped when the machine's free memory falls below this (shared)
CONFIGS = ([f"{family}-encoder" for family in ENCODER_TITLES] + ["sd2-denoiser", "sdxl-denoiser", "sdxl-denoiser-1024",
                                                                  "sd3-denoiser", "flux-denoiser"])


def parse_config(name: str) -> dict:
    """`FAMILY-KIND[-SIZE]` as a spec: family, kind (encoder or denoiser), size in pixels (512 unless given)."""
    parts = name.split("-")
    known = {"encoder": ENCODER_TITLES, "denoiser": DENOISER_TITLES}
    if len(parts) not in (2, 3) or parts[0] not in known.get(parts[1], ()):
        raise ValueError(f"--configs: unknown configuration {name!r} (known: {', '.join(CONFIGS)})")
    return {"config": name, "family": parts[0], "kind": parts[1], "size": int(parts[2]) if len(parts) == 3 else 512}


def build(spec: dict, dtype, device: str = "cpu") -> dict:
    """The networks of `spec` on `device` ("meta": shapes only), weights random in `dtype` (scale-preserving, as in
    bench.py), frozen: the VAE encoder with its 1x1 convolution (`encoder`), and for the denoiser kind the denoiser
    (a UNet, or a transformer behind Mist's own wrapper) and random conditioning, plus the latent's scale and shift."""
    import torch

    from mist.models.architectures import FAMILIES, encoder_only
    from mist.models.components import latent_encoder

    vae_family = "sd1" if spec["family"] == "sd2" else spec["family"]
    arch = encoder_only(FAMILIES[vae_family], FAMILIES[vae_family].vae_config(), spec["config"])
    with torch.device("meta"):
        networks = {"encoder": latent_encoder(arch).to(dtype)}
        if spec["kind"] == "denoiser":
            networks["denoiser"] = denoiser(spec["family"]).to(dtype)
    generator = torch.Generator().manual_seed(0)
    for module in networks.values():
        if device == "meta":
            module.to_empty(device="meta")
        else:
            _fill_random(module, generator)
        module.eval().requires_grad_(False)
    out = {**networks, "scale": arch.latent_scale, "shift": arch.latent_shift, "flow": spec["family"] in TRANSFORMERS}
    if spec["kind"] == "denoiser":
        out.update(conditioning(spec, generator, dict(device=device, dtype=dtype)))
    return out


def denoiser(family: str):
    """The published denoiser of `family` (built in the current default device): SD 2.x's or SDXL's UNet, or SD 3.5
    medium's or Flux dev's transformer in the wrapper Mist runs it through (`mist.models.flow_denoisers`)."""
    from diffusers import FluxTransformer2DModel, SD3Transformer2DModel, UNet2DConditionModel

    from mist.models.flow_denoisers import FLUX_GUIDANCE, FluxDenoiser, SD3Denoiser

    if family == "sd3":
        return SD3Denoiser(SD3Transformer2DModel(**TRANSFORMERS["sd3"]))
    if family == "flux":
        return FluxDenoiser(FluxTransformer2DModel(**TRANSFORMERS["flux"]), FLUX_GUIDANCE)
    return UNet2DConditionModel(**UNETS[family])


def conditioning(spec: dict, generator, placed: dict) -> dict:
    """Random text conditioning of the shapes `spec`'s denoiser takes: token states (`context`), and SDXL's added
    conditioning (a pooled embedding and six size numbers: original size, crop corner, target size) or a flow
    transformer's pooled embedding (`added`)."""
    import torch

    family, size = spec["family"], spec["size"]
    if family in TRANSFORMERS:
        pooled = TRANSFORMERS[family]["pooled_projection_dim"]
        return {"context": torch.randn(1, TEXT_TOKENS[family], TRANSFORMERS[family]["joint_attention_dim"],
                                       generator=generator).to(**placed),
                "added": torch.randn(1, pooled, generator=generator).to(**placed)}
    context = torch.randn(1, PROMPT_TOKENS, UNETS[family]["cross_attention_dim"], generator=generator).to(**placed)
    added = ({"text_embeds": torch.randn(1, POOLED_WIDTH, generator=generator).to(**placed),
              "time_ids": torch.tensor([[size, size, 0, 0, size, size]], **placed)} if family == "sdxl" else None)
    return {"context": context, "added": added}


def step(nets: dict, x, generator) -> None:
    """One PGD step's work: the kind's loss of the image `x` and its gradient to `x` (no weight gradients)."""
    import torch

    moments = nets["encoder"].quant_conv(nets["encoder"].encoder(x))
    mean, logvar = moments.chunk(2, dim=1)
    loss = ((mean - nets["shift"]) * nets["scale"]).square().sum()  # a textural/PhotoGuard-style distance
    if "denoiser" in nets:
        noise = torch.randn(mean.shape, generator=generator).to(mean)
        latent = (mean + torch.exp(0.5 * logvar) * noise - nets["shift"]) * nets["scale"]
        # any time costs the same: the middle of the schedule (a flow's s = 0.5; a UNet's alpha-bar 0.5 at t = 500)
        if nets["flow"]:
            noisy, target = 0.5 * latent + 0.5 * noise, noise - latent
            predicted = nets["denoiser"](noisy, torch.tensor([500.0], device=x.device), nets["context"], nets["added"])
        else:
            noisy, target = 0.5**0.5 * latent + 0.5**0.5 * noise, noise
            predicted = nets["denoiser"](noisy, torch.tensor([500], device=x.device),
                                         encoder_hidden_states=nets["context"], added_cond_kwargs=nets["added"]).sample
        loss = loss - (predicted.float() - target.float()).square().mean()
    loss.backward()  # the flop counter's module hooks need backward(), not autograd.grad
    x.grad.sign()
    x.grad = None


def image(spec: dict, dtype, device: str = "cpu"):
    import torch

    from mist.models.components import memory_format_for

    size = spec["size"]
    x = torch.rand(1, 3, size, size, generator=torch.Generator().manual_seed(1)) * 2 - 1
    return x.to(device=device, dtype=dtype).contiguous(memory_format=memory_format_for(dtype)).requires_grad_(True)


def counted_step(nets: dict, x) -> float:
    """TFLOP of one step, forward and backward, counted by torch.utils.flop_counter."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    count_cpu_attention_flops()
    with FlopCounterMode(display=False) as counter:
        step(nets, x, torch.Generator().manual_seed(0))
    return counter.get_total_flops() / 1e12


def run_one(spec: dict) -> dict:
    """Measure one configuration in this process (or only count its FLOPs on the meta device with `spec["meta"]`)."""
    import torch

    from mist.engine.objectives import PRECISION_DTYPES
    from mist.models.components import memory_format_for

    dtype = PRECISION_DTYPES[spec["precision"]]
    device = "meta" if spec.get("meta") else "cpu"
    nets = build(spec, dtype, device)
    parameters = sum(p.numel() for key in ("encoder", "denoiser") if key in nets for p in nets[key].parameters())
    if device == "meta":
        return {**spec, "tflop": counted_step(nets, image(spec, dtype, device)),
                "weights_gb": parameters * dtype.itemsize / 1e9}
    for module in (nets["encoder"], nets.get("denoiser")):
        if module is not None:
            module.to(memory_format=memory_format_for(dtype))
    reset = peak_rss_reset()
    x = image(spec, dtype)
    started = time.perf_counter()
    tflop = counted_step(nets, x)  # also the warm-up
    warm_up = time.perf_counter() - started
    seconds = []
    for n in range(spec["steps"]):
        started = time.perf_counter()
        step(nets, x, torch.Generator().manual_seed(n))
        seconds.append(time.perf_counter() - started)
    return {**spec, "parameters_m": parameters / 1e6, "tflop": tflop, "warm_up_s": warm_up,
            "seconds": statistics.median(seconds), "attack_peak_gb": peak_rss_gb() if reset else float("nan"),
            "process_peak_gb": _process_peak_gb()}


def _process_peak_gb() -> float:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2


def load_average() -> str:
    with open("/proc/loadavg") as handle:
        return " ".join(handle.read().split()[:3])


def available_gb() -> float:
    with open("/proc/meminfo") as handle:
        return next(int(line.split()[1]) for line in handle if line.startswith("MemAvailable:")) / 1024**2


def _rss_gb(pid: int) -> float:
    try:
        with open(f"/proc/{pid}/status") as handle:
            return next((int(line.split()[1]) for line in handle if line.startswith("VmRSS:")), 0) / 1024**2
    except OSError:
        return 0.0


def measure(spec: dict, cap_gb: float) -> dict:
    """`spec` measured in a fresh process, stopped if its memory passes `cap_gb`, or not started when its weights
    alone are over it (then its FLOPs are counted on the meta device); with the load average before and after."""
    before = load_average()
    counted = _counted(spec)
    if counted and counted["weights_gb"] > cap_gb:
        result = {**spec, "tflop": counted["tflop"], "stopped_gb": 0.0,
                  "why": f"not run: its weights alone take {counted['weights_gb']:.1f} GB"}
        return {**result, "load_before": before, "load_after": load_average()}
    child = subprocess.Popen([sys.executable, __file__, "--child", json.dumps(spec)], stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True)
    peak, short = 0.0, False
    while child.poll() is None:
        peak = max(peak, _rss_gb(child.pid))
        short = short or available_gb() < MIN_AVAILABLE_GB
        if peak > cap_gb or short:
            child.kill()
        time.sleep(0.5)
    out, err = child.communicate()
    lines = [line for line in out.splitlines() if line.startswith(RESULT)]
    if lines:
        result = json.loads(lines[-1][len(RESULT):])
    elif peak > cap_gb or short:
        why = "the machine's free memory fell under 1 GB (shared)" if short else "over the cap"
        result = {**spec, "stopped_gb": min(cap_gb, peak), "why": why,
                  "tflop": counted["tflop"] if counted else None}
    else:
        result = {**spec, "error": err.strip().splitlines()[-1] if err.strip() else f"exit {child.returncode}"}
    return {**result, "load_before": before, "load_after": load_average()}


def _counted(spec: dict) -> dict | None:
    """`spec`'s FLOPs and weights counted on the meta device in a fresh process (None if that failed)."""
    counted = subprocess.run([sys.executable, __file__, "--child", json.dumps({**spec, "meta": True})],
                             capture_output=True, text=True)
    meta = [line for line in counted.stdout.splitlines() if line.startswith(RESULT)]
    return json.loads(meta[-1][len(RESULT):]) if meta else None


HEADER = ("| family | method kind | parts in the step | size | precision | parameters (M) | TFLOP / step | s / step "
          "| warm-up s | attack peak GB | process peak GB | load before | load after |\n"
          "|---|---|---|---|---|---|---|---|---|---|---|---|---|")


def row(r: dict) -> str:
    title = (ENCODER_TITLES if r["kind"] == "encoder" else DENOISER_TITLES)[r["family"]]
    kind = "encoder side" if r["kind"] == "encoder" else "denoiser side"
    parts = ("VAE encoder" if r["kind"] == "encoder" else
             f"VAE encoder + {'transformer' if r['family'] in TRANSFORMERS else 'UNet'}")
    tflop = f"{r['tflop']:.3f}" if r.get("tflop") is not None else "?"
    if "seconds" in r:
        figures = (f"{r['parameters_m']:.1f} | {tflop} | {r['seconds']:.2f} | {r['warm_up_s']:.1f} | "
                   f"{r['attack_peak_gb']:.2f} | {r['process_peak_gb']:.2f}")
    elif "stopped_gb" in r:
        where = f"stopped at {r['stopped_gb']:.1f} GB: " if r["stopped_gb"] else ""
        figures = f" | {tflop} (meta) | {where}{r['why']} | | | "
    else:
        figures = f" | {tflop} | failed: {r['error'][:120]} | | | "
    return (f"| {title} | {kind} | {parts} | {r['size']} | {r['precision']} | {figures} | {r['load_before']} | "
            f"{r['load_after']} |")


def default_precision() -> str:
    """bf16 where the CPU has avx512_bf16 or amx_bf16 (fast bf16 matrix units), else fp32."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return "fp32"
    return "bf16" if " avx512_bf16" in flags or " amx_bf16" in flags else "fp32"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=2, help="timed steps after the counted warm-up step (default 2)")
    parser.add_argument("--configs", default=",".join(CONFIGS), help=f"default: {','.join(CONFIGS)}")
    parser.add_argument("--precision", default="auto", choices=("auto", "fp32", "bf16"))
    parser.add_argument("--memory-cap-gb", type=float, default=None)
    parser.add_argument("--no-record", action="store_true", help="print only; do not append to RESULTS.md")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return answer_child(args.child, run_one)
    precision = default_precision() if args.precision == "auto" else args.precision
    specs = [{**parse_config(name), "steps": args.steps, "precision": precision} for name in args.configs.split(",")]
    cap = args.memory_cap_gb or available_gb() - 1.0
    started = datetime.datetime.now(datetime.timezone.utc)
    print(f"{machine()}; memory cap {cap:.1f} GB\n{HEADER}", flush=True)
    rows = []
    for spec in specs:
        rows.append(row(measure(spec, cap)))
        print(rows[-1], flush=True)
    if not args.no_record:
        command = "python benchmarks/families.py " + " ".join(sys.argv[1:])
        with RESULTS.open("a") as handle:
            handle.write(f"\n## Cost per family, run of {started:%Y-%m-%d %H:%M} UTC\n\nMachine: {machine()}  \n"
                         f"Command: `{command.strip()}` (processes stopped over {cap:.1f} GB)\n\n{HEADER}\n"
                         + "\n".join(rows) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
