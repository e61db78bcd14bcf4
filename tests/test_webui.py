"""The web UI's handlers without a browser, on the tiny random model (which protects nothing; sizes and steps small)."""

from __future__ import annotations

import hashlib
import json
import os
import re
import stat
import string
import subprocess
import sys
import threading
import zipfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import mist.faces.cli
from mist.faces.webui import pages as webui, app as webui_app, text as webui_text
from mist.runner.jobs import NO_PROTECTION_WARNING, settings_text
from mist.engine.config import ProtectConfig
from mist.common.images import read_png_text
from mist.runner.jobs import ModelCache
from mist.faces.webui.pages import Artwork, Settings, WebUI, run_job

REPO = Path(__file__).resolve().parents[1]
# The handler takes sizes the page does not offer; the output at the processing size keeps the tests small.
FAST = dict(steps=2, size=64, epsilon=8, params={"mode": "fused"}, original_size=False)
HANG_GUARD_S = 600  # waits end on events; this only turns a hang into a failure


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
    return ModelCache("tiny-random")


# --------------------------------------------------------------------------
# Settings


def test_settings_map_to_the_engine_config():
    # The page's defaults are the engine's (Mist v1.2's), except the output at the artwork's own size.
    assert Settings().config() == ProtectConfig(original_size=True)
    page = Settings(epsilon=8.0, steps=2.0, size=256, params={"mode": "semantic", "fused_weight": 2.5, "fast": True},
                    low_vram=True, no_resize=True, seed=5.0, precision="fp32", original_size=False)
    assert page.config() == ProtectConfig.of(mode="semantic", epsilon=8, steps=2, input_size=256, fused_weight=2.5,
                                             block_num=2, keep_aspect=True, seed=5, precision="fp32", fast=True)
    assert isinstance(page.config().steps, int) and isinstance(page.config().seed, int)
    assert Settings(robust=True).config().robust == ("jpeg", "resize", "blur")  # the command line's bare --robust
    with pytest.raises(ValueError, match="seed"):
        Settings(seed=None).config()


def test_with_the_test_model_the_page_starts_at_its_ten_steps(tmp_path):
    pytest.importorskip("gradio")
    demo = webui_app.build_app(WebUI(ModelCache("tiny-random"), tmp_path))
    steps = next(block for block in demo.blocks.values() if getattr(block, "elem_id", None) == "mist-steps")
    assert (steps.minimum, steps.maximum, steps.value) == (1, 1000, 10)


def test_page_controls_have_the_original_ranges_and_defaults(tmp_path):
    pytest.importorskip("gradio")
    demo = webui_app.build_app(WebUI(ModelCache(tmp_path / "model.ckpt"), tmp_path))
    by_id = {getattr(block, "elem_id", None): block for block in demo.blocks.values()}
    strength, steps, weight = by_id["mist-strength"], by_id["mist-steps"], by_id["mist-fused-weight"]
    assert (strength.minimum, strength.maximum, strength.value) == (0, 32, 16)
    assert (steps.minimum, steps.maximum, steps.value) == (1, 1000, 100)
    assert (weight.minimum, weight.maximum, weight.value) == (0, 5, 1)
    assert [value for _, value in by_id["mist-size"].choices] == [256, 512, 768] and by_id["mist-size"].value == 512
    assert [value for _, value in by_id["mist-mode"].choices] == ["textural", "semantic", "fused"]
    assert by_id["mist-mode"].value == "fused" and by_id["mist-method"].value == "mist"
    assert by_id["mist-seed"].value == 23 and by_id["mist-precision"].value == "auto"
    assert [by_id[k].value for k in ("mist-low-vram", "mist-no-resize", "mist-fast")] == [False, False, False]
    assert by_id["mist-original-size"].value is True  # the artwork's own size is offered, and on by default
    for key in ("mist-strength", "mist-steps", "mist-size", "mist-method", "mist-mode", "mist-fused-weight",
                "mist-low-vram", "mist-no-resize", "mist-robust", "mist-seed", "mist-precision", "mist-fast",
                "mist-original-size"):
        assert by_id[key].info, f"{key} has no help text"


def test_words_an_artist_does_not_know_are_only_under_advanced(tmp_path):
    pytest.importorskip("gradio")
    demo = webui_app.build_app(WebUI(ModelCache("tiny-random"), tmp_path))
    [advanced] = [b for b in demo.blocks.values() if getattr(b, "elem_id", None) == "mist-advanced"]
    inside = {id(b) for b in _descendants(advanced)}
    jargon = re.compile(r"epsilon|10\^|10\*\*|block_num|bf16|fp16|fp32", re.IGNORECASE)
    methods_en, methods_zh = webui_app.method_labels()
    words = {"en": {**webui_text.EN, **methods_en}, "zh": {**webui_text.TEXTS["zh"], **methods_zh}}
    for block in demo.blocks.values():
        for key in _label_keys(block, words["en"]):
            for lang in ("en", "zh"):
                if jargon.search(words[lang][key]) and id(block) not in inside:
                    pytest.fail(f"{key!r} ({lang}) says {jargon.search(words[lang][key])[0]!r} outside Advanced")
    for key in ("param_fused_weight", "low_vram", "precision"):  # jargon in the help text, a plain label in front
        assert not jargon.search(words["en"][key]), key


