"""The web UI's handlers without a browser, on the tiny random model (which protects nothing; sizes and steps small)."""

from __future__ import annotations

import hashlib
import re
import string
import subprocess
import sys
import threading
import zipfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import mist.cli
from mist import webui, webui_app, webui_text
from mist.batch import NO_PROTECTION_WARNING, settings_text
from mist.config import ProtectConfig
from mist.images import read_png_text
from mist.webui import Engine, Settings, Upload, WebUI, run_job

REPO = Path(__file__).resolve().parents[1]
FAST = dict(steps=2, size=64, epsilon=8, mode="fused")  # the handler takes sizes the page does not offer


def noise(path: Path, size=(64, 64), seed=0) -> Path:
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).save(path)
    return path


def pixels(path_or_image) -> np.ndarray:
    image = path_or_image if isinstance(path_or_image, Image.Image) else Image.open(path_or_image)
    return np.asarray(image.convert("RGB"), dtype=np.int16)


@pytest.fixture(scope="module")
def engine():
    """One engine (one tiny model) shared by the tests that do not count loads."""
    return Engine("tiny-random")


# --------------------------------------------------------------------------
# Settings


def test_settings_map_to_the_engine_config():
    assert Settings().config() == ProtectConfig()  # the page's defaults are the engine's (Mist v1.2's)
    page = Settings(epsilon=8.0, steps=2.0, size=256, mode="semantic", fused_weight=2.5, low_vram=True,
                    no_resize=True, seed=5.0, precision="fp32", fast=True)
    assert page.config() == ProtectConfig(mode="semantic", epsilon=8, steps=2, input_size=256, fused_weight=2.5,
                                          block_num=2, keep_aspect=True, seed=5, precision="fp32", fast=True)
    assert isinstance(page.config().steps, int) and isinstance(page.config().seed, int)
    with pytest.raises(ValueError, match="seed"):
        Settings(seed=None).config()


def test_page_controls_have_the_original_ranges_and_defaults(tmp_path):
    pytest.importorskip("gradio")
    demo = webui_app.build_app(WebUI(Engine("tiny-random"), tmp_path))
    by_id = {getattr(block, "elem_id", None): block for block in demo.blocks.values()}
    strength, steps, weight = by_id["mist-strength"], by_id["mist-steps"], by_id["mist-fused-weight"]
    assert (strength.minimum, strength.maximum, strength.value) == (0, 32, 16)
    assert (steps.minimum, steps.maximum, steps.value) == (1, 1000, 100)
    assert (weight.minimum, weight.maximum, weight.value) == (0, 5, 1)
    assert [value for _, value in by_id["mist-size"].choices] == [256, 512, 768] and by_id["mist-size"].value == 512
    assert [value for _, value in by_id["mist-mode"].choices] == ["textural", "semantic", "fused"]
    assert by_id["mist-mode"].value == "fused"
    assert by_id["mist-seed"].value == 23 and by_id["mist-precision"].value == "auto"
    assert [by_id[k].value for k in ("mist-low-vram", "mist-no-resize", "mist-fast")] == [False, False, False]
    for key in ("mist-strength", "mist-steps", "mist-size", "mist-mode", "mist-fused-weight", "mist-low-vram",
                "mist-no-resize", "mist-seed", "mist-precision", "mist-fast"):
        assert by_id[key].info, f"{key} has no help text"


def test_server_listens_locally_limits_uploads_and_runs_one_attack_at_a_time(tmp_path):
    pytest.importorskip("gradio")
    ui = WebUI(Engine("tiny-random"), tmp_path, max_upload_mb=5)
    demo = webui_app.build_app(ui)
    options = webui_app.launch_options(ui, demo, host=webui.DEFAULT_HOST, port=7860, share=False, auth=("a", "b"))
    assert options["server_name"] == "127.0.0.1" and options["max_file_size"] == "5mb"
    assert options["auth"] == ("a", "b") and options["share"] is False
    assert options["i18n"].translations["zh-CN"]["run"] == webui_text.ZH["run"]
    [run] = [fn for fn in demo.fns.values() if fn.name == "on_run"]
    assert run.queue and run.concurrency_limit == 1 and run.concurrency_id == "mist-attack"
    assert ui.engine.loads == 0  # building the page loads no model


