"""The web UI end to end in a real headless Chromium (Playwright), on the tiny random model, on a desktop and on a
phone-sized screen: upload, paint a mask with the mouse, protect, download the PNG and check it; the phone layout; a
reload during a run (the page finds its job again); the language switch; no unprotected original left behind. Needs
Debian's chromium at /usr/bin/chromium and the playwright package (Playwright's own browser download is never used).

The waits are hang guards only: every check waits for an event of the page (a text, a link, a disabled button), never
for a time, so a slow or loaded machine makes the test slower, not wrong."""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
SCREENSHOTS = Path("/tmp")
STRENGTH = 8
PATIENCE_MS = 600_000  # a hang guard, far above what any of these steps takes on a loaded machine
DESKTOP = dict(viewport={"width": 1400, "height": 1100})
PHONE = dict(viewport={"width": 390, "height": 844}, is_mobile=True, has_touch=True, device_scale_factor=3)

if not CHROMIUM.exists():
    pytest.skip(f"{CHROMIUM} is missing (apt-get install chromium)", allow_module_level=True)
playwright_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed")
sync_playwright, expect = playwright_api.sync_playwright, playwright_api.expect
expect.set_options(timeout=PATIENCE_MS)  # a hang guard, as for the page
pytest.importorskip("gradio", reason="gradio is not installed")


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@dataclass
class Server:
    url: str
    log: Path
    temp: Path  # the server's temporary folder: its private folder is made in there

    def private(self) -> Path:
        [root] = self.temp.glob("mist-webui-*")
        return root


@pytest.fixture
def server(tmp_path):
    """`python mist-webui.py --model tiny-random` from the repository root, on a free port of 127.0.0.1; stopped
    as `kill` would (SIGTERM), after which its private folder must be gone."""
    port = free_port()
    temp = tmp_path / "tmp"
    temp.mkdir()
    env = {key: value for key, value in os.environ.items()
           if key not in ("MIST_WEBUI_AUTH", "MIST_MODEL", "GRADIO_TEMP_DIR")}
    env.update(GRADIO_ANALYTICS_ENABLED="False", TMPDIR=str(temp), OMP_NUM_THREADS="2")
    log = (tmp_path / "server.log").open("w")
    process = subprocess.Popen([sys.executable, "mist-webui.py", "--model", "tiny-random", "--port", str(port)],
                               cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}/"
    deadline = time.monotonic() + PATIENCE_MS / 1000
    while True:
        try:
            urllib.request.urlopen(url, timeout=2).close()
            break
        except OSError:
            if process.poll() is not None or time.monotonic() > deadline:
                process.kill()
                pytest.fail(f"the web UI did not start:\n{(tmp_path / 'server.log').read_text()}")
            time.sleep(0.2)
    yield Server(url, tmp_path / "server.log", temp)
    process.terminate()
    try:
        process.wait(30)
    except subprocess.TimeoutExpired:
        process.kill()
    log.close()
    assert list(temp.glob("mist-webui-*")) == [], "the private folder outlived the server"


