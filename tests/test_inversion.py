"""Textual inversion (mist.engine.inversion) and its mimicry in `mist evaluate --ti`, on the tiny model: only the new
word trains, it changes what a prompt holding it means and nothing else, the mimicry keeps shapes and seeds, a cancel
stops it after the current step, and the command puts its scores in the report."""

from __future__ import annotations

import json
import threading

import numpy as np
import pytest
import torch
from PIL import Image

from mist.engine.attack import Cancelled
from mist.engine.inversion import PLACEHOLDER, InversionOptions, TextualInversion
from mist.faces import cli
from mist.models.loading import build_random
from mist.models.tokenizer import clip_tokenizer, tokenize
from mist.runner.evaluation.mimicry import TextualInversionMimicry
from mist.runner.evaluation.resume import evaluation_key
from mist.runner.evaluation.settings import EvaluationSettings, evaluation_settings
from mist.runner.work_limits import WorkLimits

FAST = InversionOptions(images_per_step=2, flip=0.0, learning_rate=1e-1)


@pytest.fixture(scope="module")
def model():
    """The tiny model with its text encoder kept, as `mist evaluate --ti` loads it."""
    return build_random(parts=frozenset({"encoder", "unet", "text_encoder", "decoder", "text_model"}))


def _images(count: int = 2, size: int = 32, seed: int = 0) -> torch.Tensor:
    return torch.rand(count, 3, size, size, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def _hidden(model, prompt: str) -> torch.Tensor:
    with torch.no_grad():
        return model.text_encoder(tokenize(prompt)).last_hidden_state


def test_only_the_new_word_trains_and_the_model_is_left_bit_identical(model):
    """Every weight of the model's text encoder (its embedding table included) and UNet is the same bits after
    training; the word's row moved from its start, and it is the only thing the optimiser saw."""
    text_before = {name: value.clone() for name, value in model.text_encoder.state_dict().items()}
    unet_before = {name: value.clone() for name, value in model.unet.state_dict().items()}
    inversion = TextualInversion(model, FAST)
    start = inversion.word.detach().clone()
    assert [p for p in inversion.encoder.parameters() if p.requires_grad] == [inversion.word]
    inversion.train(_images(), steps=2)
    assert not torch.equal(inversion.word, start)
    for before, module in ((text_before, model.text_encoder), (unet_before, model.unet)):
        after = module.state_dict()
        assert after.keys() == before.keys() and all(torch.equal(after[k], before[k]) for k in before)
        assert all(not p.requires_grad and p.grad is None for p in module.parameters())
    table = model.text_encoder.get_input_embeddings()
    assert isinstance(table, torch.nn.Embedding) and table.num_embeddings == 49408  # not grown in the model


def test_the_word_starts_as_its_initializer_and_learning_it_changes_only_prompts_holding_it(model):
    inversion = TextualInversion(model, FAST)
    assert inversion.prompt == f"a painting in the style of {PLACEHOLDER}"
    before = inversion.embedding(inversion.prompt)
    assert torch.equal(before, _hidden(model, "a painting in the style of painting"))
    inversion.train(_images(), steps=2)
    after = inversion.embedding(inversion.prompt)
    assert before.shape == after.shape == (1, 77, model.arch.text["hidden_size"])
    assert (after - before).abs().max() > 1e-3
    assert torch.equal(inversion.embedding("a painting"), model.text_embeddings["a painting"])
    sampling = inversion.sampling_model()
    assert torch.equal(sampling.text_embedding(inversion.prompt), after) and sampling.unet is model.unet
    assert inversion.prompt not in model.text_embeddings
    assert TextualInversion(model, InversionOptions(learnable="object")).prompt == f"a photo of {PLACEHOLDER}"


def test_training_follows_the_gradient_of_the_denoising_loss(model):
    """Three steps on the same draws (the generator re-seeded before each one-step call): the loss on them falls,
    which only a step against its gradient does."""
    inversion = TextualInversion(model, FAST)
    x = _images()
    losses = [inversion.train(x, steps=1, generator=torch.Generator().manual_seed(7))[0] for _ in range(3)]
    assert losses[-1] < 0.995 * losses[0], losses
    assert all(later < earlier for earlier, later in zip(losses[:-1], losses[1:], strict=True)), losses


def test_the_placeholder_is_one_new_token_and_the_shared_tokenizer_is_unchanged():
    ids = tokenize(f"a {PLACEHOLDER}", PLACEHOLDER)[0].tolist()
    assert ids[:4] == [49406, 320, 49408, 49407]
    assert len(clip_tokenizer()) == 49408 and 49408 not in tokenize(f"a {PLACEHOLDER}")[0].tolist()


@pytest.mark.parametrize(("options", "named"), [
    (dict(learnable="colour"), "learnable"), (dict(steps=-1), "steps"), (dict(images_per_step=0), "images_per_step"),
    (dict(learning_rate=0.0), "learning_rate"), (dict(flip=1.5), "flip"), (dict(weight_decay=float("nan")),
                                                                         "weight_decay")])
def test_bad_options_are_refused_naming_them(options, named):
    with pytest.raises(ValueError, match=f"^{named}: "):
        InversionOptions(**options)


def test_a_model_without_its_text_encoder_is_refused_in_one_line(tiny_model):
    with pytest.raises(ValueError, match='"text_model" part'):
        TextualInversion(tiny_model)
    with pytest.raises(ValueError, match="images: expected a batch"):
        TextualInversion(build_random(parts=frozenset({"encoder", "unet", "text_model"})), FAST).train(
            torch.zeros(3, 32, 32))


# ------------------------------------------------------------------------------------------------------ mimicry


def test_the_mimicry_gives_one_output_per_input_at_its_shape_and_the_same_bytes_for_a_seed(model):
    pictures = [_images(1, 32, 1), _images(1, 32, 2)[..., :24]]  # two shapes: trains at the first one's
    mimicry = TextualInversionMimicry(model, train_steps=1, steps=2)
    assert mimicry.name == "ti" and mimicry.label == "textual inversion (1 steps)" and mimicry.strength is None
    first = mimicry.generate(pictures, seed=4)
    assert [tuple(g.images.shape) for g in first] == [(1, 3, 32, 32), (1, 3, 32, 24)]
    assert [tuple(g.latents.shape) for g in first] == [(1, 4, 4, 4), (1, 4, 4, 3)]
    again = mimicry.generate(pictures, seed=4)
    assert all(torch.equal(a.images, b.images) and torch.equal(a.latents, b.latents)
               for a, b in zip(first, again, strict=True))
    other = mimicry.generate(pictures, seed=5)
    assert not torch.equal(first[0].latents, other[0].latents)


def test_a_cancel_stops_training_after_its_current_step_and_samples_nothing(model, monkeypatch):
    import mist.runner.evaluation.img2img as img2img_module

    cancel = threading.Event()
    images_seen = []
    loss = TextualInversion._loss

    def counted(self, image, generator):
        images_seen.append(1)
        cancel.set()  # set during the first step: that step finishes, no other starts
        return loss(self, image, generator)

    monkeypatch.setattr(TextualInversion, "_loss", counted)
    sampled = []
    monkeypatch.setattr(img2img_module, "txt2img", lambda *a, **k: sampled.append(1))
    with pytest.raises(Cancelled):
        TextualInversionMimicry(model, train_steps=500, steps=2, cancel=cancel).generate([_images(1)], seed=1)
    assert len(images_seen) == InversionOptions().images_per_step and sampled == []


# ------------------------------------------------------------------------------------------------ the command


def test_cli_evaluate_with_ti_scores_the_textual_inversion_mimicry(tmp_path, capsys):
    originals, protected = tmp_path / "originals", tmp_path / "protected"
    originals.mkdir()
    protected.mkdir()
    rng = np.random.default_rng(0)
    picture = rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)
    Image.fromarray(picture).save(originals / "art.png")
    shifted = np.clip(picture.astype(int) + rng.integers(-8, 9, picture.shape), 0, 255).astype(np.uint8)
    Image.fromarray(shifted).save(protected / "art.png")
    report = tmp_path / "report"
    code = cli.main(["evaluate", str(originals), str(protected), "-o", str(report), "--model", "tiny-random",
                     "--purify", "", "--strengths", "0.5", "--steps", "2", "--ti", "--ti-steps", "2",
                     "--method", "pid", "-q"])  # a method without a target pattern: no training on one
    assert code == 0, capsys.readouterr().err
    record = json.loads((report / "results.json").read_text())
    assert {s["mimicry"] for s in record["scores"]} == {"img2img:0.5", "ti"}
    assert "ti" in [h["mimicry"] for h in record["headline"]]
    assert "textual inversion (2 steps)" in (report / "index.html").read_text()


