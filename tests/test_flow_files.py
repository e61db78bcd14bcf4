"""SD 3.x and Flux from their published single files: tiny models saved both as single files (transformer in the
original names, text encoders in files of their own or inside an SD 3 `_incl_clips` file, Flux's VAE in an
ae.safetensors beside it) and as a diffusers folder give the same conditioning and velocity; the denoiser-side methods
protect through the command line from the files; Flux's renaming against diffusers' own converter at Flux's width;
the transformer read in the run's type; the refusals (a missing text encoder, a file that is none, scaled float8, too
little memory, before any weight is read)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from mist.models import load_model
from mist.models.flow_files import flux_state
from support.cli import run_cli
from support.flow_files import save_files, save_same_folder, tiny

KINDS = {"sd3": ("sd3", None), "sd35": ("sd35", None), "dev": ("dev", None), "schnell": ("schnell", "schnell")}


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """kind -> (Files, folder, parts): each tiny model both ways; "sd3-incl": SD 3 with its text encoders inside;
    "dev-bare": Flux dev's transformer without the `model.diffusion_model.` prefix."""
    root = tmp_path_factory.mktemp("flow_files")
    out = {}
    for seed, (name, (kind, scheduler)) in enumerate(KINDS.items()):
        parts = tiny(kind, seed)
        out[name] = (save_files(root / name, parts), save_same_folder(root / f"{name}-folder", parts, scheduler),
                     parts)
    out["sd3-incl"] = (save_files(root / "sd3-incl", out["sd3"][2], incl_clips=True),) + out["sd3"][1:]
    out["dev-bare"] = (save_files(root / "dev-bare", out["dev"][2], prefixed=False),) + out["dev"][1:]
    return out


def _from_files(files, **options):
    return load_model(str(files.model), text_encoders=tuple(str(f) for f in files.text_encoders), **options)


