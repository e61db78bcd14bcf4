"""The denoiser-side methods served whole: a tiny SD 2.x v-prediction diffusers folder, a tiny SDXL single file and a
tiny SD 3 diffusers folder, each protecting an image with Mist's fused mode through the web UI and the HTTP service
(the output within the budget, the metadata naming the model by its file name, no server path in any answer); and
the size an SD 3.x transformer cannot take (sides not multiples of 16, in block mode of each tile) refused by the
command line, the web UI and the service before the model is loaded."""

from __future__ import annotations

import io
import json
import zipfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from mist.common.images import read_png_text
from mist.faces.webui.pages import Settings, WebUI
from mist.runner.jobs import ModelCache
from support import denoisers, faces, flows
from support.denoisers import TINY_SDXL

EPSILON = 8
SIZE = 32


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, Path]:
    """The three served models in their real layouts, named as their users would find them."""
    root = tmp_path_factory.mktemp("served")
    return {"sd2-v": denoisers.save_folder(root / "sd2-v-diffusers", denoisers.tiny_parts("sd2", 0), "v_prediction"),
            "sdxl": denoisers.save_single_file(root / "sdxl-tiny.safetensors", denoisers.tiny_parts("sdxl", 1)),
            "sd3": flows.save_folder(root / "sd3-diffusers", flows.tiny_parts("sd3", 2))}


@pytest.fixture(autouse=True)
def tiny_sdxl_shapes(monkeypatch):
    """SDXL's shipped UNet and text encoder shapes read as the tiny model's: a single file does not carry them (Mist
    ships the published ones), and a face, unlike the Python API, takes no shapes beside a model's path."""
    from mist.models import architectures

    shipped = architectures._asset_text
    tiny = json.dumps({"unet": TINY_SDXL.unet, "text": TINY_SDXL.text, "text_2": TINY_SDXL.text_2})
    monkeypatch.setattr(architectures, "_asset_text",
                        lambda name: tiny if name == "denoiser_sdxl.json" else shipped(name))


def _within_budget(png: Path, original: Image.Image) -> None:
    protected = np.asarray(Image.open(png).convert("RGB"), dtype=int)
    change = np.abs(protected - np.asarray(original.convert("RGB").resize((SIZE, SIZE)), dtype=int))
    assert protected.shape == (SIZE, SIZE, 3) and 0 < change.max() <= EPSILON


def _named_by_file_name(text: dict[str, str], model: Path) -> None:
    assert text["mist:model"] == model.name and text["mist:method"] == "mist"
    assert str(model.parent) not in json.dumps(text)


@pytest.mark.parametrize("name", ["sd2-v", "sdxl", "sd3"])
def test_the_web_ui_protects_with_the_fused_mode_on_a_whole_model(models, tmp_path, name):
    image = faces.noise_file(tmp_path / "art.png")
    ui = WebUI(ModelCache(str(models[name])), tmp_path / "work")
    settings = Settings(steps=2, size=SIZE, epsilon=EPSILON, method="mist", params={"mode": "fused"},
                        original_size=False, precision="fp32")
    ui.start("en", None)
    result = ui.run("batch", None, None, [image], settings, "en", None)
    assert len(result.outputs) == 1 and not result.messages, result.status
    _within_budget(result.outputs[0].png, Image.open(image))
    _named_by_file_name(read_png_text(result.outputs[0].png), models[name])
    assert str(models[name].parent) not in result.status + ui.banner("en") + ui.banner("zh")
    assert ui.offer.refused == {}  # a whole model runs every method


@pytest.mark.parametrize("name", ["sd2-v", "sdxl", "sd3"])
def test_the_service_protects_with_the_fused_mode_on_a_whole_model(models, tmp_path, name):
    pytest.importorskip("fastapi")
    from fastapi.testclient import TestClient

    from mist.faces.service.app import create_app

    service = faces.service(tmp_path, models[name])
    answers = []
    try:
        with TestClient(create_app(service), client=("127.0.0.1", 50000)) as http:
            answers, png, archive = faces.done_job(http, {"method": "mist", "mode": "fused", "epsilon": str(EPSILON)})
            answers.append(http.get("/v1/status").text)
        got = tmp_path / "got.png"
        got.write_bytes(png)
        _within_budget(got, Image.open(io.BytesIO(faces.noise_png())))
        _named_by_file_name(read_png_text(got), models[name])
        with zipfile.ZipFile(io.BytesIO(archive)) as zipped:
            assert zipped.namelist() == ["art.png"]
    finally:
        service.store.close()
    assert not any(str(models[name].parent) in answer or str(service.data) in answer for answer in answers)


