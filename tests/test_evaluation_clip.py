"""The metrics of `mist evaluate` that need weights or packages found locally: CLIP similarity and CMMD from a tiny
random CLIP vision tower saved to disk and loaded through the product's path, BRISQUE and NIQE on a real painting,
the skip lines when they are absent, and the command's JSON with them."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageFilter
from transformers import CLIPConfig, CLIPModel, CLIPVisionConfig, CLIPVisionModelWithProjection

from mist.faces import cli
from mist.runner.evaluation import clip, quality
from mist.runner.evaluation.run import _skipped
from mist.runner.evaluation.settings import EvaluationSettings

VISION = dict(hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4, patch_size=8,
              projection_dim=16)


@pytest.fixture(scope="module")
def tower_folder(tmp_path_factory) -> Path:
    """A tiny random CLIPVisionModelWithProjection for 32-pixel inputs, with a preprocessor_config.json saying so."""
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("clip")
    CLIPVisionModelWithProjection(CLIPVisionConfig(image_size=32, **VISION)).save_pretrained(folder)
    (folder / "preprocessor_config.json").write_text(json.dumps(
        {"size": {"shortest_edge": 32}, "crop_size": {"height": 32, "width": 32}, "image_mean": [0.5, 0.5, 0.5],
         "image_std": [0.25, 0.25, 0.25]}))
    return folder


@pytest.fixture(scope="module")
def whole_clip_folder(tmp_path_factory) -> Path:
    """A tiny random CLIPModel (text and vision towers, CLIP's vocabulary) for 32-pixel inputs: CLIP-IQA can run."""
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("clip-model")
    text = dict(hidden_size=32, intermediate_size=37, num_hidden_layers=1, num_attention_heads=4, vocab_size=49408,
                max_position_embeddings=77)
    vision = dict(image_size=32, **{k: v for k, v in VISION.items() if k != "projection_dim"})
    CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=16)).save_pretrained(folder)
    (folder / "preprocessor_config.json").write_text(json.dumps({"size": 32, "crop_size": 32}))
    return folder


def _pictures(seed: int, n: int = 3, size: int = 40) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return [torch.rand(1, 3, size, size + 8, generator=generator) * 2 - 1 for _ in range(n)]


def test_clip_similarity_of_identical_images_is_one_and_lower_for_others(tower_folder):
    tower = clip.ClipTower(tower_folder, torch.device("cpu"))
    assert tower.preprocess == clip.Preprocessing(32, (32, 32), (0.5,) * 3, (0.25,) * 3)
    a, b = tower.embed(_pictures(1)), tower.embed(_pictures(2))
    assert a.shape == (3, 16) and torch.allclose(a.norm(dim=1), torch.ones(3))
    assert clip.cosine(a, a) == pytest.approx([1.0] * 3, abs=1e-6)
    assert all(value < 0.999 for value in clip.cosine(a, b))


def test_the_sd_folders_safety_checker_is_found_and_embeds_with_clips_own_preprocessing(tmp_path):
    from diffusers.pipelines.stable_diffusion.safety_checker import StableDiffusionSafetyChecker

    torch.manual_seed(0)
    config = CLIPConfig(text_config=dict(hidden_size=32, intermediate_size=37, num_hidden_layers=1,
                                         num_attention_heads=4, vocab_size=99),
                        vision_config=dict(image_size=224, **{k: v for k, v in VISION.items() if k != "patch_size"},
                                           patch_size=32), projection_dim=16)
    StableDiffusionSafetyChecker(config).save_pretrained(tmp_path / "sd" / "safety_checker")
    folder, reason = clip.find_tower(None, tmp_path / "sd")
    assert folder == tmp_path / "sd" / "safety_checker" and reason is None
    tower = clip.ClipTower(folder, torch.device("cpu"))
    assert tower.preprocess == clip.Preprocessing()  # no preprocessor_config.json: 224 px, OpenAI's constants
    pictures = _pictures(3, n=2, size=64)
    embedded = tower.embed(pictures)
    direct = tower.model.visual_projection(tower.model.vision_model(tower.preprocess(pictures[0])).pooler_output)
    assert torch.allclose(embedded[0], torch.nn.functional.normalize(direct, dim=-1)[0], atol=1e-5)


