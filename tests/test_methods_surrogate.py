"""The surrogate-training methods (aspl, mist2-lora): their losses against the papers' formulas through the surrogate's
UNet, gradients, the fine-tuning schedule between PGD rounds, the caller's model left unchanged, reproducibility, bad
parameters, and a protection through the command line."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image
from test_methods import _images, _moments, _noise_prediction, _sampled_latent, method_loss

import mist.faces.cli
from mist.engine.config import ProtectConfig
from mist.engine.finetune import Surrogate
from mist.engine.methods import SurrogateLoss, get_method
from mist.engine.objectives import target_latent
from mist.engine.pipeline import Protector

FAST = {"round_steps": 2, "surrogate_steps": 2, "surrogate_lr": 1e-2}


def _snapshot(model):
    return {name: value.clone() for name, value in model.unet.state_dict().items()}, [
        name for name, _ in model.unet.named_modules()]


def _unchanged(model, snapshot) -> bool:
    weights, modules = snapshot
    state = model.unet.state_dict()
    return (state.keys() == weights.keys() and all(torch.equal(state[k], v) for k, v in weights.items())
            and [name for name, _ in model.unet.named_modules()] == modules
            and all(p.grad is None and not p.requires_grad for p in model.unet.parameters()))


def _lora_b(surrogate: Surrogate) -> torch.Tensor:
    return torch.cat([v.flatten() for k, v in surrogate.trainable_state().items() if ".lora_B." in k])


def _aspl_formula(unet_model, x, text, seed):
    """-L_sem with the noise predicted by `unet_model`'s UNet: posterior sample, t and n from one generator."""
    g = torch.Generator().manual_seed(seed)
    eps, n = _noise_prediction(unet_model, _sampled_latent(unet_model, x, g), g, text)
    return torch.nn.functional.mse_loss(eps, n)


@pytest.mark.parametrize("surrogate", ["lora", "full"])
def test_aspl_raises_the_denoising_loss_of_a_clone_trained_on_the_clean_images(tiny_model, surrogate):
    snapshot = _snapshot(tiny_model)
    clean, x = _images(9), _images(1)
    text = tiny_model.text_embedding("a painting")
    loss = method_loss(tiny_model, "aspl", {**FAST, "surrogate": surrogate}, clean=clean)
    assert isinstance(loss, SurrogateLoss)
    before = loss(x, [torch.Generator().manual_seed(4)])  # no round started: the model itself
    assert torch.allclose(before.objective, -_aspl_formula(tiny_model, x, text, 4).reshape(1), rtol=1e-5)

    theta = loss.theta.trainable_state()
    loss.before_step(0, x)  # round 1: theta' = theta fine-tuned on the clean image; theta does not move
    assert all(torch.equal(theta[k], v) for k, v in loss.theta.trainable_state().items())
    trained = loss.current.trainable_state()
    assert not all(torch.equal(theta[k], trained[k]) for k in theta)
    terms = loss(x, [torch.Generator().manual_seed(4)])
    expected = _aspl_formula(loss.current.model, x, text, 4)
    assert torch.allclose(terms.objective, -expected.reshape(1), rtol=1e-5)
    assert torch.allclose(terms.terms["semantic"], expected.reshape(1), rtol=1e-5)
    assert not torch.allclose(terms.objective, before.objective)

    loss.before_step(1, x)  # inside the round: nothing trains
    assert all(torch.equal(trained[k], v) for k, v in loss.current.trainable_state().items())
    loss.before_step(2, x)  # round 2: theta learns from the protected images, then a new clone from the clean ones
    assert not all(torch.equal(theta[k], v) for k, v in loss.theta.trainable_state().items())
    assert _unchanged(tiny_model, snapshot)


def test_mist2_lora_is_mist2_through_a_lora_surrogate_trained_after_each_round(tiny_model):
    x, y = _images(1), _images(3)
    text = tiny_model.text_embedding("a painting")
    snapshot = _snapshot(tiny_model)
    loss = method_loss(tiny_model, "mist2-lora", FAST, target=y, target_seed=5)
    plain = method_loss(tiny_model, "mist2", {}, target=y, target_seed=5)
    first = loss(x, [torch.Generator().manual_seed(6)])
    assert torch.equal(first.objective, plain(x, [torch.Generator().manual_seed(6)]).objective)  # B starts at zero

    loss.before_step(0, x)
    loss.before_step(1, x)
    assert torch.count_nonzero(_lora_b(loss.surrogate)) == 0  # no training before the first round ends
    loss.before_step(2, x)
    assert torch.count_nonzero(_lora_b(loss.surrogate)) > 0
    terms = loss(x, [torch.Generator().manual_seed(6)])
    target_z = target_latent(tiny_model, y, [torch.Generator().manual_seed(5)])
    z = _moments(tiny_model, x)[0] * 0.18215
    eps, _ = _noise_prediction(loss.surrogate.model, z, torch.Generator().manual_seed(6), text)
    expected = torch.nn.functional.mse_loss(eps, target_z)
    assert torch.allclose(terms.objective, expected.reshape(1), rtol=1e-5)
    assert not torch.allclose(terms.objective, first.objective)
    assert _unchanged(tiny_model, snapshot)