def _descendants(block):
    for child in getattr(block, "children", []) or []:
        yield child
        yield from _descendants(child)


def _label_keys(block, known: dict[str, str]):
    """The text keys a component shows (its label, help text, value or choices); every one must be in `known`."""
    for key in _marked_keys(block):
        assert key in known, f"the page shows the text key {key!r}, which has no text"
        yield key


def _marked_keys(block):
    for name in ("label", "info", "value"):
        value = getattr(block, name, None)
        if isinstance(value, str) and value.startswith("__i18n__"):  # gradio keeps some as marked strings
            yield json.loads(value[len("__i18n__"):])["key"]
        elif getattr(value, "key", None):
            yield value.key
    for label, _ in getattr(block, "choices", None) or []:
        if getattr(label, "key", None):
            yield label.key


def test_server_listens_locally_limits_uploads_and_runs_one_attack_at_a_time(tmp_path):
    pytest.importorskip("gradio")
    ui = WebUI(ModelCache("tiny-random"), tmp_path, max_upload_mb=5)
    demo = webui_app.build_app(ui)
    options = webui_app.launch_options(ui, demo, host=webui.DEFAULT_HOST, port=7860, share=False, auth=("a", "b"))
    assert options["server_name"] == "127.0.0.1" and options["max_file_size"] == "5mb"
    assert options["auth"] == ("a", "b") and options["share"] is False
    assert options["i18n"].translations["zh-CN"]["run"] == webui_text.ZH["run"]
    [run] = [fn for fn in demo.fns.values() if fn.name == "on_run"]
    assert run.queue and run.concurrency_limit == 1 and run.concurrency_id == "mist-attack"
    assert ui.engine.loads == 0  # building the page loads no model


def test_gradio_strings_the_page_shows_are_translated_and_no_share_button(tmp_path):
    gr = pytest.importorskip("gradio")
    demo = webui_app.build_app(WebUI(ModelCache("tiny-random"), tmp_path))
    translations = demo.mist_i18n.translations
    for locale in webui_text.CHINESE_LOCALES:  # gradio's Chinese table lacks it: a screen reader read the raw key
        assert translations[locale]["common.complete"] == webui_text.GRADIO_ZH["common.complete"]
    outputs = [b for b in demo.blocks.values() if isinstance(b, (gr.Image, gr.Gallery, gr.ImageEditor))]
    assert len(outputs) == 6 and all("share" not in (b.buttons or []) for b in outputs)  # "Must be on Spaces"


@pytest.mark.parametrize("served, key", [(False, "intro"), (True, "intro_served")])
def test_intro_says_where_images_are_processed(tmp_path, served, key):
    pytest.importorskip("gradio")
    demo = webui_app.build_app(WebUI(ModelCache("tiny-random"), tmp_path, served_to_others=served))
    [intro] = [b for b in demo.blocks.values() if getattr(b, "elem_id", None) == "mist-intro"]
    assert key in str(intro.value)
    assert ("runs on this computer" in webui_text.EN[key]) is not served


def test_invalid_settings_give_a_message(engine, tmp_path):
    result = run_job([Artwork(noise(tmp_path / "a.png"), "a.png")], Settings(seed=1.5, **FAST), engine, tmp_path)
    assert not result.outputs and "seed" in result.status and engine.loads <= 1


# --------------------------------------------------------------------------
# Jobs


def protect(ui: WebUI, source: str, artwork=None, editor=None, files=None, settings=None, lang="en", session=None):
    """One press of Protect, as the page does it: start (queue), then run."""
    ui.start(lang, session)
    return ui.run(source, artwork, editor, files, settings or Settings(**FAST), lang, session)


def stroke(size, columns) -> Image.Image:
    """An editor layer of `size` with a semi-transparent stroke over `columns` (a slice), as the brush paints."""
    layer = Image.new("RGBA", size, (0, 0, 0, 0))
    layer.paste((255, 45, 85, 150), (columns.start, 0, columns.stop, size[1]))
    return layer


def test_painted_region_only_is_protected_and_metadata_records_the_painted_mask(engine, tmp_path):
    source = noise(tmp_path / "my art.png")
    editor = {"background": None, "layers": [stroke((64, 64), slice(0, 24))], "composite": None}
    mask = webui.editor_mask(editor, (64, 64))
    assert mask.size == (64, 64) and np.asarray(mask)[:, :24].min() == 255 and np.asarray(mask)[:, 24:].max() == 0

    ui = WebUI(engine, tmp_path / "work")
    settings = Settings(**FAST)
    result = protect(ui, "single", source, editor, settings=settings)
    assert len(result.outputs) == 1 and result.zip is None and not result.messages
    out = result.outputs[0]
    assert out.png.name == "my art.png"  # named after the upload, not image.png
    before, after = pixels(source), pixels(out.png)
    change = np.abs(after - before)
    assert change[:, 28:].max() == 0  # unpainted pixels unchanged (a few columns of margin for the resized mask)
    assert change[:, :20].max() > 0 and change.max() <= 8  # painted pixels changed within the strength
    assert np.array_equal(pixels(out.original), before)
    assert pixels(out.perturbation).max() == round(change.max() * 255 / 8)

    text = read_png_text(out.png)
    painted = next((tmp_path / "work").glob(f"job-*/masks/0/{webui.PAINTED_MASK}"))
    assert np.array_equal(np.asarray(Image.open(painted)), np.asarray(mask))
    recorded = json.loads(text["mist:settings"])
    assert recorded["mask"] == {"name": "painted", "sha256": hashlib.sha256(painted.read_bytes()).hexdigest()}
    assert {k: v for k, v in recorded.items() if k != "mask"} == \
        {k: v for k, v in json.loads(settings_text(settings.config())).items() if k != "mask"}
    assert text["mist:model"] == "tiny-random" and text["mist:warning"] == NO_PROTECTION_WARNING
    assert text["mist:source"] == "my art.png"
    assert text["mist:source-sha256"] == hashlib.sha256(source.read_bytes()).hexdigest()  # the file as uploaded
    assert result.no_protection and result.status.startswith(f"**{webui_text.text('en', 'no_protection')}**")


