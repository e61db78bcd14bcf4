"""Locating and loading Stable Diffusion v1 (`mist.models`): every format, refusals, offline use, the tokenizer.

Tiny random models of the real architectures are written in each format the product reads (original CompVis layout
via `support.original_layout`, safetensors, legacy pickles, diffusers folders) and loaded back through the product's
own entry points; the loaded model must compute the same numbers as the modules that were saved.
"""

from __future__ import annotations

import json
import pickle
import shutil
import socket
import sys
import types
from pathlib import Path

import pytest
import torch
from diffusers import AutoencoderKL, UNet2DConditionModel
from safetensors.torch import save_file
from transformers import CLIPTextConfig, CLIPTextModel

from mist.models import TINY, TINY_RANDOM, Architecture, ModelNotFoundError, load_model, resolve_model
from mist.models.loading import build_random, load_single_file
from mist.models.locate import DOWNLOAD_URL, SEED_MODEL_PATH
from mist.models.tokenizer import clip_tokenizer, tokenize
from support.original_layout import to_original_layout

BOS, EOS = 49406, 49407
A_PAINTING_IDS = [BOS, 320, 3086] + [EOS] * 74
A_PHOTO_IDS = [BOS, 320, 1125] + [EOS] * 74
SD_V14_CACHE_FOLDER = "models--CompVis--stable-diffusion-v1-4"


# ----------------------------------------------------------------------------------------------------------- helpers


def _build(arch: Architecture, seed: int = 0, **unet_overrides):
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(**{**arch.unet, **unet_overrides})
    vae = AutoencoderKL(**arch.vae)
    text = CLIPTextModel(CLIPTextConfig(**arch.text))
    return unet, vae, text


def _wider(width: int) -> Architecture:
    """TINY with another cross-attention / text width (SD v1 has 768, SD 2.x 1024)."""
    return Architecture(name=f"tiny-{width}", unet={**TINY.unet, "cross_attention_dim": width}, vae=TINY.vae,
                        text={**TINY.text, "hidden_size": width, "projection_dim": width})


def _save_ckpt(path: Path, checkpoint: object, legacy: bool = False) -> Path:
    torch.save(checkpoint, path, _use_new_zipfile_serialization=not legacy)
    return path


def _save_diffusers(folder: Path, unet, vae, text) -> Path:
    unet.save_pretrained(folder / "unet")
    vae.save_pretrained(folder / "vae")
    text.save_pretrained(folder / "text_encoder")
    return folder


def _truncated(path: Path) -> Path:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    return path


def _drop(state: dict, prefix: str) -> dict:
    kept = {k: v for k, v in state.items() if not k.startswith(prefix)}
    assert len(kept) < len(state), prefix
    return kept


class Reference:
    """The source modules and what they compute on fixed inputs."""

    def __init__(self, unet, vae, text) -> None:
        self.unet, self.vae, self.text = unet, vae, text
        gen = torch.Generator().manual_seed(1)
        self.image = torch.rand(1, 3, 64, 64, generator=gen) * 2 - 1
        self.latent = torch.randn(1, 4, 8, 8, generator=gen)
        self.timesteps = torch.tensor([500])
        with torch.no_grad():
            posterior = vae.encode(self.image).latent_dist
            self.mean, self.logvar = posterior.mean, posterior.logvar
            self.hidden = text(torch.tensor([A_PAINTING_IDS])).last_hidden_state
            self.noise = unet(self.latent, self.timesteps, encoder_hidden_states=self.hidden).sample

    def assert_reproduced_by(self, model) -> None:
        for module in (model.encoder, model.unet):
            assert not any(t.is_meta for t in [*module.parameters(), *module.buffers()])
        with torch.no_grad():
            moments = model.encoder.quant_conv(model.encoder.encoder(self.image))
            mean, logvar = moments.chunk(2, dim=1)
            torch.testing.assert_close(mean, self.mean)
            torch.testing.assert_close(logvar, self.logvar)
            hidden = model.text_embedding("a painting")
            torch.testing.assert_close(hidden, self.hidden)
            torch.testing.assert_close(model.denoise(self.latent, self.timesteps, hidden), self.noise)


@pytest.fixture(scope="module")
def tiny() -> Reference:
    return Reference(*_build(TINY))