@pytest.mark.parametrize("name", ["aspl", "mist2-lora"])
def test_gradients_reach_the_image_and_no_base_weight(tiny_model, name):
    loss = method_loss(tiny_model, name, FAST)
    x = _images(1)
    loss.before_step(0, x)
    loss.before_step(2, x)
    x = x.clone().requires_grad_(True)
    terms = loss(x, [torch.Generator().manual_seed(0)])
    assert terms.objective.shape == (1,) and all(v.shape == (1,) for v in terms.terms.values())
    terms.objective.sum().backward()
    assert x.grad.abs().sum() > 0 and torch.isfinite(x.grad).all()
    modules = (tiny_model.unet, tiny_model.encoder)
    assert all(p.grad is None and not p.requires_grad for m in modules for p in m.parameters())


@pytest.mark.parametrize(("name", "trainings"), [("aspl", [1, 1, 1]), ("mist2-lora", [1])])
def test_a_protection_trains_on_the_schedule_reproducibly_and_leaves_the_model(tiny_model, painting, monkeypatch,
                                                                               name, trainings):
    """4 PGD steps in rounds of 2: aspl trains theta' on the clean image at steps 0 and 2 and theta on x' at step 2;
    mist2-lora trains its adapters once, after the first round. Same seed, same image; the caller's model unchanged."""
    calls = []
    original = Surrogate.train

    def spy(self, images, text, steps=None, generator=None, callback=None):
        calls.append((images.shape[0], steps))
        return original(self, images, text, steps, generator, callback)

    monkeypatch.setattr(Surrogate, "train", spy)
    snapshot = _snapshot(tiny_model)
    config = ProtectConfig(method=name, params={**FAST, "surrogate_steps": 1}, steps=4, input_size=32,
                           precision="fp32", seed=3)
    image = painting.resize((32, 32))
    first = Protector(tiny_model, config).protect(image)
    assert [count for count, _ in calls] == trainings and all(steps == 1 for _, steps in calls)
    again = Protector(tiny_model, config).protect(image)
    assert first.image.tobytes() == again.image.tobytes()
    assert _unchanged(tiny_model, snapshot)


@pytest.mark.parametrize(("name", "params", "named"), [
    ("aspl", {"surrogate": "dora"}, "surrogate"), ("aspl", {"round_steps": 0}, "round_steps"),
    ("aspl", {"surrogate_steps": -1}, "surrogate_steps"), ("aspl", {"surrogate_lr": 0.0}, "surrogate_lr"),
    ("mist2-lora", {"lora_rank": 0}, "lora_rank"), ("mist2-lora", {"surrogate_lr": float("nan")}, "surrogate_lr"),
    ("mist2-lora", {"round_steps": 2.5}, "round_steps")])
def test_bad_parameters_are_refused_naming_them(name, params, named):
    with pytest.raises(ValueError, match=f"^{named}: "):
        get_method(name).Params(**params)


def test_protect_with_aspl_through_the_command_line(capsys, tmp_path):
    source = tmp_path / "in.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (40, 40, 3), dtype=np.uint8)).save(source)
    code = mist.faces.cli.main(["protect", str(source), "-o", str(tmp_path / "out"), "--method", "aspl", "--model",
                          "tiny-random", "--steps", "2", "--round-steps", "1", "--surrogate-steps", "1",
                          "--input-size", "32", "--precision", "fp32"])
    assert code == 0, capsys.readouterr().err
    with Image.open(tmp_path / "out" / "in.png") as output:
        output.load()
        settings = json.loads(output.text["mist:settings"])
        assert output.text["mist:method"] == "aspl" and "ASPL" in output.text["mist:algorithm"]
    assert settings["round_steps"] == 1 and settings["surrogate"] == "lora"
    changed = np.abs(np.asarray(output, dtype=np.int16) - np.asarray(
        Image.open(source).resize((32, 32), Image.Resampling.BICUBIC), dtype=np.int16))
    assert 0 < changed.max() <= 16
