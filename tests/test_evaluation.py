"""`mist evaluate` on the tiny model (CPU, small images): constructed cases with known answers, the command end to
end, offline use with a local model, bad inputs, the purifications and the metrics."""

from __future__ import annotations

import csv
import json
import shutil
import socket
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import AutoencoderKL, UNet2DConditionModel
from PIL import Image
from transformers import CLIPTextConfig, CLIPTextModel

import mist
from mist.faces import cli
from mist.runner.evaluation import metrics
from mist.runner.evaluation.purify import Context, guided_filter, parse_purifications
from mist.runner.jobs import ModelCache
from mist.models import TINY
from mist.models.loading import build_random
from mist.engine.methods.common import mist_target

SIZE = 64
FAST = dict(purify="jpeg:75", strengths=(0.35,), steps=4)


def _painting(seed: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:SIZE, 0:SIZE]
    rgb = np.stack([x * 3 + seed * 40, y * 3, (x + y) * 2], axis=-1) + rng.normal(0, 12, (SIZE, SIZE, 3))
    return Image.fromarray(np.clip(rgb, 0, 255).astype("uint8"))


@pytest.fixture(scope="module")
def originals(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("originals")
    for i in range(2):
        _painting(i).save(folder / f"art{i}.png")
    return folder


@pytest.fixture(scope="module")
def evaluation_model():
    return build_random(parts=frozenset({"encoder", "unet", "text_encoder", "decoder"}))


@pytest.fixture(scope="module")
def protected(tmp_path_factory, originals) -> Path:
    """The originals protected by `mist protect` with the tiny model (a few steps): real Mist outputs with metadata."""
    folder = tmp_path_factory.mktemp("protected")
    code = cli.main(["protect", str(originals), "-o", str(folder), "--model", "tiny-random", "--steps", "2",
                     "--input-size", str(SIZE), "-q"])
    assert code == 0
    return folder


# ------------------------------------------------------------------------------------------------- known answers


def test_identical_images_score_as_no_change(tmp_path, originals, evaluation_model):
    copies = Path(shutil.copytree(originals, tmp_path / "copies"))
    result = mist.evaluate(originals, copies, tmp_path / "report", model=evaluation_model, **FAST)
    assert len(result.scores) == 2 * 2  # 2 images x (none + jpeg:75) x 1 strength
    for s in result.scores:
        assert s.rmse_levels == 0 and s.latent_mse == 0 and s.ssim == pytest.approx(1, abs=1e-6)
        assert s.target_pull == 0 and s.loss_clean == s.loss_protected and not s.holds
    for image in result.images:
        assert image.verdict.startswith("no change")
        assert image.invisibility["linf_levels"] == 0 and image.invisibility["psnr_db"] == float("inf")
        assert image.pair.matched_by == "name"
    record = json.loads((tmp_path / "report" / "results.json").read_text(), parse_constant=pytest.fail)  # strict JSON
    assert [image["invisibility"]["psnr_db"] for image in record["images"]] == [None, None]


def test_the_method_is_scored_with_the_settings_the_images_record(tmp_path, originals, evaluation_model):
    """Images protected with --mode textural are scored on the textural objective, not the method's default
    (fused); the report says which settings it used."""
    folder = tmp_path / "textural"
    assert cli.main(["protect", str(originals), "-o", str(folder), "--model", "tiny-random", "--steps", "1",
                     "--input-size", str(SIZE), "--mode", "textural", "--fused-weight", "2", "-q"]) == 0
    result = mist.evaluate(originals, folder, tmp_path / "report", model=evaluation_model, **FAST)
    assert result.scored_with["mode"] == "textural" and result.scored_with["fused_weight"] == 2
    report = json.loads((tmp_path / "report" / "results.json").read_text())
    assert report["method_settings"]["mode"] == "textural"
    unrecorded = mist.evaluate(originals, originals, model=evaluation_model, **FAST)  # plain files: the defaults
    assert unrecorded.scored_with["mode"] == "fused"


def test_lora_mimicry_samples_from_pure_noise_like_a_mimic(evaluation_model):
    """The fine-tuned model is sampled from noise alone: two inputs of one shape give the same sample from a model
    trained on the same set (img2img at strength 1 let about 7% of each input's latent into its sample)."""
    from mist.runner.evaluation.img2img import txt2img
    from mist.runner.evaluation.mimicry import LoraMimicry

    generator = torch.Generator().manual_seed(3)
    first, second = (torch.rand(1, 3, 32, 32, generator=generator) * 2 - 1 for _ in range(2))
    mimicry = LoraMimicry(evaluation_model, train_steps=1, steps=2)
    a, b = mimicry.generate([first, second], seed=5)
    assert torch.equal(a.latents, b.latents) and a.images.shape == (1, 3, 32, 32)
    noise_only = txt2img(evaluation_model, (32, 32), [torch.Generator().manual_seed(5)], steps=2)
    assert noise_only.latents.shape == a.latents.shape


def test_a_cancel_stops_generation_at_its_next_step_and_lora_training_too(evaluation_model, monkeypatch):
    """A set cancel stops img2img before its next DDIM step, and LoRA mimicry after its current training step, before
    any sampling (a 500-step training is not waited for)."""
    import threading

    import mist.runner.evaluation.img2img as img2img_module
    from mist.engine.attack import Cancelled
    from mist.runner.evaluation.img2img import img2img
    from mist.runner.evaluation.mimicry import LoraMimicry

    pytest.importorskip("peft")
    cancel = threading.Event()
    steps = []
    predict = evaluation_model.denoise
    monkeypatch.setattr(evaluation_model, "denoise", lambda *a, **k: steps.append(1) or predict(*a, **k))
    picture = torch.zeros(1, 3, 32, 32)
    assert img2img(evaluation_model, picture, 0.5, [torch.Generator()], steps=4, cancel=cancel).images.shape[0] == 1
    assert len(steps) == 2
    cancel.set()
    with pytest.raises(Cancelled):
        img2img(evaluation_model, picture, 0.5, [torch.Generator()], steps=4, cancel=cancel)
    assert len(steps) == 2  # not one more UNet call
    sampled = []
    monkeypatch.setattr(img2img_module, "txt2img", lambda *a, **k: sampled.append(1))
    with pytest.raises(Cancelled):
        LoraMimicry(evaluation_model, train_steps=500, steps=2, cancel=cancel).generate([picture], seed=1)
    assert sampled == []


def test_lora_mimicry_trains_on_each_set_and_identical_sets_match(tmp_path, originals, protected, evaluation_model):
    """LoRA mimicry (the trainer of mist.engine.finetune) joins img2img in the scores: identical sets give identical
    outputs (same seeds), the protected set gives other ones, and the loaded model's UNet is left as it was."""
    pytest.importorskip("peft")
    before = {name: value.clone() for name, value in evaluation_model.unet.state_dict().items()}
    lora = dict(purify="", strengths=(0.35,), steps=2, lora=True, lora_steps=2)
    copies = Path(shutil.copytree(originals, tmp_path / "copies"))
    same = mist.evaluate(originals, copies, model=evaluation_model, **lora)
    assert sorted({s.mimicry for s in same.scores}) == ["img2img:0.35", "lora"]
    for s in same.scores:
        assert s.rmse_levels == 0 and s.latent_mse == 0
    differs = mist.evaluate(originals, protected, tmp_path / "report", model=evaluation_model, **lora)
    assert all(s.latent_mse > 0 for s in differs.scores if s.mimicry == "lora")
    assert "LoRA (2 steps, rank 4)" in (tmp_path / "report" / "index.html").read_text()
    after = evaluation_model.unet.state_dict()
    assert after.keys() == before.keys() and all(torch.equal(after[name], before[name]) for name in before)


def test_protected_replaced_by_the_target_scores_at_the_target(tmp_path, originals, evaluation_model):
    """A 'protected' image that is the target pattern itself pulls the mimicry all the way to the target: the pull is
    1 without purification, and its outputs sit at the target reference distance."""
    fake = tmp_path / "target"
    fake.mkdir()
    for source in originals.iterdir():
        mist_target().resize((SIZE, SIZE), Image.Resampling.BICUBIC).save(fake / source.name)
    result = mist.evaluate(originals, fake, model=evaluation_model, purify="", strengths=(0.25, 0.5), steps=4)
    assert {s.purification for s in result.scores} == {"none"} and len(result.scores) == 4
    for s in result.scores:
        assert s.target_pull == pytest.approx(1.0, abs=1e-5)
        assert s.target_mse_protected == pytest.approx(s.target_mse_reference, rel=1e-5)
        assert s.target_mse_clean > s.target_mse_protected


def test_evaluation_with_a_local_model_opens_no_network(tmp_path, monkeypatch, originals, protected):
    """A diffusers folder on disk, LPIPS weights absent: everything runs (the decoder read from the folder), LPIPS is
    skipped with the place it looked, and no socket is ever connected."""
    torch.manual_seed(0)
    folder = tmp_path / "sd"
    UNet2DConditionModel(**TINY.unet).save_pretrained(folder / "unet")
    AutoencoderKL(**TINY.vae).save_pretrained(folder / "vae")
    CLIPTextModel(CLIPTextConfig(**TINY.text)).save_pretrained(folder / "text_encoder")
    attempts = []

    def refuse(*args, **kwargs):
        attempts.append(args)
        raise OSError("network access in an offline test")

    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch-home"))
    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    models = ModelCache(str(folder))
    from mist.runner.evaluation.run import evaluate_folders
    from mist.runner.evaluation.settings import EvaluationSettings

    result = evaluate_folders(originals, protected, EvaluationSettings(**FAST), models)
    assert models.loads == 1 and not result.random_weights and result.images
    lpips_line = next(line for line in result.skipped if line.startswith("LPIPS"))
    assert str(tmp_path / "torch-home" / "hub" / "checkpoints" / metrics.LPIPS_BACKBONE) in lpips_line
    assert attempts == []


# ---------------------------------------------------------------------------------------------- the command


def test_cli_writes_the_report(tmp_path, originals, protected, capsys):
    renamed = tmp_path / "renamed"
    renamed.mkdir()
    for i, output in enumerate(sorted(protected.iterdir())):  # other names: matched by the recorded SHA-256
        shutil.copy(output, renamed / f"shared-{i}.png")
    report = tmp_path / "report"
    code = cli.main(["evaluate", str(originals), str(renamed), "-o", str(report), "--model", "tiny-random",
                     "--purify", "jpeg:75,resize:0.5", "--strengths", "0.25,0.5", "--steps", "4", "-q"])
    out, err = capsys.readouterr()
    assert code == 0, err
    assert "meaningless for protection" in err and f"report: {report / 'index.html'}" in out
    record = json.loads((report / "results.json").read_text())
    assert record["random_weights"] and "meaningless" in record["warning"] and record["method"] == "mist"
    assert [image["matched_by"] for image in record["images"]] == ["sha256", "sha256"]
    assert "different seeds" in record["verdict_rule"] and "random noise as large as the protection" in record[
        "verdict_rule"]
    assert [h["mimicry"] for h in record["headline"]] == ["img2img:0.25", "img2img:0.5"]
    assert all(h["decision"] in ("holds", "broken", "unclear") and h["images"] == 2 for h in record["headline"])
    assert all(0 <= s["floor_ssim"] <= 1 and 0 <= s["control_ssim"] <= 1 for s in record["scores"])
    assert all(s["holds"] == (s["ssim"] < min(s["floor_ssim"], s["control_ssim"])) for s in record["scores"])
    assert "img2img strength 0.25, after the strongest purifier tried" in out
    rows = list(csv.DictReader((report / "results.csv").open()))
    assert len(rows) == 2 * 3 * 2  # images x (none, jpeg:75, resize:0.5) x strengths
    assert {row["purification"] for row in rows} == {"none", "jpeg:75", "resize:0.5"}
    assert len(record["worst_case"]) == 2 * 2
    page = (report / "index.html").read_text()
    assert "meaningless for protection" in page and "plots/strength.png" in page and "plots/jpeg.png" in page
    # Written for the artist: words, not field names; numbers without exponents (-13,020, not -1.302e+04).
    assert "Protection holds?" in page and "Likeness of the two mimicries" in page and "The answer" in page
    assert not __import__("re").search(r"\b(rmse_levels|latent_mse|target_mse_\w+|loss_clean)\b|\de[+-]\d", page)
    for source in __import__("re").findall(r"src='([^']+)'", page):
        assert (report / source).is_file(), source
    # The same report in Chinese, each page linking to the other, its pictures the same files.
    chinese = (report / "index.zh.html").read_text()
    assert "href='index.zh.html'" in page and "href='index.html'" in chinese and "<html lang='zh'>" in chinese
    assert "结论" in chinese and "图生图 强度 0.25，经过所试的最强净化" in chinese and "JPEG 压缩 q75" in chinese
    assert "此模型为随机权重" in chinese and "保护有效？" in chinese and "Protection holds?" not in chinese
    assert __import__("re").findall(r"src='([^']+)'", chinese) == __import__("re").findall(r"src='([^']+)'", page)
    assert not list(report.rglob("*.tmp")) and not (report / ".unfinished").exists()


def test_cli_refuses_an_unknown_purification_in_one_line(tmp_path, originals, protected, capsys):
    code = cli.main(["evaluate", str(originals), str(protected), "-o", str(tmp_path / "r"), "--model",
                     "tiny-random", "--purify", "jpeg:75,sharpen"])
    err = capsys.readouterr().err
    assert code == cli.EXIT_USAGE and err.count("\n") == 1
    assert "--purify: unknown purification 'sharpen'" in err and not (tmp_path / "r").exists()


def test_an_unreadable_protected_image_is_named_in_one_line(tmp_path, originals, capsys):
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "art0.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    code = cli.main(["evaluate", str(originals), str(broken), "-o", str(tmp_path / "r"), "--model", "tiny-random"])
    err = capsys.readouterr().err
    assert code == cli.EXIT_USAGE and err.count("\n") == 1 and str(broken / "art0.png") in err


def test_no_matching_pair_is_an_error_naming_the_folders(tmp_path, originals):
    other = tmp_path / "other"
    other.mkdir()
    _painting(5).save(other / "unrelated.png")
    with pytest.raises(ValueError, match="none of its images matches") as caught:
        mist.evaluate(originals, other, model="tiny-random", **FAST)
    assert str(other) in str(caught.value) and str(originals) in str(caught.value)


@pytest.mark.parametrize(("option", "value", "message"), [
    ("--strengths", "0.3,x", "--strengths: not a comma list"), ("--strengths", "0,0.5", "--strengths: each must"),
    ("--steps", "0", "--steps: must be 1 to 999"),
    ("--steps", "1000", "--steps: must be 1 to 999"), ("--ssim-threshold", "2", "--ssim-threshold: must be"),
    ("--lora-steps", "0", "--lora-steps, --lora-rank: must be at least 1"), ("--lora-lr", "-1", "--lora-lr: must be"),
])
def test_bad_options_are_named(tmp_path, originals, capsys, option, value, message):
    code = cli.main(["evaluate", str(originals), str(originals), "-o", str(tmp_path / "r"), option, value])
    assert code == cli.EXIT_USAGE and message in capsys.readouterr().err


# ------------------------------------------------------------------------------------------------ purifications


def test_purifications_parse_with_defaults_and_refuse_bad_values():
    names = [p.name for p in parse_purifications("jpeg,resize:0.25,adverse,impress,jpeg:75")]
    assert names == ["jpeg:75", "resize:0.25", "adverse:64", "impress:100"]
    for text, fragment in (("jpeg:0", "between 1 and 100"), ("blur:x", "must be a number"),
                           ("impress:0", "between 1 and 10000"), ("nothing", "unknown purification")):
        with pytest.raises(ValueError, match=fragment):
            parse_purifications(text)


def test_each_purification_keeps_the_size_and_changes_the_image(evaluation_model):
    picture = _painting(1)
    context = Context(evaluation_model, seed=0)
    for purification in parse_purifications("jpeg:50,resize:0.5,jpeg-resize:75,blur:1.5,noise:8,crop:0.8,adverse:8,"
                                            "sdedit:0.3,vae,vae:2,impress:5"):
        out = purification(picture, context)
        assert out.size == picture.size and out.mode == "RGB", purification.name
        assert not np.array_equal(np.asarray(out), np.asarray(picture)), purification.name
    noise = parse_purifications("noise:8")[0]
    assert np.array_equal(np.asarray(noise(picture, context)), np.asarray(noise(picture, context)))


def test_the_vae_round_trip_is_the_decoded_posterior_mean(evaluation_model):
    """`vae` projects the image onto what the loaded VAE can make: encoded (posterior mean, nothing drawn), decoded,
    as often as its value says; the same image gives the same result."""
    from mist.common import images as image_io

    picture = _painting(1).resize((40, 32))
    once, twice = parse_purifications("vae,vae:2")
    assert (once.label, twice.label) == ("VAE round trip x1", "VAE round trip x2")
    context = Context(evaluation_model, seed=0)
    x = image_io.image_to_tensor(picture, (40, 32))
    with torch.no_grad():
        mean, _ = evaluation_model.posterior(x)
        expected = image_io.tensor_to_image(evaluation_model.decode(mean * evaluation_model.arch.latent_scale)
                                            .clamp(-1, 1))
    assert np.array_equal(np.asarray(once(picture, context)), np.asarray(expected))
    assert np.array_equal(np.asarray(once(picture, context)), np.asarray(once(picture, Context(evaluation_model, 5))))
    assert not np.array_equal(np.asarray(twice(picture, context)), np.asarray(expected))


def test_impress_makes_the_image_more_consistent_with_the_vae_and_keeps_it_alike(evaluation_model):
    """IMPRESS lowers the VAE round trip's error of the image within its similarity bound, and a cancel stops it at
    its next step."""
    import threading

    from mist.common import images as image_io
    from mist.engine.attack import Cancelled
    from mist.runner.evaluation.metrics import ssim

    def round_trip_error(picture):
        x = image_io.image_to_tensor(picture, picture.size)
        with torch.no_grad():
            mean, _ = evaluation_model.posterior(x)
            return (x - evaluation_model.decode(mean * evaluation_model.arch.latent_scale)).pow(2).mean().item()

    picture = _painting(2).resize((32, 32))
    (purification,) = parse_purifications("impress:40")
    assert purification.label == "IMPRESS (40 steps)"
    purified = purification(picture, Context(evaluation_model, seed=0))
    assert round_trip_error(purified) < round_trip_error(picture)
    alike = ssim(image_io.image_to_tensor(purified, (32, 32)), image_io.image_to_tensor(picture, (32, 32))).item()
    assert alike > 0.8
    cancel = threading.Event()
    cancel.set()
    with pytest.raises(Cancelled):
        purification(picture, Context(evaluation_model, seed=0, cancel=cancel))


def test_weights_that_are_absent_skip_with_a_reason(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    impress, upscale = parse_purifications("impress,upscale")
    assert impress.problem() is None  # it runs: with 1 - SSIM in place of LPIPS, which the report says
    assert "x4 upscaler" in upscale.problem() and str(tmp_path / "hub") in upscale.problem()


def test_guided_filter_keeps_an_image_that_guides_itself_and_flattens_a_constant_guide():
    rng = np.random.default_rng(0)
    picture = rng.uniform(0, 255, (24, 24, 3))
    np.testing.assert_allclose(guided_filter(picture, picture, 2, 1e-6), picture, atol=1e-2)
    flat = guided_filter(np.full((24, 24, 3), 100.0), picture, 2, 16)  # no edges to keep: a box smoothing
    assert flat.std() < picture.std() / 3


# ------------------------------------------------------------------------------------------------------ metrics


def test_perturbation_sizes_are_in_levels():
    clean = torch.zeros(1, 3, 8, 8)
    shifted = clean.clone()
    shifted[0, 0, 0, 0] = 4 / 127.5  # one channel of one pixel up by 4 levels
    assert metrics.linf_levels(clean, shifted).item() == pytest.approx(4)
    assert metrics.l2_levels(clean, shifted).item() == pytest.approx(4)
    assert metrics.psnr(clean, clean).item() == float("inf") and metrics.ssim(clean, clean).item() == pytest.approx(1)
    assert metrics.psnr(clean, shifted).item() == pytest.approx(10 * np.log10(192 / (4 / 255) ** 2), rel=1e-4)


def test_model_cache_loads_the_decoder_once_and_refuses_a_given_model_without_it(tiny_model):
    cache = ModelCache("tiny-random")
    parts = frozenset({"encoder", "unet", "text_encoder", "decoder"})
    first = cache.model(parts)
    assert first.decoder is not None and cache.model(parts) is first and cache.loads == 1
    with pytest.raises(ValueError, match="without its decoder"):
        ModelCache(tiny_model).model(parts)


def test_an_interrupted_evaluation_resumes_without_redoing_its_finished_units(tmp_path, originals, protected,
                                                                              evaluation_model, monkeypatch):
    """Stopped after its third unit (as Ctrl-C or kill -9 would stop it), the same evaluation started again reads
    those units back instead of computing them, and its scores are those of a run never stopped."""
    from mist.runner.evaluation.mimicry import Img2ImgMimicry

    report = tmp_path / "report"
    seen = []

    def stop_after_three(news):
        seen.append(news.doing)
        if len(seen) == 3:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        mist.evaluate(originals, protected, report, model=evaluation_model, progress=stop_after_three, **FAST)
    kept = list((report / ".unfinished").iterdir())
    # The target's reference, then the noise floor and the random control (which made the clean mimicry on the way)
    assert len(kept) == 4 and not (report / "results.json").exists()

    generated = []
    real_generate = Img2ImgMimicry.generate
    monkeypatch.setattr(Img2ImgMimicry, "generate",
                        lambda self, pictures, seed: generated.append(1) or real_generate(self, pictures, seed))
    resumed = mist.evaluate(originals, protected, report, model=evaluation_model, **FAST)
    assert resumed.finished.reused == 4
    # 2 purifications x (clean, protected) + the reference, the floor and the control, less the 4 kept before
    assert len(generated) == 2 * 2 + 3 - 4
    assert not (report / ".unfinished").exists() and (report / "results.json").is_file()
    monkeypatch.setattr(Img2ImgMimicry, "generate", real_generate)
    fresh = mist.evaluate(originals, protected, model=evaluation_model, **FAST)
    assert [(s.image, s.purification, s.ssim, s.latent_mse, s.loss_protected) for s in resumed.scores] == \
        [(s.image, s.purification, s.ssim, s.latent_mse, s.loss_protected) for s in fresh.scores]


def test_a_damaged_unit_is_computed_again(tmp_path, originals, protected, evaluation_model):
    report = tmp_path / "report"
    with pytest.raises(KeyboardInterrupt):
        mist.evaluate(originals, protected, report, model=evaluation_model, **FAST,
                      progress=lambda news: (_ for _ in ()).throw(KeyboardInterrupt))
    [unit] = (report / ".unfinished").iterdir()
    unit.write_bytes(b"not a tensor file")  # a disk that lost its last write, say
    result = mist.evaluate(originals, protected, report, model=evaluation_model, **FAST)
    assert result.finished.reused == 0 and len(result.scores) == 2 * 2


def test_the_default_purifications_all_run_here_but_upscaling_without_its_weights(tmp_path, monkeypatch):
    """The default list holds no purification that cannot run in this release (IMPRESS and the x4 upscaler were in
    it, and were always reported as skipped); noisy upscaling is skipped only where the upscaler is not found."""
    from mist.runner.evaluation.purify import DEFAULT_PURIFY

    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    assert [p.name for p in parse_purifications(DEFAULT_PURIFY) if p.problem()] == ["upscale:0.05"]


def test_a_report_folder_that_is_a_file_is_refused_in_one_line(tmp_path, originals, protected, capsys):
    taken = tmp_path / "report.txt"
    taken.write_text("the user's notes")
    code = cli.main(["evaluate", str(originals), str(protected), "-o", str(taken), "--model", "tiny-random", "-q"])
    err = capsys.readouterr().err
    assert code == cli.EXIT_USAGE and "Traceback" not in err
    assert f"{taken}: cannot hold outputs: it exists and is not a folder" in err.strip().splitlines()[-1]
    assert taken.read_text() == "the user's notes"


def _score(image: str, purification: str, ssim: float, floor: float, control: float = 1.0):
    from mist.runner.evaluation.scores import References, Score

    references = References(floor, control)
    return Score(image, purification, "img2img:0.5", 0.5, 1.0, ssim, 0.0, None, None, None, None, 0.0, 0.0,
                 references.holds(ssim, None), floor, control)


def test_the_verdict_is_judged_against_the_references_measured_in_the_run():
    """Holds only below both the seed-to-seed floor and the random control (and a fixed bound only when given); the
    headline takes each image's worst purifier and decides on the bootstrap interval of the mean effect."""
    from mist.runner.evaluation.scores import References, headlines, verdict

    assert References(0.7, 0.9).holds(0.6, None) and not References(0.7, 0.9).holds(0.75, None)
    assert not References(0.7, 0.5).holds(0.6, None)  # random noise of its size changes the mimicry more
    assert not References(0.7, 0.9).holds(0.6, 0.5) and References(None, None).holds(0.99, None)
    held = [_score(f"i{n}", p, ssim, 0.8) for n in range(6) for p, ssim in (("none", 0.5), ("jpeg:75", 0.6 + n / 100))]
    (h,) = headlines(held)
    assert (h.worst, h.decision, h.held, h.images) == ("jpeg:75", "holds", 6, 6)
    assert h.low <= h.effect <= h.high and h.low > 0 and abs(h.effect - (0.8 - 0.625)) < 1e-9
    broken = [_score(f"i{n}", "none", 0.9 + n / 100, 0.8) for n in range(6)]
    assert headlines(broken)[0].decision == "broken"
    mixed = [_score(f"i{n}", "none", 0.8 + (0.1 if n % 2 else -0.1), 0.8) for n in range(6)]
    assert headlines(mixed)[0].decision == "unclear"
    assert headlines(held) == headlines(held)  # the interval's resampling is seeded
    line = verdict([held[0], held[1]], {"jpeg:75": "JPEG q75"}, identical=False)
    assert line.startswith("protection survived") and "JPEG q75" in line and "seed-to-seed 0.80" in line
    line = verdict([held[0], held[1]], {"jpeg:75": "JPEG 压缩 q75"}, identical=False, lang="zh")
    assert line.startswith("保护经受住了") and "JPEG 压缩 q75" in line and "换随机种子 0.80" in line
    assert verdict(broken[:2], {}, identical=False, lang="zh").startswith("保护被 none，")


def test_the_random_control_spends_the_protections_budget_in_random_signs():
    from mist.runner.evaluation.run import random_signs

    x = torch.rand(1, 3, 16, 16, generator=torch.Generator().manual_seed(0)) * 2 - 1
    x = torch.round((x + 1) * 127.5) / 127.5 - 1  # an 8-bit image
    noisy = random_signs(x, 8, seed=3)
    levels = torch.round((noisy - x) * 127.5).abs()
    inside = (torch.round((x + 1) * 127.5) >= 8) & (torch.round((x + 1) * 127.5) <= 247)
    assert levels.max() == 8 and bool((levels[inside] == 8).all())  # clipped only at 0 and 255
    assert torch.equal(noisy, random_signs(x, 8, seed=3)) and not torch.equal(noisy, random_signs(x, 8, seed=4))
