"""`--preset paper`: PGD's image start and linear step schedule, each method's paper settings where the user gave
none (explicit settings win), PhotoGuard's zero-latent target, and the faces that take the preset."""

from __future__ import annotations

import json
from dataclasses import dataclass

import numpy as np
import pytest
import torch
from PIL import Image

from mist.engine.attack import masked_linf_pgd, step_size_at
from mist.engine.config import ProtectConfig, with_preset
from mist.engine.methods import LossTerms, MethodParams, get_method, register_method
from mist.engine.methods.base import Method
from support.cli import run_cli

# Each paper's code as read for this preset, written out here apart from the methods' own tables: budget and step in
# 0..255 levels (on [-1, 1] a level is 2 / 255: Mist-v2's 8/255 is 4 levels, Anti-DreamBooth's 0.05 is 6.375).
PAPERS = {
    "photoguard": dict(epsilon=0.06 * 127.5, step_size=0.02 * 127.5, steps=1000, start="random",
                       step_schedule="linear", zero_target=True),
    "sds": dict(epsilon=16, step_size=1, steps=100, start="image", step_schedule="constant", sign="-"),
    "mist2": dict(epsilon=8 / 255 * 127.5, step_size=0.005 * 127.5, steps=5 * 30, start="image",
                  step_schedule="constant", fused=False),
    "mist2-lora": dict(epsilon=4, step_size=0.6375, steps=150, start="image", round_steps=30, surrogate_steps=10),
    "aspl": dict(epsilon=0.05 * 127.5, step_size=5e-3 * 127.5, steps=50 * 6, start="image", surrogate="full",
                 surrogate_lr=5e-7, surrogate_steps=3, round_steps=6),
    "pid": dict(epsilon=12.75, step_size=1, steps=1000, start="random", step_schedule="constant",
                pid_loss="add-log"),
}


def _linear(x, generators):
    """A loss whose gradient is 1 everywhere: every sign step lowers every pixel by the step."""
    value = x.flatten(1).sum(1)
    return LossTerms(value, {"sum": value})


def test_image_start_takes_its_first_step_from_the_image_itself():
    g = torch.Generator().manual_seed(1)
    x = torch.rand(1, 3, 8, 8, generator=g) * 2 - 1
    goal = torch.rand(1, 3, 8, 8, generator=g) * 2 - 1

    def quadratic(images, generators):
        value = (images - goal).pow(2).flatten(1).sum(1)
        return LossTerms(value, {"distance": value})

    step = 3 / 255 * 2
    out = masked_linf_pgd(x, quadratic, radius=0.1, step=step, steps=1, generators=[torch.Generator()],
                          start="image")
    expected = (x - step * (2 * (x - goal)).sign()).clamp(-1, 1)
    assert torch.equal(out, expected)
    assert torch.equal(masked_linf_pgd(x, quadratic, radius=0.1, step=step, steps=0,
                                       generators=[torch.Generator()], start="image"), x)
    randomly = masked_linf_pgd(x, quadratic, radius=0.1, step=step, steps=0, generators=[torch.Generator()])
    assert not torch.equal(randomly, x)  # the default still starts at a random point


def test_the_linear_schedule_is_photoguards_decay_to_a_hundredth():
    step, steps = 0.02, 1000
    # MadryLab/photoguard's pgd: step_size - (step_size - step_size / 100) / iters * i
    assert [step_size_at(step, i, steps, "linear") for i in (0, 500, 999)] == pytest.approx(
        [0.02, 0.02 - 0.0198 / 2, 0.02 - 0.0198 * 999 / 1000])
    assert step_size_at(step, 999, steps, "constant") == step
    seen = []
    x = torch.zeros(1, 3, 4, 4)
    out = masked_linf_pgd(x, _linear, radius=1.0, step=0.05, steps=4, generators=[torch.Generator()],
                          start="image", schedule="linear", before_step=lambda index, images: seen.append(images))
    moves = [(before - after)[0, 0, 0, 0].item() for before, after in zip(seen, seen[1:] + [out], strict=True)]
    assert moves == pytest.approx([0.05 - 0.0495 * i / 4 for i in range(4)])
    with pytest.raises(ValueError, match="step_schedule: must be one of constant, linear, got 'cosine'"):
        masked_linf_pgd(x, _linear, radius=1.0, step=0.05, steps=2, generators=[torch.Generator()],
                        schedule="cosine")


@pytest.mark.parametrize("name", sorted(PAPERS))
def test_the_paper_preset_gives_each_method_its_papers_settings(name):
    config = ProtectConfig.of(method=name, preset="paper")
    resolved = {**vars(config.params), **{key: getattr(config, key) for key in
                                          ("epsilon", "step_size", "steps", "start", "step_schedule")}}
    for key, value in PAPERS[name].items():
        assert resolved[key] == pytest.approx(value), key
    assert ProtectConfig.of(method=name) == ProtectConfig().but(method=name)  # the default preset changes nothing


def test_mist_advdm_keep_their_defaults_which_are_their_papers():
    for name in ("mist", "advdm", "advdm-"):
        assert ProtectConfig.of(method=name, preset="paper") == ProtectConfig.of(method=name)


