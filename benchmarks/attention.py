"""How fast this CPU runs the SD v1 UNet's attention, forward and backward, with each of PyTorch's ways to compute it.

    python benchmarks/attention.py [--size 512] [--precisions bf16,fp32] [--repeats 3]

The attention calls of one UNet forward at `--size` pixels are read from the real architecture (a forward on the meta
device records the shapes diffusers passes to `scaled_dot_product_attention`); each distinct shape then runs forward and
backward (gradients to the query, key and value, as an attack's step needs them) on random tensors with:

- `flash`: PyTorch's fused CPU kernel, what the engine uses (PyTorch picks it by default);
- `math`: the unfused product, softmax and product, each step a separate kernel;
- `padded-64`: the flash kernel with the head dimension zero-padded to 64 (the same result: the padded columns add
  nothing to the scores and are cut from the output), in case the kernel prefers a wider head. Its rate counts the
  unpadded attention's FLOPs, the useful work.

The table gives, per shape and method, the median seconds of one forward and backward over `--repeats` timed runs after
a warm-up, the FLOPs PyTorch's flop counter gives scaled-dot-product attention, and the rate; then the whole UNet pass's
attention (every call weighted by how often it occurs) per method, beside this CPU's matrix-product peak (`peak.py`).
Results are appended to benchmarks/RESULTS.md.
"""

from __future__ import annotations

import argparse
import collections
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench import append_results, runnable_precisions  # noqa: E402
from peak import measure  # noqa: E402

PADDED_HEAD = 64


def attention_shapes(size: int) -> collections.Counter:
    """(heads, query length, key length, head dim) of each attention call of one SD v1 UNet forward at `size` pixels,
    with how many times it occurs."""
    import torch
    import torch.nn.functional as F
    from diffusers import UNet2DConditionModel

    from mist.models import SD_V1

    shapes: collections.Counter = collections.Counter()
    original = F.scaled_dot_product_attention

    def recording(query, key, value, *args, **kwargs):
        shapes[(query.shape[1], query.shape[2], key.shape[2], query.shape[3])] += 1
        return original(query, key, value, *args, **kwargs)

    with torch.device("meta"):
        unet = UNet2DConditionModel(**SD_V1.unet)
        latent = torch.empty(1, 4, size // 8, size // 8)
        context = torch.empty(1, 77, SD_V1.unet["cross_attention_dim"])
        F.scaled_dot_product_attention = recording
        try:
            unet(latent, torch.tensor([500]), encoder_hidden_states=context)
        finally:
            F.scaled_dot_product_attention = original
    return shapes


def run_method(method: str, query, key, value):
    """The attention of `query`, `key`, `value` computed the way `method` names."""
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel

    if method == "math":
        with sdpa_kernel(SDPBackend.MATH):
            return F.scaled_dot_product_attention(query, key, value)
    head = query.shape[-1]
    if method == "padded-64" and head < PADDED_HEAD:
        query, key, value = (F.pad(t, (0, PADDED_HEAD - head)) for t in (query, key, value))
    with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
        return F.scaled_dot_product_attention(query, key, value, scale=head**-0.5)[..., :head]


def time_shape(shape: tuple[int, int, int, int], dtype, method: str, repeats: int) -> tuple[float, float]:
    """(median seconds, GFLOP) of one forward and backward of `method` on random tensors of `shape`; the FLOPs are those
    of the attention itself (counted on the flash kernel's call: padding's extra products are not useful work)."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from bench import count_cpu_attention_flops

    heads, queries, keys, head = shape
    generator = torch.Generator().manual_seed(0)
    query = torch.randn(1, heads, queries, head, generator=generator).to(dtype).requires_grad_(True)
    key, value = (torch.randn(1, heads, keys, head, generator=generator).to(dtype).requires_grad_(True)
                  for _ in range(2))

    def once() -> None:
        out = run_method(method, query, key, value)
        out.backward(torch.ones_like(out))

    count_cpu_attention_flops()
    with FlopCounterMode(display=False) as counter:
        out = run_method("flash", query, key, value)
        out.backward(torch.ones_like(out))
    once()  # the warm-up
    seconds = []
    for _ in range(repeats):
        started = time.perf_counter()
        once()
        seconds.append(time.perf_counter() - started)
    return statistics.median(seconds), counter.get_total_flops() / 1e9


def main() -> int:
    import torch

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--precisions", default="bf16,fp32")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--methods", default="flash,math,padded-64")
    args = parser.parse_args()
    dtypes = {"bf16": torch.bfloat16, "fp32": torch.float32}
    shapes = attention_shapes(args.size)
    rows = []
    for precision in runnable_precisions(args.precisions.split(","), "cpu"):
        peak = next(gflops for kernel, _, gflops in measure(dtypes[precision]) if kernel.startswith("matrix"))
        totals: dict[str, list[float]] = {}
        for shape, count in sorted(shapes.items(), key=lambda item: -item[0][1]):
            for method in args.methods.split(","):
                seconds, gflop = time_shape(shape, dtypes[precision], method, args.repeats)
                total = totals.setdefault(method, [0.0, 0.0])
                total[0] += count * seconds
                total[1] += count * gflop
                rows.append(f"| {precision} | {shape[0]} x {shape[1]} x {shape[2]} x {shape[3]} | {count} | {method} "
                            f"| {seconds * 1e3:.1f} | {gflop:.2f} | {gflop / seconds:.0f} | |")
                print(rows[-1], flush=True)
        for method, (seconds, gflop) in totals.items():
            rows.append(f"| {precision} | UNet pass, all calls | | {method} | {seconds * 1e3:.0f} | {gflop:.1f} "
                        f"| {gflop / seconds:.0f} | {gflop / seconds / peak:.0%} of {peak:.0f} |")
            print(rows[-1], flush=True)
    header = ("| precision | heads x queries x keys x head dim | calls per UNet pass | method | ms forward + backward "
              "| GFLOP | GFLOP/s | of matrix-product peak |\n|---|---|---|---|---|---|---|---|")
    append_results(f"SD v1 UNet attention at {args.size} x {args.size}, per method, ", header, rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
