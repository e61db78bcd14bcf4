"""Batches of files as a user runs them: odd entries while scanning, output folders that cannot take the outputs,
concurrent runs in one folder, what resuming compares, minimal metadata and the pre-flight check of inputs."""

from __future__ import annotations

import errno
import fcntl
import hashlib
import json
import os
import re
import threading
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import mist
import mist.runner.jobs
import mist.faces.cli
import mist.common.files
import mist.faces.legacy
import mist.models
import mist.engine.pipeline
from mist.runner import manifest
from mist.runner.inputs import collect_jobs
from mist.runner.jobs import Job, ModelCache, run_jobs
from mist.engine.config import ProtectConfig
from mist.runner.model_identity import ModelIdentity
from mist.runner.preflight import input_problem, output_folder_problem
from support.cli import run_cli

FAST = ["--model", "tiny-random", "--steps", "2", "--input-size", "64"]


def make_image(path: Path, size: tuple[int, int] = (80, 60), seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8), "RGB").save(path)
    return path


def protect(capsys, *args: object) -> tuple[int, str, str]:
    return run_cli(capsys, "protect", *args, *FAST)


def lines_with(text: str, needle: object) -> list[str]:
    return [line for line in re.split(r"[\r\n]+", text) if str(needle) in line]


def png_text(path: Path) -> dict[str, str]:
    with Image.open(path) as img:
        img.load()
        return dict(img.text)


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(autouse=True)
def _no_model_from_environment(monkeypatch):
    monkeypatch.delenv("MIST_MODEL", raising=False)


@pytest.fixture
def computed(monkeypatch) -> list[int]:
    """How many images each protect_many call computed, in order."""
    calls: list[int] = []
    original = mist.engine.pipeline.Protector.protect_many

    def counting(self, pictures, *args, **kwargs):
        calls.append(len(pictures))
        return original(self, pictures, *args, **kwargs)

    monkeypatch.setattr(mist.engine.pipeline.Protector, "protect_many", counting)
    return calls


@pytest.fixture
def loads(monkeypatch) -> list[object]:
    """Every model load of the CLI."""
    seen: list[object] = []
    original = mist.models.load_model

    def counting(where, **options):
        seen.append(where)
        return original(where, **options)

    monkeypatch.setattr(mist.models, "load_model", counting)
    return seen


# --------------------------------------------------------------------------
# 1. Entries that are not images


def test_a_symlink_loop_named_on_the_command_line_fails_only_itself(capsys, tmp_path):
    good = make_image(tmp_path / "good.png")
    loop = tmp_path / "loop.png"
    loop.symlink_to(loop)

    code, out, err = protect(capsys, loop, good, "-o", tmp_path / "out")

    assert code == 1
    assert "Traceback" not in err
    assert len(lines_with(err, loop)) == 1
    assert "symbolic links" in lines_with(err, loop)[0]
    assert (tmp_path / "out" / "good.png").is_file()


def test_a_symlink_loop_as_output_folder_is_one_line(capsys, tmp_path):
    good = make_image(tmp_path / "good.png")
    loop = tmp_path / "out"
    loop.symlink_to(loop)

    code, out, err = protect(capsys, good, "-o", loop)

    assert code == 2
    assert len(lines_with(err, loop)) == 1 and "Traceback" not in err


@pytest.fixture
def odd_folder(tmp_path) -> tuple[Path, dict[str, str]]:
    """A folder with one good image and, named like images, entries that are not image files (and why)."""
    art = tmp_path / "art"
    make_image(art / "good.png")
    (art / "loop.png").symlink_to(art / "loop.png")
    (art / "broken.jpg").symlink_to(art / "gone.jpg")
    make_image(art / "folder.png" / "inside.png", seed=1)
    os.mkfifo(art / "pipe.png")
    return art, {"loop.png": "loop", "broken.jpg": "broken", "folder.png": "folder", "pipe.png": "not a regular"}


def test_scanning_reports_each_entry_that_is_not_an_image_file(capsys, tmp_path, odd_folder):
    art, reasons = odd_folder

    code, out, err = protect(capsys, art, "-o", tmp_path / "out")

    assert code == 0, err
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["good.png"]
    for name, reason in reasons.items():
        [line] = lines_with(err, art / name)
        assert line.startswith(f"skipped {art / name}: ") and reason in line


