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

import mist.faces.cli
from mist.common import download as downloads
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
    code = mist.faces.cli.main([str(a) for a in args])
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture(autouse=True)
def _clean_environment(monkeypatch):
    for name in ("MIST_MODEL", "MIST_HOME", "MIST_LAUNCHER", "HF_TOKEN", "HF_ENDPOINT", "CUDA_VISIBLE_DEVICES"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(sys, "prefix", sys.prefix)  # tests below point it at a fake environment


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
    command = [sys.executable, "-m", "mist.faces.cli", "protect", str(source), "-o", str(out), "--model", "tiny-random",
               "--steps", "10", "--input-size", "64", "-q"]
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        # Wait for the first finished output (or the end of the run), however slow the machine is.
        while not list(out.glob("*.png")) and process.poll() is None:
            time.sleep(0.05)
    finally:
        process.send_signal(signal.SIGKILL)
        process.wait()
    first = {p.name for p in out.glob("*.png")}
    assert 0 < len(first) < 6, "kill the batch part-way"
    for png in out.glob("*.png"):
        Image.open(png).load()  # every output present is complete
    done = subprocess.run(command[:-1], capture_output=True, text=True, timeout=1800)  # a hang guard only
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
    assert "not an official SD 1.x file" in out and "--precision" in out
    digest = hashlib.sha256(b"weights").hexdigest()
    assert (tmp_path / "custom.ckpt.sha256").read_text().split()[-1] == digest


def test_doctor_flags_a_missing_model(capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    code, out, _ = _run(capsys, "doctor")
    assert code == 1 and "download-model" in out and "problem" in out


def test_recommendation_adds_low_memory_only_when_memory_is_short():
    from mist.faces.doctor import recommend

    import torch

    cpu = torch.device("cpu")
    roomy, tight, tiny = recommend(cpu, 64.0), recommend(cpu, 5.0), recommend(cpu, 2.0)
    assert "--low-memory" not in roomy.replace("no --low-memory", "")
    assert "--low-memory" in tight.replace("no --low-memory", "") or "--low-memory" in tiny
    assert "--block-num 2" in tiny


def test_doctor_knows_every_official_sd1_file(capsys, tmp_path):
    from mist.runner.model_identity import remember_checksum

    model = tmp_path / "v1-5-pruned.ckpt"
    model.write_bytes(b"stand-in")
    # The checksum cache stands in for hashing a 7 GB file: doctor trusts it while size and mtime are unchanged.
    remember_checksum(model, "e1441589a6f3c5a53f5f54d0975a18a7feb7cdf0b0dee276dfc3331ae376a053")
    code, out, _ = _run(capsys, "doctor", "--model", model, "-o", tmp_path)
    assert code == 0 and "SD v1.5 (v1-5-pruned.ckpt), checksum verified" in out and "damaged" not in out


# ------------------------------------------------------------------------------------ NVIDIA driver and PyTorch

# nvidia-smi's banner as drivers print it: a recent one and the older layout (the CUDA version is what matters).
SMI_BANNER = """Sat Nov 28 21:30:00 2026
+-----------------------------------------------------------------------------------------+
| NVIDIA-SMI {driver}              Driver Version: {driver}      CUDA Version: {cuda}     |
|-----------------------------------------+------------------------+----------------------+
| GPU  Name                 Persistence-M | Bus-Id          Disp.A | Volatile Uncorr. ECC |
|   0  NVIDIA A10                     On  |   00000000:00:07.0 Off |                    0 |
+-----------------------------------------+------------------------+----------------------+
"""
SMI_BANNER_OLD = """+-----------------------------------------------------------------------------+
| NVIDIA-SMI 470.82.01    Driver Version: 470.82.01    CUDA Version: {cuda}     |
|-------------------------------+----------------------+----------------------+
"""


def _fake_smi(folder: Path, cuda: str | None, banner: str = SMI_BANNER) -> Path:
    """A fake `nvidia-smi` in `folder`: prints the banner for `cuda`, or fails like a driver that does not answer."""
    folder.mkdir(parents=True, exist_ok=True)
    script = folder / "nvidia-smi"
    if cuda is None:
        body = "echo \"NVIDIA-SMI has failed because it couldn't communicate with the NVIDIA driver.\"; exit 9\n"
    else:
        body = "cat <<'OUT'\n" + banner.format(driver="550.54.15", cuda=cuda) + "OUT\n"
    script.write_text("#!/bin/sh\n" + body)
    script.chmod(0o755)
    return folder


@pytest.fixture
def gpu_machine(monkeypatch, tmp_path):
    """Returns a function that makes this process see a fake NVIDIA driver (nvidia-smi on PATH) with a given CUDA."""
    from mist.models import cuda_driver

    def install(cuda: str | None, banner: str = SMI_BANNER):
        folder = _fake_smi(tmp_path / f"smi-{cuda}", cuda, banner)
        monkeypatch.setenv("PATH", f"{folder}{os.pathsep}{os.environ['PATH']}")
        monkeypatch.setattr(cuda_driver, "NVIDIA_PROC", folder)  # "the kernel module is loaded"

    return install


def test_driver_cuda_version_is_read_from_nvidia_smi(gpu_machine):
    from mist.models import cuda_driver

    gpu_machine("12.4")
    assert cuda_driver.probe() == cuda_driver.Driver(True, (12, 4), "")
    gpu_machine("11.4", SMI_BANNER_OLD)
    assert cuda_driver.probe().cuda == (11, 4)
    gpu_machine(None)
    broken = cuda_driver.probe()
    assert broken.present and broken.cuda is None and "couldn't communicate" in broken.detail


def test_no_nvidia_driver_means_no_gpu(monkeypatch, tmp_path):
    from mist.models import cuda_driver

    monkeypatch.setenv("PATH", str(tmp_path))  # no nvidia-smi anywhere
    monkeypatch.setattr(cuda_driver, "NVIDIA_PROC", tmp_path / "absent")
    assert cuda_driver.probe() == cuda_driver.Driver(False, None, "")


@pytest.mark.parametrize("cuda, index", [((11, 8), "cu118"), ((12, 0), "cu118"), ((12, 2), "cu121"),
                                         ((12, 4), "cu124"), ((12, 5), "cu124"), ((12, 7), "cu126"),
                                         ((12, 8), "cu128"), ((13, 0), "cu128"), ((11, 4), None)])
def test_torch_index_is_the_newest_build_the_driver_runs(cuda, index):
    from mist.models.cuda_driver import torch_index

    found = torch_index(cuda)
    assert (found.rsplit("/", 1)[-1] if found else None) == index


def _torch_cuda(monkeypatch, available: bool, built_for: str | None):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: available)
    monkeypatch.setattr(torch.version, "cuda", built_for)


def test_cuda_problem_names_the_build_and_the_driver(monkeypatch, gpu_machine):
    from mist.models.device import cuda_problem

    gpu_machine("12.2")
    _torch_cuda(monkeypatch, False, "12.8")
    problem = cuda_problem()
    assert "built for CUDA 12.8" in problem and "supports CUDA 12.2" in problem
    assert "https://download.pytorch.org/whl/cu121" in problem

    _torch_cuda(monkeypatch, False, None)
    assert "CPU-only build" in cuda_problem()

    _torch_cuda(monkeypatch, False, "12.1")
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    assert "CUDA_VISIBLE_DEVICES" in cuda_problem()


def test_no_cuda_problem_without_nvidia_or_with_working_cuda(monkeypatch, tmp_path, gpu_machine):
    from mist.models import cuda_driver
    from mist.models.device import cuda_problem

    monkeypatch.setenv("PATH", str(tmp_path))
    monkeypatch.setattr(cuda_driver, "NVIDIA_PROC", tmp_path / "absent")
    _torch_cuda(monkeypatch, False, None)
    assert cuda_problem() is None  # a plain CPU machine: nothing to say
    gpu_machine("12.4")
    _torch_cuda(monkeypatch, True, "12.4")
    assert cuda_problem() is None


def test_doctor_and_protect_say_loudly_that_the_gpu_is_unused(capsys, monkeypatch, tmp_path, gpu_machine):
    gpu_machine("12.2")
    _torch_cuda(monkeypatch, False, "12.8")
    code, out, _ = _run(capsys, "doctor", "--model", "tiny-random", "-o", tmp_path)
    assert code == 1 and "cuda: an NVIDIA GPU is present but PyTorch cannot use it" in out and "problem" in out
    code, _, err = _run(capsys, "protect", _images(tmp_path / "in", 1), "-o", tmp_path / "out", *FAST, "-q")
    assert code == 0 and "WARNING: an NVIDIA GPU is present" in err and "built for CUDA 12.8" in err
    import mist.faces.webui.app

    monkeypatch.setattr(mist.faces.webui.app, "main", lambda args, models, auth: 0)  # the page is not served here
    code, _, err = _run(capsys, "webui", "--model", "tiny-random")
    assert code == 0 and "WARNING: an NVIDIA GPU is present" in err and "built for CUDA 12.8" in err


# ------------------------------------------------------------------------- where a cloud install's files are found

def test_models_in_the_recorded_home_are_found_without_the_launcher(tmp_path, monkeypatch):
    """`WORK/mist-env/bin/python mist_v3.py` from WORK/mist: no MIST_HOME, but install.sh recorded WORK."""
    work = tmp_path / "work"
    env = work / "mist-env"
    env.mkdir(parents=True)
    (env / locate.HOME_RECORD).write_text(f"{work}\n")
    model = work / locate.SEED_MODEL_PATH
    model.parent.mkdir(parents=True)
    model.write_bytes(b"weights")
    clone = work / "mist"
    clone.mkdir()
    monkeypatch.chdir(clone)
    monkeypatch.setattr(sys, "prefix", str(env))
    assert locate.resolve_model() == model.resolve()
    assert locate.default_model_path() == model


def test_messages_name_the_launcher_when_mist_is_not_on_path(capsys, tmp_path, monkeypatch):
    launcher = tmp_path / "work" / "bin" / "mist"
    launcher.parent.mkdir(parents=True)
    launcher.write_text("#!/bin/sh\n")
    launcher.chmod(0o755)
    monkeypatch.setenv("MIST_LAUNCHER", str(launcher))
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    monkeypatch.chdir(tmp_path)
    assert locate.mist_command() == str(launcher)
    code, out, _ = _run(capsys, "doctor")
    assert code == 1 and f"{launcher} download-model" in out
    monkeypatch.setenv("PATH", str(launcher.parent))
    assert locate.mist_command() == "mist"


# ----------------------------------------------------------------------------------------------------- install.sh

def _install_sh(*args, env=None, cwd=None) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(REPO / "install.sh"), *map(str, args)], capture_output=True, text=True,
                          env={**os.environ, **(env or {})}, cwd=cwd, timeout=120)


