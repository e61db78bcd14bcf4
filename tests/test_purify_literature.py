"""Two purifiers of the robustness studies on tiny random models: noisy x4 upscaling (Hönig et al. 2024) through a tiny
SD x4 upscaler built here and saved as a diffusers folder, and GrIDPure's grid of SDEdit tiles (Zhao et al. 2024)."""

from __future__ import annotations

import json
import shutil
import threading
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import mist
from mist.engine.attack import Cancelled
from mist.faces import cli
from mist.models.loading import build_random
from mist.runner.evaluation.purify import (X4_UPSCALER_REPOSITORY, Context, grid_offsets, grid_purified, grid_tile,
                                           parse_purifications)

SNAPSHOT = "0123456789abcdef0123456789abcdef01234567"


def _painting(width: int, height: int, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width]
    rgb = np.stack([x * 5 + seed * 30, y * 4, (x + y) * 3], axis=-1) + rng.normal(0, 10, (height, width, 3))
    return Image.fromarray(np.clip(rgb, 0, 255).astype("uint8"))


def _same(a: Image.Image, b: Image.Image) -> bool:
    return np.array_equal(np.asarray(a), np.asarray(b))


@pytest.fixture(scope="module")
def upscaler(tmp_path_factory) -> Path:
    """A tiny random SD x4 upscaler of the real design (a UNet taking the 4 latent channels and the 3 of the noisy
    low-resolution image, told the noise level as a class label; a VAE with 3 levels: latents at the input's size,
    decoded 4x larger; a CLIP text encoder with SD's tokenizer), saved as a diffusers folder."""
    from diffusers import (AutoencoderKL, DDIMScheduler, DDPMScheduler, StableDiffusionUpscalePipeline,
                           UNet2DConditionModel)
    from transformers import CLIPTextConfig, CLIPTextModel

    from mist.models import TINY
    from mist.models.tokenizer import clip_tokenizer

    torch.manual_seed(0)
    unet = UNet2DConditionModel(sample_size=16, in_channels=7, out_channels=4, layers_per_block=1,
                                down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                                up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), block_out_channels=(32, 64),
                                cross_attention_dim=TINY.text["hidden_size"], attention_head_dim=8,
                                norm_num_groups=32, num_class_embeds=1000)
    vae = AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 3,
                        up_block_types=("UpDecoderBlock2D",) * 3, block_out_channels=(8, 16, 16),
                        layers_per_block=1, latent_channels=4, norm_num_groups=8, scaling_factor=0.08333)
    pipeline = StableDiffusionUpscalePipeline(
        vae=vae, text_encoder=CLIPTextModel(CLIPTextConfig(**TINY.text)), tokenizer=clip_tokenizer(), unet=unet,
        low_res_scheduler=DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.0001, beta_end=0.02),
        scheduler=DDIMScheduler(beta_schedule="scaled_linear", beta_start=0.0001, beta_end=0.02,
                                prediction_type="v_prediction", clip_sample=False, set_alpha_to_one=False),
        max_noise_level=350)
    folder = tmp_path_factory.mktemp("x4-upscaler")
    pipeline.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def model():
    return build_random(parts=frozenset({"encoder", "unet", "text_encoder", "decoder"}))


@pytest.fixture(autouse=True)
def few_upscaler_steps(monkeypatch):
    """3 upscaler steps instead of 20: what these tests check does not depend on their number."""
    import mist.runner.evaluation.purify as purify

    monkeypatch.setattr(purify, "UPSCALE_STEPS", 3)


@pytest.fixture()
def empty_cache(tmp_path, monkeypatch) -> Path:
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    return tmp_path / "hub"


# ----------------------------------------------------------------------------------------------- noisy upscaling


def test_noisy_upscaling_keeps_the_size_changes_the_image_and_repeats_with_its_seed(upscaler):
    picture = _painting(30, 22)
    (purification,) = parse_purifications("upscale")
    assert purification.name == "upscale:0.05" and purification.problem(upscaler) is None
    out = purification(picture, Context(None, seed=0, upscaler=upscaler))
    assert out.size == picture.size and out.mode == "RGB" and not _same(out, picture)
    assert _same(out, purification(picture, Context(None, seed=0, upscaler=upscaler)))
    assert not _same(out, purification(picture, Context(None, seed=1, upscaler=upscaler)))
    (noiseless,) = parse_purifications("upscale:0")
    assert not _same(out, noiseless(picture, Context(None, seed=0, upscaler=upscaler)))