def test_a_model_the_server_cannot_read_is_named_by_its_file_name_only(tmp_path):
    """The web UI's status and the service's job error quote the loader's message with the model's path written as
    its file name."""
    pytest.importorskip("fastapi")
    from fastapi.testclient import TestClient

    from mist.faces.service.app import create_app

    broken = tmp_path / "models" / "broken.safetensors"
    broken.parent.mkdir()
    broken.write_bytes(b"not a safetensors file")
    ui = WebUI(ModelCache(str(broken)), tmp_path / "work")
    ui.start("en", None)
    result = ui.run("batch", None, None, [faces.noise_file(tmp_path / "art.png")], Settings(steps=2, size=SIZE),
                    "en", None)
    assert "broken.safetensors: cannot read" in result.status and str(broken.parent) not in result.status
    service = faces.service(tmp_path, broken)
    try:
        with TestClient(create_app(service), client=("127.0.0.1", 50000)) as http:
            status = faces.finished(http, faces.submit(http, {}).json()["id"])
    finally:
        service.store.close()
    assert status["state"] == "failed" and "broken.safetensors: cannot read" in status["error"]
    assert str(broken.parent) not in json.dumps(status)


# ------------------------------------------------------------------------------- sizes an SD 3 transformer takes

# Resized to a square of input size 40, any image is processed at 40 x 40 (a multiple of 8, not of 16); in block mode
# a 48-pixel square is cut into 24-pixel tiles. (Keeping the aspect ratio, sides are rounded down to 16s instead.)
ODD_SIZES = {"square": ((40, 48), {"input_size": 40}, "40 x 40 pixels"),
             "block": ((40, 40), {"input_size": 48, "block_num": 2}, "48 x 48 pixels in 2 x 2 tiles of 24 x 24")}


def _no_loading(monkeypatch) -> None:
    import mist.models

    def refuse(*args, **kwargs):
        raise AssertionError("the model was loaded")

    monkeypatch.setattr(mist.models, "load_model", refuse)


@pytest.mark.parametrize("case", ODD_SIZES)
def test_the_cli_refuses_a_size_the_transformer_cannot_take_before_loading(capsys, models, tmp_path, monkeypatch,
                                                                           case):
    from support.cli import run_cli

    size, settings, said = ODD_SIZES[case]
    image = faces.noise_file(tmp_path / "art.png", size)
    flags = ["--input-size", str(settings["input_size"]), "--block-num", str(settings.get("block_num", 1))]
    flags += ["--no-resize"] if settings.get("keep_aspect") else []
    _no_loading(monkeypatch)
    code, _, err = run_cli(capsys, "protect", image, "-o", tmp_path / "out", "--model", models["sd3"], "--method",
                           "advdm", "--steps", "2", *flags)
    line = next(line for line in err.splitlines() if "multiples of 16" in line)
    assert code != 0 and str(image) in line and said in line and "2 x 2 patches" in line


def test_keeping_the_aspect_ratio_rounds_sides_down_to_what_the_transformer_takes(capsys, models, tmp_path):
    """--no-resize at input size 40: a 40 x 48 image is protected at 32 x 48 against an SD 3 transformer (multiples
    of 16), where the VAE alone takes 40 x 48 (multiples of 8); before, the transformer's run was refused."""
    from support.cli import run_cli

    image = faces.noise_file(tmp_path / "art.png", (40, 48))
    sizes = {}
    for method in ("advdm", "photoguard"):
        out = tmp_path / method
        code, _, err = run_cli(capsys, "protect", image, "-o", out, "--model", models["sd3"], "--method", method,
                               "--steps", "1", "--input-size", "40", "--no-resize", "--precision", "fp32")
        assert code == 0, err
        sizes[method] = Image.open(next(out.glob("*.png"))).size
    assert sizes == {"advdm": (32, 48), "photoguard": (40, 48)}


@pytest.mark.parametrize("case", ODD_SIZES)
def test_the_web_ui_and_the_service_refuse_a_size_the_transformer_cannot_take_before_loading(models, tmp_path,
                                                                                             monkeypatch, case):
    pytest.importorskip("fastapi")
    from fastapi.testclient import TestClient

    from mist.faces.service.app import create_app

    size, settings, said = ODD_SIZES[case]
    _no_loading(monkeypatch)
    ui = WebUI(ModelCache(str(models["sd3"])), tmp_path / "work")
    ui.start("en", None)
    page = Settings(steps=2, size=settings["input_size"], method="advdm", original_size=False,
                    no_resize=settings.get("keep_aspect", False), low_vram=settings.get("block_num") == 2)
    result = ui.run("batch", None, None, [faces.noise_file(tmp_path / "art.png", size)], page, "en", None)
    assert not result.outputs and any(said in m and "multiples of 16" in m for m in result.messages), result
    assert not any(str(tmp_path) in m for m in [result.status, *result.messages])
    service = faces.service(tmp_path, models["sd3"])
    fields = {"method": "advdm", "input-size": str(settings["input_size"]),
              "block-num": str(settings.get("block_num", 1)),
              "no-resize": "true" if settings.get("keep_aspect") else "false"}
    try:
        with TestClient(create_app(service, manage_worker=False), client=("127.0.0.1", 50000)) as http:
            refused = faces.submit(http, fields, size)
            accepted = faces.submit(http, {**fields, "method": "photoguard"}, size)  # the VAE alone takes 8s
    finally:
        service.store.close()
    assert refused.status_code == 400, refused.text
    error = refused.json()["error"]
    assert error.startswith("images: art.png: processed at ") and said in error and "multiples of 16" in error
    assert str(service.data) not in error and accepted.status_code == 201, accepted.text
