"""A server's text encoder files: `mist webui` and `mist serve` started on a tiny SD 3 single file with
`--text-encoders` (its CLIP-L, OpenCLIP-G and T5 files, saved as the published ones are) offer the denoiser-side
methods, run a fused Mist job through the page and through the service within the budget, and name the model and
the files by their names only; a bad text encoder file, or one with --ray, is refused at start-up in one line."""

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
from mist.runner.entrance import open_models
from mist.runner.jobs import ModelCache, without_model_path
from mist.runner.offers import model_offer
from support import faces
from support.cli import run_cli
from support.flow_files import Files, save_files, tiny

EPSILON = 8
SIZE = 32


@pytest.fixture(scope="module")
def sd3(tmp_path_factory) -> Files:
    """A tiny SD 3 medium as `sd3_medium.safetensors` (MMDiT and VAE) with clip_l, clip_g and t5xxl files beside."""
    return save_files(tmp_path_factory.mktemp("models") / "sd3", tiny("sd3", 3))


@pytest.fixture(scope="module")
def flux(tmp_path_factory) -> Files:
    return save_files(tmp_path_factory.mktemp("models") / "flux", tiny("schnell", 4))


def _names(files: Files) -> str:
    return ",".join(str(file) for file in files.text_encoders)


def _within_budget(png: Path, original: Image.Image) -> None:
    protected = np.asarray(Image.open(png).convert("RGB"), dtype=int)
    change = np.abs(protected - np.asarray(original.convert("RGB").resize((SIZE, SIZE)), dtype=int))
    assert protected.shape == (SIZE, SIZE, 3) and 0 < change.max() <= EPSILON


def _names_only(text: dict[str, str], files: Files) -> None:
    """The output's metadata names the model and the text encoder files by their names, never a folder."""
    settings = json.loads(text["mist:settings"])
    assert text["mist:model"] == files.model.name and text["mist:method"] == "mist"
    assert settings["text_encoders"] == [file.name for file in files.text_encoders]
    assert str(files.model.parent) not in json.dumps(text)


def test_a_served_single_file_with_its_text_encoders_offers_the_denoiser_side_methods(sd3):
    bare = model_offer(ModelCache(str(sd3.model), "cpu"))
    assert "advdm" not in bare.methods and "advdm" in bare.refused  # without the files: the encoder side only
    offer = model_offer(open_models(str(sd3.model), "cpu", text_encoders=_names(sd3)))
    assert {"mist", "advdm", "sds", "mist2"} <= set(offer.methods) and offer.refused == {}
    assert offer.choices.get("mode") is None  # Mist's fused and semantic modes too


def test_the_web_ui_protects_with_the_fused_mode_on_a_served_single_file(sd3, tmp_path):
    image = faces.noise_file(tmp_path / "art.png")
    ui = WebUI(open_models(str(sd3.model), "cpu", text_encoders=_names(sd3)), tmp_path / "work")
    settings = Settings(steps=2, size=SIZE, epsilon=EPSILON, method="mist", params={"mode": "fused"},
                        original_size=False, precision="fp32")
    ui.start("en", None)
    assert "advdm" in ui.offer.methods and ui.offer.refused == {}
    result = ui.run("batch", None, None, [image], settings, "en", None)
    assert len(result.outputs) == 1 and not result.messages, result.status
    _within_budget(result.outputs[0].png, Image.open(image))
    _names_only(read_png_text(result.outputs[0].png), sd3)
    assert str(sd3.model.parent) not in result.status + ui.banner("en") + ui.banner("zh")


def test_the_service_protects_with_the_fused_mode_on_a_served_single_file(sd3, tmp_path):
    pytest.importorskip("fastapi")
    from fastapi.testclient import TestClient

    from mist.faces.service.app import create_app
    from mist.faces.service.server import ServeOptions, build_service, models_for, open_store

    options = ServeOptions(data=tmp_path / "data", model=str(sd3.model), device="cpu", no_auth=True,
                           text_encoders=_names(sd3))
    service = build_service(options, open_store(options.data, None), models_for(options))
    try:
        with TestClient(create_app(service), client=("127.0.0.1", 50000)) as http:
            status_page = http.get("/v1/status")
            assert {"mist", "advdm"} <= set(status_page.json()["methods"]), status_page.text
            own = faces.submit(http, {"method": "advdm", "text-encoders": str(sd3.text_encoders[0])})
            assert own.status_code == 400 and "set by whoever runs it" in own.text  # a job names none of its own
            answers, png, archive = faces.done_job(http, {"method": "mist", "mode": "fused", "epsilon": str(EPSILON)})
            answers.append(status_page.text)
        got = tmp_path / "got.png"
        got.write_bytes(png)
        _within_budget(got, Image.open(io.BytesIO(faces.noise_png())))
        _names_only(read_png_text(got), sd3)
        with zipfile.ZipFile(io.BytesIO(archive)) as zipped:
            assert zipped.namelist() == ["art.png"]
    finally:
        service.store.close()
    assert not any(str(sd3.model.parent) in answer or str(service.data) in answer for answer in answers)