@pytest.fixture(scope="module")
def original_state(tiny) -> dict:
    """The tiny model in the sd-v1-4.ckpt layout."""
    return to_original_layout(tiny.unet, tiny.vae, tiny.text)


@pytest.fixture(scope="module")
def ckpt_file(tmp_path_factory, original_state) -> Path:
    return _save_ckpt(tmp_path_factory.mktemp("ckpt") / "model.ckpt", {"state_dict": original_state})


@pytest.fixture(scope="module")
def diffusers_folder(tmp_path_factory, tiny) -> Path:
    return _save_diffusers(tmp_path_factory.mktemp("diffusers") / "sd", tiny.unet, tiny.vae, tiny.text)


@pytest.fixture
def folder_copy(tmp_path, diffusers_folder) -> Path:
    return Path(shutil.copytree(diffusers_folder, tmp_path / "sd"))


# Picklable callables for the refusal tests: each leaves a trace if a loader ever runs it.
CALLS: list[str] = []


def _leave_marker(path: str) -> str:
    CALLS.append(path)
    Path(path).write_text("ran")
    return path


class _Exploit:
    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return _leave_marker, (self.marker,)


# ------------------------------------------------------------------------------------------------- formats that load


@pytest.mark.parametrize("entry", ["load_single_file", "load_model"])
def test_ckpt_with_state_dict_loads_with_same_numbers(tiny, ckpt_file, entry):
    model = load_single_file(ckpt_file, TINY) if entry == "load_single_file" else load_model(str(ckpt_file), TINY)
    assert model.source == str(ckpt_file) and not model.random_weights
    tiny.assert_reproduced_by(model)


@pytest.mark.parametrize("nesting", [1, 2])
def test_novelai_text_keys_load_with_same_numbers(tiny, tmp_path, nesting):
    checkpoint = to_original_layout(tiny.unet, tiny.vae, tiny.text, novelai=True)
    for _ in range(nesting):
        checkpoint = {"state_dict": checkpoint}
    path = _save_ckpt(tmp_path / "novelai.ckpt", checkpoint)
    tiny.assert_reproduced_by(load_model(str(path), TINY))


def test_safetensors_loads_with_same_numbers(tiny, tmp_path, original_state):
    path = tmp_path / "model.safetensors"
    save_file({k: v.contiguous() for k, v in original_state.items()}, str(path))
    tiny.assert_reproduced_by(load_model(str(path), TINY))


def test_legacy_non_zip_ckpt_loads_with_same_numbers(tiny, tmp_path, original_state):
    path = _save_ckpt(tmp_path / "legacy.ckpt", {"state_dict": original_state}, legacy=True)
    with pytest.raises(RuntimeError, match="mmap"):  # the format really is one that mmap cannot read
        torch.load(path, weights_only=True, mmap=True)
    tiny.assert_reproduced_by(load_model(str(path), TINY))


def test_ckpt_with_pickled_lightning_callback_loads_without_importing_it(tiny, tmp_path, monkeypatch, original_state):
    module_name = "pytorch_lightning.callbacks.model_checkpoint"
    ran: list[str] = []

    class ModelCheckpoint:
        def __setstate__(self, state):
            ran.append("__setstate__")

    ModelCheckpoint.__module__, ModelCheckpoint.__qualname__ = module_name, "ModelCheckpoint"
    callback = ModelCheckpoint()
    callback.monitor, callback.best_model_score = "val/loss", torch.tensor(0.25)
    callback.best_k_models = {"epoch=1.ckpt": torch.tensor(0.25)}
    with monkeypatch.context() as fake:
        parts = module_name.split(".")
        for depth in range(1, len(parts) + 1):
            fake.setitem(sys.modules, ".".join(parts[:depth]), types.ModuleType(".".join(parts[:depth])))
        sys.modules[module_name].ModelCheckpoint = ModelCheckpoint
        path = _save_ckpt(tmp_path / "lightning.ckpt", {
            "epoch": 6, "global_step": 470000, "state_dict": original_state,
            "callbacks": {ModelCheckpoint: callback}, "callbacks_list": [callback],
        })
    assert not any(name.startswith("pytorch_lightning") for name in sys.modules)
    with pytest.raises(pickle.UnpicklingError, match="ModelCheckpoint"):  # the file really references the class
        torch.load(path, weights_only=True)

    tiny.assert_reproduced_by(load_model(str(path), TINY))
    assert not any(name.startswith("pytorch_lightning") for name in sys.modules)
    assert ran == []


