"""The HTTP service's own cost, on the tiny random model (the attack is kept small on purpose: what is measured is what
the service adds around it), with `mist serve` on 127.0.0.1 only.

1. Overhead per job: the same one-image job N times, sequentially, through the API (submit, poll every 20 ms until
   done, download the PNG) against the job runner called in-process with the model already loaded (what `mist
   protect` does once its process has started); the difference is the API's overhead per job.
2. Load test: `--jobs` jobs (200) submitted at once from as many threads, then all awaited: submission latency (p50,
   p95, max), status codes (no 5xx allowed), and whether every job finished with its image downloadable. Bounded: a
   fixed number of requests, a deadline, and the server is stopped at the end.

    python benchmarks/service.py --repeats 10 --jobs 200

Results are appended to benchmarks/RESULTS.md.
"""

from __future__ import annotations

import argparse
import datetime
import io
import os
import platform
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from support.serve import Server  # noqa: E402  (mist serve in its own process, as the tests start it)

RESULTS = Path(__file__).with_name("RESULTS.md")
SETTINGS = {"steps": 2, "input_size": 32}


def picture_bytes(n: int) -> bytes:
    from PIL import Image

    buffer = io.BytesIO()
    Image.new("RGB", (32, 32), (n % 256, (7 * n) % 256, 90)).save(buffer, "PNG")
    return buffer.getvalue()


def api_job(http, image: bytes) -> float:
    started = time.perf_counter()
    job = http.post("/v1/jobs", files=[("images", ("a.png", image, "image/png"))],
                    data={k: str(v) for k, v in SETTINGS.items()}).json()["id"]
    while (status := http.get(f"/v1/jobs/{job}").json())["state"] not in ("done", "failed", "cancelled"):
        time.sleep(0.02)
    assert status["state"] == "done", status
    assert http.get(status["images"][0]["url"]).status_code == 200
    return time.perf_counter() - started


def runner_job(models, folder: Path, image: bytes, n: int) -> float:
    from mist.engine.config import ProtectConfig
    from mist.runner.jobs import Job, run_jobs

    source = folder / f"in{n}.png"
    source.write_bytes(image)

    class Quiet:
        def __getattr__(self, name):
            return lambda *args, **kwargs: None

    started = time.perf_counter()
    summary = run_jobs([Job(source, folder / f"out{n}" / "a.png")], ProtectConfig.of(**SETTINGS), models, Quiet())
    assert summary.ok
    return time.perf_counter() - started


def overhead(url: str, repeats: int, work: Path) -> dict:
    import httpx

    from mist.runner.jobs import ModelCache

    image = picture_bytes(1)
    models = ModelCache("tiny-random", "cpu")
    runner_job(models, work, image, -1)  # load the model
    with httpx.Client(base_url=url, timeout=120) as http:
        api_job(http, image)  # the server's model loads on its first job
        api = [api_job(http, image) for _ in range(repeats)]
    local = [runner_job(models, work, image, n) for n in range(repeats)]
    return {"api": statistics.median(api), "runner": statistics.median(local)}


def load_test(url: str, jobs: int, deadline_seconds: float) -> dict:
    import httpx

    latencies: list[float] = []
    codes: list[int] = []
    ids: list[str] = []
    lock = threading.Lock()
    start = threading.Barrier(jobs)

    def submit(n: int) -> None:
        with httpx.Client(base_url=url, timeout=120) as http:
            start.wait()
            began = time.perf_counter()
            response = http.post("/v1/jobs", files=[("images", (f"p{n}.png", picture_bytes(n), "image/png"))],
                                 data={k: str(v) for k, v in SETTINGS.items()})
            took = time.perf_counter() - began
        with lock:
            latencies.append(took)
            codes.append(response.status_code)
            if response.status_code == 201:
                ids.append(response.json()["id"])

    threads = [threading.Thread(target=submit, args=(n,)) for n in range(jobs)]
    began = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    deadline = time.monotonic() + deadline_seconds
    finished: dict[str, str] = {}
    downloadable = 0
    with httpx.Client(base_url=url, timeout=120) as http:
        while len(finished) < len(ids) and time.monotonic() < deadline:
            for job in ids:
                if job not in finished:
                    state = http.get(f"/v1/jobs/{job}").json()["state"]
                    if state in ("done", "failed", "cancelled"):
                        finished[job] = state
            time.sleep(0.5)
        all_done = time.perf_counter() - began
        for job in ids:
            if finished.get(job) == "done":
                downloadable += http.get(f"/v1/jobs/{job}/results").status_code == 200
    latencies.sort()
    return {
        "jobs": jobs, "accepted": len(ids), "codes": {code: codes.count(code) for code in sorted(set(codes))},
        "server_errors": sum(code >= 500 for code in codes), "done": sum(s == "done" for s in finished.values()),
        "downloadable": downloadable, "p50": latencies[len(latencies) // 2],
        "p95": latencies[min(len(latencies) - 1, int(0.95 * len(latencies)))], "max": latencies[-1],
        "all_done_seconds": all_done,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--jobs", type=int, default=200)
    parser.add_argument("--deadline", type=float, default=1200, help="seconds to wait for the load test's jobs")
    args = parser.parse_args()
    load_before = os.getloadavg()[0]
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        server = Server(work / "data", "--no-auth", "--max-queued", "1000", "--max-images", "10")
        url = server.url
        try:
            cost = overhead(url, args.repeats, work)
            print(f"per job: API {cost['api']:.3f} s, job runner in-process {cost['runner']:.3f} s", flush=True)
            load = load_test(url, args.jobs, args.deadline)
            print(load, flush=True)
        finally:
            server.stop()
    load_after = os.getloadavg()[0]
    with RESULTS.open("a") as out:
        out.write(f"""
### Service: API overhead and load test ({datetime.date.today()}, {platform.processor() or platform.machine()}, \
{os.cpu_count()} CPUs, load {load_before:.1f} before, {load_after:.1f} after)

`python benchmarks/service.py --repeats {args.repeats} --jobs {args.jobs}`; tiny random model, one 32 x 32 image per
job, {SETTINGS['steps']} steps, `mist serve` on 127.0.0.1 (SQLite).

| measure | value |
|---|---|
| one-image job through the API (submit, poll every 20 ms, download), median of {args.repeats} | {cost['api']:.3f} s |
| the same job through the job runner in-process, model loaded, median | {cost['runner']:.3f} s |
| API overhead per job | {cost['api'] - cost['runner']:.3f} s |
| load test: jobs submitted at once / accepted (201) | {load['jobs']} / {load['accepted']} |
| status codes | {', '.join(f'{code}: {count}' for code, count in load['codes'].items())} |
| 5xx responses | {load['server_errors']} |
| submission latency p50 / p95 / max | {load['p50']:.2f} / {load['p95']:.2f} / {load['max']:.2f} s |
| jobs done / results downloadable | {load['done']} / {load['downloadable']} |
| time until all {load['jobs']} jobs were done | {load['all_done_seconds']:.0f} s |
""")


if __name__ == "__main__":
    main()