def _numpy_cmmd(x: np.ndarray, y: np.ndarray, sigma: float = 10.0) -> float:
    n, total = len(x), 0.0
    k = lambda a, b: np.exp(-np.sum((a - b) ** 2) / (2 * sigma**2))  # noqa: E731
    for i in range(n):
        for j in range(n):
            if i != j:
                total += k(x[i], x[j]) + k(y[i], y[j]) - k(x[i], y[j]) - k(x[j], y[i])
    return 1000 * total / (n * (n - 1))


def test_cmmd_is_zero_for_a_set_with_itself_and_grows_with_a_shift():
    generator = torch.Generator().manual_seed(0)
    x = torch.nn.functional.normalize(torch.randn(6, 16, generator=generator), dim=-1)
    assert clip.cmmd(x, x) == 0
    direction = torch.nn.functional.normalize(torch.randn(16, generator=generator), dim=0)
    values = []
    for shift in (0.2, 0.5, 1.0):
        y = torch.nn.functional.normalize(x + shift * direction, dim=-1)
        values.append(clip.cmmd(x, y))
        assert values[-1] == pytest.approx(_numpy_cmmd(x.double().numpy(), y.double().numpy()), rel=1e-6)
    assert 0 < values[0] < values[1] < values[2]
    assert clip.cmmd(x[:1], x[:1]) is None


def test_a_missing_tower_is_skipped_with_what_to_give_and_a_bad_one_is_refused(tmp_path):
    folder, reason = clip.find_tower(None, "tiny-random")
    assert folder is None and "--clip PATH" in reason and "never downloads" in reason
    lines = _skipped([], None, reason, {"NIQE": "needs the scikit-video package: pip install x"}, None)
    assert any(line.startswith("CLIP similarity / CMMD: skipped: give a CLIP vision tower") for line in lines)
    assert "NIQE: skipped: needs the scikit-video package: pip install x" in lines
    assert any(line.startswith("FID: not computed") and "CMMD" in line for line in lines)
    with pytest.raises(ValueError, match="clip: .*not a folder"):
        EvaluationSettings(clip=str(tmp_path / "absent"))
    (tmp_path / "config.json").write_text(json.dumps({"architectures": ["UNet2DConditionModel"]}))
    with pytest.raises(ValueError, match="clip: .*UNet2DConditionModel.*not one of"):
        clip.find_tower(str(tmp_path), "tiny-random")


def test_an_http_client_cannot_name_a_clip_folder_on_the_server(tmp_path):
    from mist.faces.service.evaluations import parse_evaluation_settings
    from mist.faces.service.submit import SubmitError

    with pytest.raises(SubmitError, match="clip: a path on the server"):
        parse_evaluation_settings({"clip": str(tmp_path)})


def test_brisque_and_niqe_of_a_painting_are_finite_and_distortion_worsens_them(painting_full):
    rgb = np.asarray(painting_full)
    noisy = np.clip(rgb + np.random.default_rng(0).normal(0, 25, rgb.shape), 0, 255).astype("uint8")
    blurred = np.asarray(painting_full.filter(ImageFilter.GaussianBlur(3)))
    clean_b, clean_n = quality.brisque(rgb), quality.niqe(rgb)
    assert np.isfinite(clean_b) and np.isfinite(clean_n)
    assert quality.brisque(noisy) > clean_b + 10 and quality.brisque(blurred) > clean_b + 10
    assert quality.niqe(blurred) > clean_n + 2  # scikit-video's NIQE follows blur; noise moves it erratically
    assert quality.niqe(rgb[:128, :128]) is None and not hasattr(np, "int")  # too small; the shim taken back


def test_mean_quality_of_tensors_matches_the_images(painting_full):
    from mist.common.images import image_to_tensor

    x = image_to_tensor(painting_full, painting_full.size)
    means = quality.mean_quality([x, x], {})
    assert means["brisque"] == pytest.approx(quality.brisque(np.asarray(painting_full)), rel=1e-6)
    assert quality.mean_quality([x], {"BRISQUE": "absent"})["brisque"] is None


