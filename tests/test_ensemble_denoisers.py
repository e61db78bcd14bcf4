"""An ensemble (`--against`) with a denoiser-side method: tiny random SD 2.x (v-prediction), SDXL and SD 3.x models
saved as diffusers folders beside the tiny SD 1.x stand-in, protected through the command line with Mist's fused mode
and AdvDM; each member's own objective measured with fixed draws before and after; the same seed giving the same
bytes; the scale of each denoiser member averaged over draws; the members kept and let go; each model's memory
counted from its files; and the refusals (a member that lacks a denoiser Mist runs, models that together cannot fit,
a method that fine-tunes a surrogate), each before anything big is read."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from mist.common.images import image_to_tensor
from mist.engine import ensemble
from mist.engine.config import ProtectConfig
from mist.engine.pipeline import Protector
from mist.models import load_model
from mist.models.footprint import model_footprint
from support import denoisers, flows
from support.cli import run_cli
from support.members import count_member_loads
from support.families import save_single_file, tiny_vae

SIZE = 32
METHODS = {"fused": ["--method", "mist"], "advdm": ["--method", "advdm"]}
CONFIGS = {"fused": dict(method="mist"), "advdm": dict(method="advdm")}


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, Path]:
    """SD 2.x-v, SDXL and SD 3.x as diffusers folders; an SD 3.x single file (its VAE alone, as Mist reads it) and an
    SDXL VAE folder alone, which lack a denoiser Mist runs."""
    root = tmp_path_factory.mktemp("denoiser-ensemble")
    vae_alone = root / "sdxl-vae"
    tiny_vae("sdxl", seed=5).save_pretrained(vae_alone)
    return {"sd2v": denoisers.save_folder(root / "SD2-v", denoisers.tiny_parts("sd2", 1), "v_prediction"),
            "sdxl": denoisers.save_folder(root / "SDXL", denoisers.tiny_parts("sdxl", 2)),
            "sd3": flows.save_folder(root / "SD3", flows.tiny_parts("sd3", 3)),
            "sd3-file": save_single_file(root / "SD3-file.safetensors", "sd3", tiny_vae("sd3", seed=4)),
            "vae-alone": vae_alone}


@pytest.fixture(scope="module")
def image_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("image") / "painting.png"
    Image.fromarray(np.random.default_rng(3).integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8)).save(path)
    return path


@pytest.fixture(autouse=True)
def _fresh_members(monkeypatch):
    monkeypatch.setattr(ensemble, "_KEPT", {})  # each test reads its members as a new process would


def _against(models, *names: str) -> str:
    return ",".join(str(models[name]) for name in names)


def _protect(capsys, image_file: Path, out: Path, against: str, method: str, *extra: object):
    return run_cli(capsys, "protect", image_file, "-o", out, "--model", "tiny-random", "--against", against,
                   *METHODS[method], "--steps", "6", "--input-size", SIZE, "--precision", "fp32", *extra)


def _objective(spec: str, config: ProtectConfig, picture: Image.Image) -> float:
    """The method's objective on `spec`'s model alone for `picture`, the mean over 32 fixed draws."""
    judge = Protector(load_model(spec, parts=config.parts), config)
    x = image_to_tensor(picture, (SIZE, SIZE))
    loss = judge.loss_for(x)
    with torch.no_grad():
        return float(np.mean([loss(x, [torch.Generator().manual_seed(s)]).objective.item() for s in range(32)]))


# ------------------------------------------------------------------------------------------ the attack


@pytest.mark.parametrize("method", METHODS)
def test_every_member_runs_the_method_on_its_own_model_through_the_cli(capsys, models, image_file, tmp_path, method):
    """Mist's fused mode and AdvDM against SD 1.x, SD 2.x-v, SDXL and SD 3.x at once: each member's loss reported,
    the output within the budget, and the objective of each member the attack can move measurably on these tiny
    random weights falling (the objective with the same eight draws on the clean and the protected image).

    On tiny random weights a noise predictor's denoising loss hardly depends on the image (attacking the SD 1.x
    stand-in alone with AdvDM for 6 steps moved its 32-draw mean loss by 4e-4 of 1.07, the wrong way, the draws' noise
    outweighing the effect), so the fused mode runs with fused weight -3 (r = 1), where both terms count and each
    member's whole objective moves (measured over 64 draws after 12 steps: every member's mean change at least 6
    standard errors below zero); AdvDM's is checked on SD 3.x, whose flow target depends on the latent itself."""
    extra = ["-w", "-3", "--steps", "12"] if method == "fused" else []
    code, _, err = _protect(capsys, image_file, tmp_path / "out", _against(models, "sd2v", "sdxl", "sd3"), method,
                            *extra)
    assert code == 0, err
    output = Image.open(tmp_path / "out" / image_file.name)
    record = json.loads(output.text["mist:ensemble"])
    assert [m["model"] for m in record["members"]] == ["tiny-random", "SD2-v", "SDXL", "SD3"]
    assert all(m["start"] != m["end"] for m in record["members"]), record
    protected = np.asarray(output.convert("RGB"), dtype=int)
    original = Image.open(image_file).convert("RGB")
    assert 0 < np.abs(protected - np.asarray(original, dtype=int)).max() <= 16
    config = ProtectConfig.of(**CONFIGS[method], input_size=SIZE, precision="fp32",
                              **({"fused_weight": -3} if method == "fused" else {}))
    judged = ("tiny-random", "sd2v", "sdxl", "sd3") if method == "fused" else ("sd3",)
    for name in judged:
        spec = name if name == "tiny-random" else str(models[name])
        assert _objective(spec, config, output.convert("RGB")) < _objective(spec, config, original), name