def test_given_settings_win_over_the_preset_and_the_resolved_values_are_recorded():
    config = ProtectConfig.of(method="photoguard", preset="paper", epsilon=16, steps=5, zero_target=False)
    assert (config.epsilon, config.steps, config.step_size, config.step_schedule) == (16, 5, 2.55, "linear")
    assert config.params.zero_target is False
    recorded = json.loads(config.to_json())
    assert "preset" not in recorded and (recorded["step_schedule"], recorded["zero_target"]) == ("linear", False)
    # but() applies the preset of the method it switches to; a config without one records as before these settings
    assert ProtectConfig().but(method="pid", preset="paper").steps == 1000
    assert "start" not in json.loads(ProtectConfig().to_json())
    assert json.loads(ProtectConfig.of(start="image").to_json())["start"] == "image"
    assert with_preset({"method": "mist2", "preset": "paper", "steps": 3}) == {
        "method": "mist2", "steps": 3, "epsilon": 4, "step_size": 0.6375, "start": "image",
        "step_schedule": "constant", "fused": False}


@pytest.mark.parametrize("settings, message", [
    ({"preset": "papers"}, "preset: must be one of default, paper, got 'papers'"),
    ({"start": "middle"}, "start: must be one of random, image, got 'middle'"),
    ({"step_schedule": "cosine"}, "step_schedule: must be one of constant, linear, got 'cosine'"),
])
def test_bad_values_are_refused_in_one_line(settings, message):
    with pytest.raises(ValueError) as caught:
        ProtectConfig.of(**settings)
    assert str(caught.value) == message


def test_a_preset_naming_nothing_known_is_refused_at_registration():
    @dataclass(frozen=True)
    class OddParams(MethodParams):
        pass

    class Odd(Method):
        name, title, summary, paper, parts = "odd-preset", "Odd", "odd", "none", frozenset()
        Params = OddParams
        paper_preset = {"loudness": 3}

    with pytest.raises(ValueError, match="odd-preset: paper_preset names 'loudness'"):
        register_method(Odd)


def test_photoguards_zero_target_is_the_norm_of_the_posterior_mean(tiny_model, tmp_path):
    from mist.engine import objectives
    from mist.engine.methods import TileInputs

    cls = get_method("photoguard")
    x = torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(2)) * 2 - 1
    method = cls(cls.Params(zero_target=True), tiny_model, "fp32")
    assert method.target_image() is None
    loss = method.prepare([TileInputs(clean=x, target=None, seed=lambda stream: 0)])
    expected = objectives.posterior(tiny_model, x, "fp32")[0].flatten().norm()
    assert torch.allclose(loss(x, [torch.Generator()]).objective, expected.reshape(1), rtol=1e-6)
    Image.new("RGB", (8, 8), (10, 200, 30)).save(tmp_path / "green.png")
    given = cls(cls.Params(zero_target=True, target=tmp_path / "green.png"), tiny_model, "fp32")
    assert given.target_image().getpixel((1, 1)) == (10, 200, 30)  # a target image given wins


def test_protect_takes_the_preset_and_records_what_it_resolved(capsys, tmp_path):
    source = tmp_path / "in.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(source)
    common = ["--model", "tiny-random", "--input-size", "32", "--precision", "fp32"]
    code, _, err = run_cli(capsys, "protect", source, "-o", tmp_path / "out", "--method", "photoguard", "--preset",
                           "paper", "--epsilon", "4", *common)
    assert code == 0, err
    with Image.open(tmp_path / "out" / "in.png") as output:
        output.load()
        settings = json.loads(output.text["mist:settings"])
        changed = np.abs(np.asarray(output, dtype=np.int16) - np.asarray(Image.open(source), dtype=np.int16))
    assert (settings["epsilon"], settings["step_size"], settings["step_schedule"], settings["zero_target"]) == (
        4, 2.55, "linear", True)
    assert settings["steps"] == 10  # the test model's, as without a preset
    assert 0 < changed.max() <= 4
    code, _, err = run_cli(capsys, "protect", source, "-o", tmp_path / "x", "--preset", "nope", *common)
    assert code != 0 and "--preset" in err and "nope" in err


@pytest.mark.parametrize("given, steps", [((), 1000), (("steps",), 7)])
def test_compare_gives_each_arm_its_papers_settings_but_the_budget_and_given_steps(monkeypatch, tmp_path, given,
                                                                                     steps):
    pytest.importorskip("torchmetrics")
    import mist.runner.jobs
    from mist.runner.compare import Arm, compare
    from mist.runner.evaluation.settings import EvaluationSettings

    Image.new("RGB", (16, 16)).save(tmp_path / "a.png")
    seen = []

    class Stop(Exception):
        pass

    def protect(jobs, config, *args, **kwargs):
        seen.append(config)
        raise Stop

    monkeypatch.setattr(mist.runner.jobs, "run_jobs", protect)
    with pytest.raises(Stop):
        compare(tmp_path / "a.png", tmp_path / "cmp", [Arm("pid", 8)], ProtectConfig(steps=7), EvaluationSettings(),
                None, None, preset="paper", given=given)
    [config] = seen
    assert (config.method, config.epsilon, config.steps, config.start) == ("pid", 8, steps, "random")
    assert config.params.pid_loss == "add-log"