def _plan(result: subprocess.CompletedProcess) -> dict[str, str]:
    assert result.returncode == 0, result.stderr
    return dict(line.strip().split(": ", 1) for line in result.stdout.splitlines()[1:])


def test_install_layout_launcher_never_collides_with_the_clone(tmp_path):
    work = tmp_path / "work"
    (work / "mist").mkdir(parents=True)  # where the guide clones Mist
    plan = _plan(_install_sh("--dry-run", work))
    assert plan["launcher"] == str(work / "bin" / "mist")
    assert plan["Python environment"] == f"{work / 'mist-env'} (create)"
    assert sorted(p.name for p in work.iterdir()) == ["mist"]  # a dry run changes nothing


def test_install_refuses_a_folder_where_the_launcher_goes(tmp_path):
    work = tmp_path / "work"
    (work / "bin" / "mist").mkdir(parents=True)
    for args in (("--dry-run", work), (work,)):
        result = _install_sh(*args)
        assert result.returncode == 1 and "bin/mist is a folder" in result.stderr
        assert len(result.stderr.strip().splitlines()) == 1
    assert not (work / "mist-env").exists()  # refused before building anything


def test_install_rebuilds_an_environment_whose_python_is_gone_and_keeps_foreign_folders(tmp_path):
    work = tmp_path / "work"
    env = work / "mist-env"
    (env / "bin").mkdir(parents=True)
    (env / "pyvenv.cfg").write_text("home = /usr/bin\n")
    (env / "bin" / "python").symlink_to(tmp_path / "removed-python")  # the base interpreter was removed
    assert _plan(_install_sh("--dry-run", work))["Python environment"].endswith("(rebuild (its Python no longer runs))")

    other = tmp_path / "other"
    (other / "mist-env").mkdir(parents=True)
    (other / "mist-env" / "notes.txt").write_text("mine")
    result = _install_sh(other)
    assert result.returncode == 1 and "is not a Python environment" in result.stderr
    assert (other / "mist-env" / "notes.txt").read_text() == "mine"