def test_diffusers_folder_loads_with_same_numbers(tiny, diffusers_folder):
    model = load_model(str(diffusers_folder))
    assert model.source == str(diffusers_folder)
    tiny.assert_reproduced_by(model)


@pytest.mark.parametrize("source", ["ckpt", "safetensors", "diffusers"])
def test_only_the_parts_a_method_needs_are_loaded(tiny, ckpt_file, diffusers_folder, tmp_path, original_state,
                                                    source):
    """A method that runs through the encoder alone gets a model without the UNet (3.4 GB in float32) and the text
    encoder; its encoder is exactly the full model's."""
    if source == "safetensors":
        path = tmp_path / "model.safetensors"
        save_file({k: v.contiguous() for k, v in original_state.items()}, str(path))
    else:
        path = ckpt_file if source == "ckpt" else diffusers_folder
    model = load_model(str(path), TINY, parts=frozenset({"encoder"}))
    assert model.unet is None and model.text_embeddings == {} and model.parts == {"encoder"}
    with torch.no_grad():
        mean, logvar = model.posterior(tiny.image)
    torch.testing.assert_close(mean, tiny.mean)
    torch.testing.assert_close(logvar, tiny.logvar.clamp(-30, 20))
    with pytest.raises(ValueError, match="without its UNet"):
        model.denoise(tiny.latent, tiny.timesteps, tiny.hidden)
    with pytest.raises(ValueError, match="without its text encoder"):
        model.text_embedding("a painting")
    assert load_model(str(path), TINY, parts=frozenset({"encoder", "unet"})).parts == {"encoder", "unet"}


@pytest.mark.parametrize("source", ["ckpt", "safetensors", "diffusers", "tiny-random"])
def test_the_vae_decoder_loads_only_when_asked_with_same_numbers(tiny, ckpt_file, diffusers_folder, tmp_path,
                                                                 original_state, source):
    """The decoder (evaluation's part) is never read unless asked for; asked for, it decodes as the saved VAE does.
    tiny-random has no saved VAE: its decoder is checked against diffusers' AutoencoderKL given the same weights, and
    its other parts must not change when the decoder is added (they are drawn first)."""
    if source == "safetensors":
        path = tmp_path / "model.safetensors"
        save_file({k: v.contiguous() for k, v in original_state.items()}, str(path))
    else:
        path = {"ckpt": ckpt_file, "diffusers": diffusers_folder, "tiny-random": TINY_RANDOM}[source]
    plain = load_model(str(path), TINY)
    assert plain.decoder is None and "decoder" not in plain.parts
    with pytest.raises(ValueError, match="without its VAE decoder"):
        plain.decode(tiny.latent)
    model = load_model(str(path), TINY, parts=frozenset({"encoder", "decoder"}))
    assert model.parts == {"encoder", "decoder"} and model.unet is None
    vae = tiny.vae
    if source == "tiny-random":
        vae = AutoencoderKL(**TINY.vae)
        vae.load_state_dict({**model.encoder.state_dict(), **model.decoder.state_dict()})
        torch.testing.assert_close(plain.encoder.state_dict(), model.encoder.state_dict(), rtol=0, atol=0)
    with torch.no_grad():
        expected = vae.decode(tiny.latent).sample
        torch.testing.assert_close(model.decode(tiny.latent * TINY.latent_scale), expected)
    assert not any(p.requires_grad for p in model.decoder.parameters())
    half = model.placed("cpu", torch.bfloat16)
    assert half.decoder.post_quant_conv.weight.dtype == torch.bfloat16
    assert model.decoder.post_quant_conv.weight.dtype == torch.float32  # placed() leaves the original alone


