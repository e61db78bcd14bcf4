"""`mist serve` as users start it, in its own process on 127.0.0.1: the Python client against it, and the server
killed with -9 in the middle of a job and started again (nothing accepted is lost, nothing finished is redone)."""

from __future__ import annotations

import io
import json
import os
import subprocess
import time
from pathlib import Path

import pytest
from PIL import Image

pytest.importorskip("fastapi")
from mist.faces.client import Client, ServiceError  # noqa: E402
from support.serve import MIST, Server, free_port  # noqa: E402

# The kill comes once the first image is done; the other four images' steps are the margin that leaves the job
# unfinished then, which grows with the machine's load like the time between two status polls does.
IMAGES = 5

@pytest.fixture
def images(tmp_path, painting) -> list[Path]:
    folder = tmp_path / "art"
    folder.mkdir()
    paths = []
    for n in range(IMAGES):
        path = folder / f"picture{n}.png"
        painting.rotate(30 * n).resize((32, 32)).save(path)
        paths.append(path)
    return paths


def wait_for(check, timeout: float = 120, what: str = "") -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def test_killed_with_minus_9_the_server_loses_no_job_and_redoes_no_image(tmp_path, images):
    data = tmp_path / "data"
    server = Server(data)
    token = server.token  # created and printed by the first start only
    assert token is not None
    try:
        with Client(server.url, token=token) as client:
            job = client.submit(images, steps=20, input_size=32)["id"]
            wait_for(lambda: client.status(job)["images"][0]["state"] == "done", what="the first image done")
            assert client.status(job)["images"][-1]["state"] != "done"
        finished = data / "jobs" / job / "out" / "picture0.png"
        before = finished.stat()
        server.kill()
        assert not server.process.returncode == 0
        server = Server(data, token=token)
        assert "mist_" not in server.log.read_text()  # not created, nor printed, again
        with Client(server.url, token=token) as client:
            status = client.wait(job, poll_seconds=0.1, timeout=300)
            assert status["state"] == "done", status
            assert [image["state"] for image in status["images"]] == ["done"] * IMAGES
            written = client.download(job, tmp_path / "results")
        after = finished.stat()
        assert (after.st_ino, after.st_mtime_ns) == (before.st_ino, before.st_mtime_ns)  # not redone
        assert sorted(path.name for path in written) == [f"picture{n}.png" for n in range(IMAGES)]
        for path in written:
            assert Image.open(path).size == (32, 32)
    finally:
        server.stop()


def test_an_evaluation_killed_with_minus_9_resumes_without_redoing_its_finished_units(tmp_path, images):
    data = tmp_path / "data"
    server = Server(data)
    token = server.token
    try:
        with Client(server.url, token=token) as client:
            job = client.submit_evaluation(images[:1], images[:1], purify="", strengths=(1,), steps=300)["id"]
            wait_for(lambda: (client.status(job)["units"]["done"] or 0) >= 1, what="a unit of work done")
        server.kill()
        server = Server(data, token=token)
        with Client(server.url, token=token) as client:
            status = client.wait(job, poll_seconds=0.1, timeout=300)
            assert status["state"] == "done" and status["kind"] == "evaluate", status
            report = client.evaluate(images[:1], images[:1], tmp_path / "again", purify="", strengths=(1,), steps=2)
            client.download(job, tmp_path / "report")
    finally:
        server.stop()
    record = json.loads((tmp_path / "report" / "results.json").read_text())
    assert record["units_reused"] >= 1 and record["images"][0]["protected"] == "protected/picture0.png"
    assert report.is_file() and json.loads((tmp_path / "again" / "results.json").read_text())["units_reused"] == 0


def test_the_python_client(tmp_path, images):
    data = tmp_path / "data"
    server = Server(data)
    try:
        token = subprocess.run([*MIST, "serve", "token", "create", "tester", "--data", str(data)],
                               capture_output=True, text=True, check=True).stdout.strip().splitlines()[-1]
        with Client(server.url) as anonymous, pytest.raises(ServiceError) as refused:
            anonymous.submit(images[:1], steps=1)
        assert refused.value.status == 401
        with Client(server.url, token=token) as client:
            target = tmp_path / "pattern.png"
            Image.new("RGB", (32, 32), (200, 30, 30)).save(target)
            paths = client.protect(images[:2], tmp_path / "out", steps=2, input_size=32, mode="textural",
                                   target=target, timeout=300)
            assert sorted(path.name for path in paths) == ["picture0.png", "picture1.png"]
            again = client.submit(images[:1], steps=2, idempotency_key="k1")
            assert client.submit(images[:1], steps=2, idempotency_key="k1")["id"] == again["id"]
            with pytest.raises(ServiceError) as bad:
                client.submit(images[:1], epsilon=999)
            assert bad.value.status == 400 and "epsilon" in bad.value.message
            assert "mist_images_done_total" in client.metrics()
        listed = subprocess.run([*MIST, "serve", "token", "list", "--data", str(data)], capture_output=True,
                                text=True, check=True).stdout
        assert "tester" in listed and token not in listed
        blocked = subprocess.run([*MIST, "serve", "--data", str(data), "--port", str(free_port()), "--model",
                                  "tiny-random"], capture_output=True, text=True, timeout=120)
        assert blocked.returncode != 0 and "another mist serve is using this data folder" in blocked.stderr
    finally:
        server.stop()
    with Image.open(io.BytesIO((tmp_path / "out" / "picture0.png").read_bytes())) as png:
        assert png.text["mist:method"] == "mist" and "target" in png.text["mist:settings"]
    assert os.path.getsize(tmp_path / "out" / "picture1.png") > 0