def test_collect_jobs_calls_on_skip_once_per_entry_and_recursion_enters_folders(tmp_path, odd_folder):
    art, reasons = odd_folder
    skipped: list[tuple[Path, str]] = []

    jobs = collect_jobs([art], tmp_path / "out", recursive=True, on_skip=lambda p, r: skipped.append((p, r)))

    assert [job.source for job in jobs] == [art / "folder.png" / "inside.png", art / "good.png"]
    assert sorted(p.name for p, _ in skipped) == ["broken.jpg", "loop.png", "pipe.png"]  # folder.png was entered


def test_legacy_folder_reports_a_symlink_loop(capsys, tmp_path, monkeypatch):
    make_image(tmp_path / "in" / "a.png")
    (tmp_path / "in" / "loop.png").symlink_to(tmp_path / "in" / "loop.png")
    monkeypatch.chdir(tmp_path)

    code, out, err = run_cli(capsys, "-inp", "in", "--steps", "1", "--input_size", "64", "--model", "tiny-random",
                             main=mist.faces.legacy.main)

    assert code == 0, err
    assert len(lines_with(err, "skipped in/loop.png: symbolic link loop")) == 1


# --------------------------------------------------------------------------
# 2. Output folders that cannot take the outputs


def test_an_output_folder_that_is_a_file_is_refused_before_the_model_loads(capsys, tmp_path, loads):
    source = make_image(tmp_path / "a.png")
    not_a_folder = tmp_path / "out"
    not_a_folder.write_text("my notes")

    code, out, err = protect(capsys, source, "-o", not_a_folder)

    assert code == 2
    assert len(lines_with(err, not_a_folder)) == 1 and "not a folder" in err
    assert loads == []
    assert not_a_folder.read_text() == "my notes"


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_a_read_only_output_folder_is_refused_before_the_model_loads(capsys, tmp_path, loads):
    source = make_image(tmp_path / "a.png")
    folder = tmp_path / "out"
    folder.mkdir(mode=0o500)

    code, out, err = protect(capsys, source, "-o", folder)

    assert code == 2
    assert len(lines_with(err, folder)) == 1 and "ermission" in err
    assert loads == []


def test_output_folder_problem_names_a_file_in_the_way(tmp_path):
    (tmp_path / "file").write_text("x")

    assert "not a folder" in output_folder_problem(tmp_path / "file")
    assert "Not a directory" in output_folder_problem(tmp_path / "file" / "sub")
    assert output_folder_problem(tmp_path / "new" / "sub") is None
    assert (tmp_path / "new" / "sub").is_dir() and list((tmp_path / "new" / "sub").iterdir()) == []


def test_a_full_disk_stops_the_batch_at_the_first_failed_write(capsys, tmp_path, monkeypatch, computed):
    sources = [make_image(tmp_path / "in" / f"{name}.png", seed=n) for n, name in enumerate("abc")]
    written: list[Path] = []
    write = mist.common.files.write_atomic

    def full_disk(path, data):
        if Path(path).suffix != ".png":  # the pre-flight test file still fits
            return write(path, data)
        written.append(Path(path))
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(mist.common.files, "write_atomic", full_disk)

    code, out, err = protect(capsys, *sources, "-o", tmp_path / "out")

    assert code == 1
    assert computed == [1]  # b and c were never computed
    assert written == [tmp_path / "out" / "a.png"]
    assert "No space left" in lines_with(err, tmp_path / "out" / "a.png")[0]
    for source in sources[1:]:
        [line] = lines_with(err, source)
        assert "not done" in line and "full" in line
    assert "0 protected, 0 skipped, 3 failed" in out


# --------------------------------------------------------------------------
# 3. Two runs in one folder


def _block_fsync_of_temporaries(prefix: str, monkeypatch) -> tuple[threading.Event, threading.Event]:
    """Make the first fsync of a temporary file whose name starts with `prefix` wait: returns (reached, release)."""
    reached, release = threading.Event(), threading.Event()
    real_fsync = os.fsync

    def fsync(fd):
        if os.readlink(f"/proc/self/fd/{fd}").rpartition("/")[2].startswith(prefix) and not reached.is_set():
            reached.set()
            release.wait()
        return real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    return reached, release


def test_a_second_run_keeps_the_temporary_file_a_first_run_is_writing(tmp_path, monkeypatch):
    source = make_image(tmp_path / "a.png")
    out = tmp_path / "out"
    argv = ["protect", str(source), "-o", str(out), "-q", *FAST]
    reached, release = _block_fsync_of_temporaries(".a.png.", monkeypatch)
    codes: list[int] = []
    first = threading.Thread(target=lambda: codes.append(mist.faces.cli.main(argv)))
    first.start()
    try:
        assert reached.wait(timeout=300), "the first run never wrote its output"
        [live] = mist.common.files.temporary_files_of(out / "a.png")

        second = mist.faces.cli.main(argv)  # the same command started again while the first is writing

        assert second == 0
        assert live.exists()
    finally:
        release.set()
        first.join()
    assert codes == [0]
    assert png_text(out / "a.png")["mist:source"] == "a.png"
    assert mist.common.files.temporary_files_of(out / "a.png") == []


