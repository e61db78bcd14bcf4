"""Each model family (SD 2.x, SDXL, SD 3.x, Flux) served by the web UI and the HTTP service: the encoder-side methods
protect through both, saved in the family's real layouts; a denoiser-side method is refused before the job starts with
one line naming the model by its file name (the server's path never shown), not an exception or a 500."""

from __future__ import annotations

import io
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from mist.faces.webui import text as webui_text
from mist.faces.webui.pages import Settings, WebUI
from mist.models.architectures import ENCODER_SIDE_METHODS, FAMILIES
from mist.runner.jobs import ModelCache
from support.families import PIPELINES, save_folder, save_single_file, tiny_vae

NEW_FAMILIES = tuple(PIPELINES)
SINGLE_FILES = ("sdxl", "flux")  # the families served here from a single file; the others from a diffusers folder
# The models served here on which a denoiser-side method is refused before its job starts: a family whose denoiser Mist
# does not run, or a VAE alone (Flux's ae.safetensors).
REFUSED_EARLY = tuple(family for family in NEW_FAMILIES
                      if not FAMILIES[family].denoiser or (FAMILIES[family].flow and family in SINGLE_FILES))
ENCODER_SIDE = {"photoguard": {}, "pid": {}, "mist": {"mode": "textural"}}
DENOISER_SIDE = {"mist": {"mode": "fused"}, "mist2": {}}
TIMEOUT_S = 120  # the waits end on the job's state; this only turns a hang into a failure


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, Path]:
    """Each family's tiny VAE in its real layout: a single file for SDXL and Flux (ae.safetensors), a diffusers folder
    for SD 2.x and SD 3.x."""
    root = tmp_path_factory.mktemp("models")
    out = {}
    for number, family in enumerate(NEW_FAMILIES):
        vae = tiny_vae(family, seed=number)
        if family in SINGLE_FILES:
            out[family] = save_single_file(root / ("ae.safetensors" if family == "flux" else "sdxl.safetensors"),
                                           family, vae)
        else:
            out[family] = save_folder(root / f"{family}-diffusers", family, vae)
    return out


def _noise(path: Path, size: int = 40) -> Path:
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (size, size, 3), dtype=np.uint8)).save(path)
    return path


def _page_run(ui: WebUI, image: Path, method: str, params: dict) -> object:
    settings = Settings(steps=2, size=32, epsilon=8, method=method, params=params, original_size=False,
                        precision="fp32")
    ui.start("en", None)
    return ui.run("batch", None, None, [image], settings, "en", None)


# ---------------------------------------------------------------------------------------------------------- web UI


@pytest.mark.parametrize("family", NEW_FAMILIES)
def test_the_web_ui_protects_with_each_encoder_side_method_on_each_family(models, tmp_path, family):
    image = _noise(tmp_path / "art.png")
    ui = WebUI(ModelCache(str(models[family])), tmp_path / "work")
    for method, params in ENCODER_SIDE.items():
        result = _page_run(ui, image, method, params)
        assert len(result.outputs) == 1 and not result.messages, (method, result.status)
        change = np.abs(np.asarray(Image.open(result.outputs[0].png).convert("RGB"), dtype=int)
                        - np.asarray(Image.open(image).convert("RGB").resize((32, 32)), dtype=int))
        assert 0 < change.max() <= 8, method
    assert ui.engine.loads == 1  # the three methods share the VAE encoder loaded once


@pytest.mark.parametrize("family", REFUSED_EARLY)
@pytest.mark.parametrize("lang", ["en", "zh"])
def test_the_web_ui_refuses_a_denoiser_side_method_in_one_line_before_loading(models, tmp_path, family, lang):
    image = _noise(tmp_path / "art.png")
    ui = WebUI(ModelCache(str(models[family])), tmp_path / "work")
    for method, params in DENOISER_SIDE.items():
        ui.start(lang, None)
        result = ui.run("batch", None, None, [image], Settings(steps=2, size=32, method=method, params=params,
                                                                original_size=False), lang, None)
        assert not result.outputs and "\n" not in result.status
        assert result.status.startswith(webui_text.text(lang, "method_refused"))
        assert FAMILIES[family].title in result.status and models[family].name in result.status
        assert str(models[family].parent) not in result.status  # the server's folders are not the page's business
    assert ui.engine.loads == 0


def test_the_web_ui_page_builds_for_a_family_model(models, tmp_path):
    pytest.importorskip("gradio")
    from mist.faces.webui import app as webui_app

    demo = webui_app.build_app(WebUI(ModelCache(str(models["sdxl"])), tmp_path))
    assert any(getattr(block, "elem_id", None) == "mist-run" for block in demo.blocks.values())


# ------------------------------------------------------------------------------------------------------ HTTP service


def _service(tmp_path: Path, model: Path):
    from mist.faces.service.app import Service
    from mist.faces.service.store import JobStore, Limits, sqlite_url
    from mist.faces.service.worker import Worker

    data = tmp_path / "data"
    data.mkdir()
    store = JobStore(sqlite_url(data))
    models = ModelCache(str(model), "cpu")
    worker = Worker(store, data, models, retention_seconds=3600, lease_seconds=30, poll_seconds=0.05)
    return Service(store, data, worker, False, Limits(), 3600, str(models.where()))


def _png(size: int = 40) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(np.random.default_rng(1).integers(0, 256, (size, size, 3), dtype=np.uint8)).save(buffer, "PNG")
    return buffer.getvalue()


def _submit(http, fields: dict):
    return http.post("/v1/jobs", files=[("images", ("art.png", _png(), "image/png"))],
                     data={"steps": "2", "input-size": "32", "precision": "fp32", **fields})


def _finished(http, job_id: str) -> dict:
    deadline = time.monotonic() + TIMEOUT_S
    while (status := http.get(f"/v1/jobs/{job_id}").json())["state"] not in ("done", "failed", "cancelled"):
        assert time.monotonic() < deadline, status
        time.sleep(0.05)
    return status


@pytest.mark.parametrize("family", NEW_FAMILIES)
def test_the_service_protects_with_each_encoder_side_method_and_refuses_the_others_at_submission(models, tmp_path,
                                                                                                  family):
    """The refusals where the family's denoiser does not run; the tiny models here have only their VAE, so a family
    whose denoiser runs is asked only the encoder-side methods."""
    pytest.importorskip("fastapi")
    from fastapi.testclient import TestClient

    from mist.faces.service.app import create_app

    service = _service(tmp_path, models[family])
    try:
        with TestClient(create_app(service), client=("127.0.0.1", 50000)) as http:
            for method, params in ENCODER_SIDE.items():
                created = _submit(http, {"method": method, **params})
                assert created.status_code == 201, created.text
                status = _finished(http, created.json()["id"])
                assert status["state"] == "done", (method, status["error"], status["images"])
            asked = [{"method": m, **params} for m, params in DENOISER_SIDE.items()] + [{}]  # {}: Mist's fused default
            for fields in asked if family in REFUSED_EARLY else []:
                refused = _submit(http, fields)
                error = refused.json()["error"]
                assert refused.status_code == 422 and "\n" not in error, refused.text
                assert FAMILIES[family].title in error and error.startswith(f"{models[family].name}: ")
                assert ENCODER_SIDE_METHODS in error
        # nothing refused was queued, and the refused submissions' uploads were removed
        assert len(service.store.job_ids()) == len(ENCODER_SIDE)
        assert {p.name for p in (service.data / "jobs").iterdir()} == service.store.job_ids()
        assert service.worker.models.loads == 1
    finally:
        service.store.close()
