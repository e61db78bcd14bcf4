"""The denoiser-side methods on SD 3.x and Flux (rectified flow): tiny random models of each design saved as diffusers
folders and loaded back through a user's path; the training-time draw of s (logit-normal, shifted as each scheduler
says), the velocity target and its score-distillation gradient against direct computations; each family's
conditioning; Flux's packed patches against diffusers' own packing; protection through the command line; the memory
refusal and what single files still refuse."""

from __future__ import annotations

import json
import math
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import FluxPipeline
from PIL import Image

from mist.engine import objectives
from mist.models import load_model
from mist.models.tokenizer import tokenize
from mist.runner.evaluation.img2img import img2img
from support.cli import run_cli
from support.denoisers import score_distillation_run
from support.flows import save_folder, t5_tokenizer, tiny_parts


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """name -> (folder, parts): SD 3 (with and without T5), Flux dev and Flux schnell."""
    root = tmp_path_factory.mktemp("flows")
    kinds = {"sd3": ("sd3", None, {}), "sd3-no-t5": ("sd3", None, {"t5": False}), "flux": ("flux", None, {}),
             "schnell": ("flux", "schnell", {"guidance": False})}
    out = {}
    for seed, (name, (family, scheduler, options)) in enumerate(kinds.items()):
        parts = tiny_parts(family, seed, **options)
        out[name] = (save_folder(root / name, parts, scheduler), parts)
    return out


def _load(saved, name: str):
    return load_model(str(saved[name][0]))


def _generators(seed: int = 5) -> list[torch.Generator]:
    return [torch.Generator().manual_seed(seed)]


def _latent(seed: int = 3) -> torch.Tensor:
    return torch.randn(1, 16, 4, 4, generator=torch.Generator().manual_seed(seed))


# ------------------------------------------------------------------------------------------------ flow matching


@pytest.mark.parametrize("name,factor", [("sd3", 3.0), ("schnell", 1.0),
                                         ("flux", math.exp(0.5 + 0.65 / 3840 * (4 - 256)))])
def test_the_noised_latent_is_on_the_straight_path_at_a_shifted_logit_normal_time(saved, name, factor):
    """u = sigmoid(x), x ~ N(0, 1), then n, from the image's generator; s = k u / (1 + (k - 1) u) with SD 3's shift
    3, schnell's 1, Flux dev's exp(mu) for 4 image tokens; z_s = (1 - s) z + s n; time 1000 s; target n - z."""
    model = _load(saved, name)
    latent = _latent()
    noised = model.noised(latent, _generators())
    generator = _generators()[0]
    u = torch.sigmoid(torch.randn((1,), generator=generator))
    n = torch.randn((1, 16, 4, 4), generator=generator)
    s = factor * u / (1 + (factor - 1) * u)
    assert torch.equal(noised.noise, n)
    torch.testing.assert_close(noised.timesteps, 1000 * s)
    torch.testing.assert_close(noised.latent, (1 - s) * latent + s * n)
    torch.testing.assert_close(model.target(noised), n - latent)
    torch.testing.assert_close(model.as_noise(n - latent, noised), n)  # the exact velocity implies n
    with torch.no_grad():
        prediction = model.denoise(noised.latent, noised.timesteps, model.conditioning("a painting"))
        loss = objectives.denoising_loss(model, latent, model.conditioning("a painting"), _generators(), "fp32")
    torch.testing.assert_close(loss, (prediction - (n - latent)).pow(2).mean().view(1))


@pytest.mark.parametrize("name", ["sd3", "flux"])
def test_score_distillation_steps_along_the_velocity_residual(saved, name):
    """Value: the velocity loss; latent gradient (2 / N) (1 - s) (eps_hat - n) = (2 / N) (1 - s)^2 (u_hat - u)."""
    model = _load(saved, name)
    value, gradient, noised, velocity = score_distillation_run(model, _latent(), model.conditioning("a painting"),
                                                               _generators)
    residual = velocity - model.target(noised)
    torch.testing.assert_close(value, residual.pow(2).mean().view(1))
    expected = 2 / residual.numel() * (1 - noised.sigma) ** 2 * residual
    torch.testing.assert_close(gradient, expected, rtol=1e-4, atol=1e-8)


