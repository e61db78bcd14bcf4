"""Scale-out on a real local Ray cluster (a head and two worker nodes, separate processes) inside a private network
namespace that has only loopback: `mist protect --ray` with a worker process killed in the middle of an image (retried,
no output lost or duplicated, every output the same bytes as a local run), `mist serve --ray` through the client, and
the checks a Ray server makes at submission (its workers' model asked), the same as a server without Ray."""

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
REFUSALS = Path(__file__).parent / "support" / "ray_refusals.py"


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


def test_a_ray_server_refuses_at_submission_what_its_workers_model_cannot_run(network, tmp_path):
    """A lone Flux VAE (ae.safetensors) and a Flux diffusers folder served through Ray: `/v1/status` lists the methods
    the workers' model runs and why not the others, and each submission is refused (or taken) at once with the status
    code and the one line the service without Ray gives: a denoiser-side method on the VAE (422), a size the Flux
    transformer cannot take (400), the model named by its file or folder name, never its path; a new question after
    the worker was killed (and restarted by Ray) is answered alike."""
    from fastapi.testclient import TestClient

    from mist.faces.service.app import create_app
    from support import faces
    from support.families import save_single_file, tiny_vae
    from support.flows import save_folder, tiny_parts
    from support.ray_refusals import AFTER_RESTART, answers, submitted

    models = {"vae": save_single_file(tmp_path / "ae.safetensors", "flux", tiny_vae("flux")),
              "flux": save_folder(tmp_path / "flux-diffusers", tiny_parts("flux"))}
    report_file = tmp_path / "report.json"
    paths = json.dumps({name: str(model) for name, model in models.items()})
    run = in_private_network([sys.executable, str(REFUSALS), str(report_file), str(tmp_path / "ray"), paths],
                             timeout=900, capture_output=True, text=True)
    assert report_file.exists(), run.stdout[-3000:] + run.stderr[-3000:]
    report = json.loads(report_file.read_text())
    for name, model in models.items():
        service = faces.service(tmp_path / f"plain-{name}", model)
        try:
            with TestClient(create_app(service, manage_worker=False), client=("127.0.0.1", 50000)) as http:
                plain = answers(http, name) | {"after_restart": submitted(http, AFTER_RESTART)}
        finally:
            service.store.close()
        assert name in report, report.get(f"{name}_log")
        assert report[name] == plain, report.get(f"{name}_log")
        assert report[f"{name}_killed"] == 1
    assert [code for code, _ in report["vae"]["submissions"] + report["vae"]["after_restart"]] == [422, 422, 201, 422]
    assert [code for code, _ in report["flux"]["submissions"]] == [400, 201]
    assert "multiple of 16" in report["flux"]["submissions"][0][1]
    assert {"mist2", "advdm"} <= set(report["vae"]["methods_refused"]) and "photoguard" in report["vae"]["methods"]
    for refused in report["vae"]["methods_refused"].values():
        assert refused.startswith("ae.safetensors: ") and str(tmp_path) not in refused
