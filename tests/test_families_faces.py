"""Each model family (SD 2.x, SDXL, SD 3.x, Flux) served by the web UI and the HTTP service: the encoder-side methods
protect through both, saved in the family's real layouts; a denoiser-side method is refused before the job starts with
one line naming the model by its file name (the server's path never shown), not an exception or a 500."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from mist.faces.webui import text as webui_text
from mist.faces.webui.pages import Settings, WebUI
from mist.models.architectures import ENCODER_SIDE_METHODS, FAMILIES
from mist.runner.jobs import ModelCache
from support import faces
from support.families import PIPELINES, save_folder, save_single_file, tiny_vae

NEW_FAMILIES = tuple(PIPELINES)
SINGLE_FILES = ("sdxl", "flux")  # the families served here from a single file; the others from a diffusers folder
# The models served here on which a denoiser-side method is refused before its job starts: a family whose denoiser Mist
# does not run, or a VAE alone (Flux's ae.safetensors).
REFUSED_EARLY = tuple(family for family in NEW_FAMILIES
                      if not FAMILIES[family].denoiser or (FAMILIES[family].flow and family in SINGLE_FILES))
ENCODER_SIDE = {"photoguard": {}, "pid": {}, "mist": {"mode": "textural"}}
DENOISER_SIDE = {"mist": {"mode": "fused"}, "mist2": {}}


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


def _page_run(ui: WebUI, image: Path, method: str, params: dict) -> object:
    settings = Settings(steps=2, size=32, epsilon=8, method=method, params=params, original_size=False,
                        precision="fp32")
    ui.start("en", None)
    return ui.run("batch", None, None, [image], settings, "en", None)


# ---------------------------------------------------------------------------------------------------------- web UI


@pytest.mark.parametrize("family", NEW_FAMILIES)
def test_the_web_ui_protects_with_each_encoder_side_method_on_each_family(models, tmp_path, family):
    image = faces.noise_file(tmp_path / "art.png")
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
    image = faces.noise_file(tmp_path / "art.png")
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


@pytest.mark.parametrize("family", NEW_FAMILIES)
def test_the_service_protects_with_each_encoder_side_method_and_refuses_the_others_at_submission(models, tmp_path,
                                                                                                  family):
    """The refusals where the family's denoiser does not run; the tiny models here have only their VAE, so a family
    whose denoiser runs is asked only the encoder-side methods."""
    pytest.importorskip("fastapi")
    from fastapi.testclient import TestClient

    from mist.faces.service.app import create_app

    service = faces.service(tmp_path, models[family])
    try:
        with TestClient(create_app(service), client=("127.0.0.1", 50000)) as http:
            for method, params in ENCODER_SIDE.items():
                created = faces.submit(http, {"method": method, **params})
                assert created.status_code == 201, created.text
                status = faces.finished(http, created.json()["id"])
                assert status["state"] == "done", (method, status["error"], status["images"])
            asked = [{"method": m, **params} for m, params in DENOISER_SIDE.items()] + [{}]  # {}: Mist's fused default
            for fields in asked if family in REFUSED_EARLY else []:
                refused = faces.submit(http, fields)
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


# ------------------------------------------------------------------------------------- what the faces offer


def _choices(demo, elem_id: str) -> tuple[list, object]:
    block = next(b for b in demo.blocks.values() if getattr(b, "elem_id", None) == elem_id)
    return [value for _, value in block.choices], block.value


@pytest.mark.parametrize("family", REFUSED_EARLY)
def test_the_page_offers_only_the_methods_and_modes_the_model_runs_and_says_why_in_both_languages(models, tmp_path,
                                                                                                  family):
    pytest.importorskip("gradio")
    from mist.faces.webui import app as webui_app

    ui = WebUI(ModelCache(str(models[family])), tmp_path)
    demo = webui_app.build_app(ui)
    methods, chosen = _choices(demo, "mist-method")
    assert methods == ["mist", "photoguard", "pid"] and chosen == "mist"
    assert _choices(demo, "mist-mode") == (["textural"], "textural")  # fused and semantic need the denoiser
    for lang in ("en", "zh"):
        banner = ui.banner(lang)
        assert webui_text.text(lang, "not_offered", methods="advdm").split("advdm")[0] in banner
        assert "advdm" in banner and "mist2" in banner and FAMILIES[family].title in banner
        assert models[family].name in banner and str(models[family].parent) not in banner
    assert ui.engine.loads == 0


def test_the_page_offers_every_method_and_mode_for_a_model_that_runs_them(tmp_path):
    pytest.importorskip("gradio")
    from mist.engine.methods import list_methods
    from mist.faces.webui import app as webui_app

    ui = WebUI(ModelCache("tiny-random"), tmp_path)
    demo = webui_app.build_app(ui)
    assert _choices(demo, "mist-method") == ([m.name for m in list_methods()], "mist")
    assert _choices(demo, "mist-mode") == (["textural", "semantic", "fused"], "fused")
    assert webui_text.text("en", "not_offered", methods="").split(":")[0] not in ui.banner("en")


@pytest.mark.parametrize("family", REFUSED_EARLY)
def test_the_service_status_lists_the_methods_the_model_runs_and_why_not_the_others(models, tmp_path, family):
    pytest.importorskip("fastapi")
    from fastapi.testclient import TestClient

    from mist.faces.service.app import create_app

    service = faces.service(tmp_path, models[family])
    try:
        with TestClient(create_app(service, manage_worker=False), client=("127.0.0.1", 50000)) as http:
            status = http.get("/v1/status").json()
        assert status["methods"] == ["mist", "photoguard", "pid"]
        assert {"advdm", "sds", "mist2", "aspl"} <= set(status["methods_refused"])
        for reason in status["methods_refused"].values():
            assert reason.startswith(f"{models[family].name}: ") and str(models[family].parent) not in reason
        assert service.worker.models.loads == 0
    finally:
        service.store.close()