# ------------------------------------------------------------------------------------------------ conditioning


def _t5(parts, length: int, prompt: str = "a painting") -> torch.Tensor:
    ids = t5_tokenizer()(prompt, padding="max_length", max_length=length, truncation=True, return_tensors="pt")
    assert ids.input_ids[0, :3].tolist() == [3, 4, 1] and not ids.input_ids[0, 3:].any()
    with torch.no_grad():
        return parts.t5(ids.input_ids).last_hidden_state


def test_sd3_conditioning_joins_both_clip_towers_and_t5(saved):
    model, parts = _load(saved, "sd3"), saved["sd3"][1]
    clip_l, clip_g = parts.clips
    with torch.no_grad():
        first = clip_l(tokenize("a painting"), output_hidden_states=True)
        second = clip_g(tokenize("a painting", pad=0), output_hidden_states=True)  # tokenizer_2 pads with "!"
    clip = torch.cat([first.hidden_states[-2], second.hidden_states[-2]], -1)
    clip = torch.cat([clip, torch.zeros(1, 77, 64 - clip.shape[-1])], -1)
    conditioning = model.conditioning("a painting")
    torch.testing.assert_close(conditioning.states, torch.cat([clip, _t5(parts, 256)], 1), rtol=0, atol=1e-6)
    torch.testing.assert_close(conditioning.pooled, torch.cat([first.text_embeds, second.text_embeds], -1))
    without = _load(saved, "sd3-no-t5").conditioning("a painting")
    assert without.states.shape == (1, 77 + 256, 64) and not without.states[:, 77:].any()


@pytest.mark.parametrize("name,length", [("flux", 512), ("schnell", 256)])
def test_flux_conditioning_is_t5_states_and_clip_pooled_output(saved, name, length):
    model, parts = _load(saved, name), saved[name][1]
    with torch.no_grad():
        pooled = parts.clips[0](tokenize("a painting")).pooler_output
    conditioning = model.conditioning("a painting")
    torch.testing.assert_close(conditioning.states, _t5(parts, length), rtol=0, atol=1e-6)
    torch.testing.assert_close(conditioning.pooled, pooled)


# ------------------------------------------------------------------------------------------------ denoisers


def test_sd3_denoise_is_the_transformer_on_the_latent(saved):
    model, parts = _load(saved, "sd3"), saved["sd3"][1]
    latent, t, text = _latent(), torch.tensor([700.0]), model.conditioning("a photo")
    with torch.no_grad():
        expected = parts.transformer(hidden_states=latent, encoder_hidden_states=text.states,
                                     pooled_projections=text.pooled, timestep=t).sample
        torch.testing.assert_close(model.denoise(latent, t, text), expected)


@pytest.mark.parametrize("name,guidance", [("flux", 3.5), ("schnell", None)])
def test_flux_denoise_packs_the_latent_as_diffusers_does(saved, name, guidance):
    """Patches packed and unpacked, and image ids made, by FluxPipeline's own helpers; the time divided by 1000;
    dev's guidance 3.5, none for schnell."""
    model, parts = _load(saved, name), saved[name][1]
    latent, t = torch.randn(2, 16, 4, 6, generator=torch.Generator().manual_seed(1)), torch.tensor([700.0, 80.0])
    text = model.conditioning("a photo").batched(2)
    packed = FluxPipeline._pack_latents(latent, 2, 16, 4, 6)
    ids = FluxPipeline._prepare_latent_image_ids(2, 2, 3, latent.device, latent.dtype)
    extra = {"guidance": torch.full((2,), guidance)} if guidance else {}
    with torch.no_grad():
        out = parts.transformer(hidden_states=packed, encoder_hidden_states=text.states, pooled_projections=text.pooled,
                                timestep=t / 1000, img_ids=ids, txt_ids=torch.zeros(text.states.shape[1], 3),
                                **extra).sample
        expected = FluxPipeline._unpack_latents(out, 32, 48, 8)
        torch.testing.assert_close(model.denoise(latent, t, text), expected)
    with pytest.raises(ValueError, match="multiples of 16 pixels"):
        model.denoise(torch.zeros(1, 16, 3, 4), t[:1], model.conditioning("a photo"))


# ------------------------------------------------------------------------------------------------ protection