def test_cli_evaluate_with_a_clip_folder_records_the_new_fields(tmp_path, tower_folder, capsys):
    originals, protected = tmp_path / "originals", tmp_path / "protected"
    originals.mkdir()
    protected.mkdir()
    rng = np.random.default_rng(0)
    for i in range(2):
        image = rng.integers(0, 256, (48, 48, 3), dtype=np.uint8)
        Image.fromarray(image).save(originals / f"art{i}.png")
        Image.fromarray(np.clip(image.astype(int) + 8, 0, 255).astype(np.uint8)).save(protected / f"art{i}.png")
    report = tmp_path / "report"
    code = cli.main(["evaluate", str(originals), str(protected), "-o", str(report), "--model", "tiny-random",
                     "--purify", "jpeg:75", "--strengths", "0.35", "--steps", "2", "--clip", str(tower_folder), "-q"])
    assert code == 0, capsys.readouterr().err
    record = json.loads((report / "results.json").read_text())
    assert record["clip_tower"] == tower_folder.name and str(tower_folder) not in json.dumps(record)
    assert all(-1 <= s["clip_similarity"] <= 1 for s in record["scores"]) and len(record["scores"]) == 4
    assert [(s["purification"], s["mimicry"]) for s in record["sets"]] == [("none", "img2img:0.35"),
                                                                            ("jpeg:75", "img2img:0.35")]
    assert all(s["cmmd"] is not None and s["brisque_clean"] is not None and s["niqe_clean"] is None
               for s in record["sets"])  # 48-pixel outputs: too small for NIQE
    assert not any(line.startswith("CLIP similarity") for line in record["skipped"])
    assert any(line.startswith("CLIP-IQA: skipped:") and "vision tower alone" in line for line in record["skipped"])
    assert all(s["clip_iqa_clean"] is None for s in record["sets"])
    assert "clip_similarity" in (report / "results.csv").read_text().splitlines()[0]
    page = (report / "index.html").read_text()
    assert "CLIP likeness of the two mimicries" in page and "CMMD, clean vs protected" in page


def test_clip_iqa_is_the_softmax_of_the_good_and_bad_photo_prompts(whole_clip_folder, tower_folder):
    from mist.models.tokenizer import clip_tokenizer

    tower = clip.ClipTower(whole_clip_folder, torch.device("cpu"))
    pictures = _pictures(3)
    values = tower.quality(pictures)
    prompts = clip_tokenizer()(["Good photo.", "Bad photo."], padding=True, return_tensors="pt")
    with torch.no_grad():
        text = tower.model.get_text_features(input_ids=prompts.input_ids, attention_mask=prompts.attention_mask)
    text = getattr(text, "pooler_output", text)  # a tensor in transformers 4, an output object in 5
    anchors = torch.nn.functional.normalize(text, dim=-1)
    expected = (100 * tower.embed(pictures) @ anchors.T).softmax(-1)[:, 0]
    assert values == pytest.approx(expected.tolist(), abs=1e-6) and all(0 < v < 1 for v in values)
    assert tower.quality(pictures[:1]) == pytest.approx(values[:1], abs=1e-6)  # per image, whatever the batch
    assert clip.clip_iqa_problem(whole_clip_folder) is None
    assert "vision tower alone" in clip.clip_iqa_problem(tower_folder)
    assert "--clip PATH" in clip.clip_iqa_problem(None)


def test_cli_evaluate_with_a_whole_clip_model_records_clip_iqa(tmp_path, whole_clip_folder, capsys):
    originals, protected = tmp_path / "originals", tmp_path / "protected"
    originals.mkdir()
    protected.mkdir()
    image = np.random.default_rng(1).integers(0, 256, (32, 32, 3), dtype=np.uint8)
    for i in range(2):
        Image.fromarray(np.roll(image, 5 * i, axis=0)).save(originals / f"art{i}.png")
        Image.fromarray(np.roll(255 - image, 5 * i, axis=0)).save(protected / f"art{i}.png")
    report = tmp_path / "report"
    code = cli.main(["evaluate", str(originals), str(protected), "-o", str(report), "--model", "tiny-random",
                     "--purify", "", "--strengths", "0.5", "--steps", "2", "--clip", str(whole_clip_folder), "-q"])
    assert code == 0, capsys.readouterr().err
    record = json.loads((report / "results.json").read_text())
    (row,) = record["sets"]
    assert 0 < row["clip_iqa_clean"] < 1 and 0 < row["clip_iqa_protected"] < 1
    assert row["clip_iqa_clean"] != row["clip_iqa_protected"]
    assert not any(line.startswith("CLIP") for line in record["skipped"])
    assert "CLIP-IQA of clean mimicries" in (report / "index.html").read_text()
