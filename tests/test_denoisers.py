"""The denoiser-side methods on SD 2.x and SDXL: tiny random models of each design saved in the real single-file and
diffusers layouts and loaded back through a user's path, each family's conditioning (SD 2.x's penultimate OpenCLIP
layer, SDXL's two towers, pooled embedding and time ids), the v-prediction target and its score-distillation
gradient against direct computations, protection through the command line, and img2img mimicry."""

from __future__ import annotations

import json

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from mist.engine import objectives
from mist.engine.config import ProtectConfig
from mist.engine.pipeline import Protector
from mist.models import load_model
from mist.models.conditioning import time_ids
from mist.models.tokenizer import tokenize
from mist.runner.evaluation.img2img import img2img
from support.cli import run_cli
from support.denoisers import (ARCHITECTURES, read_penultimate, save_folder, save_single_file,
                               score_distillation_run, tiny_parts)

FAMILIES = ("sd2", "sdxl")
DENOISER_METHODS = {"mist": [], "advdm": [], "sds": []}


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """Each family's tiny model as a single file and a diffusers folder (an SD 2.x one also as a v-prediction folder
    and a 768 file): (family, layout) -> path, and (family, "parts") -> the modules."""
    root = tmp_path_factory.mktemp("denoisers")
    out = {}
    for seed, family in enumerate(FAMILIES):
        parts = tiny_parts(family, seed)
        out[family, "parts"] = parts
        out[family, "file"] = save_single_file(root / f"{family}.safetensors", parts)
        out[family, "folder"] = save_folder(root / f"{family}-diffusers", parts)
    out["sd2", "v-folder"] = save_folder(root / "sd2-v-diffusers", out["sd2", "parts"], "v_prediction")
    out["sd2", "768-file"] = save_single_file(root / "v2-1_768-ema-pruned.safetensors", out["sd2", "parts"])
    return out


def _load(saved, family: str, layout: str, parts=None):
    path = saved[family, layout]
    kwargs = {"parts": parts} if parts is not None else {}
    return load_model(str(path), ARCHITECTURES[family], **kwargs)


def _pixels(seed: int = 1, size: int = 32) -> torch.Tensor:
    return torch.rand((1, 3, size, size), generator=torch.Generator().manual_seed(seed)) * 2 - 1


def _generators(seed: int = 5) -> list[torch.Generator]:
    return [torch.Generator().manual_seed(seed)]


# ------------------------------------------------------------------------------------------------ loading


@pytest.mark.parametrize("family", FAMILIES)
def test_both_layouts_load_the_same_model(saved, family):
    file, folder = _load(saved, family, "file"), _load(saved, family, "folder")
    assert file.arch.family == folder.arch.family == family and file.parts == folder.parts
    assert file.arch.prediction_type == folder.arch.prediction_type == "epsilon"
    latent = torch.randn(1, 4, 4, 4, generator=torch.Generator().manual_seed(0))
    t = torch.tensor([500])
    with torch.no_grad():
        for prompt in ("a painting", "a photo", ""):
            torch.testing.assert_close(file.text_embedding(prompt), folder.text_embedding(prompt), rtol=0, atol=0)
        expected = saved[family, "parts"].unet(latent, t, **_unet_inputs(file, latent)).sample
        torch.testing.assert_close(file.denoise(latent, t, file.conditioning("a painting")), expected)
        torch.testing.assert_close(folder.denoise(latent, t, folder.conditioning("a painting")), expected)


def _unet_inputs(model, latent) -> dict:
    conditioning = model.conditioning("a painting")
    inputs = {"encoder_hidden_states": conditioning.states}
    if model.arch.family == "sdxl":
        inputs["added_cond_kwargs"] = {"text_embeds": conditioning.pooled, "time_ids": time_ids(latent)}
    return inputs