@pytest.mark.parametrize("source", ["ckpt", "diffusers", "tiny-random"])
def test_the_text_encoder_is_kept_only_with_the_text_model_part(tiny, ckpt_file, diffusers_folder, source):
    """Textual inversion's part: the text encoder itself, with the saved weights, kept (and placed with the rest) only
    when "text_model" is asked for; the default parts drop it after embedding the prompts."""
    path = {"ckpt": ckpt_file, "diffusers": diffusers_folder, "tiny-random": TINY_RANDOM}[source]
    plain = load_model(str(path), TINY)
    assert plain.text_encoder is None and "text_model" not in plain.parts
    model = load_model(str(path), TINY, parts=frozenset({"encoder", "text_model"}))
    assert model.parts == {"encoder", "text_encoder", "text_model"} and model.unet is None
    assert not any(p.requires_grad for p in model.text_encoder.parameters())
    ids = torch.tensor([A_PAINTING_IDS])
    with torch.no_grad():
        hidden = model.text_encoder(ids).last_hidden_state
    torch.testing.assert_close(hidden, model.text_embedding("a painting"), rtol=0, atol=0)
    if source != "tiny-random":
        torch.testing.assert_close(hidden, tiny.hidden)
    half = model.placed("cpu", torch.bfloat16)
    assert half.text_encoder.dtype == torch.bfloat16 and model.text_encoder.dtype == torch.float32


def test_an_unknown_model_part_is_refused():
    with pytest.raises(ValueError, match="unknown model parts"):
        load_model(TINY_RANDOM, parts=frozenset({"encoder", "vae"}))


def test_a_partial_checkpoint_is_still_checked_as_a_whole(tmp_path, original_state):
    """The layout check reads the UNet's shapes also when the UNet is not loaded: an inpainting model is refused."""
    inpainting = dict(original_state)
    first = "model.diffusion_model.input_blocks.0.0.weight"
    inpainting[first] = torch.zeros(inpainting[first].shape[0], 9, *inpainting[first].shape[2:])
    path = _save_ckpt(tmp_path / "inpainting.ckpt", {"state_dict": inpainting})
    with pytest.raises(ValueError, match="9 input channels"):
        load_model(str(path), TINY, parts=frozenset({"encoder"}))


def test_diffusers_folder_with_v_prediction_scheduler_is_refused(folder_copy):
    (folder_copy / "scheduler").mkdir()
    (folder_copy / "scheduler" / "scheduler_config.json").write_text(json.dumps({"prediction_type": "v_prediction"}))
    with pytest.raises(ValueError, match="v_prediction") as caught:
        load_model(str(folder_copy))
    assert str(folder_copy) in str(caught.value)


# --------------------------------------------------------------------------------------------- pickled code refused


@pytest.mark.parametrize("legacy", [False, True], ids=["zip", "legacy"])
def test_checkpoint_pickling_a_callable_is_refused_and_never_runs_it(tmp_path, original_state, legacy):
    marker = tmp_path / "pwned"
    path = _save_ckpt(tmp_path / "evil.ckpt", {"state_dict": original_state, "hook": _Exploit(marker)}, legacy=legacy)
    CALLS.clear()
    with pytest.raises(ValueError) as caught:
        load_model(str(path), TINY)
    _assert_refused_as_code(caught.value, path, "_leave_marker")
    assert CALLS == [] and not marker.exists()
    torch.load(path, weights_only=False)  # the file really does run its payload when unpickled without restriction
    assert CALLS == [str(marker)] and marker.exists()


def test_diffusers_weights_pickling_a_callable_are_refused_and_never_run(tmp_path, folder_copy):
    marker = tmp_path / "pwned"
    for weights in (folder_copy / "unet").glob("diffusion_pytorch_model*"):
        weights.unlink()
    path = _save_ckpt(folder_copy / "unet" / "diffusion_pytorch_model.bin", {"hook": _Exploit(marker)})
    CALLS.clear()
    with pytest.raises(ValueError) as caught:
        load_model(str(folder_copy))
    _assert_refused_as_code(caught.value, path, "_leave_marker")
    assert CALLS == [] and not marker.exists()


def _assert_refused_as_code(error: ValueError, path: Path, global_name: str) -> None:
    """One line that names the file, says it holds code or objects Mist will not load, names the global it asked for,
    and gives no advice on loading it unsafely (PyTorch's own message suggests weights_only=False)."""
    message = str(error)
    assert "\n" not in message
    assert message.startswith(f"{path}: refused: the file contains code or Python objects that Mist will not load")
    assert global_name in message
    assert "weights_only" not in message and "trust" not in message and "can still be loaded" not in message