def test_a_served_text_encoder_file_is_named_by_its_file_name_in_messages(sd3):
    models = ModelCache(str(sd3.model), "cpu", text_encoders=tuple(map(str, sd3.text_encoders)))
    clip = sd3.text_encoders[0]
    assert without_model_path(f"{clip}: cannot read it", models) == f"{clip.name}: cannot read it"


def _refusals(sd3: Files, flux: Files, tmp_path: Path) -> dict[str, tuple[list[str], str]]:
    """What a server's --text-encoders must not be: (the options, the one line it is refused in)."""
    stray = flux.model.with_name("ae.safetensors")  # a VAE: no text encoder
    clip_l, clip_g, t5 = (str(sd3.model.with_name(f"{name}.safetensors")) for name in ("clip_l", "clip_g", "t5xxl"))
    return {
        "missing": (["--model", sd3.model, "--text-encoders", f"{clip_l},{tmp_path}/clip_g.safetensors"],
                    f"--text-encoders: {tmp_path}/clip_g.safetensors: no such file"),
        "folder": (["--model", sd3.model, "--text-encoders", f"{clip_l},{tmp_path}"],
                   f"--text-encoders: {tmp_path}: a folder, not a file"),
        "not a text encoder": (["--model", sd3.model, "--text-encoders", f"{clip_l},{stray}"],
                               f"{stray}: not a text encoder Mist knows"),
        "not read by the family": (["--model", flux.model, "--text-encoders", f"{clip_l},{clip_g},{t5}"],
                                   f"{clip_g}: OpenCLIP-G, a text encoder Flux does not read"),
        "one needed is missing": (["--model", sd3.model, "--text-encoders", clip_l],
                                  f"{sd3.model}: its OpenCLIP-G text encoder is needed"),
        "a model that takes none": (["--model", "tiny-random", "--text-encoders", clip_l],
                                    "--text-encoders: tiny-random takes no text encoder files"),
        "with ray": (["--model", sd3.model, "--text-encoders", clip_l, "--ray", "auto"],
                     "--text-encoders: not with a Ray cluster"),
    }


def test_start_up_refuses_text_encoder_files_that_cannot_serve_the_model_in_one_line(sd3, flux, tmp_path, capsys,
                                                                                     monkeypatch):
    pytest.importorskip("fastapi")
    import uvicorn

    from mist.faces.webui import app as webui_app

    monkeypatch.setattr(uvicorn, "run", lambda *args, **kwargs: pytest.fail("the server started listening"))
    monkeypatch.setattr(webui_app, "launch", lambda *args, **kwargs: pytest.fail("the page was served"))
    for case, (options, line) in _refusals(sd3, flux, tmp_path).items():
        for command in (["serve", "--data", tmp_path / "data", "--device", "cpu"], ["webui", "--device", "cpu"]):
            if "--ray" in options and command[0] == "webui":
                continue  # the page takes no cluster
            code, _, err = run_cli(capsys, *command, *options)
            assert code == 2 and len(err.strip().splitlines()) == 1, (case, err)
            assert err.strip().startswith(f"mist: error: {line}"), (case, err)
    assert not (tmp_path / "data").exists()  # refused before the data folder was made


def test_the_web_ui_command_serves_the_page_with_the_files(sd3, monkeypatch):
    from mist.faces.cli import main
    from mist.faces.webui import app as webui_app

    served = []
    monkeypatch.setattr(webui_app, "launch", lambda ui, **kw: served.append(ui))
    assert main(["webui", "--model", str(sd3.model), "--device", "cpu", "--text-encoders", _names(sd3)]) == 0
    assert served[0].engine.text_encoders == tuple(map(str, sd3.text_encoders)) and served[0].engine.loads == 0
    assert "advdm" in served[0].offer.methods


def test_evaluations_load_a_served_single_file_with_the_servers_text_encoders(sd3):
    """An evaluation (the page's Evaluate, the service's /v1/evaluations) names no files: the model it mimics with is
    the server's, read with the server's text encoder files."""
    models = ModelCache(str(sd3.model), "cpu", text_encoders=tuple(map(str, sd3.text_encoders)))
    model = models.model(frozenset({"encoder", "unet", "text_encoder", "decoder"}))
    assert model.unet is not None and model.conditioning("a painting").states.shape[-1] > 0
    with pytest.raises(ValueError, match="CLIP-L and OpenCLIP-G text encoders are needed"):
        ModelCache(str(sd3.model), "cpu").model(frozenset({"encoder", "unet", "text_encoder"}))