@pytest.mark.parametrize("name", ["sd3", "sd35", "sd3-incl", "dev", "dev-bare", "schnell"])
def test_single_files_condition_and_denoise_as_the_same_models_folder(saved, name):
    files, folder, _ = saved[name]
    from_files, from_folder = _from_files(files), load_model(str(folder))
    assert from_files.arch.schedule == from_folder.arch.schedule
    plain = lambda value: tuple(value) if isinstance(value, list) else value  # noqa: E731
    assert {k: plain(v) for k, v in from_files.arch.unet.items() if k != "sample_size"} == {
        k: plain(from_folder.arch.unet[k]) for k in from_files.arch.unet if k != "sample_size"}
    latent, time = torch.randn(1, 16, 4, 6, generator=torch.Generator().manual_seed(2)), torch.tensor([640.0])
    for prompt in ("a painting", "a photo", ""):
        ours, theirs = from_files.conditioning(prompt), from_folder.conditioning(prompt)
        torch.testing.assert_close(ours.states, theirs.states, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(ours.pooled, theirs.pooled, rtol=1e-5, atol=1e-6)
        with torch.no_grad():
            torch.testing.assert_close(from_files.denoise(latent, time, ours),
                                       from_folder.denoise(latent, time, theirs), rtol=1e-5, atol=1e-6)


def test_sd35_extra_attention_layers_and_norms_are_read_from_the_weights(saved):
    config = _from_files(saved["sd35"][0]).arch.unet
    assert config["dual_attention_layers"] == (0,) and config["qk_norm"] == "rms_norm" and config["num_layers"] == 2
    assert _from_files(saved["sd3"][0]).arch.unet["dual_attention_layers"] == ()


def test_flux_is_renamed_as_diffusers_converter_renames_it_at_flux_width():
    """diffusers' converter assumes Flux's 3072-wide blocks: random one-column tensors of those heights, one double
    and one single block, renamed both ways."""
    from diffusers.loaders.single_file_utils import convert_flux_transformer_checkpoint_to_diffusers

    width, generator = 3072, torch.Generator().manual_seed(0)
    rows = {"double_blocks.0.img_attn.qkv": 3 * width, "double_blocks.0.txt_attn.qkv": 3 * width,
            "single_blocks.0.linear1": 7 * width, "final_layer.adaLN_modulation.1": 2 * width}
    names = [f"double_blocks.0.{part}" for part in ("img_mod.lin", "txt_mod.lin", "img_attn.proj", "txt_attn.proj",
                                                     "img_mlp.0", "img_mlp.2", "txt_mlp.0", "txt_mlp.2")]
    names += ["single_blocks.0.modulation.lin", "single_blocks.0.linear2", "time_in.in_layer", "time_in.out_layer",
              "vector_in.in_layer", "vector_in.out_layer", "guidance_in.in_layer", "guidance_in.out_layer", "txt_in",
              "img_in", "final_layer.linear"]
    state = {}
    for name in [*rows, *names]:
        for kind in ("weight", "bias"):
            state[f"{name}.{kind}"] = torch.randn(rows.get(name, 5), 1, generator=generator).squeeze(-1) \
                if kind == "bias" else torch.randn(rows.get(name, 5), 1, generator=generator)
    for norm in ("img_attn.norm.query_norm", "img_attn.norm.key_norm", "txt_attn.norm.query_norm",
                 "txt_attn.norm.key_norm"):
        state[f"double_blocks.0.{norm}.scale"] = torch.randn(4, generator=generator)
    for norm in ("norm.query_norm", "norm.key_norm"):
        state[f"single_blocks.0.{norm}.scale"] = torch.randn(4, generator=generator)
    expected = convert_flux_transformer_checkpoint_to_diffusers(dict(state))
    ours = flux_state(state, width)
    assert ours.keys() == expected.keys()
    assert all(torch.equal(ours[key], expected[key]) for key in expected)


# ------------------------------------------------------------------------------------------------ protection


@pytest.mark.parametrize("name", ["sd3-incl", "dev"])
@pytest.mark.parametrize("method", ["mist", "advdm", "sds"])
def test_denoiser_methods_protect_single_files_through_the_cli(capsys, saved, noise_painting_file, tmp_path, name,
                                                              method):
    image_file = noise_painting_file
    files = saved[name][0]
    named = ["--text-encoders", ",".join(str(f) for f in files.text_encoders)] if files.text_encoders else []
    out = tmp_path / "out"
    code, _, err = run_cli(capsys, "protect", image_file, "-o", out, "--model", files.model, *named, "--method",
                           method, "--steps", "2", "--input-size", "32", "--precision", "fp32")
    assert code == 0, err
    assert "Loading weights" not in err  # transformers' progress bars stay off while a flow model loads
    protected = np.asarray(Image.open(out / image_file.name).convert("RGB"), dtype=int)
    original = np.asarray(Image.open(image_file).convert("RGB"), dtype=int)
    assert protected.shape == original.shape and 0 < np.abs(protected - original).max() <= 16


def test_the_denoiser_loss_moves_under_pgd_on_a_single_file(saved):
    """Three PGD steps on the advdm loss against the SD 3 file: a finite objective that changes from step to step."""
    from mist.engine.config import ProtectConfig
    from mist.engine.pipeline import Protector

    model = _from_files(saved["sd3-incl"][0])
    image = Image.fromarray(np.random.default_rng(1).integers(0, 256, (32, 32, 3), dtype=np.uint8))
    losses = []
    protector = Protector(model, ProtectConfig.of(method="advdm", steps=3, input_size=32, precision="fp32"),
                          torch.device("cpu"))
    protector.protect(image, callback=lambda info: losses.append(info.objective))
    assert len(losses) == 3 and np.isfinite(losses).all() and len(set(losses)) > 1


@pytest.mark.parametrize("source", ["files", "folder"])
def test_the_transformer_is_read_in_the_runs_type(saved, source):
    files, folder, _ = saved["dev"]
    model = _from_files(files, dtype=torch.bfloat16) if source == "files" else load_model(str(folder),
                                                                                         dtype=torch.bfloat16)
    assert {p.dtype for p in model.unet.parameters()} == {torch.bfloat16} and model.dtype == torch.bfloat16
    assert next(model.encoder.parameters()).dtype == torch.float32


def test_an_fp8_t5_file_is_widened_and_a_bf16_one_read(saved, tmp_path):
    files, _, parts = saved["dev"]
    reference = _from_files(files).conditioning("a painting").states
    for dtype in (torch.bfloat16, torch.float8_e4m3fn):
        t5 = tmp_path / f"t5xxl_{str(dtype).split('.')[1]}.safetensors"
        save_file({k: v.to(dtype).contiguous() for k, v in parts.t5.state_dict().items()
                   if k != "encoder.embed_tokens.weight"}, str(t5))
        clip = [f for f in files.text_encoders if "clip" in f.name]
        states = load_model(str(files.model), text_encoders=(*map(str, clip), str(t5))).conditioning("a painting")
        assert torch.isfinite(states.states).all()
        torch.testing.assert_close(states.states, reference, rtol=0.2, atol=0.2)


# ------------------------------------------------------------------------------------------------ refusals


def _one_line(caught) -> str:
    message = str(caught.value)
    assert "\n" not in message
    return message


def test_flux_without_its_t5_file_is_refused_naming_what_to_give(saved):
    files = saved["dev"][0]
    clip = [str(f) for f in files.text_encoders if "clip" in f.name]
    with pytest.raises(ValueError) as caught:
        load_model(str(files.model), text_encoders=tuple(clip))
    message = _one_line(caught)
    assert message.startswith(f"{files.model}: ") and "T5-XXL" in message and "--text-encoders" in message


def test_sd3_without_t5_runs_on_zeros_in_its_place(saved):
    files = saved["sd3"][0]
    clips = tuple(str(f) for f in files.text_encoders if "clip" in f.name)
    states = load_model(str(files.model), text_encoders=clips).conditioning("a painting").states
    assert states.shape[1] == 77 + 256 and not states[:, 77:].any() and states[:, :77].any()


def test_a_file_that_is_no_text_encoder_is_refused_naming_it(saved):
    files = saved["dev"][0]
    ae = files.model.with_name("ae.safetensors")
    with pytest.raises(ValueError, match="not a text encoder Mist knows") as caught:
        load_model(str(files.model), text_encoders=(*map(str, files.text_encoders), str(ae)))
    assert _one_line(caught).startswith(f"{ae}: ")


def test_a_scaled_fp8_t5_file_is_refused(saved, tmp_path):
    files, _, parts = saved["dev"]
    t5 = tmp_path / "t5xxl_fp8_e4m3fn_scaled.safetensors"
    weights = {k: v.contiguous() for k, v in parts.t5.state_dict().items() if k != "encoder.embed_tokens.weight"}
    save_file({**weights, "scaled_fp8": torch.zeros(0)}, str(t5))
    clip = [str(f) for f in files.text_encoders if "clip" in f.name]
    with pytest.raises(ValueError, match="scaled float8") as caught:
        load_model(str(files.model), text_encoders=(*clip, str(t5)))
    assert _one_line(caught).startswith(f"{t5}: ")


def test_text_encoder_files_for_a_folder_are_refused(saved):
    files, folder, _ = saved["dev"]
    with pytest.raises(ValueError, match="^text_encoders: .*diffusers folder"):
        load_model(str(folder), text_encoders=tuple(map(str, files.text_encoders)))


def test_too_little_memory_is_refused_naming_each_part_before_any_weight_is_read(saved, monkeypatch):
    import mist.models.flow_files as flow_files
    import mist.models.footprint as footprint

    def no_reading(*args, **kwargs):
        raise AssertionError("a weight was read")

    monkeypatch.setattr(footprint, "available_ram_bytes", lambda: 1000)
    monkeypatch.setattr(flow_files, "read", no_reading)
    files = saved["dev"][0]
    with pytest.raises(ValueError) as caught:
        _from_files(files)
    message = _one_line(caught)
    assert message.startswith(f"{files.model}: this Flux.1 model needs about ")
    assert all(part in message for part in ("T5-XXL t5xxl.safetensors", "CLIP-L clip_l.safetensors", "transformer",
                                            "VAE"))


def test_flux_dev_files_at_full_size_are_refused_on_a_20_gb_machine_from_their_headers(tmp_path, monkeypatch):
    """Flux dev's published shapes (19 + 38 blocks, 24 heads of 128, guidance) in a flux1-dev.safetensors and T5-XXL
    and CLIP-L files whose data are holes: the shapes are told from the weights' names and sizes, and a bf16 run is
    refused for its 23.8 GB transformer before any weight is read (the check counts weights only)."""
    import mist.models.flow_files as flow_files
    import mist.models.footprint as footprint
    from diffusers import FluxTransformer2DModel
    from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

    from support.families import tiny_vae
    from support.flow_files import flux_original, sparse_safetensors
    from support.original_layout import vae_to_original_layout

    with torch.device("meta"):
        transformer = FluxTransformer2DModel(guidance_embeds=True).to(torch.bfloat16)
        t5 = T5EncoderModel(T5Config(d_model=4096, d_ff=10240, d_kv=64, num_heads=64, num_layers=24,
                                     vocab_size=32128, feed_forward_proj="gated-gelu")).to(torch.bfloat16)
        clip = CLIPTextModel(CLIPTextConfig(hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                                            num_attention_heads=12))
    model = sparse_safetensors(tmp_path / "flux1-dev.safetensors", flux_original(transformer))
    t5_file = sparse_safetensors(tmp_path / "t5xxl_fp16.safetensors", {k: v for k, v in t5.state_dict().items()
                                                                      if k != "encoder.embed_tokens.weight"})
    clip_file = sparse_safetensors(tmp_path / "clip_l.safetensors",
                                   {"text_model." + k: v for k, v in clip.state_dict().items()})
    save_file(vae_to_original_layout(tiny_vae("flux"), ""), str(tmp_path / "ae.safetensors"))
    config = flow_files.flux_config(flow_files.header(model))
    assert config["axes_dims_rope"] == (16, 56, 56) and config["num_attention_heads"] == 24
    assert (config["num_layers"], config["num_single_layers"]) == (19, 38) and config["guidance_embeds"]
    monkeypatch.setattr(footprint, "available_ram_bytes", lambda: 20 * 10**9)
    monkeypatch.setattr(flow_files, "read", lambda *args, **kwargs: pytest.fail("a weight was read"))
    with pytest.raises(ValueError, match=r"needs about 23\.\d GB .*T5-XXL t5xxl_fp16\.safetensors 9\.5 GB.*"
                                         r"transformer 23\.8 GB") as caught:
        load_model(str(model), text_encoders=(str(clip_file), str(t5_file)), dtype=torch.bfloat16)
    assert _one_line(caught).startswith(f"{model}: this Flux.1 model")


def test_the_faces_refuse_a_denoiser_on_a_flux_file_whose_text_encoders_are_missing_before_loading(saved,
                                                                                                   monkeypatch):
    """The web UI and the service cannot name text encoder files: a Flux transformer file served alone offers only
    the encoder-side methods, and its refusal names the file (never its path) and what it lacks, from the headers
    alone; with its text encoder files named (the command line) nothing is refused."""
    import mist.models
    from mist.engine.config import ProtectConfig
    from mist.runner.jobs import ModelCache
    from mist.runner.offers import model_offer

    monkeypatch.setattr(mist.models, "load_model", lambda *args, **kwargs: pytest.fail("the model was loaded"))
    files = saved["dev"][0]
    served = ModelCache(str(files.model))
    refused = served.refusal(ProtectConfig.of(method="advdm"))
    assert refused.startswith(f"{files.model.name}: ") and "T5-XXL" in refused
    assert str(files.model.parent) not in refused
    offer = model_offer(served)
    assert "advdm" not in offer.methods and "photoguard" in offer.methods and offer.choices["mode"] == ("textural",)
    named = ProtectConfig.of(method="advdm", text_encoders=tuple(str(f) for f in files.text_encoders))
    assert served.refusal(named) is None
    assert ModelCache(str(saved["sd3-incl"][0].model)).refusal(ProtectConfig.of(method="advdm")) is None


def test_evaluate_mimics_with_a_flux_file_and_the_text_encoders_it_names(capsys, saved, noise_painting_file,
                                                                         tmp_path):
    """`mist evaluate --model flux1-dev.safetensors --text-encoders ...` mimics through img2img as a folder would;
    without the text encoder files it stops naming what the transformer lacks."""
    import json

    files = saved["dev"][0]
    named = ",".join(str(f) for f in files.text_encoders)
    originals, protected = tmp_path / "originals", tmp_path / "protected"
    originals.mkdir()
    (originals / noise_painting_file.name).write_bytes(noise_painting_file.read_bytes())
    code, _, err = run_cli(capsys, "protect", originals, "-o", protected, "--model", files.model, "--text-encoders",
                           named, "--method", "photoguard", "--steps", "2", "--input-size", "32")
    assert code == 0, err
    evaluate = ["evaluate", originals, protected, "--model", files.model, "--purify", "", "--strengths", "0.5",
                "--steps", "2", "-q"]
    code, _, err = run_cli(capsys, *evaluate, "-o", tmp_path / "bare")
    assert code != 0 and "T5-XXL" in err and "--text-encoders" in err, err
    code, _, err = run_cli(capsys, *evaluate, "-o", tmp_path / "report", "--text-encoders", named)
    assert code == 0, err
    record = json.loads((tmp_path / "report" / "results.json").read_text())
    assert record["model"] == files.model.name and [h["mimicry"] for h in record["headline"]] == ["img2img:0.5"]


def test_a_folder_given_as_a_text_encoder_file_is_refused_as_one(capsys, saved, noise_painting_file, tmp_path):
    files = saved["dev"][0]
    code, _, err = run_cli(capsys, "protect", noise_painting_file, "-o", tmp_path / "out", "--model", files.model,
                           "--text-encoders", files.model.parent, "--method", "advdm", "--steps", "1")
    assert code != 0 and f"{files.model.parent}: a folder, not a file" in err, err