# ----------------------------------------------------------------------------------------------------- bad files


def _write_truncated_ckpt(tmp_path, state, tiny):
    return _truncated(_save_ckpt(tmp_path / "cut.ckpt", {"state_dict": state}))


def _write_truncated_safetensors(tmp_path, state, tiny):
    path = tmp_path / "cut.safetensors"
    save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    return _truncated(path)


def _write_random_bytes(tmp_path, state, tiny):
    path = tmp_path / "noise.ckpt"
    path.write_bytes(torch.randint(0, 256, (4096,), dtype=torch.uint8, generator=torch.Generator()).numpy().tobytes())
    return path


def _write_empty(tmp_path, state, tiny):
    path = tmp_path / "empty.ckpt"
    path.touch()
    return path


def _write_dict_without_sd_keys(tmp_path, state, tiny):
    return _save_ckpt(tmp_path / "other.ckpt", {"state_dict": {"model.fc.weight": torch.zeros(2, 2)}, "epoch": 1})


def _write_sd2_like(tmp_path, state, tiny):
    """SD 2.x: OpenCLIP text encoder under `cond_stage_model.model.`, wider cross-attention (1024 in the real one)."""
    unet, vae, text = _build(_wider(64))
    sd2 = _drop(to_original_layout(unet, vae, text), "cond_stage_model.")
    sd2["cond_stage_model.model.token_embedding.weight"] = torch.zeros(8, 64)
    sd2["cond_stage_model.model.transformer.resblocks.0.attn.in_proj_weight"] = torch.zeros(3 * 64, 64)
    return _save_ckpt(tmp_path / "sd2.ckpt", {"state_dict": sd2})


def _write_other_cross_attention_width(tmp_path, state, tiny):
    return _save_ckpt(tmp_path / "wide.ckpt", {"state_dict": to_original_layout(*_build(_wider(48)))})


def _write_inpainting_unet(tmp_path, state, tiny):
    unet, _, _ = _build(TINY, in_channels=9)
    return _save_ckpt(tmp_path / "inpainting.ckpt", {"state_dict": to_original_layout(unet, tiny.vae, tiny.text)})


def _write_missing_unet_attention(tmp_path, state, tiny):
    return _save_ckpt(tmp_path / "partial.ckpt", {"state_dict": _drop(state, "model.diffusion_model.middle_block.1.")})


def _write_diffusers_without_unet_weights(tmp_path, state, tiny):
    folder = _save_diffusers(tmp_path / "sd", tiny.unet, tiny.vae, tiny.text)
    for weights in (folder / "unet").glob("diffusion_pytorch_model*"):
        weights.unlink()
    return folder


BAD_FILES = {
    "truncated-ckpt": (_write_truncated_ckpt, "cannot read"),
    "truncated-safetensors": (_write_truncated_safetensors, "cannot read"),
    "random-bytes": (_write_random_bytes, "cannot read"),
    "empty-file": (_write_empty, "cannot read"),
    "no-sd-keys": (_write_dict_without_sd_keys, "not a Stable Diffusion v1"),
    "sd2-like": (_write_sd2_like, "Stable Diffusion 2.x"),
    "cross-attention-width": (_write_other_cross_attention_width, "cross-attention width 48"),
    "inpainting-unet": (_write_inpainting_unet, "9 input channels"),
    "missing-unet-weights": (_write_missing_unet_attention, "UNet weights missing"),
    "diffusers-without-unet-weights": (_write_diffusers_without_unet_weights, "no weights file"),
}


@pytest.mark.parametrize("case", BAD_FILES)
def test_bad_model_is_refused_with_its_path(tmp_path, original_state, tiny, case):
    write, fragment = BAD_FILES[case]
    path = write(tmp_path, original_state, tiny)
    with pytest.raises(ValueError, match=fragment) as caught:
        load_model(str(path), TINY)
    message = str(caught.value)
    assert str(path) in message
    assert "\n" not in message and "weights_only" not in message and "trust" not in message