def test_the_settings_name_bad_values_the_resume_key_holds_them_and_servers_count_the_steps():
    with pytest.raises(ValueError, match="--ti-steps: must be at least 1"):
        evaluation_settings({"ti": "true", "ti_steps": "0"})
    with pytest.raises(ValueError, match="--ti-lr: must be above 0"):
        evaluation_settings({"ti_learning_rate": "-1"})
    chosen = evaluation_settings({"ti": "true", "ti_steps": "20", "ti_learning_rate": "0.01"})
    assert (chosen.ti, chosen.ti_steps, chosen.ti_learning_rate) == (True, 20, 0.01)
    keys = {evaluation_key([], settings, "mist", {}, "model") for settings in (
        EvaluationSettings(), EvaluationSettings(ti=True), EvaluationSettings(ti=True, ti_steps=20),
        EvaluationSettings(ti=True, ti_learning_rate=1e-3))}
    assert len(keys) == 4
    limits = WorkLimits(max_steps=100)
    assert "ti-steps: 500 is over" in limits.evaluation_problem({"steps": 50, "ti": True, "ti_steps": 500})
    assert limits.evaluation_problem({"steps": 50, "ti": False, "ti_steps": 500}) is None


def test_the_denoising_loss_reaches_the_word_through_the_unet(model):
    """The gradient the optimiser sees is the denoising loss's with respect to the word's row (checked against a
    finite difference along it)."""
    inversion = TextualInversion(model, FAST)
    image = _images(1)

    def loss() -> torch.Tensor:
        return inversion._loss(image, torch.Generator().manual_seed(3))

    loss().backward()
    direction = inversion.word.grad / inversion.word.grad.norm()
    step = 1e-2
    with torch.no_grad():
        inversion.word += step * direction
        up = loss().item()
        inversion.word -= 2 * step * direction
        down = loss().item()
    assert (up - down) / (2 * step) == pytest.approx(inversion.word.grad.norm().item(), rel=0.05)
