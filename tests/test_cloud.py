"""Running Mist on a rented server: --then, resuming after kill -9, download-model, doctor, MIST_HOME, install.sh."""

from __future__ import annotations

import hashlib
import http.server
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import mist.cli
from mist import download as downloads
from mist.models import locate

REPO = Path(__file__).resolve().parents[1]
FAST = ("--model", "tiny-random", "--steps", "2", "--input-size", "64")


def _images(folder: Path, count: int) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(count):
        pixels = np.random.default_rng(i).integers(0, 256, (40, 40, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(folder / f"img{i}.png")
    return folder


def _run(capsys, *args):
    capsys.readouterr()
    code = mist.cli.main([str(a) for a in args])
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture(autouse=True)
def _clean_environment(monkeypatch):
    for name in ("MIST_MODEL", "MIST_HOME", "HF_TOKEN", "HF_ENDPOINT"):
        monkeypatch.delenv(name, raising=False)


def test_then_runs_after_a_clean_batch_only(capsys, tmp_path):
    source = _images(tmp_path / "in", 2)
    marker = tmp_path / "shutdown-ran"
    code, out, _ = _run(capsys, "protect", source, "-o", tmp_path / "out", *FAST, "--then", f"touch '{marker}'")
    assert code == 0 and marker.exists() and "running:" in out

    marker.unlink()
    (source / "broken.png").write_text("not an image")
    code, _, err = _run(capsys, "protect", source, "-o", tmp_path / "out2", *FAST, "--then", f"touch '{marker}'")
    assert code == 1 and not marker.exists() and "not running --then" in err

    code, _, _ = _run(capsys, "protect", source, "-o", tmp_path / "out3", *FAST, "--then", f"touch '{marker}'",
                      "--then-always")
    assert code == 1 and marker.exists()


def test_eta_for_the_batch_is_printed_after_the_first_image(capsys, tmp_path):
    code, out, _ = _run(capsys, "protect", _images(tmp_path / "in", 3), "-o", tmp_path / "out", *FAST)
    assert code == 0 and "estimated time for the other 2 image(s)" in out


def test_a_batch_killed_mid_way_resumes_without_partial_or_duplicate_outputs(tmp_path):
    source = _images(tmp_path / "in", 6)
    out = tmp_path / "out"
    command = [sys.executable, "-m", "mist.cli", "protect", str(source), "-o", str(out), "--model", "tiny-random",
               "--steps", "40", "--input-size", "64", "-q"]
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 120
        while not list(out.glob("*.png")) and time.monotonic() < deadline:
            time.sleep(0.05)
    finally:
        process.send_signal(signal.SIGKILL)
        process.wait()
    first = {p.name for p in out.glob("*.png")}
    assert 0 < len(first) < 6, "kill the batch part-way"
    for png in out.glob("*.png"):
        Image.open(png).load()  # every output present is complete
    done = subprocess.run(command[:-1], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert f"{len(first)} skipped" in done.stdout and f"{6 - len(first)} protected" in done.stdout
    assert sorted(p.name for p in out.iterdir()) == [f"img{i}.png" for i in range(6)]  # no temp files, no extras


# ----------------------------------------------------------------------------------------------- download-model

PAYLOAD = os.urandom(200_000)


class _Server(http.server.BaseHTTPRequestHandler):
    status = 200

    def log_message(self, *args):
        pass

    def do_GET(self):
        if self.status != 200:
            self.send_error(self.status)
            return
        self.send_response(200)
        self.send_header("Content-Length", str(len(PAYLOAD)))
        self.end_headers()
        self.wfile.write(PAYLOAD)


@pytest.fixture
def mirror(monkeypatch):
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Server)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{server.server_port}")
    remote = downloads.Remote("{endpoint}/repo/model.ckpt", hashlib.sha256(PAYLOAD).hexdigest(), "model.ckpt")
    monkeypatch.setitem(downloads.MODELS, "v1-4", remote)
    yield server
    server.shutdown()


def test_download_model_goes_to_mist_home_and_is_found_there(capsys, tmp_path, monkeypatch, mirror):
    monkeypatch.setenv("MIST_HOME", str(tmp_path / "persistent"))
    monkeypatch.chdir(tmp_path)
    code, out, _ = _run(capsys, "download-model", "-q")
    target = tmp_path / "persistent" / "models/ldm/stable-diffusion-v1/model.ckpt"
    assert code == 0 and target.read_bytes() == PAYLOAD and "SHA-256 verified" in out
    assert locate.resolve_model() == target.resolve()
    assert (target.parent / "model.ckpt.sha256").read_text().split()[-1] == hashlib.sha256(PAYLOAD).hexdigest()


def test_download_model_errors_are_one_line(capsys, tmp_path, mirror):
    _Server.status = 404
    try:
        code, _, err = _run(capsys, "download-model", "-q", "--to", tmp_path / "m.ckpt")
    finally:
        _Server.status = 200
    assert code == 1 and len(err.strip().splitlines()) == 1 and "404" in err
    assert not (tmp_path / "m.ckpt").exists()


# ------------------------------------------------------------------------------------------------------ doctor

def test_doctor_reports_machine_model_disk_and_a_recommendation(capsys, tmp_path):
    model = tmp_path / "custom.ckpt"
    model.write_bytes(b"weights")
    code, out, _ = _run(capsys, "doctor", "--model", model, "-o", tmp_path)
    assert code == 0
    for label in ("python:", "pytorch:", "device:", "model:", "disk:", "recommended:"):
        assert label in out
    assert "not a known SD v1 release" in out and "--precision" in out
    digest = hashlib.sha256(b"weights").hexdigest()
    assert (tmp_path / "custom.ckpt.sha256").read_text().split()[-1] == digest


def test_doctor_flags_a_missing_model(capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    code, out, _ = _run(capsys, "doctor")
    assert code == 1 and "download-model" in out and "problem" in out


def test_recommendation_adds_low_memory_only_when_memory_is_short():
    from mist.doctor import recommend

    import torch

    cpu = torch.device("cpu")
    roomy, tight, tiny = recommend(cpu, 64.0), recommend(cpu, 5.0), recommend(cpu, 2.0)
    assert "--low-memory" not in roomy.replace("no --low-memory", "")
    assert "--low-memory" in tight.replace("no --low-memory", "") or "--low-memory" in tiny
    assert "--block-num 2" in tiny


# ----------------------------------------------------------------------------------------------------- install.sh

@pytest.mark.slow
def test_install_script_twice_second_run_is_quick(tmp_path):
    env = {**os.environ, "MIST_TORCH": "torch==2.13.0"}
    first = subprocess.run(["bash", str(REPO / "install.sh"), str(tmp_path / "work")], env=env, capture_output=True,
                           text=True, timeout=1800)
    assert first.returncode == 0, first.stderr
    started = time.monotonic()
    second = subprocess.run(["bash", str(REPO / "install.sh"), str(tmp_path / "work")], env=env,
                            capture_output=True, text=True, timeout=600)
    assert second.returncode == 0 and "up to date" in second.stdout
    assert time.monotonic() - started < 20
    launched = subprocess.run([str(tmp_path / "work" / "mist"), "--version"], capture_output=True, text=True)
    assert launched.returncode == 0 and "mist" in launched.stdout
