"""The web UI's Evaluate tab without a browser, on the tiny random model: the img2img check of the page's last job,
and when the copy of that job's originals is deleted."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from mist.faces.webui import app as webui_app
from mist.runner.jobs import ModelCache
from mist.faces.webui.pages import EVALUATE_STRENGTH, Settings, WebUI
from mist.faces.webui.text import text

FAST = dict(steps=2, size=64, epsilon=8, params={"mode": "fused"}, original_size=False)


def noise(path: Path, seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(path)
    return path


@pytest.fixture(scope="module")
def engine():
    return ModelCache("tiny-random")


def protected_page(engine, tmp_path: Path, session: str = "page", seed: int = 0):
    """A page whose job protected one upload (in gradio's upload folder, as the page gets it)."""
    uploads = tmp_path / "uploads"
    (uploads / f"h{seed}").mkdir(parents=True)
    source = noise(uploads / f"h{seed}" / "art.png", seed)
    ui = WebUI(engine, tmp_path / "work", upload_root=uploads)
    ui.start("en", session)
    result = ui.run("single", source, None, None, Settings(**FAST), "en", session)
    assert len(result.outputs) == 1 and result.uploads_removed and not source.exists()  # the upload is gone
    return ui, result


def test_evaluate_shows_the_grid_scores_and_verdict_of_the_last_job_then_deletes_the_originals(engine, tmp_path):
    ui, result = protected_page(engine, tmp_path)
    assert result.originals_kept and text("en", "originals_kept") in webui_app._status_markdown(result, "en")
    kept = ui._page("page").kept
    assert kept is not None and [p.name for p in kept.iterdir()] == ["art.png"]
    locked: list[bool] = []

    def progress(fraction: float, desc: str) -> None:
        locked.append(engine.attack_lock.locked())

    view = ui.evaluate(EVALUATE_STRENGTH, True, "en", "page", progress)
    assert locked and all(locked)  # the model is used under the engine's attack lock, as protection does
    # One row: original | protected | img2img of each | then JPEG q75 of the protected image and its img2img.
    assert view.columns == 6 and len(view.grid) == 6
    assert all(path.is_file() and path.is_relative_to(result.outputs[0].png.parent) for path, _ in view.grid)
    captions = [caption for _, caption in view.grid]
    assert captions[:3] == ["art: original", "art: protected", "art: img2img of the original"]
    assert "SSIM" in captions[3] and "JPEG q75" in captions[5]
    clean, protected = (Image.open(view.grid[i][0]) for i in (0, 1))
    assert clean.size == protected.size == (64, 64) and not np.array_equal(np.asarray(clean), np.asarray(protected))
    assert text("en", "no_protection") in view.summary  # random weights: the numbers say nothing
    assert "- art: protection " in view.summary  # the verdict line of the image
    assert "after the strongest purifier tried" in view.summary  # and the answer for the set
    assert view.originals_removed and not kept.exists() and ui._page("page").kept is None
    again = ui.evaluate(EVALUATE_STRENGTH, False, "zh", "page")
    assert again.grid == [] and again.summary == text("zh", "evaluate_nothing")


def test_kept_originals_are_deleted_by_the_next_job_and_when_the_page_goes_away(engine, tmp_path):
    ui, first = protected_page(engine, tmp_path, seed=1)
    kept = ui._page("page").kept
    assert kept.is_dir()
    ui.start("en", "page")
    empty = ui.run("single", None, None, None, Settings(**FAST), "en", "page")  # a job with nothing to protect
    assert not empty.originals_kept
    assert not kept.exists() and ui._page("page").kept is None  # only the last job is ever evaluated

    ui, second = protected_page(engine, tmp_path, seed=2)
    kept = ui._page("page").kept
    ui.closed("page")  # the page is closed or reloaded
    assert not kept.exists() and "page" not in ui._pages
    assert second.outputs[0].png.exists()  # the protected output is not the user's upload: it stays


def test_the_page_has_an_evaluate_tab(tmp_path):
    pytest.importorskip("gradio")
    demo = webui_app.build_app(WebUI(ModelCache("tiny-random"), tmp_path))
    by_id = {getattr(block, "elem_id", None): block for block in demo.blocks.values()}
    assert by_id["mist-evaluate-strength"].value == EVALUATE_STRENGTH and by_id["mist-evaluate-jpeg"].value is False
    assert {"mist-evaluate-run", "mist-evaluate-summary", "mist-evaluate-grid"} <= set(by_id)


def test_a_failed_copy_leaves_the_job_intact_and_nothing_to_evaluate(engine, tmp_path, monkeypatch):
    def full_disk(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr("mist.faces.webui.pages.shutil.copyfile", full_disk)
    ui, result = protected_page(engine, tmp_path)
    assert result.outputs[0].png.is_file() and not result.originals_kept
    assert not (result.outputs[0].png.parent / "originals").exists()
    assert ui.evaluate(EVALUATE_STRENGTH, False, "en", "page").summary == text("en", "evaluate_nothing")


def test_cancel_stops_an_evaluation_at_its_next_unit_and_keeps_the_originals(engine, tmp_path):
    """Cancel during Evaluate stops it (it used to say "Cancelling..." and run to the end, holding the lock every
    page's Protect waits for); the originals stay, so the check can be run again."""
    ui, _ = protected_page(engine, tmp_path)
    kept = ui._page("page").kept
    seen = []

    def progress(fraction: float, desc: str) -> None:
        seen.append(desc)
        if len(seen) == 2:
            ui.cancel("en", "page")  # the page's Cancel, pressed while the check runs

    view = ui.evaluate(EVALUATE_STRENGTH, True, "en", "page", progress)
    assert view.summary == text("en", "evaluate_cancelled") and view.grid == []
    assert len(seen) == 2 and not engine.attack_lock.locked()
    assert kept.exists() and ui._page("page").kept == kept and ui._page("page").phase == "idle"
    assert list((kept.parent / ".unfinished").iterdir())  # the units finished before the cancel, for the rerun
    again = ui.evaluate(EVALUATE_STRENGTH, False, "en", "page")  # runs to the end this time
    assert again.grid and again.originals_removed and not kept.exists()
    assert not (kept.parent / ".unfinished").exists()  # it held purified copies of the originals


def test_a_reload_stops_the_evaluation_and_the_page_found_again_can_run_it_once_more(engine, tmp_path):
    key = "ab" * 16
    ui, result = protected_page(engine, tmp_path)
    ui.reload_grace_s = 600.0
    ui.attach("page", key, "en")
    kept = ui._page("page").kept
    seen = []

    def progress(fraction: float, desc: str) -> None:
        seen.append(desc)
        if len(seen) == 1:
            ui.closed("page")  # reloaded while the check runs

    view = ui.evaluate(EVALUATE_STRENGTH, True, "en", "page", progress)
    assert view.summary == text("en", "evaluate_cancelled") and len(seen) == 1
    again = ui.attach("reloaded", key, "en")
    assert again.status == text("en", "reload_evaluate") and again.result is result
    assert kept.exists() and ui.evaluate(EVALUATE_STRENGTH, False, "en", "reloaded").grid
    assert not kept.exists()


def test_the_grid_goes_with_the_page(engine, tmp_path):
    """The grid shows unprotected pictures (the original, its img2img): deleted when the page is closed, as the
    job's previews are."""
    ui, _ = protected_page(engine, tmp_path)
    view = ui.evaluate(EVALUATE_STRENGTH, False, "en", "page")
    assert view.grid and all(path.exists() for path, _ in view.grid)
    ui.closed("page")
    assert not any(path.exists() for path, _ in view.grid)