@pytest.mark.parametrize("cuda, expected", [("11.8", "cu118"), ("12.2", "cu121"), ("12.4", "cu124"),
                                            ("12.6", "cu126"), ("12.9", "cu128"), ("13.0", "cu128")])
def test_install_picks_the_pytorch_build_for_the_driver(tmp_path, cuda, expected):
    smi = _fake_smi(tmp_path / "bin", cuda)
    # MIST_TORCH set: never reuse this machine's own PyTorch, so the test does not depend on what it has.
    plan = _plan(_install_sh("--dry-run", tmp_path / "work", env={"PATH": f"{smi}{os.pathsep}{os.environ['PATH']}",
                                                                   "MIST_TORCH": "torch"}))
    assert plan["PyTorch"] == (f"torch from https://download.pytorch.org/whl/{expected} "
                               f"(the NVIDIA driver supports CUDA {cuda})")


def test_install_refuses_a_driver_older_than_every_build_and_obeys_an_explicit_index(tmp_path):
    path = {"PATH": f"{_fake_smi(tmp_path / 'bin', '11.4')}{os.pathsep}{os.environ['PATH']}", "MIST_TORCH": "torch"}
    result = _install_sh("--dry-run", tmp_path / "work", env=path)
    assert result.returncode == 1 and "supports CUDA 11.4 only" in result.stderr and "MIST_TORCH_INDEX" in result.stderr
    index = "https://mirror.example/whl/cu118"
    plan = _plan(_install_sh("--dry-run", tmp_path / "work", env={**path, "MIST_TORCH_INDEX": index,
                                                                    "MIST_TORCH": "torch==2.6.0"}))
    assert plan["PyTorch"] == f"torch==2.6.0 from {index} (MIST_TORCH_INDEX)"