@pytest.fixture(scope="module")
def image_file(noise_painting_file) -> Path:
    return noise_painting_file


@pytest.mark.parametrize("name", ["sd3", "flux"])
@pytest.mark.parametrize("method", ["mist", "advdm", "sds"])
def test_denoiser_methods_protect_through_the_cli(capsys, saved, image_file, tmp_path, name, method):
    out = tmp_path / "out"
    code, _, err = run_cli(capsys, "protect", image_file, "-o", out, "--model", saved[name][0], "--method", method,
                           "--steps", "2", "--input-size", "32", "--precision", "fp32")
    assert code == 0, err
    assert "Loading weights" not in err  # transformers' progress bars stay off while a flow folder loads
    protected = np.asarray(Image.open(out / image_file.name).convert("RGB"), dtype=int)
    original = np.asarray(Image.open(image_file).convert("RGB"), dtype=int)
    assert protected.shape == original.shape and 0 < np.abs(protected - original).max() <= 16


# ------------------------------------------------------------------------------------------------ refusals


def test_a_model_too_large_for_the_memory_is_refused_naming_each_part(saved, monkeypatch):
    import mist.models.footprint as footprint

    monkeypatch.setattr(footprint, "available_ram_bytes", lambda: 1000)
    with pytest.raises(ValueError) as caught:
        _load(saved, "flux")
    message = str(caught.value)
    assert message.startswith(f"{saved['flux'][0]}: this Flux.1 model needs about ") and "\n" not in message
    assert all(part in message for part in ("transformer 0.0", "T5 text_encoder_2", "CLIP text_encoder", "VAE"))


@pytest.mark.parametrize("name,strength,guidance", [("sd3", 0.35, 5.0), ("sd3", 1.0, 1.0), ("flux", 0.35, 3.5),
                                                    ("schnell", 0.6, 1.0)])
def test_img2img_matches_the_diffusers_flow_pipelines(saved, name, strength, guidance):
    """Mist's img2img against StableDiffusion3Img2ImgPipeline / FluxImg2ImgPipeline on the same weights, prompt
    embeddings and seed (posterior sample, then noise); SD 3 with and without classifier-free guidance, Flux dev with
    its guidance input 3.5 (Mist's `guidance` does not apply to Flux), schnell without."""
    from diffusers import FluxImg2ImgPipeline, StableDiffusion3Img2ImgPipeline
    from mist.runner.evaluation.img2img import flow_scheduler

    folder, parts = saved[name]
    model = load_model(str(folder), parts=frozenset({"encoder", "unet", "text_encoder", "decoder"}))
    image = torch.rand(1, 3, 64, 48, generator=torch.Generator().manual_seed(3)) * 2 - 1
    ours = img2img(model, image, strength, [torch.Generator().manual_seed(7)], steps=6,
                   guidance=guidance if name == "sd3" else 9.0)
    text, empty = model.conditioning("a painting"), model.conditioning("")
    scheduler = flow_scheduler(model, 12, 6)  # a fresh one, with the model's config: the pipeline sets its steps
    embeds = dict(prompt_embeds=text.states, pooled_prompt_embeds=text.pooled)
    if name == "sd3":
        pipe = StableDiffusion3Img2ImgPipeline(transformer=parts.transformer, scheduler=scheduler, vae=parts.vae,
                                               text_encoder=None, tokenizer=None, text_encoder_2=None,
                                               tokenizer_2=None, text_encoder_3=None, tokenizer_3=None)
        if guidance > 1:
            embeds.update(negative_prompt_embeds=empty.states, negative_pooled_prompt_embeds=empty.pooled)
    else:
        pipe = FluxImg2ImgPipeline(transformer=parts.transformer, scheduler=scheduler, vae=parts.vae,
                                   text_encoder=None, tokenizer=None, text_encoder_2=None, tokenizer_2=None)
    theirs = pipe(**embeds, image=(image + 1) / 2, height=64, width=48, strength=strength, num_inference_steps=6,
                  guidance_scale=guidance,
                  generator=torch.Generator().manual_seed(7), output_type="pt").images
    assert ours.images.shape == (1, 3, 64, 48) and ours.latents.shape == (1, 16, 8, 6)
    torch.testing.assert_close((ours.images + 1) / 2, theirs, atol=1e-5, rtol=1e-4)
    assert not torch.allclose(ours.images, image, atol=1e-2)