def test_the_same_seed_gives_the_same_bytes(capsys, models, image_file, tmp_path):
    against = _against(models, "sd2v", "sd3")
    for run in ("a", "b"):
        code, _, err = _protect(capsys, image_file, tmp_path / run, against, "advdm", "--steps", "3")
        assert code == 0, err
    assert (tmp_path / "a" / image_file.name).read_bytes() == (tmp_path / "b" / image_file.name).read_bytes()
    code, _, err = _protect(capsys, image_file, tmp_path / "c", against, "advdm", "--steps", "3", "--seed", "7")
    assert code == 0, err
    assert (tmp_path / "c" / image_file.name).read_bytes() != (tmp_path / "a" / image_file.name).read_bytes()


def test_each_denoiser_member_is_scaled_by_the_mean_of_eight_draws(models):
    """The combined objective's first value is the sum of each member's first draw divided by the mean magnitude of
    eight draws of the member's loss at the start point from the tile's "scale" stream (members in order): not -1
    each, as dividing by the first draw itself would make it."""
    from mist.engine.methods import TileInputs
    from mist.engine.pipeline import pixel_digest, tile_seed

    config = ProtectConfig.of(method="advdm", steps=1, input_size=SIZE, precision="fp32", start="image",
                              against=_against(models, "sd2v", "sdxl"))
    protector = Protector(load_model("tiny-random", parts=config.parts), config)
    seen = []
    picture = Image.fromarray(np.random.default_rng(4).integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8))
    protector.protect(picture, callback=seen.append)
    x = image_to_tensor(picture, (SIZE, SIZE))
    digest = pixel_digest(x)
    inputs = [TileInputs(clean=x, target=None, seed=lambda stream: tile_seed(config.seed, digest, 0, stream))]
    losses = [protector.method.prepare(inputs)] + [m.method.prepare(inputs) for m in protector.members]
    scale = torch.Generator().manual_seed(tile_seed(config.seed, digest, 0, "scale"))
    with torch.no_grad():
        scales = [np.mean([abs(loss(x, [scale]).objective.item()) for _ in range(ensemble.SCALE_DRAWS)])
                  for loss in losses]
    first = [seen[0].terms[ensemble.term_name(label)] for label in protector.ensemble]
    assert seen[0].objective == pytest.approx(sum(f / s for f, s in zip(first, scales, strict=True)), rel=1e-5)
    assert seen[0].objective != pytest.approx(-3.0, rel=1e-2)


# ------------------------------------------------------------------------------------------ members kept


def test_denoiser_members_are_kept_converted_in_place_and_let_go(monkeypatch, models):
    loaded = count_member_loads(monkeypatch)
    sd1 = load_model("tiny-random", parts=ProtectConfig.of(method="advdm").parts)
    base = dict(method="advdm", steps=1, input_size=SIZE)
    first = Protector(sd1, ProtectConfig.of(**base, precision="fp32", against=str(models["sd2v"])))
    second = Protector(sd1, ProtectConfig.of(**base, precision="fp32", against=str(models["sd2v"])))
    assert loaded == ["SD2-v"]  # read once, then used as kept
    assert first.members[0].method.model is second.members[0].method.model  # in place: one copy
    Protector(sd1, ProtectConfig.of(**base, precision="bf16", against=str(models["sd2v"])))
    assert ensemble.kept_member(models["sd2v"], first.members[0].method.model.parts).dtype == torch.bfloat16
    Protector(sd1, ProtectConfig.of(**base, precision="fp32", against=str(models["sd2v"])))
    assert loaded == ["SD2-v", "SD2-v"]  # converted to bf16 in place: a float32 run reads it again
    Protector(sd1, ProtectConfig.of(**base, precision="fp32", against=str(models["sdxl"])))
    assert ensemble.kept_member(models["sd2v"], first.members[0].method.model.parts) is None  # other members: let go
    Protector(sd1, ProtectConfig.of(method="pid", steps=1, input_size=SIZE))
    assert not ensemble._KEPT  # a run without members lets the denoisers go too


# ------------------------------------------------------------------------------------------ memory


