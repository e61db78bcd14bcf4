"""The evaluation report opened from disk (file://, no server) in a real headless Chromium: every picture and plot
loads, the random-weights warning and a verdict per image are shown. Needs Debian's chromium at /usr/bin/chromium and
playwright (its own browser download is never used). Marked slow: `python -m pytest -m slow` runs it."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import mist

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync"]
SCREENSHOT = Path("/tmp/mist-evaluation-report.png")

pytestmark = pytest.mark.slow
if not CHROMIUM.exists():
    pytest.skip(f"{CHROMIUM} is missing (apt-get install chromium)", allow_module_level=True)
playwright_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed")


def test_the_report_opens_from_disk_with_every_picture(tmp_path):
    originals, protected = tmp_path / "art", tmp_path / "protected"
    originals.mkdir()
    protected.mkdir()
    rng = np.random.default_rng(0)
    for i in range(2):
        clean = rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)
        Image.fromarray(clean).save(originals / f"art{i}.png")
        noisy = np.clip(clean.astype(int) + rng.integers(-8, 9, clean.shape), 0, 255).astype(np.uint8)
        Image.fromarray(noisy).save(protected / f"art{i}.png")
    mist.evaluate(originals, protected, tmp_path / "report", model="tiny-random", purify="jpeg:75,jpeg:50,blur:1",
                  strengths=(0.25, 0.5), steps=4)
    with playwright_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS, headless=True)
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 1000})
            page.goto((tmp_path / "report" / "index.html").as_uri())
            page.wait_for_load_state("load")
            sizes = page.eval_on_selector_all("img", "images => images.map(i => [i.getAttribute('src'), "
                                                     "i.complete && i.naturalWidth])")
            assert len(sizes) == 2 + 2 * (5 + 2 * 5)  # 2 plots; per image: clean, protected, 3 purified, 2 x 5 outputs
            assert all(width for _, width in sizes), [src for src, width in sizes if not width]
            assert page.locator(".warning").inner_text().startswith("This model has random weights")
            assert page.locator("h2 + p b").count() == 2  # a verdict under each image's heading
            page.screenshot(path=str(SCREENSHOT), full_page=True)
            _check_on_a_phone(browser, tmp_path / "report" / "index.zh.html")
        finally:
            browser.close()


def _check_on_a_phone(browser, chinese: Path) -> None:
    """The Chinese page on a phone-sized screen: the answer in Chinese, every picture loaded, nothing wider than the
    screen but the tables' own scrolling boxes, and pictures three to a row, not squeezed to slivers."""
    phone = browser.new_page(viewport={"width": 390, "height": 844}, device_scale_factor=2, is_mobile=True)
    phone.goto(chinese.as_uri())
    phone.wait_for_load_state("load")
    assert phone.locator("h2").first.inner_text() == "结论"
    assert phone.locator(".warning").inner_text().startswith("此模型为随机权重")
    assert phone.evaluate("document.documentElement.scrollWidth") <= 390
    widths = phone.eval_on_selector_all(".grid img", "images => images.map(i => i.getBoundingClientRect().width)")
    assert widths and min(widths) > 80, widths
    assert all(phone.eval_on_selector_all("img", "images => images.map(i => i.complete && i.naturalWidth > 0)"))
    phone.screenshot(path=str(SCREENSHOT.with_name("mist-evaluation-report-phone.png")), full_page=True)
