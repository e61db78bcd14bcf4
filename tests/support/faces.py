"""The web UI's and the HTTP service's faces on a given model, in-process, for the family tests: a service with its
own worker, a submission and the wait for its end, and small noise images."""

from __future__ import annotations

import io
import json
import time
from pathlib import Path

import numpy as np
from PIL import Image

from mist.runner.jobs import ModelCache

TIMEOUT_S = 120  # the waits end on the job's state; this only turns a hang into a failure


def noise_file(path: Path, size: tuple[int, int] = (40, 40), seed: int = 0) -> Path:
    """A PNG of random pixels, `size` = (width, height)."""
    Image.fromarray(np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).save(path)
    return path


def noise_png(size: tuple[int, int] = (40, 40), seed: int = 1) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).save(
        buffer, "PNG")
    return buffer.getvalue()


def service(tmp_path: Path, model: Path):
    """The `Service` `mist serve --model MODEL --device cpu --no-auth` builds (its worker not started), its data under
    `tmp_path`."""
    from mist.faces.service.server import ServeOptions, build_service, open_store

    options = ServeOptions(data=tmp_path / "data", model=str(model), device="cpu", no_auth=True)
    return build_service(options, open_store(options.data, None), ModelCache(str(model), "cpu"))


def submit(http, fields: dict, size: tuple[int, int] = (40, 40)):
    """POST one noise image named art.png with `fields` (2 steps, 32 pixels, fp32 unless given)."""
    return http.post("/v1/jobs", files=[("images", ("art.png", noise_png(size), "image/png"))],
                     data={"steps": "2", "input-size": "32", "precision": "fp32", **fields})


def finished(http, job_id: str) -> dict:
    """The job's status once it is done, failed or cancelled."""
    deadline = time.monotonic() + TIMEOUT_S
    while (status := http.get(f"/v1/jobs/{job_id}").json())["state"] not in ("done", "failed", "cancelled"):
        assert time.monotonic() < deadline, status
        time.sleep(0.05)
    return status


def done_job(http, fields: dict) -> tuple[list[str], bytes, bytes]:
    """Submit one image with `fields` (`submit`) and wait until its job is done: the answers as text (submission, the
    finished status, the results' ZIP), the first PNG and the ZIP."""
    created = submit(http, fields)
    assert created.status_code == 201, created.text
    status = finished(http, created.json()["id"])
    assert status["state"] == "done", status
    png, archive = http.get(status["images"][0]["url"]), http.get(status["results_url"])
    return [created.text, json.dumps(status), archive.text], png.content, archive.content
