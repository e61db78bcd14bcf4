"""Throughput of `--ray` with 1, 2 and 4 local worker nodes on the tiny random model (images per minute, and how close
to linear), each worker node a separate `ray start` process with one slot and one CPU thread.

The cluster runs in a private network namespace with only loopback (Ray's servers listen on every interface; see
tests/support/ray_cluster.py, which this uses). For each worker count: start the cluster, protect a warm-up batch
(one image per worker: the actors load the model), then time `--images` images through the job runner with
`RayModels`, as `mist protect --ray` runs them; then stop the cluster.

    python benchmarks/ray_scaling.py --workers 1,2,4 --images 16 --steps 40 --size 64

Results are appended to benchmarks/RESULTS.md. A machine with fewer cores than workers cannot scale past its cores.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
RESULTS = Path(__file__).with_name("RESULTS.md")


def measure(workers: int, images: int, steps: int, size: int) -> float:
    """Seconds to protect `images` images on a fresh cluster of `workers` worker nodes (after a warm-up)."""
    from PIL import Image
    from support.ray_cluster import RESOURCE, Cluster

    from mist.engine.config import ProtectConfig
    from mist.runner.jobs import Job, run_jobs
    from mist.runner.ray_pool import RayModels

    class Quiet:
        def __getattr__(self, name):
            return lambda *args, **kwargs: None

    cluster = Cluster(workers)
    try:
        import ray

        models = RayModels(cluster.address, "tiny-random", "cpu", resource=RESOURCE)
        config = ProtectConfig.of(steps=steps, input_size=size)
        with tempfile.TemporaryDirectory() as tmp:
            folder = Path(tmp)

            def batch(name: str, count: int) -> list[Job]:
                jobs = []
                for n in range(count):
                    source = folder / name / f"{n}.png"
                    source.parent.mkdir(exist_ok=True)
                    Image.new("RGB", (size, size), (n * 13 % 256, 60, 120)).save(source)
                    jobs.append(Job(source, folder / f"{name}-out" / f"{n}.png"))
                return jobs

            assert run_jobs(batch("warm", workers), config, models, Quiet()).ok
            started = time.perf_counter()
            summary = run_jobs(batch("timed", images), config, models, Quiet())
            seconds = time.perf_counter() - started
            assert summary.ok and len(summary.done) == images, summary.failed
        ray.shutdown()
        return seconds
    finally:
        cluster.stop()


def child(args: argparse.Namespace) -> None:
    results = {}
    for workers in args.workers:
        results[workers] = measure(workers, args.images, args.steps, args.size)
        print(f"{workers} worker(s): {args.images} images in {results[workers]:.1f} s", flush=True)
    Path(args.out).write_text(json.dumps(results))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workers", type=lambda text: [int(n) for n in text.split(",")], default=[1, 2, 4])
    parser.add_argument("--images", type=int, default=16)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.out:
        return child(args)
    from support.ray_cluster import in_private_network, private_network_problem

    problem = private_network_problem()
    if problem:
        sys.exit(f"cannot run: {problem}")
    load_before = os.getloadavg()[0]
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "results.json"
        in_private_network([sys.executable, __file__, "--workers", ",".join(map(str, args.workers)), "--images",
                            str(args.images), "--steps", str(args.steps), "--size", str(args.size), "--out",
                            str(out)], timeout=3600, check=True)
        results = {int(k): v for k, v in json.loads(out.read_text()).items()}
    load_after = os.getloadavg()[0]
    base = args.images / results[min(results)] * 60 / min(results)
    rows = "\n".join(f"| {w} | {args.images / s * 60:.1f} | {args.images / s * 60 / (base * w):.0%} |"
                     for w, s in sorted(results.items()))
    with RESULTS.open("a") as report:
        report.write(f"""
### Service: Ray scale-out, local workers ({datetime.date.today()}, {platform.processor() or platform.machine()}, \
{os.cpu_count()} CPUs, load {load_before:.1f} before, {load_after:.1f} after)

`python benchmarks/ray_scaling.py --workers {','.join(map(str, args.workers))} --images {args.images} --steps \
{args.steps} --size {args.size}`; tiny random model, a fresh local cluster per row (head + N worker nodes, one slot and
one CPU thread each, loopback-only network namespace), warm-up excluded.

| worker nodes | images / minute | of linear (N x one worker's rate) |
|---|---|---|
{rows}
""")
    print(rows)


if __name__ == "__main__":
    main()