def test_missing_model_path_raises_model_not_found_with_its_path(tmp_path):
    path = tmp_path / "nowhere.ckpt"
    with pytest.raises(ModelNotFoundError) as caught:
        load_model(str(path), TINY)
    assert str(path) in str(caught.value)


def test_sd2_checkpoint_is_named_as_sd2(tmp_path, original_state, tiny):
    path = _write_sd2_like(tmp_path, original_state, tiny)
    with pytest.raises(ValueError, match="2.x"):
        load_model(str(path), TINY)


def test_checkpoint_with_openclip_text_keys_is_refused(tmp_path, original_state):
    mixed = {**original_state, "cond_stage_model.model.token_embedding.weight": torch.zeros(8, 32)}
    path = _save_ckpt(tmp_path / "mixed.ckpt", {"state_dict": mixed})
    with pytest.raises(ValueError, match="2.x"):
        load_model(str(path), TINY)


@pytest.mark.parametrize("key", [
    "model.diffusion_model.input_blocks.0.0.weight",
    "model.diffusion_model.input_blocks.2.0.op.bias",
    "model.diffusion_model.output_blocks.1.2.conv.bias",
    "first_stage_model.encoder.down.0.downsample.conv.bias",
])
def test_checkpoint_missing_any_single_key_is_refused_with_value_error(tmp_path, original_state, key):
    path = _save_ckpt(tmp_path / "partial.ckpt", {"state_dict": _drop(original_state, key)})
    with pytest.raises(ValueError, match="missing") as caught:
        load_model(str(path), TINY)
    assert str(path) in str(caught.value)


# -------------------------------------------------------------------------------------------------------- offline


@pytest.fixture
def no_network(monkeypatch) -> list:
    attempts: list = []

    def refuse(*args, **kwargs):
        attempts.append(args)
        raise OSError("network access in an offline test")

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    return attempts


def test_loading_and_tokenizing_need_no_network(no_network, tiny, ckpt_file, diffusers_folder):
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", 9))
    no_network.clear()
    clip_tokenizer.cache_clear()
    assert clip_tokenizer()("a painting").input_ids == [BOS, 320, 3086, EOS]
    tiny.assert_reproduced_by(load_model(str(ckpt_file), TINY))
    tiny.assert_reproduced_by(load_model(str(diffusers_folder)))
    assert no_network == []


# ------------------------------------------------------------------------------------------------------ tokenizer


def test_tokenizer_gives_sd_v1_ids():
    ids = tokenize("a painting")
    assert ids.shape == (1, 77) and ids.dtype == torch.int64
    assert ids[0].tolist() == A_PAINTING_IDS
    assert tokenize("a photo")[0].tolist() == A_PHOTO_IDS
    assert len(clip_tokenizer()) == 49408


# ----------------------------------------------------------------------------------------------- where models are


