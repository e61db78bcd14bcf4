"""Run inside a private network namespace by tests/test_ray.py: a local Ray cluster (head + 2 worker nodes), then
`mist protect --ray` with a worker killed mid-image, then `mist serve --ray` with a job submitted through the client.
Writes what it saw as JSON to the file named by its first argument; the test checks it."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from support.ray_cluster import RESOURCE, Cluster, kill_a_busy_actor  # noqa: E402
from support.serve import MIST, Server  # noqa: E402
SETTINGS = ["--model", "tiny-random", "--steps", "30", "--input-size", "32", "--device", "cpu"]


def main(report_path: str, images: str, work: str) -> None:
    work_dir = Path(work)
    report: dict = {}
    cluster = Cluster(workers=2)
    try:
        protect = subprocess.Popen([*MIST, "protect", images, "-o", str(work_dir / "ray-out"), *SETTINGS,
                                    "--ray", cluster.address, "--ray-resource", RESOURCE],
                                   stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        report["killed"] = kill_a_busy_actor(protect)
        output, _ = protect.communicate(timeout=600)
        report["protect"] = {"code": protect.returncode, "output": output[-3000:]}

        from mist.faces.client import Client

        server = Server(work_dir / "data", "--ray", cluster.address, "--ray-resource", RESOURCE)
        try:
            with Client(server.url, token=server.token) as client:
                pictures = sorted(Path(images).glob("*.png"))
                status = client.wait(client.submit(pictures, steps=30, input_size=32)["id"], poll_seconds=0.2,
                                     timeout=600)
                report["serve"] = {"state": status["state"], "images": [i["state"] for i in status["images"]],
                                   "files": [str(p) for p in client.download(status["id"], work_dir / "serve-out")]}
        finally:
            server.stop()
            report["serve_log"] = server.log.read_text()[-3000:]
    finally:
        cluster.stop()
        Path(report_path).write_text(json.dumps(report))


if __name__ == "__main__":
    main(*sys.argv[1:])
