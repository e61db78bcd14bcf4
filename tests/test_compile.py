"""`--compile`: torch.compile of the networks, its checks before anything is loaded, its cache folder, and that a
compiled attack computes what the uncompiled one does."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from mist.engine import compiling
from mist.engine.config import ProtectConfig
from mist.runner.entrance import open_models
from mist.runner.jobs import Job, settings_text
from mist.engine.pipeline import ProtectedImage, Protector
from mist.faces.reporting import ConsoleReporter
from support.cli import run_cli

CPU = torch.device("cpu")


@pytest.fixture
def fresh_compiler():
    """Each compiling test starts and ends with no compiled code in memory (other tests run uncompiled)."""
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def _no_program(monkeypatch, *missing: str) -> None:
    real = compiling.shutil.which
    monkeypatch.setattr(compiling.shutil, "which", lambda name: None if name in missing else real(name))


def test_a_cpu_without_a_cpp_compiler_is_named(monkeypatch):
    monkeypatch.delenv("CXX", raising=False)
    _no_program(monkeypatch, *compiling.CPP_COMPILERS)
    assert "no C++ compiler was found" in compiling.compile_problem(CPU)
    monkeypatch.setenv("CXX", "my-g++")  # the compiler inductor would use is looked for, not just any
    assert "my-g++" in compiling.compile_problem(CPU)


def test_a_python_without_headers_is_named(monkeypatch, tmp_path):
    monkeypatch.setattr(compiling.sysconfig, "get_paths", lambda: {"include": str(tmp_path)})
    assert f"no C headers at {tmp_path}" in compiling.compile_problem(CPU)


def test_devices_that_cannot_compile_are_named(monkeypatch):
    assert "does not compile for mps" in compiling.compile_problem(torch.device("mps"))
    monkeypatch.setattr(compiling.importlib.util, "find_spec", lambda name: None)
    assert "Triton is not installed" in compiling.compile_problem(torch.device("cuda"))


def test_the_cache_is_kept_in_mists_home_unless_chosen(monkeypatch, tmp_path):
    monkeypatch.delenv(compiling.CACHE_ENV, raising=False)
    monkeypatch.setenv("MIST_HOME", str(tmp_path / "home"))
    assert compiling.cache_folder() == tmp_path / "home" / "cache" / "inductor"
    monkeypatch.setenv(compiling.CACHE_ENV, str(tmp_path / "mine"))
    assert compiling.cache_folder() == tmp_path / "mine"


def test_the_cli_refuses_compile_before_loading_or_writing(capsys, monkeypatch, tmp_path):
    monkeypatch.delenv("CXX", raising=False)
    _no_program(monkeypatch, *compiling.CPP_COMPILERS)
    source = tmp_path / "art.png"
    Image.new("RGB", (64, 64), "orange").save(source)
    code, out, err = run_cli(capsys, "protect", source, "-o", tmp_path / "out", "--model", "tiny-random",
                             "--device", "cpu", "--compile")
    assert code != 0
    assert "--compile: it compiles C++ for the CPU and no C++ compiler was found" in err
    assert "loading model" not in out and not (tmp_path / "out").exists()


def test_a_compiled_attack_computes_what_the_uncompiled_one_does(tiny_model, fresh_compiler, monkeypatch, tmp_path):
    """One test, as compiling takes minutes: the compile time is reported for the first image of a size only, and the
    compiled networks give the uncompiled loss and gradient within float32 rounding."""
    if compiling.compile_problem(CPU):
        pytest.skip(compiling.compile_problem(CPU))
    monkeypatch.setenv(compiling.CACHE_ENV, str(tmp_path / "cache"))
    config = ProtectConfig(steps=2, input_size=64, precision="fp32")
    compiled = Protector(tiny_model, config, compile=True)
    picture = Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8))
    first, again = compiled.protect(picture), compiled.protect(picture)
    assert 0 < first.compile_seconds <= first.seconds
    assert again.compile_seconds == 0
    assert again.image.tobytes() == first.image.tobytes()
    assert any((tmp_path / "cache").iterdir())  # inductor wrote its cache where it was told

    x = torch.empty(1, 3, 64, 64).uniform_(-1, 1, generator=torch.Generator().manual_seed(1))
    values, gradients = [], []
    for protector in (Protector(tiny_model, config), compiled):
        image = x.clone().requires_grad_(True)
        objective = protector.loss_for(x, seed=0)(image, [torch.Generator().manual_seed(0)]).objective.sum()
        objective.backward()
        values.append(objective.detach())
        gradients.append(image.grad)
    torch.testing.assert_close(values[1], values[0], rtol=1e-5, atol=0)
    assert (gradients[1] - gradients[0]).abs().max() <= 1e-5 * gradients[0].abs().max()


def test_compile_is_refused_with_ray_by_every_face(capsys, tmp_path):
    from mist.faces.service.server import ServeOptions, models_for

    with pytest.raises(ValueError, match="^compile: not available with a Ray cluster"):
        open_models("tiny-random", "cpu", compile=True, ray="auto")
    with pytest.raises(ValueError, match="^--compile: not available with a Ray cluster"):
        models_for(ServeOptions(data=tmp_path, model="tiny-random", compile=True, ray="auto"))
    source = tmp_path / "art.png"
    Image.new("RGB", (64, 64), "orange").save(source)
    code, _, err = run_cli(capsys, "protect", source, "-o", tmp_path / "out", "--model", "tiny-random", "--compile",
                           "--ray", "auto")
    assert code != 0 and "--compile: not available with a Ray cluster" in err


def test_the_server_checks_it_can_compile_before_it_serves(monkeypatch, tmp_path):
    from mist.faces.service.server import ServeOptions, models_for

    monkeypatch.delenv("CXX", raising=False)
    _no_program(monkeypatch, *compiling.CPP_COMPILERS)
    with pytest.raises(ValueError, match="^--compile: it compiles C\\+\\+ for the CPU"):
        models_for(ServeOptions(data=tmp_path, model="tiny-random", device="cpu", compile=True))
    assert not models_for(ServeOptions(data=tmp_path, model="tiny-random", device="cpu")).compile


def test_outputs_record_compilation_only_when_on():
    config = ProtectConfig(steps=2)
    assert json.loads(settings_text(config, compiled=True))["compiled"] is True
    assert "compiled" not in json.loads(settings_text(config))  # records of uncompiled runs are as before


def test_the_time_estimate_leaves_the_one_time_compile_out(capsys, tmp_path):
    reporter = ConsoleReporter()
    reporter.batch_started([], to_do=3)
    result = ProtectedImage(image=Image.new("RGB", (8, 8)), size=(8, 8), start={}, end={}, seconds=400.0,
                            random_weights=False, compile_seconds=340.0)
    reporter.image_done(Job(tmp_path / "a.png", tmp_path / "out" / "a.png"), result)
    out = capsys.readouterr().out
    assert "(400.0 s, 340 s of it compiling)" in out
    assert "estimated time for the other 2 image(s): 2 min" in out  # 2 x 60 s, not 2 x 400 s
