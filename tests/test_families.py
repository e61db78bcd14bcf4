"""Model families beyond SD 1.x (SD 2.x, SDXL, SD 3.x, Flux): their VAEs loaded offline from diffusers folders and
single files in each family's original layout, the encoder-side methods run on them through the command line, their
latents scaled and shifted as each family's pipelines do, and the one-line refusals of what Mist does not support."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import AutoencoderKL
from PIL import Image
from safetensors.torch import save_file

from mist.engine.config import ProtectConfig
from mist.engine.pipeline import Protector
from mist.models import load_model
from mist.models.architectures import FAMILIES, SD_V1, encoder_only
from mist.models.components import StableDiffusion, latent_decoder, latent_encoder
from support.cli import run_cli
from support.families import PIPELINES, PUBLISHED, marker, save_folder, save_single_file, tiny_vae
from support.original_layout import vae_to_original_layout

NEW_FAMILIES = tuple(PIPELINES)
ENCODER_SIDE = {"photoguard": [], "pid": [], "mist-textural": ["--mode", "textural"]}


@pytest.fixture(scope="module")
def saved(tmp_path_factory) -> dict[tuple[str, str], tuple[Path, AutoencoderKL]]:
    """Each new family's tiny VAE saved as a diffusers folder and as a single file: (family, layout) -> (path, vae)."""
    root = tmp_path_factory.mktemp("families")
    out = {}
    for number, family in enumerate(NEW_FAMILIES):
        vae = tiny_vae(family, seed=number)
        out[family, "folder"] = (save_folder(root / f"{family}-diffusers", family, vae), vae)
        name = "ae.safetensors" if family == "flux" else f"{family}.safetensors"
        out[family, "file"] = (save_single_file(root / name, family, vae), vae)
    return out


@pytest.fixture(scope="module")
def image_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("image") / "painting.png"
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(path)
    return path


def _pixels(seed: int = 1, size: int = 32) -> torch.Tensor:
    return torch.rand((1, 3, size, size), generator=torch.Generator().manual_seed(seed)) * 2 - 1


# ------------------------------------------------------------------------------------------------------- families


@pytest.mark.parametrize("family", PUBLISHED)
def test_each_family_has_its_published_latent_space(family):
    config = FAMILIES[family].vae_config()
    channels, scale, shift, quant = PUBLISHED[family]
    assert config["latent_channels"] == channels and config["scaling_factor"] == scale
    assert (config.get("shift_factor") or 0.0) == shift
    assert config.get("use_quant_conv", True) is quant and config.get("use_post_quant_conv", True) is quant
    arch = encoder_only(FAMILIES[family], config, family)
    assert (arch.latent_scale, arch.latent_shift, arch.family) == (scale, shift, family)


@pytest.mark.parametrize("family", NEW_FAMILIES)
@pytest.mark.parametrize("layout", ["folder", "file"])
def test_each_family_loads_its_vae_with_the_same_numbers(saved, family, layout):
    path, vae = saved[family, layout]
    model = load_model(str(path), parts=frozenset({"encoder", "decoder"}))
    channels, scale, shift, _ = PUBLISHED[family]
    assert model.arch.family == family and model.parts == {"encoder", "decoder"} and model.unet is None
    assert (model.arch.latent_scale, model.arch.latent_shift) == (scale, shift)
    x = _pixels()
    with torch.no_grad():
        mean, logvar = model.posterior(x)
        expected = vae.encode(x).latent_dist
        assert mean.shape == (1, channels, 4, 4)
        torch.testing.assert_close(mean, expected.mean, rtol=0, atol=1e-6)
        torch.testing.assert_close(logvar, expected.logvar, rtol=0, atol=1e-6)
        # the diffusers pipelines' own scaling: (mean - shift) * scale in, latent / scale + shift out
        latent = model.scale_latent(mean)
        torch.testing.assert_close(latent, (expected.mean - shift) * scale)
        torch.testing.assert_close(model.decode(latent), vae.decode(latent / scale + shift).sample, rtol=0, atol=1e-5)


def test_a_flux_ae_file_is_read_with_bare_keys_and_no_quant_convolutions(saved):
    from safetensors import safe_open

    path, _ = saved["flux", "file"]
    with safe_open(str(path), framework="pt") as handle:
        keys = list(handle.keys())
    assert all(k.startswith(("encoder.", "decoder.")) for k in keys) and not any("quant_conv" in k for k in keys)
    model = load_model(str(path), parts=frozenset({"encoder"}))
    assert isinstance(model.encoder.quant_conv, torch.nn.Identity) and model.arch.vae["latent_channels"] == 16