def test_sd2_reads_the_penultimate_open_clip_layer_padded_with_zeros(saved):
    """The file holds all three layers of the tiny tower; SD 2.x reads the output of the second, then the final layer
    norm, of prompts padded with 0 after the end marker (OpenCLIP's padding)."""
    model = _load(saved, "sd2", "file")
    tower = saved["sd2", "parts"].towers[0]
    ids = tokenize("a painting", pad=0)
    assert ids[0, :5].tolist() == [49406, 320, 3086, 49407, 0] and (ids[0, 4:] == 0).all()
    with torch.no_grad():
        hidden = tower(ids, output_hidden_states=True).hidden_states[-2]
        expected = tower.final_layer_norm(hidden)
        assert not torch.allclose(expected, tower(ids).last_hidden_state)  # the last layer does change it
        assert not torch.allclose(expected, tower.final_layer_norm(tower(tokenize("a painting"),
                                                                         output_hidden_states=True).hidden_states[-2]))
        torch.testing.assert_close(read_penultimate(tower, 2)(ids).last_hidden_state, expected)
    torch.testing.assert_close(model.text_embedding("a painting"), expected, rtol=0, atol=1e-6)


def test_sdxl_conditioning_has_both_towers_the_pooled_embedding_and_the_time_ids(saved, monkeypatch):
    model = _load(saved, "sdxl", "file")
    clip_l, clip_g = saved["sdxl", "parts"].towers
    conditioning = model.conditioning("a painting")
    assert conditioning.states.shape == (1, 77, 64) and conditioning.pooled.shape == (1, 32)
    with torch.no_grad():
        first = clip_l(tokenize("a painting"), output_hidden_states=True).hidden_states[-2]
        second = clip_g(tokenize("a painting", pad=0), output_hidden_states=True)
    torch.testing.assert_close(conditioning.states, torch.cat([first, second.hidden_states[-2]], -1), rtol=0, atol=0)
    torch.testing.assert_close(conditioning.pooled, second.text_embeds, rtol=0, atol=0)
    empty = model.conditioning("")
    assert not empty.states.any() and not empty.pooled.any()  # SDXL base zeroes the empty prompt

    seen = {}
    forward = model.unet.forward
    monkeypatch.setattr(model.unet, "forward", lambda *a, **k: seen.update(k) or forward(*a, **k))
    latents = torch.zeros(2, 4, 6, 5)
    with torch.no_grad():
        objectives.predict(model, latents, torch.tensor([10, 20]), conditioning, "fp32")
    added = seen["added_cond_kwargs"]
    assert seen["encoder_hidden_states"].shape == (2, 77, 64) and added["text_embeds"].shape == (2, 32)
    assert added["time_ids"].tolist() == [[48, 40, 0, 0, 48, 40]] * 2  # (height, width, crop, target) in pixels


def test_the_prediction_type_comes_from_the_folder_or_the_file_name(saved, tmp_path):
    assert _load(saved, "sd2", "v-folder").arch.prediction_type == "v_prediction"
    assert _load(saved, "sd2", "768-file").arch.prediction_type == "v_prediction"
    assert _load(saved, "sd2", "file").arch.prediction_type == "epsilon"
    assert _load(saved, "sdxl", "folder").arch.prediction_type == "epsilon"
    folder = save_folder(tmp_path / "sample", saved["sd2", "parts"], "sample")
    with pytest.raises(ValueError, match=r"scheduler_config.json: prediction type 'sample'"):
        load_model(str(folder))


@pytest.mark.parametrize("family", FAMILIES)
def test_textual_inversion_is_refused_naming_the_model(saved, family):
    path = saved[family, "folder"]
    with pytest.raises(ValueError, match=f"{path}: .*textual inversion.*1.x only"):
        load_model(str(path), parts=frozenset({"encoder", "unet", "text_model"}))


# ------------------------------------------------------------------------------------------- v-prediction


def test_the_v_target_and_loss_match_a_direct_computation(saved):
    model = _load(saved, "sd2", "v-folder")
    latent = torch.randn(1, 4, 4, 4, generator=torch.Generator().manual_seed(3))
    noised = model.noised(latent, _generators())
    # the draws in order, from the same seed: t, then n
    generator = _generators()[0]
    t = torch.randint(0, 1000, (1,), generator=generator)
    n = torch.randn((1, 4, 4, 4), generator=generator)
    alpha_bar = model.alphas_cumprod[t]
    v = alpha_bar.sqrt() * n - (1 - alpha_bar).sqrt() * latent
    assert torch.equal(noised.timesteps, t) and torch.equal(noised.noise, n)
    torch.testing.assert_close(model.target(noised), v)
    torch.testing.assert_close(model.as_noise(v, noised), n, rtol=0, atol=1e-6)  # the exact v implies n
    with torch.no_grad():
        prediction = model.denoise(alpha_bar.sqrt() * latent + (1 - alpha_bar).sqrt() * n, t,
                                   model.conditioning("a painting"))
        loss = objectives.denoising_loss(model, latent, model.conditioning("a painting"), _generators(), "fp32")
    torch.testing.assert_close(loss, (prediction - v).pow(2).mean().view(1))
    assert not torch.allclose(loss, (prediction - n).pow(2).mean().view(1))  # not the noise-prediction loss