def _fake_system_torch(folder: Path, version: str) -> Path:
    """A stand-in for a provider's preinstalled PyTorch that runs CUDA, importable through PYTHONPATH."""
    package = folder / "torch"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text(f"__version__ = {version!r}\nfrom . import cuda\n")
    (package / "cuda.py").write_text("def is_available():\n    return True\n")
    return folder


@pytest.mark.parametrize("version, reused", [("2.6.0+cu124", True), ("2.4.1+cu121", False)])
def test_install_reuses_a_preinstalled_cuda_pytorch_only_if_new_enough(tmp_path, version, reused):
    env = {"PATH": f"{_fake_smi(tmp_path / 'bin', '12.4')}{os.pathsep}{os.environ['PATH']}", "PYTHON": sys.executable,
           "PYTHONPATH": str(_fake_system_torch(tmp_path / "site", version))}
    plan = _plan(_install_sh("--dry-run", tmp_path / "work", env=env))
    if reused:
        expected = f"reused from {sys.executable} ({sys.executable} already has PyTorch {version}"
        assert plan["PyTorch"].startswith(expected)
    else:
        assert plan["PyTorch"].startswith("torch from https://download.pytorch.org/whl/cu124")


def _guide_install_commands(guide: Path) -> str:
    """The install block of a cloud guide (the first bash block of its section 2), exactly as written."""
    text = guide.read_text(encoding="utf-8")
    section = text[text.index("\n## 2."):]
    return section.split("```bash\n", 1)[1].split("```", 1)[0]