@pytest.mark.parametrize("name,guidance", [("sd3", 5.0), ("flux", 3.5), ("schnell", 1.0)])
def test_text_to_image_sampling_matches_the_diffusers_flow_pipelines(saved, name, guidance):
    """What LoRA mimicry samples with: Mist's txt2img against StableDiffusion3Pipeline / FluxPipeline."""
    from diffusers import FluxPipeline, StableDiffusion3Pipeline
    from mist.runner.evaluation.img2img import flow_scheduler, txt2img

    folder, parts = saved[name]
    model = load_model(str(folder), parts=frozenset({"encoder", "unet", "text_encoder", "decoder"}))
    ours = txt2img(model, (64, 48), [torch.Generator().manual_seed(7)], steps=4, guidance=guidance)
    text, empty = model.conditioning("a painting"), model.conditioning("")
    embeds = dict(prompt_embeds=text.states, pooled_prompt_embeds=text.pooled)
    towers = dict(text_encoder=None, tokenizer=None, text_encoder_2=None, tokenizer_2=None)
    if name == "sd3":
        pipe = StableDiffusion3Pipeline(transformer=parts.transformer, scheduler=flow_scheduler(model, 12, 4),
                                        vae=parts.vae, text_encoder_3=None, tokenizer_3=None, **towers)
        embeds.update(negative_prompt_embeds=empty.states, negative_pooled_prompt_embeds=empty.pooled)
    else:
        pipe = FluxPipeline(transformer=parts.transformer, scheduler=flow_scheduler(model, 12, 4), vae=parts.vae,
                            **towers)
    theirs = pipe(**embeds, height=64, width=48, num_inference_steps=4, guidance_scale=guidance,
                  generator=torch.Generator().manual_seed(7), output_type="pt").images
    torch.testing.assert_close((ours.images + 1) / 2, theirs, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("name", ["sd3", "flux"])
def test_evaluate_mimics_with_a_flow_model(capsys, saved, image_file, tmp_path, name):
    """`mist evaluate --model` with an SD 3.x or Flux folder: what was protected against that model, mimicked by it
    through img2img and LoRA fine-tuning (the transformer's attention adapted, then text-to-image sampling)."""
    originals, protected = tmp_path / "originals", tmp_path / "protected"
    originals.mkdir()
    (originals / image_file.name).write_bytes(image_file.read_bytes())
    code, _, err = run_cli(capsys, "protect", originals, "-o", protected, "--model", saved[name][0], "--steps", "2",
                           "--input-size", "32", "--precision", "fp32")
    assert code == 0, err
    report = tmp_path / "report"
    code, _, err = run_cli(capsys, "evaluate", originals, protected, "-o", report, "--model", saved[name][0],
                           "--purify", "", "--strengths", "0.5", "--steps", "2", "--lora", "--lora-steps", "1", "-q")
    assert code == 0, err
    record = json.loads((report / "results.json").read_text())
    assert record["model"] == saved[name][0].name
    assert [h["mimicry"] for h in record["headline"]] == ["img2img:0.5", "lora"]


def test_flux_dev_at_full_size_is_refused_on_a_24_gb_machine_before_any_weight_is_read(tmp_path, monkeypatch):
    """Configs alone, with Flux dev's published sizes (a 19 + 38 block transformer, 24 heads of 128; T5-XXL in
    bf16; CLIP-L), and a VAE weights file whose data is a hole: the transformer alone needs 47.6 GB in float32."""
    from diffusers import AutoencoderKL

    import mist.models.footprint as footprint
    from mist.models.architectures import FAMILIES
    from support.flow_files import sparse_safetensors

    def write(part: str, config: dict) -> None:
        (tmp_path / part).mkdir(parents=True, exist_ok=True)
        (tmp_path / part / "config.json").write_text(json.dumps(config))

    write("transformer", dict(_class_name="FluxTransformer2DModel", guidance_embeds=True, num_layers=19,
                              num_single_layers=38, attention_head_dim=128, num_attention_heads=24))
    write("vae", FAMILIES["flux"].vae_config())
    with torch.device("meta"):
        vae = AutoencoderKL(**{k: v for k, v in FAMILIES["flux"].vae_config().items() if not k.startswith("_")})
    sparse_safetensors(tmp_path / "vae" / "diffusion_pytorch_model.safetensors", vae.state_dict())
    write("text_encoder", dict(model_type="clip_text_model", hidden_size=768, intermediate_size=3072,
                               num_hidden_layers=12, num_attention_heads=12, max_position_embeddings=77))
    write("text_encoder_2", dict(model_type="t5", d_model=4096, d_ff=10240, d_kv=64, num_heads=64, num_layers=24,
                                 vocab_size=32128, feed_forward_proj="gated-gelu", dtype="bfloat16"))
    (tmp_path / "model_index.json").write_text(json.dumps({"_class_name": "FluxPipeline"}))
    monkeypatch.setattr(footprint, "available_ram_bytes", lambda: 24 * 10**9)
    with pytest.raises(ValueError, match=r"needs about 47\.\d GB .*T5 text_encoder_2 9\.5 GB, transformer 47\.6 GB"):
        load_model(str(tmp_path))


def test_a_folder_part_without_weights_is_refused_in_one_line_naming_it(saved, tmp_path):
    folder = tmp_path / "copy"
    shutil.copytree(saved["sd3"][0], folder)
    for weights in (folder / "text_encoder_2").glob("model*"):
        weights.unlink()
    with pytest.raises(ValueError, match=rf"^{re.escape(str(folder / 'text_encoder_2'))}: cannot read[^\n]*$"):
        load_model(str(folder))


@pytest.mark.parametrize("method,params", [("mist2", {}), ("aspl", {"round_steps": 2, "surrogate_steps": 1}),
                                           ("mist2-lora", {"round_steps": 2, "surrogate_steps": 1})])
def test_the_surrogate_methods_run_on_sd3(saved, method, params):
    from mist.engine.config import ProtectConfig
    from mist.engine.pipeline import Protector

    picture = Image.fromarray(np.random.default_rng(4).integers(0, 256, (32, 32, 3), dtype=np.uint8))
    config = ProtectConfig.of(method=method, steps=2, input_size=32, precision="fp32", **params)
    result = Protector(load_model(str(saved["sd3"][0]), parts=config.parts), config).protect(picture)
    change = np.abs(np.asarray(result.image, dtype=int) - np.asarray(picture, dtype=int))
    assert 0 < change.max() <= 16


@pytest.mark.parametrize(("name", "beyond_image_attention"), [
    ("sd3", {"add_q_proj", "add_k_proj", "add_v_proj", "to_add_out"}),
    ("flux", {"add_q_proj", "add_k_proj", "add_v_proj", "to_add_out", "ff.net.0.proj", "ff.net.2",
              "ff_context.net.0.proj", "ff_context.net.2"})])
def test_lora_adapts_what_diffusers_scripts_adapt_in_each_flow_family(saved, name, beyond_image_attention):
    """LoRA mimicry (and the LoRA surrogates) on SD 3.x adapt the joint attention's text stream as well as its image
    stream, and on Flux both streams' feed-forward layers too, as diffusers' DreamBooth LoRA scripts do by default;
    every target names modules that exist (peft matches by suffix)."""
    from mist.engine.finetune import FinetuneOptions, Surrogate, lora_targets

    surrogate = Surrogate(_load(saved, name), FinetuneOptions(rank=2))
    adapted = {module for module, layer in surrogate.unet.named_modules() if hasattr(layer, "lora_A")}
    matched = {target for target in lora_targets(name) if any(module.endswith("." + target) for module in adapted)}
    assert matched == set(lora_targets(name)) >= beyond_image_attention | {"to_q", "to_k", "to_v", "to_out.0"}


def test_an_image_larger_than_sd3s_position_table_is_refused_in_one_clear_line(saved):
    """The tiny SD 3's table covers 16 patches a side (256 pixels): a 512-pixel latent is refused naming the limit,
    where diffusers' own message spoke of `pos_embed_max_size`."""
    model = _load(saved, "sd3")
    latent = torch.zeros(1, 16, 64, 64)
    with pytest.raises(ValueError, match=r"^image size: .* at most 16 patches a side, .* at most 256 pixels"):
        model.denoise(latent, torch.tensor([500.0]), model.conditioning("a painting"))
