"""A diffusers VAE folder alone (config.json and its weights, as VAE repositories publish them) loads as its family's
encoder, the family told from the scale and shift its config carries; only the encoder-side methods run on it."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from mist.models import load_model
from mist.runner.jobs import ModelCache
from mist.engine.config import ProtectConfig
from support.cli import run_cli
from support.families import PUBLISHED, tiny_vae

# What each family's VAE alone is read as: SD 2.x's VAE is SD 1.x's (the same design, scale and shift).
READ_AS = {"sd1": "sd1", "sd2": "sd1", "sdxl": "sdxl", "sd3": "sd3", "flux": "flux"}


@pytest.mark.parametrize("family", READ_AS)
def test_a_vae_folder_alone_loads_as_its_familys_encoder(tmp_path, family):
    vae = tiny_vae(family, seed=4)
    vae.save_pretrained(tmp_path / "vae-alone")
    model = load_model(str(tmp_path / "vae-alone"), parts=frozenset({"encoder"}))
    _, scale, shift, _ = PUBLISHED[family]
    assert model.arch.family == READ_AS[family] and model.unet is None and model.parts == {"encoder"}
    assert (model.arch.latent_scale, model.arch.latent_shift) == (scale, shift)
    x = torch.rand((1, 3, 32, 32), generator=torch.Generator().manual_seed(0)) * 2 - 1
    with torch.no_grad():
        torch.testing.assert_close(model.posterior(x)[0], vae.encode(x).latent_dist.mean, rtol=0, atol=1e-6)


def test_a_sixteen_channel_vae_folder_is_told_sd3_from_flux_by_its_factors(tmp_path):
    """A lone 16-channel single file is taken as Flux's; the same VAE as a folder says which it is."""
    for family in ("sd3", "flux"):
        tiny_vae(family).save_pretrained(tmp_path / family)
        assert load_model(str(tmp_path / family), parts=frozenset({"encoder"})).arch.family == family


def test_a_vae_alone_refuses_denoiser_side_methods_on_every_surface(tmp_path, capsys):
    tiny_vae("sd1").save_pretrained(tmp_path / "sd-vae")
    with pytest.raises(ValueError, match="Stable Diffusion 1.x VAE \\(alone\\)") as caught:
        load_model(str(tmp_path / "sd-vae"), parts=frozenset({"encoder", "unet", "text_encoder"}))
    assert str(tmp_path / "sd-vae") in str(caught.value) and "\n" not in str(caught.value)
    refusal = ModelCache(str(tmp_path / "sd-vae")).refusal(ProtectConfig.of(method="mist"))
    assert refusal.startswith("sd-vae: a Stable Diffusion 1.x VAE (alone)")
    assert ModelCache(str(tmp_path / "sd-vae")).refusal(ProtectConfig.of(method="photoguard")) is None
    image = tmp_path / "art.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(image)
    code, _, err = run_cli(capsys, "protect", image, "-o", tmp_path / "out", "--model", tmp_path / "sd-vae",
                           "--method", "photoguard", "--steps", "2", "--input-size", "32", "--precision", "fp32")
    assert code == 0, err
    code, _, err = run_cli(capsys, "protect", image, "-o", tmp_path / "out2", "--model", tmp_path / "sd-vae",
                           "--method", "mist", "--steps", "2", "--input-size", "32")
    assert code != 0 and len([line for line in err.splitlines() if "VAE (alone)" in line]) == 1, err


def test_a_vae_folder_whose_factors_match_no_family_is_refused_naming_it(tmp_path):
    tiny_vae("sdxl").save_pretrained(tmp_path / "odd")
    config = json.loads((tmp_path / "odd" / "config.json").read_text())
    (tmp_path / "odd" / "config.json").write_text(json.dumps({**config, "scaling_factor": 0.5}))
    with pytest.raises(ValueError, match="matches no family") as caught:
        load_model(str(tmp_path / "odd"), parts=frozenset({"encoder"}))
    assert str(tmp_path / "odd") in str(caught.value) and "scaling_factor 0.5" in str(caught.value)
