"""Scale-out on a real local Ray cluster (a head and two worker nodes, separate processes) inside a private network
namespace that has only loopback: `mist protect --ray` with a worker process killed in the middle of an image (retried,
no output lost or duplicated, every output the same bytes as a local run), and `mist serve --ray` through the client."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("ray")
pytest.importorskip("fastapi")
from support.ray_cluster import in_private_network, private_network_problem  # noqa: E402

from mist.faces.cli import main as mist_main  # noqa: E402

SCENARIO = Path(__file__).parent / "support" / "ray_scenario.py"


@pytest.fixture(scope="module")
def network():
    problem = private_network_problem()
    if problem:
        pytest.skip(f"Ray's servers listen on every interface; this test runs them in a private network: {problem}")


def test_ray_workers_share_the_images_and_survive_a_killed_worker(network, tmp_path, painting):
    images = tmp_path / "art"
    images.mkdir()
    for n in range(4):
        painting.rotate(20 * n).resize((32, 32)).save(images / f"p{n}.png")
    report_file = tmp_path / "report.json"
    run = in_private_network([sys.executable, str(SCENARIO), str(report_file), str(images), str(tmp_path)],
                             timeout=1500, capture_output=True, text=True)
    assert report_file.exists(), run.stdout[-3000:] + run.stderr[-3000:]
    report = json.loads(report_file.read_text())
    assert report["protect"]["code"] == 0, report["protect"]["output"]
    assert report["killed"] > 0
    # The same images protected here without Ray, with one thread as each Ray worker has (on some CPUs PyTorch's
    # kernels split their sums differently with another thread count, and the sign steps amplify the last bit):
    # byte for byte the same files, none missing, none extra.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert mist_main([
            "protect", str(images), "-o", str(tmp_path / "local-out"), "--model", "tiny-random", "--steps", "30",
            "--input-size", "32", "--device", "cpu", "-q"]) == 0
    finally:
        torch.set_num_threads(threads)
    local = sorted((tmp_path / "local-out").glob("*.png"))
    remote = sorted((tmp_path / "ray-out").glob("*.png"))
    assert [p.name for p in remote] == [p.name for p in local] == [f"p{n}.png" for n in range(4)]
    assert [p.read_bytes() for p in remote] == [p.read_bytes() for p in local]
    assert report["serve"]["state"] == "done", report["serve_log"]
    assert report["serve"]["images"] == ["done"] * 4
    served = sorted(Path(path) for path in report["serve"]["files"])
    assert [p.read_bytes() for p in served] == [p.read_bytes() for p in local]