@pytest.fixture
def nowhere(tmp_path, monkeypatch) -> Path:
    """A working directory with no seed model, no MIST_MODEL, and an empty Hugging Face cache; returns the cache."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MIST_MODEL", raising=False)
    monkeypatch.delenv("HF_HOME", raising=False)
    cache = tmp_path / "hf-cache"
    cache.mkdir()
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    return cache


def _touch(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.touch()
    return path


def _cached_snapshot(cache: Path, parts=("unet", "vae", "text_encoder")) -> Path:
    snapshot = cache / SD_V14_CACHE_FOLDER / "snapshots" / "0123abcd"
    for part in parts:
        _touch(snapshot / part / "config.json")
    return snapshot


def test_explicit_spec_beats_mist_model(nowhere, tmp_path, monkeypatch):
    monkeypatch.setenv("MIST_MODEL", str(_touch(tmp_path / "env.ckpt")))
    assert resolve_model(str(_touch(tmp_path / "cli.ckpt"))) == tmp_path / "cli.ckpt"


def test_mist_model_beats_seed_path(nowhere, tmp_path, monkeypatch):
    _touch(tmp_path / SEED_MODEL_PATH)
    monkeypatch.setenv("MIST_MODEL", str(_touch(tmp_path / "env.ckpt")))
    assert resolve_model() == tmp_path / "env.ckpt"


@pytest.mark.parametrize("suffix", [".ckpt", ".safetensors"])
def test_seed_path_beats_hugging_face_cache(nowhere, tmp_path, suffix):
    _cached_snapshot(nowhere)
    seed = _touch(tmp_path / SEED_MODEL_PATH.with_suffix(suffix))
    assert resolve_model() == seed.resolve()


def test_hugging_face_cache_snapshot_is_found(nowhere):
    snapshot = _cached_snapshot(nowhere)
    assert resolve_model() == snapshot


def test_hugging_face_cache_follows_hf_home(nowhere, tmp_path, monkeypatch):
    monkeypatch.delenv("HF_HUB_CACHE")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))
    snapshot = _cached_snapshot(tmp_path / "hf-home" / "hub")
    assert resolve_model() == snapshot


def test_incomplete_cache_snapshot_is_ignored(nowhere):
    _cached_snapshot(nowhere, parts=("unet", "vae"))
    with pytest.raises(ModelNotFoundError):
        resolve_model()


def test_tiny_random_via_spec_and_mist_model(nowhere, monkeypatch):
    assert resolve_model(TINY_RANDOM) == TINY_RANDOM
    monkeypatch.setenv("MIST_MODEL", TINY_RANDOM)
    assert resolve_model() == TINY_RANDOM
    model = load_model()
    assert model.random_weights and model.source == TINY_RANDOM


@pytest.mark.parametrize("origin", ["--model", "MIST_MODEL"])
def test_missing_named_model_names_path_and_origin(nowhere, tmp_path, monkeypatch, origin):
    missing = tmp_path / "missing.ckpt"
    _touch(tmp_path / SEED_MODEL_PATH)  # a fallback exists, but a named model must not fall back to it
    if origin == "MIST_MODEL":
        monkeypatch.setenv("MIST_MODEL", str(missing))
    with pytest.raises(ModelNotFoundError) as caught:
        resolve_model(str(missing) if origin == "--model" else None)
    assert str(missing) in str(caught.value) and origin in str(caught.value)


def test_nothing_found_says_where_it_looked_and_how_to_download(nowhere):
    with pytest.raises(ModelNotFoundError) as caught:
        resolve_model()
    message = str(caught.value)
    assert str(SEED_MODEL_PATH) in message
    assert str(nowhere) in message
    assert f"wget -c {DOWNLOAD_URL}" in message


# ------------------------------------------------------------------------------------------ random and frozen models


def test_build_random_is_reproducible_and_leaves_global_rng_alone():
    before = torch.get_rng_state()
    first, second = build_random(), build_random()
    assert torch.equal(torch.get_rng_state(), before)
    for a, b in ((first.encoder, second.encoder), (first.unet, second.unet)):
        sa, sb = a.state_dict(), b.state_dict()
        assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)
    assert all(torch.equal(first.text_embeddings[p], second.text_embeddings[p]) for p in ("a painting", "a photo"))
    assert not torch.equal(build_random(seed=1).unet.conv_in.weight, first.unet.conv_in.weight)


@pytest.mark.parametrize("source", ["ckpt", "diffusers", "tiny-random"])
def test_loaded_models_are_frozen_and_encode_reproducibly(ckpt_file, diffusers_folder, source):
    spec = {"ckpt": ckpt_file, "diffusers": diffusers_folder, "tiny-random": TINY_RANDOM}[source]
    model = load_model(str(spec), TINY)
    for module in (model.encoder, model.unet):
        assert not module.training
        assert all(not p.requires_grad for p in module.parameters())
    x = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(3)) * 2 - 1
    def generators(seed):
        return [torch.Generator().manual_seed(seed), torch.Generator().manual_seed(seed + 100)]

    first = model.encode(x, generators(7))
    assert first.shape == (2, 4, 8, 8)
    assert torch.equal(first, model.encode(x, generators(7)))
    assert not torch.equal(first, model.encode(x, generators(8)))


def test_numpy_training_metadata_in_a_ckpt_is_read_as_data(tmp_path, original_state):
    import numpy as np

    path = _save_ckpt(tmp_path / "numpy-meta.ckpt", {"state_dict": original_state, "global_step": np.int64(470000),
                                                     "epoch": np.float64(6.0), "history": np.zeros(3)})
    load_model(str(path), TINY)