def test_each_models_memory_is_counted_from_its_files(models, tmp_path):
    parts = frozenset({"encoder", "unet"})
    model = load_model(str(models["sdxl"]), parts=parts)
    weights = 4 * sum(p.numel() for module in (model.encoder, model.unet) for p in module.parameters())
    assert model_footprint(models["sdxl"], parts).peak == weights
    towers = denoisers.tiny_parts("sdxl", 2).towers
    text = 4 * sum(p.numel() for tower in towers for p in tower.parameters())
    assert model_footprint(models["sdxl"], parts | {"text_encoder"}).peak == weights + text
    single = denoisers.save_single_file(tmp_path / "SDXL.safetensors", denoisers.tiny_parts("sdxl", 2))
    assert model_footprint(single, parts).peak == weights
    pickled = shutil.copytree(models["sdxl"], tmp_path / "SDXL-bin")  # the UNet as a PyTorch .bin, memory-mapped
    (pickled / "unet" / "diffusion_pytorch_model.safetensors").unlink()
    torch.save(model.unet.state_dict(), pickled / "unet" / "diffusion_pytorch_model.bin")
    assert model_footprint(pickled, parts).peak == weights
    assert model_footprint(models["sd3-file"], frozenset({"encoder"})).peak == 4 * sum(
        p.numel() for p in load_model(str(models["sd3-file"]), parts=frozenset({"encoder"})).encoder.parameters())


def test_models_that_cannot_fit_together_are_refused_naming_each_before_any_is_read(monkeypatch, models):
    from mist.engine import ensemble_checks
    from mist.runner.jobs import ModelCache

    config = ProtectConfig.of(method="advdm", steps=1, input_size=SIZE, against=_against(models, "sdxl", "sd3"))
    parts = frozenset({"encoder", "unet", "text_encoder"})
    sizes = {label: model_footprint(where, parts).peak
             for label, where in (("tiny-random", "tiny-random"), ("SDXL", models["sdxl"]), ("SD3", models["sd3"]))}
    monkeypatch.setattr(ensemble_checks, "available_ram_bytes", lambda: sum(sizes.values()) - 1)  # each one fits
    loaded = count_member_loads(monkeypatch)
    cache = ModelCache("tiny-random", "cpu")
    with pytest.raises(ValueError) as caught:
        cache.protector(config)
    message = str(caught.value)
    assert message.startswith("against: these models need about") and "\n" not in message
    for label, size in sizes.items():
        assert f"{label} {size / 1e6:.1f} MB" in message, message
    assert str(models["sdxl"].parent) not in message
    assert cache.loads == 0 and loaded == []
    assert cache.refusal(config) == message  # what the web UI and the service say before accepting the work
    monkeypatch.setattr(ensemble_checks, "available_ram_bytes", lambda: sum(sizes.values()))
    assert cache.refusal(config) is None


# ------------------------------------------------------------------------------------------ refusals


@pytest.mark.parametrize("member, lacks, why", [
    ("sd3-file", "SD3-file.safetensors: a Stable Diffusion 3.x single file", "only its diffusers folder runs"),
    ("vae-alone", "sdxl-vae: a Stable Diffusion XL VAE (alone)", "needs its denoiser and text encoder")])
def test_a_member_without_a_denoiser_mist_runs_is_refused_by_name(capsys, monkeypatch, models, image_file, tmp_path,
                                                                 member, lacks, why):
    loaded = count_member_loads(monkeypatch)
    code, _, err = _protect(capsys, image_file, tmp_path / "out", _against(models, "sd2v", member), "advdm")
    lines = [line for line in err.splitlines() if lacks in line]
    assert code != 0 and len(lines) == 1 and why in lines[0], err
    assert str(models[member].parent) not in err and loaded == []
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


def test_an_encoder_side_method_still_runs_on_those_members(capsys, models, image_file, tmp_path):
    code, _, err = run_cli(capsys, "protect", image_file, "-o", tmp_path / "out", "--model", "tiny-random",
                           "--against", _against(models, "sd3-file", "vae-alone", "sd3"), "--method", "photoguard",
                           "--steps", "2", "--input-size", SIZE, "--precision", "fp32")
    assert code == 0, err


def test_an_sd3_member_sets_the_side_multiple_of_the_whole_ensemble(capsys, models, tmp_path):
    """The run's model (SD 1.x) takes multiples of 8, an SD 3 member's transformer 16: keeping the aspect ratio a
    40 x 48 image is protected at 32 x 48; resized to a 40-pixel square it is refused before anything loads."""
    image = tmp_path / "art.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (48, 40, 3), dtype=np.uint8)).save(image)
    code, _, err = run_cli(capsys, "protect", image, "-o", tmp_path / "kept", "--model", "tiny-random", "--against",
                           _against(models, "sd3"), "--method", "advdm", "--steps", "1", "--input-size", "40",
                           "--no-resize", "--precision", "fp32")
    assert code == 0, err
    assert Image.open(next((tmp_path / "kept").glob("*.png"))).size == (32, 48)
    code, _, err = run_cli(capsys, "protect", image, "-o", tmp_path / "square", "--model", "tiny-random", "--against",
                           _against(models, "sd3"), "--method", "advdm", "--steps", "1", "--input-size", "40",
                           "--precision", "fp32")
    assert code != 0 and "multiples of 16 pixels" in err and "2 x 2 patches" in err, err
