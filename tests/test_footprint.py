"""One count of a model's memory (`mist.models.footprint`): loading refuses at exactly the bytes the ensemble check
counts for the same model and parts, for each family's tiny model in each layout it is published in, in float32 and
with an SD 3.x / Flux transformer read in bf16."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from diffusers import AutoencoderKL, UNet2DConditionModel
from safetensors.torch import save_file
from transformers import CLIPTextConfig, CLIPTextModel

from mist.engine import ensemble_checks
from mist.engine.config import ProtectConfig
from mist.models import TINY, Architecture, load_model
from mist.models import footprint
from mist.models.footprint import model_footprint
from support import denoisers, families, flow_files
from support.original_layout import to_original_layout

SIZE = 32
DENOISER_METHOD = "advdm"  # reads the VAE encoder, the denoiser and the text encoders
ENCODER_METHOD = "pid"  # reads the VAE encoder alone
NAMES = ("sd1-ckpt", "sd1-file", "sd1-folder", "sd2-file", "sd2-folder", "sdxl-file", "sdxl-folder", "sd3-file",
         "sd3-folder", "dev-file", "dev-folder", "flux-vae")


@pytest.fixture(scope="module")
def saved(tmp_path_factory) -> dict[str, tuple[Path, tuple[Path, ...], Architecture]]:
    """name -> (where, text encoder files, the shapes a single file is read with): SD 1.x as a .ckpt, a .safetensors
    and a folder; SD 2.x and SDXL as a file and a folder; SD 3 and Flux dev as single files (with their text encoder
    files) and folders; Flux's VAE alone (its ae.safetensors)."""
    root = tmp_path_factory.mktemp("footprint")
    torch.manual_seed(0)
    unet, vae = UNet2DConditionModel(**TINY.unet), AutoencoderKL(**TINY.vae)
    text = CLIPTextModel(CLIPTextConfig(**TINY.text))
    original = to_original_layout(unet, vae, text)
    torch.save({"state_dict": original}, root / "sd1.ckpt")
    save_file({k: v.contiguous() for k, v in original.items()}, str(root / "sd1.safetensors"))
    for part, module in (("unet", unet), ("vae", vae), ("text_encoder", text)):
        module.save_pretrained(root / "sd1" / part)
    out = {"sd1-ckpt": (root / "sd1.ckpt", (), TINY), "sd1-file": (root / "sd1.safetensors", (), TINY),
           "sd1-folder": (root / "sd1", (), TINY)}
    for seed, family in enumerate(("sd2", "sdxl")):
        parts, shapes = denoisers.tiny_parts(family, seed), denoisers.ARCHITECTURES[family]
        out[f"{family}-file"] = (denoisers.save_single_file(root / f"{family}.safetensors", parts), (), shapes)
        out[f"{family}-folder"] = (denoisers.save_folder(root / family, parts), (), shapes)
    for seed, kind in enumerate(("sd3", "dev")):
        parts = flow_files.tiny(kind, seed)
        files = flow_files.save_files(root / f"{kind}-files", parts)
        out[f"{kind}-file"] = (files.model, tuple(files.text_encoders), TINY)
        out[f"{kind}-folder"] = (flow_files.save_same_folder(root / kind, parts), (), TINY)
    vae_alone = families.save_single_file(root / "ae.safetensors", "flux", families.tiny_vae("flux"))
    out["flux-vae"] = (vae_alone, (), TINY)
    return out


@pytest.mark.parametrize("name", NAMES)
def test_loading_refuses_at_the_bytes_the_ensemble_check_counts(saved, monkeypatch, name):
    where, encoders, shapes = saved[name]
    method = ENCODER_METHOD if name == "flux-vae" else DENOISER_METHOD
    config = ProtectConfig.of(method=method, steps=1, input_size=SIZE, against="tiny-random",
                              text_encoders=tuple(map(str, encoders)))
    member = _least_memory(monkeypatch, config, None)  # the member alone
    count = _least_memory(monkeypatch, config, where) - member
    assert count == model_footprint(where, config.parts, torch.float32, encoders).peak > 0
    load = lambda: load_model(str(where), shapes, config.parts, encoders)  # noqa: E731
    _assert_refused_below(monkeypatch, load, count)


@pytest.mark.parametrize("name", ["sd3-file", "sd3-folder", "dev-file", "dev-folder"])
def test_loading_counts_a_bf16_flow_transformer_at_two_bytes_a_weight_as_the_count_does(saved, monkeypatch, name):
    where, encoders, shapes = saved[name]
    parts = frozenset({"encoder", "unet", "text_encoder"})
    wide, half = (model_footprint(where, parts, dtype, encoders) for dtype in (torch.float32, torch.bfloat16))
    assert half.held["transformer"] * 2 == wide.held["transformer"] > 0
    assert {**half.held, "transformer": 0} == {**wide.held, "transformer": 0} and half.first == wide.first
    load = lambda: load_model(str(where), shapes, parts, encoders, torch.bfloat16)  # noqa: E731
    _assert_refused_below(monkeypatch, load, half.peak)


def _least_memory(monkeypatch, config: ProtectConfig, run: Path | None) -> int:
    """The fewest bytes available with which the ensemble check lets `config` run with the run's model `run` (None:
    its members alone), found by bisection."""
    low, high = 0, 1 << 40
    while low < high:
        middle = (low + high) // 2
        monkeypatch.setattr(ensemble_checks, "available_ram_bytes", lambda value=middle: value)
        if ensemble_checks.ensemble_refusal(config, run) is None:
            high = middle
        else:
            low = middle + 1
    return low


def _assert_refused_below(monkeypatch, load, count: int) -> None:
    """`load()` is refused in one line with a byte less than `count` available, and loads with `count`."""
    monkeypatch.setattr(footprint, "available_ram_bytes", lambda: count - 1)
    with pytest.raises(ValueError, match=r"needs about [\d.]+ GB of memory [^\n]*, and 0\.0 GB is available$"):
        load()
    monkeypatch.setattr(footprint, "available_ram_bytes", lambda: count)
    assert load().encoder is not None