def test_both_guides_give_the_same_install_commands():
    english = _guide_install_commands(REPO / "docs" / "cloud.md")
    assert english == _guide_install_commands(REPO / "docs" / "cloud.zh-CN.md")
    assert "bash mist/install.sh WORK" in english


def _clone_source(tmp_path: Path) -> dict[str, str]:
    """A git repository holding this working tree's files, and git settings that send the guide's GitHub URL to it,
    so the guide's `git clone` runs exactly as written and clones the code under test."""
    listed = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=REPO,
                            capture_output=True, check=True).stdout.decode().split("\0")
    source = tmp_path / "upstream" / "mist.git"
    for name in filter(None, listed):
        if (REPO / name).is_file():
            (source / name).parent.mkdir(parents=True, exist_ok=True)
            (source / name).write_bytes((REPO / name).read_bytes())
            (source / name).chmod((REPO / name).stat().st_mode)
    git = ["git", "-c", "user.name=test", "-c", "user.email=test@localhost"]
    subprocess.run(["git", "init", "-q"], cwd=source, check=True)
    subprocess.run([*git, "add", "-A"], cwd=source, check=True)
    subprocess.run([*git, "commit", "-qm", "snapshot"], cwd=source, check=True)
    return {"GIT_CONFIG_COUNT": "1", "GIT_CONFIG_KEY_0": f"url.{source.parent.as_uri()}/.insteadOf",
            "GIT_CONFIG_VALUE_0": "https://github.com/mist-project/"}


@pytest.mark.slow
def test_the_guides_install_commands_work_verbatim_in_a_fresh_folder(tmp_path):
    """docs/cloud.md step 2 as written (WORK replaced), a second run, the launcher, and the original command's model
    lookup from the clone. Installs PyTorch and Mist for real (from the pip cache): several minutes."""
    work = tmp_path / "work"
    work.mkdir()
    commands = _guide_install_commands(REPO / "docs" / "cloud.md").replace("WORK", str(work))
    env = {**os.environ, **_clone_source(tmp_path), "MIST_TORCH": "torch==2.13.0",
           "PIP_CACHE_DIR": os.environ.get("PIP_CACHE_DIR", str(Path.home() / ".cache" / "pip"))}
    env.pop("VIRTUAL_ENV", None)
    first = subprocess.run(["bash", "-euc", commands], cwd=tmp_path, env=env, capture_output=True, text=True,
                           timeout=3600)
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    launcher = work / "bin" / "mist"
    assert (work / "mist" / ".git").is_dir() and launcher.is_file()

    version = subprocess.run([str(launcher), "--version"], capture_output=True, text=True, env=env)
    assert version.returncode == 0 and version.stdout.startswith("mist ")
    doctor = subprocess.run([str(launcher), "doctor", "-o", str(work)], capture_output=True, text=True, env=env,
                            cwd=tmp_path)
    assert "Is a directory" not in doctor.stderr and f"{launcher} download-model" in doctor.stdout

    # The guide's "original command from the mist folder" finds the model download-model puts in WORK/models.
    model = work / locate.SEED_MODEL_PATH
    model.parent.mkdir(parents=True)
    model.write_bytes(b"weights")
    found = subprocess.run([str(work / "mist-env" / "bin" / "python"), "-c",
                            "from mist.models.locate import resolve_model; print(resolve_model())"],
                           cwd=work / "mist", capture_output=True, text=True, env={"PATH": os.environ["PATH"]})
    assert found.stdout.strip() == str(model.resolve()), found.stderr

    second = subprocess.run(["bash", "-euc", commands.split("\n", 2)[2]], cwd=work, env=env, capture_output=True,
                            text=True, timeout=600)  # the install line again (the clone exists)
    assert second.returncode == 0 and "up to date" in second.stdout, second.stderr