def test_invalid_settings_give_a_message(engine, tmp_path):
    result = run_job([Upload(noise(tmp_path / "a.png"), "a.png")], Settings(seed=1.5, **FAST), engine, tmp_path)
    assert not result.outputs and "seed" in result.status and engine.loads <= 1


# --------------------------------------------------------------------------
# Jobs


def test_painted_region_only_is_protected_and_metadata_matches_the_cli(engine, tmp_path):
    source = noise(tmp_path / "art.png")
    layer = Image.new("RGBA", (64, 64), (0, 0, 0, 0))
    layer.paste((255, 45, 85, 150), (0, 0, 24, 64))  # a stroke over the left part
    editor = {"background": Image.open(source), "layers": [layer], "composite": None}
    mask = webui.editor_mask(editor)
    assert mask.size == (64, 64) and np.asarray(mask)[:, :24].min() == 255 and np.asarray(mask)[:, 24:].max() == 0

    ui = WebUI(engine, tmp_path / "work")
    settings = Settings(**FAST)
    result = ui.run("single", editor, None, settings, "en", "session")
    assert len(result.outputs) == 1 and result.zip is None and not result.messages
    out = result.outputs[0]
    before, after = pixels(source), pixels(out.png)
    change = np.abs(after - before)
    assert change[:, 28:].max() == 0  # unpainted pixels unchanged (a few columns of margin for the resized mask)
    assert change[:, :20].max() > 0 and change.max() <= 8  # painted pixels changed within the strength
    assert np.array_equal(pixels(out.original), before)
    assert pixels(out.perturbation).max() == round(change.max() * 255 / 8)

    text = read_png_text(out.png)
    assert text["mist:settings"] == settings_text(settings.config())
    assert text["mist:model"] == "tiny-random" and text["mist:warning"] == NO_PROTECTION_WARNING
    assert text["mist:source"] == webui.EDITOR_NAME
    editor_input = next((tmp_path / "work").glob("upload-*/inputs/*/image.png"))
    assert text["mist:source-sha256"] == hashlib.sha256(editor_input.read_bytes()).hexdigest()
    assert result.no_protection and result.status.startswith(f"**{webui_text.text('en', 'no_protection')}**")


def test_nothing_painted_protects_everything(engine, tmp_path):
    source = noise(tmp_path / "art.png")
    editor = {"background": Image.open(source), "layers": [Image.new("RGBA", (64, 64))], "composite": None}
    assert webui.editor_mask(editor) is None
    result = WebUI(engine, tmp_path / "work").run("single", editor, None, Settings(**FAST), "en", None)
    change = np.abs(pixels(result.outputs[0].png) - pixels(source))
    assert change[:, 40:].max() > 0 and change.max() <= 8


def test_batch_gives_pngs_and_a_zip_and_skips_a_corrupt_file(engine, tmp_path):
    uploads = tmp_path / "uploads"
    uploads.mkdir()
    files = [noise(uploads / "a.png", seed=1), noise(uploads / "b.jpg", size=(80, 60), seed=2)]
    broken = uploads / "broken.png"
    broken.write_bytes(files[0].read_bytes()[:200])  # truncated
    second = tmp_path / "other"
    second.mkdir()
    files.append(noise(second / "a.png", seed=3))  # same name as the first: a_2.png
    result = WebUI(engine, tmp_path / "work").run("batch", None, [*files, broken], Settings(**FAST), "en", None)
    assert [o.png.name for o in result.outputs] == ["a.png", "b.png", "a_2.png"]
    assert result.files == [o.png for o in result.outputs] + [result.zip]
    with zipfile.ZipFile(result.zip) as archive:
        assert archive.namelist() == ["a.png", "b.png", "a_2.png"]
        assert archive.read("b.png") == result.outputs[1].png.read_bytes()
    assert [Image.open(o.png).size for o in result.outputs] == [(64, 64)] * 3
    assert len(result.messages) == 1 and result.messages[0].startswith("Skipped broken.png:")
    assert "truncated or corrupt" in result.messages[0] and str(uploads) not in result.messages[0]
    assert read_png_text(result.outputs[1].png)["mist:source"] == "b.jpg"
    assert "3 of 4" in result.status


