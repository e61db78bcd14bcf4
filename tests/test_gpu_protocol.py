"""benchmarks/gpu-protocol.sh, the whole evaluation protocol in one script: tried on the CPU with the tiny random
model (DEVICE=cpu, as its header says), and its refusal where PyTorch sees no CUDA GPU."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

pytest.importorskip("torchmetrics")
pytest.importorskip("peft")

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu-protocol.sh"
QUICK = ["--protect-steps", "1", "--steps", "2", "--purify", "jpeg:75", "--strengths", "0.5", "--lora-steps", "1",
         "-q"]


def _run(tmp_path: Path, *args: str, **env: str) -> subprocess.CompletedProcess:
    environment = {key: value for key, value in os.environ.items() if key not in ("MODEL", "METHODS", "BUDGETS")}
    return subprocess.run(["bash", str(SCRIPT), *args], cwd=tmp_path, capture_output=True, text=True,
                          env={**environment, "PYTHON": sys.executable, **env}, timeout=900)


def test_the_protocol_script_protects_evaluates_and_summarises_on_the_tiny_model(tmp_path):
    art = tmp_path / "art"
    art.mkdir()
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(art / "a.png")
    done = _run(tmp_path, "art", "out", *QUICK, DEVICE="cpu", MODEL="tiny-random", METHODS="mist", BUDGETS="8")
    assert done.returncode == 0, done.stderr + done.stdout
    record = json.loads((tmp_path / "out" / "comparison.json").read_text())
    assert [(arm["method"], arm["epsilon"]) for arm in record["arms"]] == [("mist", 8)]
    assert [h["mimicry"] for h in record["arms"][0]["headline"]] == ["img2img:0.5", "lora"]
    summary = (tmp_path / "out" / "protocol.md").read_text()
    assert "exit status 0" in summary and "--lora" in summary and "- mist-e8: lora: " in summary


def test_the_protocol_script_refuses_in_one_line_without_a_cuda_gpu(tmp_path):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a CUDA GPU")
    done = _run(tmp_path, "art", "out")
    assert done.returncode == 2
    assert done.stderr.strip() == ("gpu-protocol: PyTorch sees no CUDA GPU (set DEVICE=cpu to run the protocol on the "
                                   "CPU anyway)")
    assert not (tmp_path / "out").exists()


def test_the_protocol_script_says_which_python_lacks_pytorch(tmp_path):
    done = _run(tmp_path, "art", "out", PYTHON="false")  # a "Python" that imports nothing
    assert done.returncode == 2
    assert done.stderr.strip() == ("gpu-protocol: false cannot import torch (set PYTHON to the Python that has Mist's "
                                   "packages)")