def test_cleanup_removes_only_temporary_files_no_live_process_holds(tmp_path):
    import subprocess
    import sys

    dest = tmp_path / "a.png"
    writer = subprocess.Popen(
        [sys.executable, "-c",
         "import os, sys\n"
         "import mist.common.files as f\n"
         "real = os.fsync\n"
         "def fsync(fd):\n"
         "    print('writing', flush=True)\n"
         "    sys.stdin.readline()\n"
         "    real(fd)\n"
         "os.fsync = fsync\n"
         f"f.write_atomic({str(dest)!r}, b'new contents')\n"],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert writer.stdout.readline() == "writing\n"
        [live] = mist.common.files.temporary_files_of(dest)
        stale = tmp_path / ".a.png.0123456789ab.tmp"
        stale.write_bytes(b"left by a killed run")

        removed = mist.common.files.remove_stale_temporaries(dest)

        assert removed == [stale]
        assert live.exists() and not stale.exists()
    finally:
        writer.communicate("\n", timeout=60)
    assert writer.returncode == 0
    assert dest.read_bytes() == b"new contents"
    assert mist.common.files.temporary_files_of(dest) == []


def test_a_stale_temporary_file_of_a_complete_output_is_removed(capsys, tmp_path):
    source = make_image(tmp_path / "a.png")
    out = tmp_path / "out"
    assert protect(capsys, source, "-o", out)[0] == 0
    stale = out / ".a.png.0123456789ab.tmp"
    stale.write_bytes(b"left by a killed run")

    code, out_text, err = protect(capsys, source, "-o", out)

    assert code == 0 and "1 skipped" in out_text
    assert not stale.exists()


def test_a_failed_write_keeps_the_old_file_and_leaves_no_temporary_file(tmp_path, monkeypatch):
    dest = tmp_path / "done.png"
    dest.write_bytes(b"old contents")

    def failing_fsync(fd):
        raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(os, "fsync", failing_fsync)
    with pytest.raises(OSError, match="Input/output"):
        mist.common.files.write_atomic(dest, b"new contents")

    assert dest.read_bytes() == b"old contents"
    assert mist.common.files.temporary_files_of(dest) == []


# --------------------------------------------------------------------------
# 4-6. What resuming compares; minimal metadata


def test_batch_size_is_recorded_and_resume_does_not_mix_batch_sizes(capsys, tmp_path, loads):
    sources = [make_image(tmp_path / "in" / f"{name}.png", seed=n) for n, name in enumerate("ab")]
    out = tmp_path / "out"
    assert protect(capsys, *sources, "-o", out, "--batch-size", 2)[0] == 0
    assert json.loads(png_text(out / "a.png")["mist:settings"])["batch_size"] == 2
    loads.clear()

    code, _, err = protect(capsys, *sources, "-o", out)

    assert code == 1
    for name in "ab":
        [line] = lines_with(err, out / f"{name}.png")
        assert "other settings: batch_size 2 (now 1)" in line and "--overwrite" in line
    assert loads == []


class Quiet:
    """A reporter that keeps what it hears."""

    def __init__(self) -> None:
        self.skipped: list[Path] = []
        self.failed: list[str] = []

    def batch_started(self, jobs, to_do): ...
    def model_loading(self, where, device): ...
    def images_started(self, jobs, first, to_do): ...
    def step(self, jobs, progress): ...
    def image_done(self, job, result): ...
    def image_skipped(self, job, reason): self.skipped.append(job.source)
    def image_failed(self, job, message, stage): self.failed.append(message)


@pytest.fixture
def model_files(tmp_path) -> tuple[Path, Path]:
    """Two different model files with the same name (as v1.4 and v1.5 both are model.ckpt)."""
    first, second = tmp_path / "v14" / "model.ckpt", tmp_path / "v15" / "model.ckpt"
    for path, content in ((first, b"weights of one model"), (second, b"weights of another")):
        path.parent.mkdir()
        path.write_bytes(content)
    return first, second


def _run(tmp_path, tiny_model, model: ModelIdentity, **options) -> Quiet:
    """A batch of a.png into tmp_path/out with `model` recorded (the tiny model computes)."""
    config = ProtectConfig(steps=1, input_size=64)
    source = tmp_path / "a.png"
    if not source.exists():
        make_image(source)
    reporter = Quiet()
    models = ModelCache(tiny_model)
    models.identity = lambda: model  # the tiny model computes; the outputs name the model file given
    summary = run_jobs([Job(source, tmp_path / "out" / "a.png")], config, models, reporter, **options)
    assert summary.ok, reporter.failed
    return reporter


def test_resume_tells_models_by_checksum_not_by_name(tmp_path, tiny_model, model_files):
    first, second = model_files
    _run(tmp_path, tiny_model, ModelIdentity(first))
    text = png_text(tmp_path / "out" / "a.png")
    assert text["mist:model-sha256"] == sha(first)
    assert (first.parent / "model.ckpt.sha256").is_file()  # computed once, cached beside the model

    assert _run(tmp_path, tiny_model, ModelIdentity(first)).skipped == [tmp_path / "a.png"]
    with pytest.raises(AssertionError, match="was made with another model"):
        _run(tmp_path, tiny_model, ModelIdentity(second))


def test_resume_compares_the_precision_auto_resolved_to(tmp_path, tiny_model, monkeypatch):
    """`--precision auto` is bf16 on a CPU with native bf16 and fp32 on one without: the outputs differ, so an output
    made on one is not taken as this run's on the other."""
    from mist.models import device

    monkeypatch.setattr(device, "cpu_has_fast_bf16", lambda: True)
    _run(tmp_path, tiny_model, ModelIdentity("tiny-random"))
    assert png_text(tmp_path / "out" / "a.png")["mist:precision"] == "bf16"
    assert _run(tmp_path, tiny_model, ModelIdentity("tiny-random")).skipped == [tmp_path / "a.png"]
    monkeypatch.setattr(device, "cpu_has_fast_bf16", lambda: False)
    with pytest.raises(AssertionError, match=r"was made in bf16 arithmetic \(this run: fp32\)"):
        _run(tmp_path, tiny_model, ModelIdentity("tiny-random"))


def test_the_cached_model_checksum_is_used(tmp_path, tiny_model, model_files):
    first, _ = model_files
    size, mtime = first.stat().st_size, first.stat().st_mtime_ns
    (first.parent / "model.ckpt.sha256").write_text(f"{size} {mtime} {'ab' * 32}\n")

    _run(tmp_path, tiny_model, ModelIdentity(first))

    assert png_text(tmp_path / "out" / "a.png")["mist:model-sha256"] == "ab" * 32


def test_resume_compares_the_mist_version(tmp_path, tiny_model, monkeypatch):
    _run(tmp_path, tiny_model, ModelIdentity("tiny-random"))
    monkeypatch.setattr(mist.runner.jobs, "__version__", "99.0")

    with pytest.raises(AssertionError, match=f"was made by Mist {mist.__version__} \\(this is Mist 99.0\\)"):
        _run(tmp_path, tiny_model, ModelIdentity("tiny-random"))


def test_minimal_metadata_keeps_the_source_out_of_the_image_and_still_resumes(capsys, tmp_path, loads):
    source = make_image(tmp_path / "my secret title.png")
    out = tmp_path / "out"

    code, _, err = protect(capsys, source, "-o", out, "--metadata", "minimal")

    assert code == 0, err
    output = out / "my secret title.png"
    text = png_text(output)
    assert set(text) == {"Software", "mist:version", "mist:method", "mist:algorithm", "mist:settings", "mist:precision",
                         "mist:warning"}
    assert json.loads(text["mist:settings"])["metadata"] == "minimal"
    data = output.read_bytes()
    assert b"secret" not in data and sha(source).encode() not in data and b"tiny-random" not in data
    assert sorted(p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file()) == [
        ".mist/manifest.json", ".mist/manifest.lock", "my secret title.png"]
    loads.clear()

    code, out_text, err = protect(capsys, source, "-o", out, "--metadata", "minimal")
    assert code == 0 and "1 skipped" in out_text and loads == []

    code, _, err = protect(capsys, source, "-o", out)  # full metadata would be another output
    assert code == 1 and "--overwrite" in lines_with(err, output)[0]


def test_minimal_output_is_redone_when_it_or_its_record_changed(capsys, tmp_path):
    source = make_image(tmp_path / "a.png")
    out = tmp_path / "out"
    assert protect(capsys, source, "-o", out, "--metadata", "minimal")[0] == 0
    output = out / "a.png"
    with Image.open(output) as img:
        edited = img.copy()
        text = dict(img.text)
    edited.putpixel((0, 0), tuple(255 - v for v in edited.getpixel((0, 0))))
    mist.common.images.write_png_atomic(edited, output, text)  # same metadata, other pixels

    code, _, err = protect(capsys, source, "-o", out, "--metadata", "minimal")
    assert code == 1 and "no record" in lines_with(err, output)[0]

    assert protect(capsys, source, "-o", out, "--metadata", "minimal", "--overwrite")[0] == 0
    (out / ".mist" / "manifest.json").unlink()
    code, _, err = protect(capsys, source, "-o", out, "--metadata", "minimal")
    assert code == 1 and "no record" in lines_with(err, output)[0]


def test_manifest_is_read_and_rewritten_under_its_lock(tmp_path, monkeypatch):
    output = tmp_path / "b.png"
    lock = manifest.manifest_path(output).with_name("manifest.lock")
    held: list[str] = []

    def noting_whether_locked(name, action):
        def wrapper(*args):
            fd = os.open(lock, os.O_RDONLY)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                held.append(f"{name} unlocked")
            except BlockingIOError:
                held.append(f"{name} locked")
            finally:
                os.close(fd)
            return action(*args)
        return wrapper

    manifest.write_record(output.with_name("a.png"), "1" * 64, {"mist:version": "x"})
    monkeypatch.setattr(manifest, "_read", noting_whether_locked("read", manifest._read))
    monkeypatch.setattr(mist.common.files, "write_atomic",
                        noting_whether_locked("write", mist.common.files.write_atomic))

    manifest.write_record(output, "2" * 64, {"mist:version": "y"})

    assert held == ["read locked", "write locked"]  # another run cannot slip its update in between
    assert manifest.read_record(output.with_name("a.png"), "1" * 64) == {"mist:version": "x"}
    assert manifest.read_record(output, "2" * 64) == {"mist:version": "y"}
    assert manifest.read_record(output, "3" * 64) is None


# --------------------------------------------------------------------------
# 7. Pre-flight


def test_tiny_images_are_upscaled_in_both_modes(tmp_path):
    tiny = make_image(tmp_path / "tiny.png", size=(4, 3))

    assert input_problem(tiny, ProtectConfig(input_size=64)) is None
    assert input_problem(tiny, ProtectConfig(input_size=64, block_num=2)) is None
    assert input_problem(tiny, ProtectConfig(input_size=64, keep_aspect=True)) is None


def test_an_extreme_aspect_ratio_is_refused_only_without_resizing(tmp_path):
    strip = make_image(tmp_path / "strip.png", size=(20000, 1))

    assert input_problem(strip, ProtectConfig(input_size=512)) is None
    problem = input_problem(strip, ProtectConfig(input_size=512, keep_aspect=True))
    assert problem.startswith(f"{strip}: ") and "10240000 x 512" in problem and "\n" not in problem


def test_input_problem_reports_unreadable_files(tmp_path):
    (tmp_path / "text.png").write_text("not an image")

    assert "not an image" in input_problem(tmp_path / "text.png", ProtectConfig())
    assert "not found" in input_problem(tmp_path / "missing.png", ProtectConfig())


def test_a_tiny_image_is_protected_in_resize_mode(capsys, tmp_path):
    tiny = make_image(tmp_path / "tiny.png", size=(4, 4))

    code, _, err = protect(capsys, tiny, "-o", tmp_path / "out")

    assert code == 0, err
    assert Image.open(tmp_path / "out" / "tiny.png").size == (64, 64)


def test_a_mask_of_any_size_is_resized(capsys, tmp_path):
    source = make_image(tmp_path / "a.png", size=(80, 60))
    mask = tmp_path / "mask.png"
    values = np.zeros((50, 50, 3), dtype=np.uint8)
    values[:, :25] = 255  # left half protected
    Image.fromarray(values, "RGB").save(mask)

    code, _, err = protect(capsys, source, "-o", tmp_path / "out", "--mask", mask, "--epsilon", 4)

    assert code == 0, err
    before = np.asarray(Image.open(source).resize((64, 64), Image.Resampling.BICUBIC), dtype=np.int16)
    after = np.asarray(Image.open(tmp_path / "out" / "a.png"), dtype=np.int16)
    assert np.array_equal(after[:, 33:], before[:, 33:]) and not np.array_equal(after[:, :31], before[:, :31])