def test_a_large_image_is_downsized_to_the_cap_before_it_is_upscaled(upscaler, monkeypatch):
    import mist.runner.evaluation.purify as purify

    monkeypatch.setattr(purify, "UPSCALE_MAX_SIDE", 16)
    (purification,) = parse_purifications("upscale")
    context = Context(None, seed=0, upscaler=upscaler)
    purification(_painting(16, 8), context)  # loads the upscaler into the context
    widths = []
    context.held["upscale"].unet.register_forward_hook(lambda module, args, out: widths.append(args[0].shape[-1]))
    out = purification(_painting(40, 24), context)
    assert out.size == (40, 24) and set(widths) == {16}  # the UNet works at the input's size: 40 x 24 became 16 wide


def test_the_upscaler_is_loaded_once_for_all_images_and_freed_on_release(upscaler, model, monkeypatch):
    from diffusers import StableDiffusionUpscalePipeline

    loads = []
    real = StableDiffusionUpscalePipeline.from_pretrained.__func__
    monkeypatch.setattr(StableDiffusionUpscalePipeline, "from_pretrained",
                        classmethod(lambda cls, *args, **kwargs: loads.append(args) or real(cls, *args, **kwargs)))
    (purification,) = parse_purifications("upscale:0.1")
    context = Context(model, seed=0, upscaler=upscaler)
    for seed in range(3):
        purification(_painting(16, 16, seed), context)
    assert len(loads) == 1 and context.held["upscale"].device == model.device
    context.release()
    assert context.held == {}
    purification(_painting(16, 16), context)
    assert len(loads) == 2


def test_noisy_upscaling_stops_at_the_upscalers_next_step_once_cancelled(upscaler):
    (purification,) = parse_purifications("upscale")
    context = Context(None, seed=0, upscaler=upscaler)
    purification(_painting(16, 16), context)  # loads the upscaler into the context
    cancel = threading.Event()
    steps = []
    context.held["upscale"].unet.register_forward_hook(lambda *_: steps.append(1) or cancel.set())
    with pytest.raises(Cancelled):
        purification(_painting(16, 16), replace(context, cancel=cancel))
    assert len(steps) == 1
    with pytest.raises(Cancelled):  # set before it starts: no step at all
        purification(_painting(16, 16), replace(context, cancel=cancel))
    assert len(steps) == 1


def test_the_upscaler_is_found_in_the_hugging_face_cache_by_its_refs_main(upscaler, empty_cache):
    repository = empty_cache / ("models--" + X4_UPSCALER_REPOSITORY.replace("/", "--"))
    shutil.copytree(upscaler, repository / "snapshots" / SNAPSHOT)
    (purification,) = parse_purifications("upscale")
    assert "not on this machine" in purification.problem()  # no refs/main: huggingface_hub would not find it either
    (repository / "refs").mkdir()
    (repository / "refs" / "main").write_text(SNAPSHOT)
    assert purification.problem() is None
    picture = _painting(20, 20)
    assert _same(purification(picture, Context(None, seed=0)),
                 purification(picture, Context(None, seed=0, upscaler=upscaler)))


def test_an_absent_upscaler_is_skipped_with_one_line_saying_where_to_put_it(tmp_path, empty_cache):
    (purification,) = parse_purifications("upscale")
    reason = purification.problem()
    assert "\n" not in reason and "--upscaler" in reason and str(empty_cache) in reason and "never downloads" in reason
    originals, protected = _pair_folders(tmp_path)
    result = mist.evaluate(originals, protected, model="tiny-random", purify="jpeg:75,upscale", strengths=(0.35,),
                           steps=2)
    assert [p.name for p in result.purifications] == ["none", "jpeg:75"]
    assert f"upscale:0.05: skipped: {reason}" in result.skipped


@pytest.mark.parametrize("make, message", [
    (lambda root: root / "nowhere", "no such folder"),
    (lambda root: (root / "empty").mkdir() or root / "empty", "no model_index.json in it"),
])
def test_a_bad_upscaler_folder_is_refused_in_one_line(tmp_path, capsys, make, message):
    originals, protected = _pair_folders(tmp_path)
    folder = make(tmp_path)
    code = cli.main(["evaluate", str(originals), str(protected), "-o", str(tmp_path / "report"), "--model",
                     "tiny-random", "--purify", "upscale", "--upscaler", str(folder)])
    err = capsys.readouterr().err
    assert code == cli.EXIT_USAGE and err.count("\n") == 1 and "Traceback" not in err
    assert f"--upscaler: {folder}: {message}" in err and not (tmp_path / "report").exists()


def test_the_http_service_takes_no_upscaler_path_from_its_clients(upscaler):
    from mist.faces.service.evaluations import parse_evaluation_settings
    from mist.faces.service.submit import SubmitError

    with pytest.raises(SubmitError, match="upscaler: a path on the server") as refused:
        parse_evaluation_settings({"upscaler": str(upscaler)})
    assert refused.value.status == 400