def test_only_the_vae_encoder_is_read_for_an_encoder_side_method(saved, monkeypatch):
    import safetensors

    read: list[str] = []
    real_open = safetensors.safe_open

    class Spy:
        def __init__(self, *args, **kwargs):
            self.handle = real_open(*args, **kwargs)

        def __enter__(self):
            self.inner = self.handle.__enter__()
            return self

        def __exit__(self, *exc):
            return self.handle.__exit__(*exc)

        def keys(self):
            return self.inner.keys()

        def get_tensor(self, key):
            read.append(key)
            return self.inner.get_tensor(key)

    monkeypatch.setattr(safetensors, "safe_open", Spy)
    path, _ = saved["sdxl", "file"]
    load_model(str(path), parts=frozenset({"encoder"}))
    assert read and all(k.startswith(("first_stage_model.encoder.", "first_stage_model.quant_conv."))
                        or k == "model.diffusion_model.input_blocks.0.0.weight" for k in read)
    assert any(k.startswith("first_stage_model.encoder.") for k in read)


def test_the_latent_is_the_mean_shifted_then_scaled():
    """A known shift and scale: z = (mean - shift) * scale for posterior means and samples, undone before decoding."""
    config = {**SD_V1.vae, "block_out_channels": (32, 32, 32, 32), "layers_per_block": 1, "latent_channels": 16,
              "use_quant_conv": False, "use_post_quant_conv": False, "scaling_factor": 2.0, "shift_factor": 0.5}
    arch = encoder_only(FAMILIES["flux"], config, "shifted")
    torch.manual_seed(0)
    model = StableDiffusion.assemble(arch, latent_encoder(arch), None, None, "shifted", random_weights=True,
                                     decoder=latent_decoder(arch))
    x = _pixels()
    with torch.no_grad():
        mean, logvar = model.posterior(x)
        assert torch.equal(model.scale_latent(mean), (mean - 0.5) * 2.0)
        sample = model.encode(x, [torch.Generator().manual_seed(3)])
        noise = torch.randn(mean.shape, generator=torch.Generator().manual_seed(3))
        torch.testing.assert_close(sample, (mean + torch.exp(0.5 * logvar) * noise - 0.5) * 2.0)
        torch.testing.assert_close(model.decode(sample), model.decoder.decoder(sample / 2.0 + 0.5))


def test_sd1_latents_are_scaled_as_before(tiny_model):
    """SD 1.x has no shift: the latent is the mean times 0.18215, bit for bit."""
    x = _pixels()
    with torch.no_grad():
        mean, _ = tiny_model.posterior(x)
        assert tiny_model.arch.latent_shift == 0.0
        assert torch.equal(tiny_model.scale_latent(mean), mean * 0.18215)


# ------------------------------------------------------------------------------------------ methods on each family


@pytest.mark.parametrize("family", NEW_FAMILIES)
@pytest.mark.parametrize("method", ENCODER_SIDE)
def test_encoder_side_methods_protect_through_the_cli(capsys, saved, image_file, tmp_path, family, method):
    layout = "file" if family in ("sdxl", "flux") else "folder"
    path, _ = saved[family, layout]
    out = tmp_path / "out"
    code, _, err = run_cli(capsys, "protect", image_file, "-o", out, "--model", path,
                           "--method", method.split("-")[0], *ENCODER_SIDE[method], "--steps", "2",
                           "--input-size", "32", "--precision", "fp32")
    assert code == 0, err
    protected = np.asarray(Image.open(out / image_file.name).convert("RGB"), dtype=int)
    original = np.asarray(Image.open(image_file).convert("RGB"), dtype=int)
    assert protected.shape == original.shape and 0 < np.abs(protected - original).max() <= 16


@pytest.mark.parametrize("family", NEW_FAMILIES)
@pytest.mark.parametrize("method", ENCODER_SIDE)
def test_each_method_moves_its_loss_on_each_family(saved, family, method):
    path, _ = saved[family, "folder"]
    params = {"mode": "textural"} if method == "mist-textural" else {}
    config = ProtectConfig.of(method=method.split("-")[0], steps=8, input_size=32, precision="fp32", **params)
    model = load_model(str(path), parts=config.parts)
    picture = Image.fromarray(np.random.default_rng(2).integers(0, 256, (32, 32, 3), dtype=np.uint8))
    result = Protector(model, config).protect(picture)
    assert result.end["objective"] < result.start["objective"]


def test_mist_textural_needs_only_the_vae_encoder():
    assert ProtectConfig.of(method="mist", mode="textural").parts == {"encoder"}
    assert ProtectConfig.of(method="mist").parts == {"encoder", "unet", "text_encoder"}


# ------------------------------------------------------------------------------------------------------- refusals


def test_a_denoiser_side_method_on_a_vae_alone_is_refused_in_one_line_naming_the_family(capsys, saved, image_file,
                                                                                          tmp_path):
    """Flux's ae.safetensors alone (SD 2.x, SDXL, SD 3.x and Flux models run them: see test_denoisers.py,
    test_flows.py and test_flow_files.py)."""
    path, _ = saved["flux", "file"]
    code, _, err = run_cli(capsys, "protect", image_file, "-o", tmp_path / "out", "--model", path, "--method", "mist",
                           "--steps", "2", "--input-size", "32")
    message = [line for line in err.splitlines() if str(path) in line]
    assert code != 0 and len(message) == 1
    assert "Flux.1 VAE (alone)" in message[0] and "photoguard, pid, mist --mode textural" in message[0]