def test_corrupt_or_oversized_upload_gives_a_message_not_an_exception(engine, tmp_path):
    junk = tmp_path / "junk.png"
    junk.write_bytes(b"this is not an image")
    result = run_job([Upload(junk, "junk.png")], Settings(**FAST), engine, tmp_path / "work", lang="zh")
    assert not result.outputs and result.messages[0].startswith("已跳过 junk.png：")
    assert result.status == webui_text.text("zh", "nothing_done")
    big = noise(tmp_path / "big.png", size=(256, 256))
    result = run_job([Upload(big, "big.png")], Settings(**FAST), engine, tmp_path / "work", max_upload_bytes=10_000)
    assert "above this server's limit" in result.messages[0] and not result.outputs
    assert run_job([], Settings(**FAST), engine, tmp_path).status == webui_text.text("en", "no_input")
    assert WebUI(engine, tmp_path).run("single", None, None, Settings(**FAST), "en", None).status == \
        webui_text.text("en", "no_input")


def test_cancel_stops_within_one_step_and_keeps_finished_images(engine, tmp_path):
    files = [Upload(noise(tmp_path / f"{n}.png", seed=n), f"{n}.png") for n in range(3)]
    cancel = threading.Event()
    seen: list[str] = []

    def progress(fraction: float, desc: str) -> None:
        seen.append(desc)
        if desc.startswith("Image 2 of 3, step 1 "):
            cancel.set()  # as the Cancel button does, from another thread, while step 1 of image 2 is reported

    result = run_job(files, Settings(**{**FAST, "steps": 50}), engine, tmp_path / "work", cancel=cancel,
                     progress=progress)
    assert result.cancelled and len(result.outputs) == 1 and result.zip is None
    assert [d for d in seen if d.startswith("Image 2 of 3, step")] == [seen[-1]]  # no step of image 2 after step 1
    assert result.status.endswith(webui_text.text("en", "cancelled", done=1))
    assert any(re.fullmatch(r"Image 1 of 3, step 50 of 50, about \d+ s left", d) for d in seen)

    ui = WebUI(engine, tmp_path / "work")
    ui.cancel("en", "s1")  # cancelled while waiting in the queue: the job does nothing
    assert ui.run("batch", None, [files[0].path], Settings(**FAST), "en", "s1").cancelled
    ui.start("en", "s1")  # a new click forgets the old cancel
    assert len(ui.run("batch", None, [files[0].path], Settings(**FAST), "en", "s1").outputs) == 1


def test_cancel_from_another_thread_returns_promptly(engine, tmp_path):
    cancel, stepping = threading.Event(), threading.Event()
    upload = Upload(noise(tmp_path / "a.png"), "a.png")
    box = {}
    worker = threading.Thread(target=lambda: box.update(result=run_job(
        [upload], Settings(**{**FAST, "steps": 1000}), engine, tmp_path / "work", cancel=cancel,
        progress=lambda f, d: stepping.set() if "step" in d else None)))
    worker.start()
    assert stepping.wait(60)
    cancel.set()
    worker.join(30)
    assert not worker.is_alive() and box["result"].cancelled and not box["result"].outputs


def test_model_is_loaded_once_on_the_first_job(tmp_path):
    engine = Engine("tiny-random")
    ui = WebUI(engine, tmp_path / "work")
    assert engine.loads == 0
    upload = [noise(tmp_path / "a.png")]
    for _ in range(2):
        assert len(ui.run("batch", None, upload, Settings(**FAST), "en", None).outputs) == 1
    assert engine.loads == 1
    # The cache hands its model over: a bf16 job converts it in place; an fp32 job after it needs the exact weights.
    ui.run("batch", None, upload, Settings(**FAST, precision="bf16"), "en", None)
    assert engine.loads == 1
    ui.run("batch", None, upload, Settings(**FAST, precision="fp32"), "en", None)
    assert engine.loads == 2