def test_mist_evaluate_runs_noisy_upscaling_with_the_upscaler_it_is_given(tmp_path, upscaler, empty_cache, capsys):
    originals, protected = _pair_folders(tmp_path)
    report = tmp_path / "report"
    code = cli.main(["evaluate", str(originals), str(protected), "-o", str(report), "--model", "tiny-random",
                     "--purify", "upscale:0.05", "--upscaler", str(upscaler), "--strengths", "0.35", "--steps", "2",
                     "-q"])
    assert code == 0, capsys.readouterr().err
    record = json.loads((report / "results.json").read_text())
    assert [p["name"] for p in record["purifications"]] == ["none", "upscale:0.05"]
    assert not any(line.startswith("upscale") for line in record["skipped"])
    assert {s["purification"] for s in record["scores"]} == {"none", "upscale:0.05"}


def _pair_folders(root: Path) -> tuple[Path, Path]:
    """Two originals and their "protected" versions (the same names, plus a little noise)."""
    originals, protected = root / "originals", root / "protected"
    originals.mkdir()
    protected.mkdir()
    for i in range(2):
        picture = _painting(32, 32, i)
        picture.save(originals / f"art{i}.png")
        noisy = np.asarray(picture, dtype=np.int16) + np.random.default_rng(i).integers(-4, 5, (32, 32, 3))
        Image.fromarray(np.clip(noisy, 0, 255).astype(np.uint8)).save(protected / f"art{i}.png")
    return originals, protected


# ------------------------------------------------------------------------------------------------------ GrIDPure


def test_a_512_image_is_cut_as_gridpure_cuts_it():
    assert grid_tile((512, 512)) == 256 and grid_offsets(512, 256) == [0, 128, 256]
    assert grid_tile((768, 512)) == 256 and grid_offsets(768, 256) == [0, 128, 256, 384, 512]
    assert grid_tile((100, 60)) == 24 and grid_offsets(60, 24) == [0, 12, 24, 36]
    assert grid_offsets(100, 24) == [0, 12, 24, 36, 48, 60, 72, 76]  # the last tile flush with the far side
    assert grid_tile((5, 9)) == 5 and grid_offsets(5, 5) == [0]


@pytest.mark.parametrize("size", [(512, 512), (100, 60), (37, 53), (8, 8), (5, 9), (1, 1)])
def test_the_tiles_and_the_corner_mosaic_cover_the_image_exactly(size):
    picture = _painting(*size)
    tiles = []

    def identity(tile: Image.Image, index: int) -> Image.Image:
        tiles.append((tile.size, index))
        return tile

    merged = grid_purified(picture, identity)
    np.testing.assert_array_equal(merged, np.asarray(picture, dtype=np.float64))
    tile = grid_tile(size)
    grid = len(grid_offsets(size[0], tile)) * len(grid_offsets(size[1], tile))
    corner = tile // 2
    assert [index for _, index in tiles] == list(range(grid + (1 if corner else 0)))
    assert {s for s, _ in tiles[:grid]} == {(tile, tile)}
    if corner:
        assert tiles[-1][0] == (2 * corner, 2 * corner)


def test_overlaps_are_averaged():
    """A purifier that gives each tile the value of its index: the merged value of a pixel is the mean of the indices
    of the tiles that hold it (the top-left pixel: tile 0 and the corner mosaic)."""
    picture = _painting(32, 32)
    merged = grid_purified(picture, lambda tile, index: Image.new("RGB", tile.size, (index,) * 3))
    # tile 16, offsets 0, 8, 16: 9 tiles, the mosaic is index 9
    assert merged[0, 0, 0] == pytest.approx((0 + 9) / 2)
    assert merged[12, 12, 0] == pytest.approx((0 + 1 + 3 + 4) / 4)
    assert merged[31, 31, 0] == pytest.approx((8 + 9) / 2)


def test_gridpure_runs_sdedit_on_each_tile_and_repeats_with_its_seed(model, monkeypatch):
    import mist.runner.evaluation.purify as purify

    picture = _painting(96, 64)  # tiles of 32: the tiny UNet needs latents of at least 4 x 4
    (purification,) = parse_purifications("gridpure")
    assert (purification.name, purification.label) == ("gridpure:0.1", "GrIDPure 0.1")
    seeds = []
    real_sdedit = purify.sdedit
    monkeypatch.setattr(purify, "sdedit", lambda tile, strength, context: seeds.append(context.seed)
                        or real_sdedit(tile, strength, context))
    out = purification(picture, Context(model, seed=3))
    assert out.size == picture.size and out.mode == "RGB" and not _same(out, picture)
    assert seeds == list(range(3, 3 + 5 * 3 + 1))  # 5 x 3 tiles and the corner mosaic, a seed each
    assert _same(out, purification(picture, Context(model, seed=3)))
    assert not _same(out, purification(picture, Context(model, seed=4)))