def test_score_distillation_on_a_v_model_steps_along_the_implied_noise(saved):
    """Value: the v loss; latent gradient: (2 / N) sqrt(alpha_bar) (eps_hat - n) = (2 / N) alpha_bar (v_hat - v)."""
    model = _load(saved, "sd2", "v-folder")
    latent = torch.randn(1, 4, 4, 4, generator=torch.Generator().manual_seed(3))
    value, gradient, noised, v_hat = score_distillation_run(model, latent, model.conditioning("a painting"),
                                                            _generators)
    v = model.target(noised)
    alpha_bar = noised.signal**2
    torch.testing.assert_close(value, (v_hat - v).pow(2).mean().view(1))
    torch.testing.assert_close(gradient, 2 / v.numel() * alpha_bar * (v_hat - v), rtol=1e-4, atol=1e-7)


# ------------------------------------------------------------------------------------------ protection


@pytest.fixture(scope="module")
def image_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("image") / "painting.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(path)
    return path


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("method", DENOISER_METHODS)
def test_denoiser_methods_protect_through_the_cli(capsys, saved, image_file, tmp_path, family, method):
    out = tmp_path / "out"
    code, _, err = run_cli(capsys, "protect", image_file, "-o", out, "--model", saved[family, "folder"],
                           "--method", method, "--steps", "2", "--input-size", "32", "--precision", "fp32")
    assert code == 0, err
    protected = np.asarray(Image.open(out / image_file.name).convert("RGB"), dtype=int)
    original = np.asarray(Image.open(image_file).convert("RGB"), dtype=int)
    assert protected.shape == original.shape and 0 < np.abs(protected - original).max() <= 16


def _denoising_loss(model, picture: Image.Image) -> float:
    """The model's denoising loss on `picture` with the same eight draws each time (posterior sample, t, n)."""
    x = torch.from_numpy(np.asarray(picture, dtype=np.float32) / 127.5 - 1).permute(2, 0, 1)[None]
    text, total = model.conditioning("a painting"), 0.0
    with torch.no_grad():
        for seed in range(8):
            latent = objectives.encode(model, x, _generators(seed), "fp32")
            total += objectives.denoising_loss(model, latent, text, _generators(seed + 100), "fp32").item()
    return total / 8


@pytest.mark.parametrize("family,layout", [("sd2", "v-folder"), ("sd2", "file"), ("sdxl", "file")])
@pytest.mark.parametrize("method", ["mist", "advdm"])
def test_the_exact_gradient_methods_raise_the_denoising_loss(saved, family, layout, method):
    """mist (semantic) and advdm raise the model's own denoising loss (measured with the same draws before and after).
    Score distillation leaves the UNet's Jacobian out, so on random weights it promises no direction for the loss:
    its gradient is checked against the formula instead (above)."""
    params = {"mode": "semantic"} if method == "mist" else {}
    config = ProtectConfig.of(method=method, steps=8, input_size=32, precision="fp32", **params)
    model = _load(saved, family, layout, config.parts)
    picture = Image.fromarray(np.random.default_rng(2).integers(0, 256, (32, 32, 3), dtype=np.uint8))
    protected = Protector(model, config).protect(picture).image
    assert _denoising_loss(model, protected) > _denoising_loss(model, picture)


# ------------------------------------------------------------------------------------------ evaluation


@pytest.mark.parametrize("family,layout", [("sd2", "v-folder"), ("sdxl", "folder")])
def test_img2img_runs_on_each_family(saved, family, layout):
    model = _load(saved, family, layout, frozenset({"encoder", "unet", "text_encoder", "decoder"}))
    images = torch.cat([_pixels(1), _pixels(2)])
    first = img2img(model, images, 0.5, [torch.Generator().manual_seed(i) for i in (1, 2)], steps=4)
    again = img2img(model, images, 0.5, [torch.Generator().manual_seed(i) for i in (1, 2)], steps=4)
    assert first.images.shape == images.shape and torch.isfinite(first.images).all()
    assert torch.equal(first.images, again.images) and not torch.allclose(first.images, images, atol=1e-2)