def test_a_denoiser_side_method_on_an_sd3_file_without_its_transformer_is_refused_naming_it(capsys, saved,
                                                                                             image_file, tmp_path):
    path, _ = saved["sd3", "file"]  # a VAE and a few marker weights of the MMDiT
    code, _, err = run_cli(capsys, "protect", image_file, "-o", tmp_path / "out", "--model", path, "--method", "mist",
                           "--steps", "2", "--input-size", "32")
    message = [line for line in err.splitlines() if str(path) in line]
    assert code != 0 and len(message) == 1 and "not a whole SD 3.x transformer" in message[0]


def _sdxl_refiner() -> dict[str, torch.Tensor]:
    return {"conditioner.embedders.0.model.token_embedding.weight": marker(8, 16),
            "model.diffusion_model.input_blocks.0.0.weight": marker(8, 4, 3, 3)}


def _inpainting() -> dict[str, torch.Tensor]:
    return {"model.diffusion_model.input_blocks.0.0.weight": marker(8, 9, 3, 3),
            "conditioner.embedders.1.model.token_embedding.weight": marker(8, 16)}


def _controlnet() -> dict[str, torch.Tensor]:
    return {"control_model.input_hint_block.0.weight": marker(16, 3, 3, 3),
            "control_model.zero_convs.0.0.weight": marker(8, 8, 1, 1)}


def _kohya_lora() -> dict[str, torch.Tensor]:
    return {"lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight": marker(4, 8),
            "lora_unet_down_blocks_0_attentions_0_proj_in.lora_up.weight": marker(8, 4)}


def _peft_lora() -> dict[str, torch.Tensor]:
    return {"transformer.single_transformer_blocks.0.attn.to_q.lora_A.weight": marker(4, 8),
            "transformer.single_transformer_blocks.0.attn.to_q.lora_B.weight": marker(8, 4)}


REFUSED = {"refiner": (_sdxl_refiner, "SDXL refiner"), "inpainting": (_inpainting, "inpainting model"),
           "controlnet": (_controlnet, "ControlNet"), "kohya-lora": (_kohya_lora, "LoRA file alone"),
           "peft-lora": (_peft_lora, "LoRA file alone")}


@pytest.mark.parametrize("case", REFUSED)
def test_unsupported_files_are_refused_in_one_line_naming_the_file(capsys, image_file, tmp_path, case):
    build, what = REFUSED[case]
    path = tmp_path / f"{case}.safetensors"
    save_file({**build(), **vae_to_original_layout(tiny_vae("sdxl"))}, str(path))
    with pytest.raises(ValueError, match=what) as caught:
        load_model(str(path), parts=frozenset({"encoder"}))
    assert str(path) in str(caught.value) and "\n" not in str(caught.value)
    code, _, err = run_cli(capsys, "protect", image_file, "-o", tmp_path / "out", "--model", path,
                           "--method", "photoguard", "--steps", "2", "--input-size", "32")
    assert code != 0 and len([line for line in err.splitlines() if what in line and str(path) in line]) == 1


@pytest.mark.parametrize("index, what", [
    ({"_class_name": "StableDiffusionXLImg2ImgPipeline", "requires_aesthetics_score": True}, "SDXL refiner"),
    ({"_class_name": "StableDiffusionInpaintPipeline"}, "inpainting pipeline"),
    ({"_class_name": "StableDiffusionControlNetPipeline"}, "ControlNet pipeline"),
    ({"_class_name": "KandinskyPipeline"}, "does not support"),
])
def test_unsupported_folders_are_refused_naming_the_folder(tmp_path, index, what):
    folder = tmp_path / "model"
    tiny_vae("sdxl").save_pretrained(folder / "vae")
    (folder / "model_index.json").write_text(json.dumps(index))
    with pytest.raises(ValueError, match=what) as caught:
        load_model(str(folder), parts=frozenset({"encoder"}))
    assert str(folder) in str(caught.value)


def test_a_flux_transformer_without_its_autoencoder_says_what_to_give(tmp_path):
    path = tmp_path / "flux1-dev.safetensors"
    save_file({"double_blocks.0.img_attn.norm.key_norm.scale": marker(8)}, str(path))
    with pytest.raises(ValueError, match="ae.safetensors") as caught:
        load_model(str(path), parts=frozenset({"encoder"}))
    assert str(path) in str(caught.value) and "Flux transformer without its VAE" in str(caught.value)


def test_a_four_channel_vae_alone_is_refused_as_ambiguous(tmp_path):
    path = tmp_path / "vae.safetensors"
    save_file(vae_to_original_layout(tiny_vae("sdxl"), ""), str(path))
    with pytest.raises(ValueError, match="4 latent channels") as caught:
        load_model(str(path), parts=frozenset({"encoder"}))
    assert str(path) in str(caught.value)
