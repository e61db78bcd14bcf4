"""The web UI end to end in a real headless Chromium (Playwright), on the tiny random model: upload, paint a mask with
the mouse, protect, download the PNG and check it. Needs Debian's chromium at /usr/bin/chromium and the playwright
package (Playwright's own browser download is never used)."""

from __future__ import annotations

import json
import os
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
SCREENSHOT = Path("/tmp/mist-webui.png")
STRENGTH = 8

if not CHROMIUM.exists():
    pytest.skip(f"{CHROMIUM} is missing (apt-get install chromium)", allow_module_level=True)
sync_playwright = pytest.importorskip("playwright.sync_api", reason="playwright is not installed").sync_playwright
pytest.importorskip("gradio", reason="gradio is not installed")


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@dataclass
class Server:
    url: str
    log: Path


@pytest.fixture
def server(tmp_path):
    """`python mist-webui.py --model tiny-random` from the repository root, on a free port of 127.0.0.1."""
    port = free_port()
    env = {key: value for key, value in os.environ.items() if key not in ("MIST_WEBUI_AUTH", "MIST_MODEL")}
    env.update(GRADIO_ANALYTICS_ENABLED="False", GRADIO_TEMP_DIR=str(tmp_path / "gradio"), OMP_NUM_THREADS="2")
    log = (tmp_path / "server.log").open("w")
    process = subprocess.Popen([sys.executable, "mist-webui.py", "--model", "tiny-random", "--port", str(port)],
                               cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}/"
    deadline = time.monotonic() + 60
    while True:
        try:
            urllib.request.urlopen(url, timeout=2).close()
            break
        except OSError:
            if process.poll() is not None or time.monotonic() > deadline:
                process.kill()
                pytest.fail(f"the web UI did not start:\n{(tmp_path / 'server.log').read_text()}")
            time.sleep(0.2)
    yield Server(url, tmp_path / "server.log")
    process.terminate()
    try:
        process.wait(10)
    except subprocess.TimeoutExpired:
        process.kill()
    log.close()


def artwork(path: Path) -> Path:
    """A 256 x 256 picture with smooth gradients and fine noise."""
    rng = np.random.default_rng(7)
    y, x = np.mgrid[0:256, 0:256]
    rgb = np.stack([x, y, (x + y) // 2], axis=-1) + rng.integers(0, 40, (256, 256, 3))
    Image.fromarray(np.clip(rgb, 0, 255).astype(np.uint8)).save(path)
    return path


def set_number(page, elem_id: str, value: int) -> None:
    box = page.locator(f"#{elem_id} input[type=number]")
    box.fill(str(value))
    box.press("Enter")


def test_paint_protect_download(server, tmp_path):
    source = artwork(tmp_path / "art.png")
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS, headless=True)
        page = browser.new_page(viewport={"width": 1400, "height": 1100}, locale="en-US", accept_downloads=True)
        try:
            page.goto(server.url)
            page.locator("#mist-banner", has_text="NO protection").wait_for()  # the page is up and connected
            zoom_label = page.locator("#mist-editor .zoom-number")
            empty_zoom = zoom_label.inner_text().strip()
            page.locator("#mist-editor input[type=file]").set_input_files(str(source))
            page.get_by_role("button", name="Brush", exact=True).click()

            # A stroke down the left part of the image as the editor shows it (centred in its canvas, zoomed to fit).
            page.wait_for_function("(empty) => document.querySelector('#mist-editor .zoom-number').textContent"
                                   ".trim() !== empty", arg=empty_zoom)  # the image is in: zoomed to fit
            zoom, previous = None, ""
            while zoom is None:  # until the zoom settles
                time.sleep(0.3)
                current = zoom_label.inner_text().strip()
                zoom = float(current.rstrip("%")) / 100 if current == previous else None
                previous = current
            canvas = page.locator("#mist-editor canvas").first
            box = canvas.bounding_box()
            side = 256 * zoom
            left, top = box["x"] + (box["width"] - side) / 2, box["y"] + (box["height"] - side) / 2
            page.mouse.move(left + 0.12 * side, top + 0.1 * side)
            page.mouse.down()
            for k in range(1, 21):
                page.mouse.move(left + 0.12 * side, top + (0.1 + 0.04 * k) * side)
            page.mouse.up()

            set_number(page, "mist-steps", 2)
            set_number(page, "mist-strength", STRENGTH)
            page.locator("#mist-size").get_by_text("256", exact=True).click()
            page.locator("#mist-run").click()

            link = page.locator("#mist-downloads a[download]").first
            link.wait_for(timeout=60_000)
            with page.expect_download() as download:
                link.click()
            assert download.value.suggested_filename == "image.png"
            output = tmp_path / "protected.png"
            download.value.save_as(output)
            status = page.locator("#mist-status").inner_text()
            page.screenshot(path=str(SCREENSHOT), full_page=True)

            page.locator("#mist-language").get_by_text("中文", exact=True).click()
            page.locator("#mist-run", has_text="开始保护").wait_for(timeout=10_000)
        except Exception:
            page.screenshot(path=str(SCREENSHOT), full_page=True)
            print(f"page at the failure: {SCREENSHOT}; server log:\n{server.log.read_text()}")
            raise
        finally:
            browser.close()

    assert "NO protection" in status and "1 of 1" in status
    protected = Image.open(output)
    assert protected.size == (256, 256)
    text = protected.text
    settings = json.loads(text["mist:settings"])
    assert (settings["epsilon"], settings["steps"], settings["input_size"]) == (STRENGTH, 2, 256)
    assert text["mist:model"] == "tiny-random" and "NO protection" in text["mist:warning"]
    before = np.asarray(Image.open(source).convert("RGB").resize((256, 256), Image.Resampling.BICUBIC), np.int16)
    change = np.abs(np.asarray(protected.convert("RGB"), np.int16) - before)
    assert change.max() <= STRENGTH
    assert change[:, 128:].max() == 0, "pixels far from the stroke changed"
    assert change[40:220, :64].max() > 0, "the painted stroke was not protected"