def artwork(path: Path, size=(256, 256)) -> Path:
    """A picture with smooth gradients and fine noise (a JPEG at the best quality for a .jpg name)."""
    rng = np.random.default_rng(7)
    y, x = np.mgrid[0:size[1], 0:size[0]]
    rgb = np.stack([x, y, (x + y) // 2], axis=-1) % 256 + rng.integers(0, 40, (size[1], size[0], 3))
    Image.fromarray(np.clip(rgb, 0, 255).astype(np.uint8)).save(path, quality=100)
    return path


def set_number(page, elem_id: str, value: int) -> None:
    box = page.locator(f"#{elem_id} input[type=number]")
    box.fill(str(value))
    box.press("Enter")


def choose_artwork(page, path: Path) -> None:
    page.locator("#mist-artwork input[type=file]").set_input_files(str(path))
    page.locator("#mist-editor canvas").first.wait_for(timeout=PATIENCE_MS)


def open_page(browser, server: Server, **context):
    page = browser.new_context(locale="en-US", accept_downloads=True, **context).new_page()
    page.set_default_timeout(PATIENCE_MS)
    page.goto(server.url)
    page.locator("#mist-banner", has_text="NO protection").wait_for()  # the page is up and connected
    return page


def holding(server: Server, source: Path) -> list[Path]:
    """Files in the server's private folder that hold the unprotected original: the upload itself (its bytes) and
    the preview it was painted on. (The editor's own exports of its canvas, at the preview's size, are not found by
    the server after a job; they go with the private folder when the server stops.)"""
    data = source.read_bytes()
    return [p for p in server.private().rglob("*")
            if p.is_file() and (p.read_bytes() == data or p.name.startswith("mist-preview-"))]


@pytest.fixture
def browser():
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS, headless=True)
        yield browser
        browser.close()


def test_desktop_paint_protect_download(server, browser, tmp_path):
    source = artwork(tmp_path / "art.jpg")
    page = open_page(browser, server, **DESKTOP)
    try:
        choose_artwork(page, source)
        zoom_label = page.locator("#mist-editor .zoom-number")
        page.get_by_role("button", name="Brush", exact=True).click()
        zoom, previous = None, ""
        while zoom is None:  # the editor zooms the preview to fit: until the zoom it shows settles
            page.wait_for_timeout(300)
            current = zoom_label.inner_text().strip()
            zoom = float(current.rstrip("%")) / 100 if current == previous and current else None
            previous = current
        canvas = page.locator("#mist-editor canvas").first
        box = canvas.bounding_box()
        side = 256 * zoom
        left, top = box["x"] + (box["width"] - side) / 2, box["y"] + (box["height"] - side) / 2
        page.mouse.move(left + 0.12 * side, top + 0.1 * side)
        page.mouse.down()
        for k in range(1, 21):  # a stroke down the left part of the image
            page.mouse.move(left + 0.12 * side, top + (0.1 + 0.04 * k) * side)
        page.mouse.up()

        set_number(page, "mist-steps", 2)
        set_number(page, "mist-strength", STRENGTH)
        page.locator("#mist-size").get_by_text("256", exact=True).click()
        expect(page.locator("#mist-original-size input[type=checkbox]")).to_be_checked()  # the default
        page.locator("#mist-run").click()

        link = page.locator("#mist-downloads a[download]").first
        link.wait_for()
        with page.expect_download() as download:
            link.click()
        assert download.value.suggested_filename == "art.png"  # named after the upload
        output = tmp_path / "protected.png"
        download.value.save_as(output)
        status = page.locator("#mist-status").inner_text()
        expect(page.locator("#mist-run")).to_be_enabled()
        # The upload was deleted with the job; only the copy kept for the Evaluate tab remains...
        assert [p.parent.name for p in holding(server, source)] == ["originals"]
        expect(page.locator("#mist-artwork a[download]")).to_have_count(0)  # and the page asks for it again
        page.screenshot(path=str(SCREENSHOTS / "mist-webui-desktop.png"), full_page=True)
        page.get_by_role("tab", name="Evaluate").click()
        page.locator("#mist-evaluate-run").click()
        page.locator("#mist-evaluate-summary", has_text="Checked 1 image").wait_for()
        expect(page.locator("#mist-evaluate-grid img").first).to_be_visible()
        verdict = page.locator("#mist-evaluate-summary").inner_text()
        assert holding(server, source) == []  # ...until the check ran
        page.screenshot(path=str(SCREENSHOTS / "mist-webui-evaluate.png"), full_page=True)
    except Exception:
        page.screenshot(path=str(SCREENSHOTS / "mist-webui-desktop.png"), full_page=True)
        print(f"page at the failure: {SCREENSHOTS / 'mist-webui-desktop.png'}; server log:\n{server.log.read_text()}")
        raise

    assert "NO protection" in status and "1 of 1" in status and "deleted" in status and "Evaluate tab" in status
    assert "NO protection" in verdict and "art: protection" in verdict and "SSIM" in verdict
    protected = Image.open(output)
    assert protected.size == (256, 256)
    text = protected.text
    settings = json.loads(text["mist:settings"])
    assert (settings["epsilon"], settings["steps"], settings["input_size"]) == (STRENGTH, 2, 256)
    assert settings["original_size"] is True and settings["mask"]["name"] == "painted"
    assert text["mist:model"] == "tiny-random" and "NO protection" in text["mist:warning"]
    assert text["mist:source"] == "art.jpg"
    before = np.asarray(Image.open(source).convert("RGB"), np.int16)
    change = np.abs(np.asarray(protected.convert("RGB"), np.int16) - before)
    assert change.max() <= STRENGTH
    # Where the stroke lands depends on the zoom and position the editor had reached when it was painted (it animates
    # to fit), so the check does not assume a place: some pixels are protected, and only a stroke's worth of them
    # (without a mask, the random start alone changes nearly every pixel).
    changed = change.max(axis=2) > 0
    assert changed.any(), "the painted stroke was not protected"
    assert changed.mean() < 0.25, f"{changed.mean():.0%} of the pixels changed: more than the painted stroke"


def test_a_refused_file_says_why(server, browser, tmp_path):
    page = open_page(browser, server, **DESKTOP)
    text_file = tmp_path / "drawing.png"
    text_file.write_text("a text file renamed .png")
    page.locator("#mist-artwork input[type=file]").set_input_files(str(text_file))
    expect(page.locator("#mist-status")).to_contain_text("drawing.png cannot be protected: not an image file")
    page.locator("#mist-run").click()  # nothing to protect: the page says so, and does not wait forever
    expect(page.locator("#mist-status")).to_have_text("Upload an image first.")
    expect(page.locator("#mist-run")).to_be_enabled()


def test_a_reload_finds_the_running_job_again_and_its_cancel_works(server, browser, tmp_path):
    source = artwork(tmp_path / "art.jpg")
    page = open_page(browser, server, **DESKTOP)
    status = page.locator("#mist-status")
    try:
        choose_artwork(page, source)
        set_number(page, "mist-steps", 1000)
        page.locator("#mist-size").get_by_text("256", exact=True).click()
        page.locator("#mist-run").click()
        expect(status).to_contain_text(re.compile(r"step \d+ of 1000"))

        page.reload()  # the job goes on, and the reloaded page follows it
        expect(status).to_contain_text("Found this page's job again")
        expect(status).to_contain_text(re.compile(r"step \d+ of 1000"))
        expect(page.locator("#mist-run")).to_be_disabled()
        first = int(re.search(r"step (\d+) of", status.inner_text())[1])
        expect(status).not_to_contain_text(f"step {first} of")  # it moves on
        page.locator("#mist-cancel").click()
        expect(status).to_contain_text("Cancelled.")
        expect(page.locator("#mist-run")).to_be_enabled()
        assert holding(server, source) == []  # the upload went with the job

        second = browser.new_context(locale="en-US").new_page()  # another tab: a page of its own
        second.goto(server.url)
        second.locator("#mist-banner", has_text="NO protection").wait_for()
        expect(second.locator("#mist-status")).to_have_text("")
    except Exception:
        page.screenshot(path=str(SCREENSHOTS / "mist-webui-reload.png"), full_page=True)
        print(f"page at the failure: {SCREENSHOTS / 'mist-webui-reload.png'}; server log:\n{server.log.read_text()}")
        raise


def test_phone_layout_one_job_per_page_a_reload_and_the_language_switch(server, browser, tmp_path):
    source = artwork(tmp_path / "art.jpg")
    page = open_page(browser, server, **PHONE)
    try:
        heading = page.locator("#mist-heading").bounding_box()
        assert heading["width"] > 300, f"the heading is squeezed into {heading['width']} px"
        choose_artwork(page, source)
        set_number(page, "mist-steps", 1000)
        page.locator("#mist-size").get_by_text("256", exact=True).tap()
        page.locator("#mist-run").tap()
        status = page.locator("#mist-status")
        expect(page.locator("#mist-run")).to_be_disabled()
        # The status follows the job (any step: a poll can miss the moment a given step is shown)...
        expect(status).to_contain_text(re.compile(r"step \d+ of 1000"))
        expect(status).to_be_in_viewport()  # ...where the phone shows it, right after the tap
        # A second tap cannot start a second job. (Tapped once the page has scrolled to the status: a tap during the
        # smooth scroll lands where the button was, which can be Cancel by then.)
        page.locator("#mist-run").tap(force=True)
        page.screenshot(path=str(SCREENSHOTS / "mist-webui-phone-running.png"))

        page.reload()  # the page finds its job again; its Cancel frees the queue
        expect(status).to_contain_text("Found this page's job again")
        page.locator("#mist-cancel").tap()
        expect(status).to_contain_text("Cancelled.")
        choose_artwork(page, source)
        set_number(page, "mist-steps", 2)
        page.locator("#mist-size").get_by_text("256", exact=True).tap()
        page.locator("#mist-run").tap()
        expect(status).to_contain_text("1 of 1 image(s) protected")
        expect(page.locator("#mist-protected")).to_be_in_viewport()  # the result scrolls into view on a phone
        page.screenshot(path=str(SCREENSHOTS / "mist-webui-phone-done.png"))
        assert len(list((server.private() / "jobs").glob("job-*"))) == 2  # the cancelled job and this one
        # The uploads are gone; the finished job's originals stay, as a copy, for the Evaluate tab.
        assert [p.parent.name for p in holding(server, source)] == ["originals"]

        page.locator("#mist-language").get_by_text("中文", exact=True).tap()  # labels through gradio's i18n
        page.locator("#mist-run", has_text="开始保护").wait_for()
        expect(page.locator("#mist-artwork")).to_contain_text("你的作品")
        expect(page.get_by_role("tab", name="多张图片")).to_be_visible()  # every tab, not only the selected one
        expect(page.locator("#mist-artwork")).to_contain_text("点击上传")  # gradio's own text in the upload box too
    except Exception:
        page.screenshot(path=str(SCREENSHOTS / "mist-webui-phone.png"), full_page=True)
        print(f"page at the failure: {SCREENSHOTS / 'mist-webui-phone.png'}; server log:\n{server.log.read_text()}")
        raise