def test_mask_painted_on_the_preview_is_scaled_to_the_artwork(tmp_path):
    big = noise(tmp_path / "big.png", size=(2000, 1000))
    shown = webui.preview(big, tmp_path / "previews")
    assert Image.open(shown).size == (webui.PREVIEW_SIDE, webui.PREVIEW_SIDE // 2)
    editor = {"background": None, "layers": [stroke(Image.open(shown).size, slice(0, 320))], "composite": None}
    upload = webui.artwork_upload(big, editor)
    assert upload.path == big and upload.name == "big.png"
    painted = np.asarray(upload.mask)
    assert upload.mask.size == (2000, 1000) and painted[:, :490].min() == 255 and painted[:, 510:].max() == 0


def test_nothing_painted_protects_everything(engine, tmp_path):
    source = noise(tmp_path / "art.png")
    editor = {"background": None, "layers": [Image.new("RGBA", (64, 64))], "composite": None}
    assert webui.editor_mask(editor, (64, 64)) is None
    result = protect(WebUI(engine, tmp_path / "work"), "single", source, editor)
    change = np.abs(pixels(result.outputs[0].png) - pixels(source))
    assert change[:, 40:].max() > 0 and change.max() <= 8
    assert json.loads(read_png_text(result.outputs[0].png)["mist:settings"])["mask"] is None


def test_batch_gives_pngs_and_a_zip_and_skips_a_corrupt_file(engine, tmp_path):
    uploads = tmp_path / "uploads"
    uploads.mkdir()
    files = [noise(uploads / "a.png", seed=1), noise(uploads / "b.jpg", size=(80, 60), seed=2)]
    broken = uploads / "broken.png"
    broken.write_bytes(files[0].read_bytes()[:200])  # truncated
    second = tmp_path / "other"
    second.mkdir()
    files.append(noise(second / "a.png", seed=3))  # same name as the first: a_2.png
    result = protect(WebUI(engine, tmp_path / "work"), "batch", files=[*files, broken])
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
    assert all(f.exists() for f in files) and not result.uploads_removed  # files outside gradio's uploads stay


def test_corrupt_or_oversized_upload_gives_a_message_not_an_exception(engine, tmp_path):
    junk = tmp_path / "junk.png"
    junk.write_bytes(b"this is not an image")
    result = run_job([Artwork(junk, "junk.png")], Settings(**FAST), engine, tmp_path / "work", lang="zh")
    assert not result.outputs and result.messages[0].startswith("已跳过 junk.png：")
    assert result.status == webui_text.text("zh", "nothing_done")
    big = noise(tmp_path / "big.png", size=(256, 256))
    result = run_job([Artwork(big, "big.png")], Settings(**FAST), engine, tmp_path / "work", max_upload_bytes=10_000)
    assert "above this server's limit" in result.messages[0] and not result.outputs
    assert run_job([], Settings(**FAST), engine, tmp_path).status == webui_text.text("en", "no_input")
    assert protect(WebUI(engine, tmp_path), "single").status == webui_text.text("en", "no_input")


def pixel_bomb(path: Path) -> Path:
    """A valid PNG header announcing more pixels than Pillow's limit (nothing behind it is ever decoded)."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    side = int((Image.MAX_IMAGE_PIXELS * 2) ** 0.5) + 1
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", side, side, 8, 2, 0, 0, 0))
                     + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b""))
    return path


def test_one_image_tab_says_why_it_refuses_a_file_and_takes_a_large_jpeg_as_it_is(tmp_path):
    """The one-image tab takes the file itself (a large JPEG is no longer re-encoded by the browser into a PNG many
    times larger than the upload limit) and names the problem of a file it cannot use."""
    uploads = tmp_path / "uploads"
    ui = WebUI(ModelCache("tiny-random"), tmp_path / "work", max_upload_mb=1, upload_root=uploads)

    def upload(name: str, write) -> Path:
        folder = uploads / name.replace(".", "-")  # gradio keeps each upload in a folder of its own
        folder.mkdir(parents=True)
        write(folder / name)
        return folder / name

    text_file = upload("notes.png", lambda p: p.write_text("not a picture"))
    empty = upload("empty.png", lambda p: p.write_bytes(b""))
    bomb = upload("bomb.png", pixel_bomb)
    large = upload("large.png", lambda p: noise(p, size=(700, 700)))
    expected = {text_file: "not an image file", empty: "file is empty (0 bytes)", bomb: "image is too large",
                large: "above this server's limit of 1 MB"}
    for path, reason in expected.items():
        shown, said = ui.artwork(path, "en", "page")
        assert shown is None and said.startswith(f"{path.name} cannot be protected: ") and reason in said, said
        assert not path.exists() and not path.parent.exists()  # a refused upload is not kept

    y, x = np.mgrid[0:1500, 0:1100]
    painting = Image.fromarray(np.stack([x % 256, y % 256, (x + y) // 12 % 256], axis=-1).astype(np.uint8))
    photo = upload("photo.jpg", lambda p: painting.save(p, quality=95))
    assert photo.stat().st_size < 2**20 < 1500 * 1100 * 3  # within the limit as a JPEG, above it decoded
    shown, said = ui.artwork(photo, "en", "page")
    assert said == "" and Image.open(shown).size == (round(1100 * webui.PREVIEW_SIDE / 1500), webui.PREVIEW_SIDE)
    assert webui.artwork_upload(photo, None) == Artwork(photo, "photo.jpg")  # the job reads the file as uploaded


def test_cancel_stops_within_one_step_and_keeps_finished_images(engine, tmp_path):
    files = [Artwork(noise(tmp_path / f"{n}.png", seed=n), f"{n}.png") for n in range(3)]
    cancel = threading.Event()
    events: list[tuple[float, str]] = []
    steps = 50

    def progress(fraction: float, desc: str) -> None:
        events.append((fraction, desc))
        if desc.startswith("Image 2 of 3, step 1 "):
            cancel.set()  # as the Cancel button does, from another thread, while step 1 of image 2 is reported

    result = run_job(files, Settings(**{**FAST, "steps": steps}), engine, tmp_path / "work", cancel=cancel,
                     progress=progress)
    assert result.cancelled and len(result.outputs) == 1 and result.zip is None
    # Events, not their timing: image 1 reported all its steps, image 2 nothing after its first step.
    first = [fraction for fraction, desc in events if desc.startswith("Image 1 of 3, step ")]
    assert first == pytest.approx([step / steps / 3 for step in range(1, steps + 1)])
    assert [desc for _, desc in events if desc.startswith("Image 2 of 3, step")] == [events[-1][1]]
    assert events[-1][0] == pytest.approx((1 + 1 / steps) / 3)
    assert result.status.endswith(webui_text.text("en", "cancelled", done=1))

    ui = WebUI(engine, tmp_path / "work")
    ui.cancel("en", "s1")  # cancelled while waiting in the queue: the job does nothing
    ui._page("s1").phase = "pending"  # (as if Protect had been pressed before the cancel)
    assert ui.run("batch", None, None, [files[0].path], Settings(**FAST), "en", "s1").cancelled
    assert len(protect(ui, "batch", files=[files[0].path], session="s1").outputs) == 1  # a new press forgets it


def test_cancel_from_another_thread_stops_after_the_current_step(engine, tmp_path):
    cancel, stepping = threading.Event(), threading.Event()
    upload = Artwork(noise(tmp_path / "a.png"), "a.png")
    after_cancel: list[str] = []
    box = {}

    def progress(fraction: float, desc: str) -> None:
        if cancel.is_set():
            after_cancel.append(desc)
        if "step" in desc:
            stepping.set()

    worker = threading.Thread(target=lambda: box.update(result=run_job(
        [upload], Settings(**{**FAST, "steps": 1000}), engine, tmp_path / "work", cancel=cancel, progress=progress)))
    worker.start()
    assert stepping.wait(HANG_GUARD_S)
    cancel.set()
    worker.join(HANG_GUARD_S)
    assert box["result"].cancelled and not box["result"].outputs
    assert len(after_cancel) <= 1  # at most the step that was running when Cancel was pressed


def test_a_second_press_while_the_job_runs_starts_nothing(engine, tmp_path):
    ui = WebUI(engine, tmp_path / "work")
    source = noise(tmp_path / "a.png")
    inside: list[str | None] = []

    def progress(fraction: float, desc: str) -> None:
        if not inside:  # a second tap of Protect during the run
            inside.append(ui.start("en", "page"))

    assert ui.start("en", "page") == webui_text.text("en", "starting")
    first = ui.run("batch", None, None, [source], Settings(**FAST), "en", "page", progress)
    assert inside == [None] and len(first.outputs) == 1
    # gradio queues the second press's run behind the first: it finds nothing to do.
    assert ui.run("batch", None, None, [source], Settings(**FAST), "en", "page") is None
    assert len(list((tmp_path / "work").glob("job-*"))) == 1


def test_other_pages_jobs_are_counted_while_waiting(engine, tmp_path):
    ui = WebUI(engine, tmp_path / "work")
    assert ui.start("en", "a") == webui_text.text("en", "starting")
    assert ui.start("zh", "b") == webui_text.text("zh", "waiting", ahead=1)


def test_a_page_that_goes_away_cancels_its_job_and_its_uploads_are_deleted(engine, tmp_path):
    uploads = tmp_path / "uploads"
    (uploads / "h1").mkdir(parents=True)
    source = noise(uploads / "h1" / "art.png")
    ui = WebUI(engine, tmp_path / "work", upload_root=uploads)
    shown, _ = ui.artwork(source, "en", "page")
    served = uploads / "h2" / shown.name  # gradio's copy of the preview it served to the editor...
    served.parent.mkdir()
    served.write_bytes(shown.read_bytes())
    (uploads / "h2" / "background.png").write_bytes(shown.read_bytes())  # ...and the editor's, beside it
    (uploads / "h2" / "original-art.png").write_bytes(shown.read_bytes())  # an output with the same content
    steps_after_close: list[str] = []

    def progress(fraction: float, desc: str) -> None:
        if "step" in desc:
            if ui._page("page").closed:
                steps_after_close.append(desc)
            else:
                ui.closed("page")  # the tab is closed or reloaded during the run (gradio's unload event)

    ui.start("en", "page")
    result = ui.run("single", source, None, None, Settings(**{**FAST, "steps": 1000}), "en", "page", progress)
    assert result.cancelled and len(steps_after_close) <= 1
    assert result.uploads_removed and not source.exists() and not shown.exists() and not served.exists()
    assert [p.name for p in uploads.rglob("*") if p.is_file()] == ["original-art.png"]  # the output is kept
    (uploads / "h2" / "original-art.png").unlink()
    (uploads / "h2").rmdir()
    assert "page" not in ui._pages  # the page is forgotten

    (uploads / "h3").mkdir()
    idle = noise(uploads / "h3" / "other.png")
    ui.artwork(idle, "en", "idle page")
    ui.closed("idle page")  # closed with an upload and no job
    assert not idle.exists() and list(uploads.iterdir()) == []


def test_a_page_closed_while_its_job_waits_leaves_no_phantom_job(engine, tmp_path):
    """Closed while waiting for its turn: the page is forgotten with its uploads, its job never runs, and the next
    page is not told to wait for it."""
    uploads = tmp_path / "uploads"
    (uploads / "h1").mkdir(parents=True)
    source = noise(uploads / "h1" / "art.png")
    ui = WebUI(engine, tmp_path / "work", upload_root=uploads)
    ui.artwork(source, "en", "gone")
    ui.start("en", "gone")
    ui.closed("gone")
    assert "gone" not in ui._pages and not source.exists()
    assert ui.run("single", source, None, None, Settings(**FAST), "en", "gone") is None  # gradio ran it anyway
    assert "gone" not in ui._pages
    assert ui.start("en", "next") == webui_text.text("en", "starting")


def test_two_pages_with_the_same_file_each_keep_it_until_their_own_job_ends(engine, tmp_path):
    """gradio stores one copy of identical uploads: the first page's job must not delete the file the second page
    is about to protect."""
    uploads = tmp_path / "uploads"
    (uploads / "h1").mkdir(parents=True)
    shared = noise(uploads / "h1" / "art.png")
    ui = WebUI(engine, tmp_path / "work", upload_root=uploads)
    ui.uploaded([shared], "a")
    ui.uploaded([shared], "b")
    for page in ("a", "b"):
        ui.start("en", page)
        result = ui.run("batch", None, None, [shared], Settings(**FAST), "en", page)
        assert len(result.outputs) == 1 and not result.messages, result.messages
        assert shared.exists() == (page == "a")  # deleted with the last page's job only


def test_the_page_is_sent_previews_scaled_to_a_screen_and_downloads_at_full_size(engine, tmp_path):
    big = noise(tmp_path / "big.png", size=(1800, 1200))
    result = protect(WebUI(engine, tmp_path / "work"), "batch", files=[big],
                     settings=Settings(**{**FAST, "original_size": True}))
    [output] = result.outputs
    assert Image.open(output.png).size == (1800, 1200)
    for shown in (output.original, output.shown, output.perturbation):
        assert Image.open(shown).size == (1280, 853), shown


def test_uploads_of_a_job_are_deleted_when_it_ends(engine, tmp_path):
    uploads = tmp_path / "uploads"
    files = []
    for n in range(2):
        (uploads / f"h{n}").mkdir(parents=True)
        files.append(noise(uploads / f"h{n}" / f"{n}.png", seed=n))
    (uploads / "h9").mkdir()
    composite = noise(uploads / "h9" / "composite.png")  # the browser uploads the editor's images with every job
    editor = {"background": None, "layers": [], "composite": None, "uploaded": [composite]}
    result = protect(WebUI(engine, tmp_path / "work", upload_root=uploads), "batch", editor=editor, files=files)
    assert len(result.outputs) == 2 and result.uploads_removed
    assert list(uploads.iterdir()) == [] and all(o.png.exists() for o in result.outputs)


def test_model_is_loaded_once_on_the_first_job(tmp_path):
    engine = ModelCache("tiny-random")
    ui = WebUI(engine, tmp_path / "work")
    assert engine.loads == 0
    upload = [noise(tmp_path / "a.png")]
    for _ in range(2):
        assert len(protect(ui, "batch", files=upload).outputs) == 1
    assert engine.loads == 1
    # The cache hands its model over: a bf16 job converts it in place; an fp32 job after it needs the exact weights.
    protect(ui, "batch", files=upload, settings=Settings(**FAST, precision="bf16"))
    assert engine.loads == 1
    protect(ui, "batch", files=upload, settings=Settings(**FAST, precision="fp32"))
    assert engine.loads == 2


def test_no_model_found_shows_how_to_get_one(tmp_path, monkeypatch):
    monkeypatch.delenv("MIST_MODEL", raising=False)
    monkeypatch.delenv("MIST_HOME", raising=False)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.chdir(tmp_path)
    ui = WebUI(ModelCache(None), tmp_path / "work")
    result = protect(ui, "batch", files=[noise(tmp_path / "a.png")])
    assert not result.outputs and result.status.startswith(webui_text.text("en", "no_model"))
    assert "mist download-model" in result.status
    assert webui_text.text("zh", "no_model") in ui.banner("zh") and "mist download-model" in ui.banner("zh")
    assert webui_text.text("en", "no_protection") in WebUI(ModelCache("tiny-random"), tmp_path).banner("en")


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
    code = ("import sys, threading, mist.faces.webui.pages; "
            "assert 'gradio' not in sys.modules and 'diffusers' not in sys.modules, 'heavy import'; "
            "assert threading.active_count() == 1, 'a thread was started'")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=REPO)


def test_command_line_warns_when_open_without_a_password(monkeypatch, capsys):
    calls = []
    monkeypatch.setattr(webui_app, "launch", lambda ui, **kw: calls.append((ui, kw)))
    monkeypatch.delenv(webui.AUTH_ENV, raising=False)
    assert mist.faces.cli.main(["webui", "--model", "tiny-random", "--listen", "--port", "7999"]) == 0
    ui, options = calls[-1]
    assert options["host"] == "0.0.0.0" and options["port"] == 7999 and options["auth"] is None
    assert ui.engine.loads == 0 and "without a password" in capsys.readouterr().err
    assert mist.faces.cli.main(["webui", "--model", "tiny-random", "--share", "--auth", "me:secret"]) == 0
    assert calls[-1][1]["auth"] == ("me", "secret") and calls[-1][1]["host"] == "127.0.0.1"
    assert "WARNING" not in capsys.readouterr().err
    monkeypatch.setenv(webui.AUTH_ENV, "you:pw:with:colons")
    assert mist.faces.cli.main(["webui", "--model", "tiny-random", "--max-upload-mb", "5"]) == 0
    assert calls[-1][1]["auth"] == ("you", "pw:with:colons") and calls[-1][0].max_upload_bytes == 5 * 2**20
    assert mist.faces.cli.main(["webui", "--auth", "nopassword"]) == mist.faces.cli.EXIT_USAGE
    assert "user:password" in capsys.readouterr().err
    assert [ui.served_to_others for ui, _ in calls] == [True, True, False]  # --listen, --share, neither


def test_uploads_and_jobs_live_in_a_private_folder_removed_on_shutdown(monkeypatch, tmp_path):
    """gradio's uploads (set through GRADIO_TEMP_DIR before gradio builds the page) and the jobs go to one folder
    only this user can open; it is gone when the server stops, and the environment is as it was."""
    seen = {}

    def fake_launch(ui, **options):
        root = ui.workdir.parent
        seen.update(root=root, mode=stat.S_IMODE(root.stat().st_mode), temp=os.environ["GRADIO_TEMP_DIR"], ui=ui)
        (ui.upload_root / "h1").mkdir(parents=True)
        (ui.upload_root / "h1" / "background.png").write_bytes(b"an unprotected original")

    monkeypatch.setattr(webui_app, "launch", fake_launch)
    monkeypatch.setenv("GRADIO_TEMP_DIR", str(tmp_path / "base"))
    assert mist.faces.cli.main(["webui", "--model", "tiny-random"]) == 0
    assert seen["root"].parent == tmp_path / "base" and seen["mode"] == 0o700
    assert Path(seen["temp"]) == seen["ui"].upload_root and seen["ui"].upload_root.parent == seen["root"]
    assert not seen["root"].exists() and os.environ["GRADIO_TEMP_DIR"] == str(tmp_path / "base")


def test_previews_are_deleted_with_the_next_job_or_when_the_page_goes_away(engine, tmp_path):
    """The previews (the original's is an unprotected copy of the artwork) and gradio's served copies of them live
    while the page shows them: until its next job starts or it goes away. The protected PNG stays for download."""
    uploads = tmp_path / "uploads"
    ui = WebUI(engine, tmp_path / "work", upload_root=uploads)
    files = []
    for n in range(2):
        (uploads / f"h{n}").mkdir(parents=True)
        files.append(noise(uploads / f"h{n}" / f"art{n}.png", seed=n))
    first = protect(ui, "batch", files=files[:1], session="page")
    [output] = first.outputs
    served = uploads / "served" / output.original.name  # what gradio copied to send the view to the browser
    served.parent.mkdir()
    served.write_bytes(output.original.read_bytes())
    assert output.original.exists() and output.shown.exists() and output.perturbation.exists()
    second = protect(ui, "batch", files=files[1:], session="page")
    assert not output.original.exists() and not output.shown.exists() and not output.perturbation.exists()
    assert not served.exists() and output.png.exists()
    ui.closed("page")
    assert not any(path.exists() for o in second.outputs for path in (o.original, o.shown, o.perturbation))
    assert all(o.png.exists() for o in second.outputs)


# --------------------------------------------------------------------------
# Reloads: the page is found again by its tab's key


KEY = "0123456789abcdef" * 2  # a tab's key as the browser makes it (32 hex digits)


def test_a_reload_finds_the_running_job_again_follows_it_and_shows_its_result(engine, tmp_path):
    uploads = tmp_path / "uploads"
    (uploads / "h1").mkdir(parents=True)
    source = noise(uploads / "h1" / "art.png")
    ui = WebUI(engine, tmp_path / "work", upload_root=uploads, reload_grace_s=HANG_GUARD_S)
    assert ui.attach("before", KEY, "en") == webui.Resumed("", None, False)  # a new page
    reloaded: list[webui.Resumed] = []
    following: list[webui.Resumed] = []

    def progress(fraction: float, desc: str) -> None:
        if "step 2 of" in desc and not reloaded:
            ui.closed("before")  # the reload: the old page goes away (gradio's unload)...
            reloaded.append(ui.attach("after", KEY, "en"))  # ...and the new one comes with the same key
        elif reloaded and not following:
            following.append(ui.follow("after", "en"))

    ui.artwork(source, "en", "before")
    ui.start("en", "before")
    result = ui.run("single", source, None, None, Settings(**{**FAST, "steps": 4}), "en", "before", progress)
    assert not result.cancelled and len(result.outputs) == 1  # the reload did not stop the job
    [again] = reloaded
    assert again.running and again.result is None and "step 2 of 4" in again.status
    assert again.status.startswith(webui_text.text("en", "reload_running", latest="")[:30])
    assert following[0].running and "step" in following[0].status
    done = ui.follow("after", "en")  # the next tick after the job ended: its result
    assert not done.running and done.result is result and result.uploads_removed and not source.exists()
    # A later reload shows the finished job again.
    ui.closed("after")
    shown = ui.attach("later", KEY, "en")
    assert shown.result is result and shown.status == webui_text.text("en", "reload_found")
    assert result.outputs[0].original.exists()  # its previews are still there to show
    assert ui.start("en", "later") == webui_text.text("en", "starting")  # and the page is usable


def test_a_page_that_does_not_come_back_is_closed_for_good_after_the_grace(engine, tmp_path):
    ui = WebUI(engine, tmp_path / "work", reload_grace_s=0.05)
    source = noise(tmp_path / "art.png")
    attached: list[webui._Page] = []

    def progress(fraction: float, desc: str) -> None:
        if "step" in desc and not attached:
            attached.append(ui._page("page"))
            ui.closed("page")
            assert attached[0].cancel.wait(HANG_GUARD_S)  # the grace ended without a reload: cancelled

    ui.attach("page", KEY, "en")
    ui.start("en", "page")
    result = ui.run("batch", None, None, [source], Settings(**{**FAST, "steps": 1000}), "en", "page", progress)
    assert result.cancelled and attached[0].closed
    assert ui.attach("too late", KEY, "en") == webui.Resumed("", None, False)  # nothing to find: a new page
    assert not any((tmp_path / "work").rglob("previews/*"))


def test_a_reload_while_the_job_waits_says_it_was_not_run(engine, tmp_path):
    ui = WebUI(engine, tmp_path / "work", reload_grace_s=HANG_GUARD_S)
    ui.attach("before", KEY, "zh")
    ui.start("zh", "before")
    ui.closed("before")
    assert ui.run("batch", None, None, [noise(tmp_path / "a.png")], Settings(**FAST), "zh", "before") is None
    assert ui.attach("after", KEY, "zh") == webui.Resumed(webui_text.text("zh", "reload_dropped"), None, False)
    assert ui.start("en", "other") == webui_text.text("en", "starting")  # nobody waits for it
    ui.close_all()


@pytest.mark.parametrize("key", ["", None, "../etc", "0" * 31, "g" * 32, KEY.upper(), {"a": 1}])
def test_a_malformed_key_starts_a_page_that_cannot_be_found_again(engine, tmp_path, key):
    ui = WebUI(engine, tmp_path / "work", reload_grace_s=HANG_GUARD_S)
    ui.attach("page", key, "en")
    assert ui._page("page").key is None
    ui.closed("page")
    assert ui._away == {}


def test_a_duplicated_tab_gets_a_page_of_its_own(engine, tmp_path):
    """A duplicated tab has a copy of the first one's key while the first is open: it does not take over its job."""
    ui = WebUI(engine, tmp_path / "work", reload_grace_s=HANG_GUARD_S)
    ui.attach("first", KEY, "en")
    ui.start("en", "first")
    assert ui.attach("copy", KEY, "en") == webui.Resumed("", None, False)
    assert ui._page("copy") is not ui._page("first") and ui._page("copy").key is None
    assert ui._page("first").phase == "pending"
    ui.closed("copy")
    assert ui._away == {}
    ui.close_all()


def test_partial_uploads_that_browsers_abandoned_are_swept(engine, tmp_path):
    """gradio writes an upload to uploads/tmp* and renames it when complete; a browser that hangs up midway leaves
    the partial file (an unprotected fragment of the artwork) behind."""
    uploads = tmp_path / "uploads"
    (uploads / "h1").mkdir(parents=True)
    ui = WebUI(engine, tmp_path / "work", upload_root=uploads)
    stale, fresh, kept = uploads / "tmpabandoned", uploads / "tmpstillcoming", uploads / "h1" / "art.png"
    for path in (stale, fresh, kept):
        path.write_bytes(b"\x89PNG partial")
    old = stale.stat().st_mtime - webui.STALE_UPLOAD_S - 1
    os.utime(stale, (old, old))
    os.utime(kept, (old, old))
    assert ui.sweep() == 1
    assert not stale.exists() and fresh.exists() and kept.exists()


def test_the_image_editors_exports_are_swept_once_no_page_waits_for_them(engine, tmp_path):
    """The browser uploads the editor's canvas (background.png: the preview, an unprotected copy; composite.png,
    layer_N.png) with a job and again when the editor is cleared after it; what no page holds is swept, but not
    while a page waits for its turn (its exports are read only when its job starts) and not when just uploaded."""
    uploads = tmp_path / "uploads"
    ui = WebUI(engine, tmp_path / "work", upload_root=uploads)
    exports = []
    for n, name in enumerate(("background.png", "composite.png", "layer_0.png", "layer_12.png", "art.png")):
        (uploads / f"h{n}").mkdir(parents=True)
        exports.append(uploads / f"h{n}" / name)
        exports[-1].write_bytes(b"png")
    old = exports[0].stat().st_mtime - webui.STALE_EXPORT_S - 1
    for path in exports[1:]:
        os.utime(path, (old, old))
    ui.start("en", "waiting page")
    assert ui.sweep() == 0  # a page waits: its exports may be among these
    ui.closed("waiting page")
    assert ui.sweep() == 3  # not the one just uploaded, nor the user's own file
    assert [p.exists() for p in exports] == [True, False, False, False, True]
    assert not (uploads / "h1").exists()


def test_the_server_sweeps_on_its_own_until_it_stops(engine, tmp_path):
    uploads = tmp_path / "uploads"
    uploads.mkdir()
    ui = WebUI(engine, tmp_path / "work", upload_root=uploads)
    stale = uploads / "tmpabandoned"
    stale.write_bytes(b"")
    old = stale.stat().st_mtime - webui.STALE_UPLOAD_S - 1
    os.utime(stale, (old, old))
    swept = threading.Event()
    real_sweep = ui.sweep
    ui.sweep = lambda: (real_sweep(), swept.set())  # type: ignore[method-assign]
    ui.keep_clean(every_s=0.01)
    assert swept.wait(HANG_GUARD_S) and not stale.exists()
    ui.close_all()


def test_the_command_line_opens_the_runner_before_serving_the_page(monkeypatch, capsys, tmp_path):
    """`mist webui` refuses what `mist protect` refuses, in the same line, before the page is served: a model that
    is not there, a device this machine lacks."""
    served = []
    monkeypatch.setattr(webui_app, "launch", lambda ui, **kw: served.append(ui))
    missing = tmp_path / "nowhere" / "model.ckpt"
    web = mist.faces.cli.main(["webui", "--model", str(missing)])
    web_err = capsys.readouterr().err
    protect = mist.faces.cli.main(["protect", str(noise(tmp_path / "a.png")), "-o", str(tmp_path / "out"), "--model",
                             str(missing)])
    protect_err = capsys.readouterr().err
    assert web == protect != 0 and served == []
    assert str(missing) in web_err and web_err.splitlines()[0] == protect_err.splitlines()[0]
    if not __import__("torch").cuda.is_available():
        assert mist.faces.cli.main(["webui", "--model", "tiny-random", "--device", "cuda"]) == mist.faces.cli.EXIT_USAGE
        assert "--device: cuda" in capsys.readouterr().err and served == []


def test_pages_that_come_and_go_keep_no_timers(engine, tmp_path):
    """Only a page with something to find again is kept for its reload, and at most MAX_AWAY_PAGES at once: a flood of
    pages opened and closed (each with a key of its own) cannot pile up a timer thread per page."""
    ui = WebUI(engine, tmp_path / "work", reload_grace_s=HANG_GUARD_S)
    threads = threading.active_count()
    for n in range(50):  # idle pages: nothing to find again
        ui.attach(f"idle {n}", f"{n:032x}", "en")
        ui.closed(f"idle {n}")
    assert ui._away == {} and threading.active_count() <= threads  # (threads of earlier tests may end meanwhile)
    for n in range(webui.MAX_AWAY_PAGES + 20):  # pages whose Protect waited: each has a notice for its reload
        ui.attach(f"waiting {n}", f"{n + 1000:032x}", "en")
        ui.start("en", f"waiting {n}")
        ui.closed(f"waiting {n}")
    assert len(ui._away) == webui.MAX_AWAY_PAGES
    assert threading.active_count() <= threads + webui.MAX_AWAY_PAGES
    ui.close_all()


def test_a_crafted_request_cannot_ask_for_more_compute_than_the_page_allows(engine, tmp_path):
    """The page's controls end at 1000 steps and 768 pixels, but a request can send anything: the server's limits
    (`mist webui --max-steps / --max-input-size`) refuse it with a message, and nothing runs."""
    ui = WebUI(engine, tmp_path / "work", work_limits=webui.WorkLimits(max_steps=5, max_input_size=64))
    source = noise(tmp_path / "a.png")
    for settings, words in [({"steps": 6}, "steps: 6 steps per image"), ({"size": 128}, "input-size: 128 is over")]:
        result = protect(ui, "batch", files=[source], settings=Settings(**{**FAST, **settings}))
        assert not result.outputs and words in result.status and "--max-" in result.status
    assert not list((tmp_path / "work").glob("job-*"))
    assert len(protect(ui, "batch", files=[source], settings=Settings(**{**FAST, "steps": 5})).outputs) == 1