@pytest.mark.parametrize("family", FAMILIES)
def test_evaluate_mimics_with_another_family_what_was_protected_against_sd1(capsys, saved, image_file, tmp_path,
                                                                            family):
    originals, protected = tmp_path / "originals", tmp_path / "protected"
    originals.mkdir()
    (originals / image_file.name).write_bytes(image_file.read_bytes())
    code, _, err = run_cli(capsys, "protect", originals, "-o", protected, "--model", "tiny-random", "--steps", "2",
                           "--input-size", "32", "--precision", "fp32")
    assert code == 0, err
    report = tmp_path / "report"
    code, _, err = run_cli(capsys, "evaluate", originals, protected, "-o", report, "--model", saved[family, "folder"],
                           "--purify", "", "--strengths", "0.5", "--steps", "2", "-q")
    assert code == 0, err
    record = json.loads((report / "results.json").read_text())
    assert record["model"] == saved[family, "folder"].name and record["method"] == "mist"
    assert [h["mimicry"] for h in record["headline"]] == ["img2img:0.5"]


def test_a_model_too_large_for_the_memory_is_refused_saying_what_it_needs(saved, monkeypatch):
    import mist.models.footprint as footprint

    layout = "folder"

    monkeypatch.setattr(footprint, "available_ram_bytes", lambda: 1000)
    path = saved["sdxl", layout]
    with pytest.raises(ValueError, match=r"Stable Diffusion XL model needs about 0\.\d GB of memory .*\(UNet 0\.\d GB, "
                                         r"text encoders 0\.\d GB, VAE 0\.\d GB\)") as caught:
        _load(saved, "sdxl", layout)
    assert str(path) in str(caught.value) and "\n" not in str(caught.value)
    monkeypatch.setattr(footprint, "available_ram_bytes", lambda: None)  # unknown: no refusal
    assert _load(saved, "sdxl", layout).unet is not None


@pytest.mark.parametrize("layout", ["file", "folder"])
def test_the_memory_check_comes_before_anything_is_built_and_counts_the_weights(saved, monkeypatch, layout):
    """The text towers are built for real when loaded (SDXL's OpenCLIP-G is 2.8 GB): the memory the parts will take
    is counted from the files' headers and checked before any module is built; a byte less than the count is
    refused, the count itself loads."""
    import mist.models.footprint as footprint
    import mist.models.loading as loading

    built, real = [], loading._text_module

    def spy(arch):
        built.append(torch.empty(0).device.type)
        return real(arch)

    parts = saved["sdxl", "parts"]
    weights = 4 * sum(p.numel() for m in (parts.unet, parts.vae.encoder, parts.vae.quant_conv, *parts.towers)
                      for p in m.parameters())
    monkeypatch.setattr(loading, "_text_module", spy)
    monkeypatch.setattr(footprint, "available_ram_bytes", lambda: weights - 1)
    with pytest.raises(ValueError, match="needs about"):
        _load(saved, "sdxl", layout)
    assert built == []
    monkeypatch.setattr(footprint, "available_ram_bytes", lambda: weights)
    assert _load(saved, "sdxl", layout).unet is not None and built == ["cpu"]


SURROGATE_METHODS = {"mist2": {}, "mist2-lora": {"round_steps": 2, "surrogate_steps": 1},
                     "aspl": {"round_steps": 2, "surrogate_steps": 1}}


@pytest.mark.parametrize("method", SURROGATE_METHODS)
def test_the_target_unet_and_surrogate_methods_run_on_a_v_model_and_on_sdxl(saved, method):
    """Mist-v2's and Anti-DreamBooth's losses (the noise the UNet predicts; surrogate fine-tuning with the model's own
    training loss) change the image within the budget on SD 2.x-v and SDXL."""
    picture = Image.fromarray(np.random.default_rng(4).integers(0, 256, (32, 32, 3), dtype=np.uint8))
    config = ProtectConfig.of(method=method, steps=4, input_size=32, precision="fp32", **SURROGATE_METHODS[method])
    for family, layout in (("sd2", "v-folder"), ("sdxl", "file")):
        result = Protector(_load(saved, family, layout, config.parts), config).protect(picture)
        change = np.abs(np.asarray(result.image, dtype=int) - np.asarray(picture, dtype=int))
        assert 0 < change.max() <= 16, (family, method)