def test_no_model_found_shows_how_to_get_one(tmp_path, monkeypatch):
    monkeypatch.delenv("MIST_MODEL", raising=False)
    monkeypatch.delenv("MIST_HOME", raising=False)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.chdir(tmp_path)
    ui = WebUI(Engine(None), tmp_path / "work")
    result = ui.run("batch", None, [noise(tmp_path / "a.png")], Settings(**FAST), "en", None)
    assert not result.outputs and result.status.startswith(webui_text.text("en", "no_model"))
    assert "mist download-model" in result.status
    assert webui_text.text("zh", "no_model") in ui.banner("zh") and "mist download-model" in ui.banner("zh")
    assert webui_text.text("en", "no_protection") in WebUI(Engine("tiny-random"), tmp_path).banner("en")


# --------------------------------------------------------------------------
# Strings, languages, start-up


def test_both_languages_have_every_string():
    en, zh = webui_text.EN, webui_text.ZH
    assert list(en) == list(zh)
    fields = lambda s: {f for _, f, _, _ in string.Formatter().parse(s) if f}  # noqa: E731
    for key in en:
        assert zh[key].strip() and fields(en[key]) == fields(zh[key]), key
        if key in webui_text.LABEL_KEYS:  # rendered by gradio's i18n (ICU syntax): no braces
            assert not re.search(r"[{}]", en[key] + zh[key]), key
    assert all(re.search(r"[\u4e00-\u9fff]", zh[k]) for k in zh if k not in ("precision",))


@pytest.mark.parametrize("header, lang", [
    ("zh-CN,zh;q=0.9,en;q=0.8", "zh"), ("en-US,en;q=0.9,zh-CN;q=0.8", "en"), ("fr-FR,zh-TW;q=0.5", "zh"),
    ("de-DE", "en"), ("", "en"), (None, "en"), ("en;q=0.2, zh;q=0.7", "zh"),
])
def test_language_follows_the_browser(header, lang):
    assert webui_text.detect_language(header) == lang


def test_import_does_no_work():
    code = ("import sys, threading, mist.webui; "
            "assert 'gradio' not in sys.modules and 'diffusers' not in sys.modules, 'heavy import'; "
            "assert threading.active_count() == 1, 'a thread was started'")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=REPO)


def test_command_line_warns_when_open_without_a_password(monkeypatch, capsys):
    calls = []
    monkeypatch.setattr(webui_app, "launch", lambda ui, **kw: calls.append((ui, kw)))
    monkeypatch.delenv(webui.AUTH_ENV, raising=False)
    assert mist.cli.main(["webui", "--model", "tiny-random", "--listen", "--port", "7999"]) == 0
    ui, options = calls[-1]
    assert options["host"] == "0.0.0.0" and options["port"] == 7999 and options["auth"] is None
    assert ui.engine.loads == 0 and "without a password" in capsys.readouterr().err
    assert mist.cli.main(["webui", "--model", "tiny-random", "--share", "--auth", "me:secret"]) == 0
    assert calls[-1][1]["auth"] == ("me", "secret") and calls[-1][1]["host"] == "127.0.0.1"
    assert "WARNING" not in capsys.readouterr().err
    monkeypatch.setenv(webui.AUTH_ENV, "you:pw:with:colons")
    assert mist.cli.main(["webui", "--model", "tiny-random", "--max-upload-mb", "5"]) == 0
    assert calls[-1][1]["auth"] == ("you", "pw:with:colons") and calls[-1][0].max_upload_bytes == 5 * 2**20
    assert mist.cli.main(["webui", "--auth", "nopassword"]) == mist.cli.EXIT_USAGE
    assert "user:password" in capsys.readouterr().err
