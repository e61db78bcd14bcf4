"""Run inside a private network namespace by tests/test_ray.py: a local Ray cluster (head + 1 worker node), then
`mist serve --ray` on each model the test names, asked for its status and sent each submission of `SUBMISSIONS`, and
those of `AFTER_RESTART` once its worker was killed (Ray restarts it). Writes what it saw as JSON to the file named by
its first argument; the test compares it with the plain service's."""

from __future__ import annotations

import json
import os
import signal
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from support.faces import submit  # noqa: E402
from support.ray_cluster import RESOURCE, Cluster, actor_pids  # noqa: E402
from support.serve import Server  # noqa: E402

# By model: the settings submitted with one 40 x 40 image, each refused or taken by the model's own checks.
SUBMISSIONS = {
    "vae": [{"method": "mist", "mode": "semantic"}, {"method": "mist2"}, {"method": "photoguard"}],
    "flux": [{"method": "mist2", "input-size": "40"}, {"method": "photoguard", "input-size": "40"}],
}
AFTER_RESTART = [{"method": "mist", "mode": "fused", "epsilon": "9"}]  # settings not asked before: a new question


def submitted(http, submissions: list[dict]) -> list:
    """The service's answer (status code, error) to each submission."""
    responses = [submit(http, fields) for fields in submissions]
    return [[response.status_code, response.json().get("error")] for response in responses]


def answers(http, name: str) -> dict:
    """The service's status (the methods it offers and refuses) and its answer (status code, error) to each
    submission of the model called `name`."""
    status = http.get("/v1/status").json()
    return {"methods": status["methods"], "methods_refused": status["methods_refused"],
            "submissions": submitted(http, SUBMISSIONS[name])}


def main(report_path: str, work: str, models: str) -> None:
    import httpx

    report: dict = {}
    cluster = Cluster(workers=1)
    try:
        for name, model in json.loads(models).items():
            server = Server(Path(work) / f"data-{name}", "--no-auth", "--ray", cluster.address, "--ray-resource",
                            RESOURCE, "--model", model)
            try:
                with httpx.Client(base_url=server.url, timeout=300) as http:
                    report[name] = answers(http, name)
                    killed = set(actor_pids())  # this cluster's only
                    for pid in killed:
                        os.kill(pid, signal.SIGKILL)
                    report[f"{name}_killed"] = len(killed)
                    report[name]["after_restart"] = submitted(http, AFTER_RESTART)
            finally:
                server.stop()
                report[f"{name}_log"] = server.log.read_text()[-3000:]
    finally:
        cluster.stop()
        Path(report_path).write_text(json.dumps(report))


if __name__ == "__main__":
    main(*sys.argv[1:])
