"""One perturbation against several families' VAE encoders at once (`--against`): tiny VAEs of SD 1.x, SDXL and SD 3.x
saved in their real layouts, an ensemble run through the command line whose every member's loss moves, the
normalised combination checked step by step, the members named (never by full path) in the outputs, the pixels of an
encoder-side ensemble unchanged since before denoisers could join one, and the refusals (denoiser-side ensembles:
test_ensemble_denoisers.py)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from mist.engine.config import ProtectConfig
from mist.engine.ensemble import ensemble_loss, term_name, unique_labels
from mist.engine.methods import LossTerms
from mist.engine.pipeline import Protector
from mist.models import load_model
from support.cli import run_cli
from support.members import count_member_loads
from support.families import marker, save_folder, save_single_file, tiny_vae
from support.original_layout import vae_to_original_layout

METHODS = {"photoguard": [], "pid": [], "mist-textural": ["--mode", "textural"]}


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, Path]:
    """SD 1.x's tiny VAE as a diffusers folder, SDXL's as an original single file, SD 3.x's as a diffusers folder."""
    root = tmp_path_factory.mktemp("ensemble")
    return {"sd1": save_folder(root / "SD1-tiny", "sd1", tiny_vae("sd1", seed=10)),
            "sdxl": save_single_file(root / "SDXL-tiny.safetensors", "sdxl", tiny_vae("sdxl", seed=11)),
            "sd3": save_folder(root / "SD3-tiny", "sd3", tiny_vae("sd3", seed=12))}


@pytest.fixture(scope="module")
def image_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("image") / "painting.png"
    Image.fromarray(np.random.default_rng(3).integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(path)
    return path


def _protect(capsys, image_file: Path, out: Path, models: dict[str, Path], method: str, *extra: object):
    return run_cli(capsys, "protect", image_file, "-o", out, "--model", models["sd1"],
                   "--against", f"{models['sdxl']},{models['sd3']}", "--method", method.split("-")[0],
                   *METHODS[method], "--steps", "6", "--input-size", "32", "--precision", "fp32", *extra)


@pytest.mark.parametrize("method", METHODS)
def test_every_member_loss_moves_through_the_cli(capsys, models, image_file, tmp_path, method):
    code, _, err = _protect(capsys, image_file, tmp_path / "out", models, method)
    assert code == 0, err
    output = Image.open(tmp_path / "out" / image_file.name)
    record = json.loads(output.text["mist:ensemble"])
    assert record["combine"] == "sum"
    assert [m["model"] for m in record["members"]] == ["SD1-tiny", "SDXL-tiny.safetensors", "SD3-tiny"]
    for member in record["members"]:  # each member's own loss, minimised: down (PID's is the negated distance)
        assert member["end"] < member["start"], member
    assert json.loads(output.text["mist:settings"])["against"] == ["SDXL-tiny.safetensors", "SD3-tiny"]
    assert not any(str(tmp_path.parent) in value or str(models["sd3"]) in value for value in output.text.values())
    protected = np.asarray(output.convert("RGB"), dtype=int)
    original = np.asarray(Image.open(image_file).convert("RGB"), dtype=int)
    assert 0 < np.abs(protected - original).max() <= 16


def test_minimal_metadata_names_no_member(capsys, models, image_file, tmp_path):
    code, _, err = _protect(capsys, image_file, tmp_path / "out", models, "photoguard", "--metadata", "minimal")
    assert code == 0, err
    text = Image.open(tmp_path / "out" / image_file.name).text
    assert "mist:ensemble" not in text and "tiny" not in text["mist:settings"]
    assert json.loads(text["mist:settings"])["against"] == 2


def _steps(models, combine: str, method: str = "photoguard", steps: int = 5) -> tuple[Protector, list]:
    config = ProtectConfig.of(method=method, steps=steps, input_size=32, precision="fp32",
                              against=f"{models['sdxl']},{models['sd3']}", against_combine=combine)
    protector = Protector(load_model(str(models["sd1"]), parts=config.parts), config)
    seen = []
    picture = Image.fromarray(np.random.default_rng(4).integers(0, 256, (32, 32, 3), dtype=np.uint8))
    protector.protect(picture, callback=seen.append)
    return protector, seen


@pytest.mark.parametrize("method", ["photoguard", "pid"])
def test_the_objective_is_the_sum_of_the_losses_each_divided_by_its_start(models, method):
    protector, seen = _steps(models, "sum", method)
    names = [term_name(label) for label in protector.ensemble]
    assert len(names) == 3 and all(name in seen[0].terms for name in names)
    start = [abs(seen[0].terms[name]) for name in names]
    sign = 1.0 if method == "photoguard" else -1.0  # PID's objective is negative (the distances are raised)
    assert seen[0].objective == pytest.approx(3 * sign, rel=1e-6)  # each member's ratio is +1 or -1 at the start
    for progress in seen:
        ratios = [progress.terms[name] / scale for name, scale in zip(names, start, strict=True)]
        assert progress.objective == pytest.approx(sum(ratios), rel=1e-5)
    assert seen[-1].objective < seen[0].objective


def test_the_worst_case_is_the_largest_ratio(models):
    protector, seen = _steps(models, "max")
    names = [term_name(label) for label in protector.ensemble]
    start = [abs(seen[0].terms[name]) for name in names]
    assert seen[0].objective == pytest.approx(1.0, rel=1e-6)
    for progress in seen:
        ratios = [progress.terms[name] / scale for name, scale in zip(names, start, strict=True)]
        assert progress.objective == pytest.approx(max(ratios), rel=1e-5)
    assert seen[-1].objective < 1.0  # the member that moved least moved too


def test_a_member_outweighing_the_others_counts_alike_once_normalised():
    """Two members whose losses differ a million-fold: normalised, each pulls the sign with equal weight."""
    x = torch.zeros(1, 2, requires_grad=True)

    def small(x, generators):
        value = (x[:, 0] - 1) ** 2 + 1
        return LossTerms(value, {})

    def large(x, generators):
        value = 1e6 * ((x[:, 1] - 1) ** 2 + 1)
        return LossTerms(value, {})

    loss = ensemble_loss([("a", small), ("b", large)], "sum")
    terms = loss(x, [])
    (gradient,) = torch.autograd.grad(terms.objective.sum(), x)
    torch.testing.assert_close(gradient, torch.tensor([[-1.0, -1.0]]))  # d/dx of 2 (x - 1)^2 / 2 at 0, for both
    assert terms.objective.item() == pytest.approx(2.0)
    assert terms.terms == {"loss@a": terms.terms["loss@a"], "loss@b": terms.terms["loss@b"]}


def test_members_load_their_vae_encoder_alone_with_their_own_latents(models):
    config = ProtectConfig.of(method="pid", steps=1, input_size=32, against=f"{models['sdxl']},{models['sd3']}")
    protector = Protector(load_model(str(models["sd1"]), parts=config.parts), config)
    latents = [(m.method.model.parts, m.method.model.arch.family, m.method.model.arch.vae["latent_channels"])
               for m in protector.members]
    assert latents == [({"encoder"}, "sdxl", 4), ({"encoder"}, "sd3", 16)]
    assert protector.ensemble == ["SD1-tiny", "SDXL-tiny.safetensors", "SD3-tiny"]


def test_the_ensemble_moves_a_member_more_than_attacking_the_main_model_alone(models):
    """The point of the ensemble: SD 3.x's loss on the saved image falls when SD 3.x is a member, and not when the
    same budget is spent on SD 1.x alone (these tiny random VAEs share nothing, so nothing transfers)."""
    picture = Image.fromarray(np.random.default_rng(5).integers(0, 256, (32, 32, 3), dtype=np.uint8))
    base = dict(method="photoguard", steps=8, input_size=32, precision="fp32")
    sd1 = load_model(str(models["sd1"]), parts=frozenset({"encoder"}))
    alone = Protector(sd1, ProtectConfig.of(**base)).protect(picture).image
    together = Protector(sd1, ProtectConfig.of(**base, against=str(models["sd3"]))).protect(picture).image
    judge = Protector(load_model(str(models["sd3"]), parts=frozenset({"encoder"})), ProtectConfig.of(**base))

    def sd3_loss(image):
        from mist.common.images import image_to_tensor

        return judge.loss_for(image_to_tensor(image, (32, 32)))(image_to_tensor(image, (32, 32)), []).objective.item()

    # measured: 6.34 on the clean image, 6.48 after SD 1.x alone (no transfer), 4.79 with SD 3.x as a member
    assert sd3_loss(together) < 0.9 * min(sd3_loss(alone), sd3_loss(picture))


def test_labels_of_the_same_name_are_told_apart():
    assert unique_labels(["model", "vae", "model", "model"]) == ["model", "vae", "model#2", "model#3"]


# ------------------------------------------------------------------------------------------------------- refusals


@pytest.mark.parametrize("method, why", [(["--method", "aspl"], "--method aspl fine-tunes a surrogate"),
                                         (["--method", "mist2-lora"], "--method mist2-lora fine-tunes a surrogate")])
def test_a_surrogate_training_method_is_refused_in_one_line(capsys, models, image_file, tmp_path, method, why):
    code, _, err = run_cli(capsys, "protect", image_file, "-o", tmp_path / "out", "--model", models["sd1"],
                           "--against", models["sdxl"], *method, "--steps", "2", "--input-size", "32")
    lines = [line for line in err.splitlines() if "--against" in line]
    assert code != 0 and len(lines) == 1 and why in lines[0], err
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


@pytest.mark.parametrize("case", ["the run's own model", "named twice"])
def test_a_model_named_twice_is_refused_in_one_line(capsys, monkeypatch, models, image_file, tmp_path, case):
    """The run's own model as a member (here by another spelling of its path), or one member twice, would count that
    model twice in the combined loss: refused before any member is read."""
    loaded = count_member_loads(monkeypatch)
    monkeypatch.chdir(models["sdxl"].parent)
    against = (f"./{models['sd1'].name},{models['sdxl']}" if case == "the run's own model"
               else f"{models['sdxl']},{models['sd3']},{models['sdxl'].name}")
    code, _, err = run_cli(capsys, "protect", image_file, "-o", tmp_path / "out", "--model", models["sd1"],
                           "--against", against, "--method", "pid", "--steps", "2", "--input-size", "32")
    lines = [line for line in err.splitlines() if "--against" in line or "against:" in line]
    assert code != 0 and len(lines) == 1 and case in lines[0] and "each model counts once" in lines[0], err
    assert loaded == []


def test_a_missing_member_is_named_in_one_line(capsys, models, image_file, tmp_path):
    missing = tmp_path / "nowhere" / "flux-ae.safetensors"
    code, _, err = run_cli(capsys, "protect", image_file, "-o", tmp_path / "out", "--model", models["sd1"],
                           "--against", f"{models['sdxl']},{missing}", "--method", "pid", "--steps", "2",
                           "--input-size", "32")
    lines = [line for line in err.splitlines() if str(missing) in line]
    assert code != 0 and len(lines) == 1 and "--against" in lines[0] and "no such model" in lines[0], err


def test_a_member_that_is_no_model_is_named_in_one_line(capsys, models, image_file, tmp_path):
    lora = tmp_path / "style-lora.safetensors"
    save_file({"lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight": marker(4, 8),
               **vae_to_original_layout(tiny_vae("sdxl"))}, str(lora))
    code, _, err = run_cli(capsys, "protect", image_file, "-o", tmp_path / "out", "--model", models["sd1"],
                           "--against", lora, "--method", "photoguard", "--steps", "2", "--input-size", "32")
    lines = [line for line in err.splitlines() if str(lora) in line]
    assert code != 0 and len(lines) == 1 and "LoRA file alone" in lines[0], err


def test_combining_needs_members_and_a_known_rule(models):
    with pytest.raises(ValueError, match=r"^against_combine: needs models"):
        ProtectConfig.of(method="pid", against_combine="max")
    with pytest.raises(ValueError, match=r"^against_combine: must be one of sum, max, got 'mean'"):
        ProtectConfig.of(method="pid", against=str(models["sdxl"]), against_combine="mean")


def test_without_against_the_settings_record_is_as_before():
    record = json.loads(ProtectConfig.of(method="pid").to_json())
    assert "against" not in record and "against_combine" not in record


# ------------------------------------------------------------------------------------- members kept, Ray's record


class _Quiet:
    def __getattr__(self, name):
        return lambda *args, **kwargs: None


def test_members_are_read_once_per_process_across_jobs_and_precisions(monkeypatch, tmp_path):
    """Jobs after jobs (a folder, then another job of a service) on one model cache: each member read once, its kept
    encoder left in float32 by a bf16 run, and the fp32 run after it the same as one on freshly read members."""
    from mist.runner.jobs import Job, ModelCache, run_jobs

    members = (save_single_file(tmp_path / "kept-xl.safetensors", "sdxl", tiny_vae("sdxl", seed=21)),
               save_folder(tmp_path / "kept-sd3", "sd3", tiny_vae("sd3", seed=22)))
    loaded = count_member_loads(monkeypatch)
    for n in range(3):
        Image.fromarray(np.random.default_rng(n).integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(
            tmp_path / f"p{n}.png")
    cache = ModelCache("tiny-random", "cpu")
    base = dict(method="photoguard", steps=2, input_size=32, against=",".join(map(str, members)))
    for run, precision in enumerate(("bf16", "fp32", "fp32")):
        jobs = [Job(tmp_path / f"p{n}.png", tmp_path / f"out{run}" / f"p{n}.png") for n in range(3)]
        assert run_jobs(jobs, ProtectConfig.of(**base, precision=precision), cache, _Quiet()).ok
    assert loaded == ["kept-xl.safetensors", "kept-sd3"]
    from mist.engine.ensemble import member_model

    assert all(member_model(path).dtype == torch.float32 for path in members)
    kept = member_model(members[0]).encoder.state_dict()
    fresh = load_model(str(members[0]), parts=frozenset({"encoder"})).encoder.state_dict()
    assert all(torch.equal(kept[name], fresh[name]) for name in fresh)  # a bf16 run converted a copy, not these
    from mist.engine import ensemble

    monkeypatch.setattr(ensemble, "_KEPT", {})  # as in a new process: the members read again
    jobs = [Job(tmp_path / f"p{n}.png", tmp_path / "fresh" / f"p{n}.png") for n in range(3)]
    assert run_jobs(jobs, ProtectConfig.of(**base, precision="fp32"), cache, _Quiet()).ok
    assert len(loaded) == 4
    assert [(tmp_path / "out1" / f"p{n}.png").read_bytes() for n in range(3)] == \
        [(tmp_path / "fresh" / f"p{n}.png").read_bytes() for n in range(3)]


def test_a_ray_worker_names_the_members_and_the_runner_records_them_as_locally(models, tmp_path):
    """What a Ray worker answers (`_ProtectActor.prepare`, called here without a cluster) carries the ensemble's
    names, so the runner writes `mist:ensemble` from the worker's result exactly as it does from a local run."""
    from mist.runner.jobs import ModelCache, ensemble_record
    from mist.runner.ray_pool import RemoteProtector, Setup, _ProtectActor

    config = ProtectConfig.of(method="pid", steps=2, input_size=32, precision="fp32",
                              against=f"{models['sdxl']},{models['sd3']}")
    picture = Image.fromarray(np.random.default_rng(5).integers(0, 256, (32, 32, 3), dtype=np.uint8))
    actor = _ProtectActor(str(models["sd1"]), "cpu", False)
    setup = Setup(config, {}, 1)
    remote = RemoteProtector([actor], setup, config, *actor.prepare(setup))
    remote_record = json.loads(ensemble_record(remote, actor.protect(setup, picture, None)))
    local = ModelCache(str(models["sd1"]), "cpu").protector(config)
    local_record = json.loads(ensemble_record(local, local.protect(picture)))
    assert remote.ensemble == local.ensemble == ["SD1-tiny", "SDXL-tiny.safetensors", "SD3-tiny"]
    assert [m["model"] for m in remote_record["members"]] == [m["model"] for m in local_record["members"]]
    for there, here in zip(remote_record["members"], local_record["members"], strict=True):
        assert there["start"] == pytest.approx(here["start"]) and there["end"] == pytest.approx(here["end"])


# SHA-256 (first 16 hex digits) of the protected pixels of `_steps`'s image, as main's code (b3b6bfd, before the
# ensemble ran denoisers) made them: an encoder-side ensemble still loads each member's VAE encoder alone, evaluates the
# members in the same order with the same draws and divides by the first evaluation, so not one pixel may move.
ENCODER_SIDE_PIXELS = {("photoguard", "sum"): "a538c68fd746a0da", ("photoguard", "max"): "08a6c00fb42837a6",
                       ("pid", "sum"): "31d0995e13d4ba41", ("pid", "max"): "9b2895f28ac397d8",
                       ("mist-textural", "sum"): "d0c171a7c168265c", ("mist-textural", "max"): "9fb6876b9c4440b5"}


@pytest.mark.parametrize("method, combine", ENCODER_SIDE_PIXELS)
def test_an_encoder_side_ensemble_makes_the_pixels_it_made_before(models, method, combine):
    import hashlib

    params = {"mode": "textural"} if method == "mist-textural" else {}
    config = ProtectConfig.of(method=method.split("-")[0], steps=5, input_size=32, precision="fp32",
                              against=f"{models['sdxl']},{models['sd3']}", against_combine=combine, **params)
    picture = Image.fromarray(np.random.default_rng(4).integers(0, 256, (32, 32, 3), dtype=np.uint8))
    out = Protector(load_model(str(models["sd1"]), parts=config.parts), config).protect(picture).image
    assert hashlib.sha256(np.asarray(out).tobytes()).hexdigest()[:16] == ENCODER_SIDE_PIXELS[method, combine]
