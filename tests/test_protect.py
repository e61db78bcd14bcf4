"""The pipeline on the tiny model: budget in the saved 8-bit image, mask, determinism, tiles, sizes, prompts."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from mist.common import images
from mist.engine import pipeline
from mist.engine.config import ProtectConfig
from mist.engine.methods.common import mist_target
from mist.engine.pipeline import Protector


def _protect(model, picture, mask=None, **settings):
    settings = {"steps": 3, "input_size": 64, **settings}
    return Protector(model, ProtectConfig.of(**settings)).protect(picture, mask)


def _pixels(picture: Image.Image) -> np.ndarray:
    return np.asarray(picture).astype(np.int16)


def test_budget_holds_in_the_saved_png(tiny_model, painting, tmp_path):
    result = _protect(tiny_model, painting, epsilon=4, steps=6)
    path = tmp_path / "out.png"
    images.write_png_atomic(result.image, path, {"k": "v"})
    saved = _pixels(Image.open(path))
    original = _pixels(painting.resize((64, 64), Image.Resampling.BICUBIC))
    assert saved.shape == (64, 64, 3)
    assert np.abs(saved - original).max() == 4  # reached, never exceeded


def test_pixels_outside_the_mask_never_change(tiny_model, painting):
    mask = np.zeros((96, 96, 3), np.uint8)
    mask[:, :40] = 255
    result = _protect(tiny_model, painting, Image.fromarray(mask))
    out, original = _pixels(result.image), _pixels(painting.resize((64, 64), Image.Resampling.BICUBIC))
    protected = images.mask_to_tensor(Image.fromarray(mask), (64, 64))[0, 0].numpy().astype(bool)
    assert np.array_equal(out[~protected], original[~protected])
    assert np.abs(out[protected] - original[protected]).max() > 0


def test_same_seed_same_bytes_other_seed_other_bytes(tiny_model, painting):
    first = _protect(tiny_model, painting, seed=5).image.tobytes()
    assert _protect(tiny_model, painting, seed=5).image.tobytes() == first
    assert _protect(tiny_model, painting, seed=6).image.tobytes() != first


def test_textural_distance_to_the_target_falls(tiny_model, painting):
    result = _protect(tiny_model, painting, mode="textural", steps=15, epsilon=16)
    assert result.end["textural"] < result.start["textural"]
    assert set(result.start) == {"objective", "textural"}


@pytest.mark.parametrize("mode", ["semantic", "fused"])
def test_semantic_and_fused_report_their_losses(tiny_model, painting, mode):
    """The reported losses are the ones the first and the last step measured."""
    steps = []
    result = Protector(tiny_model, ProtectConfig.of(steps=3, input_size=64, mode=mode)).protect(painting,
                                                                                             callback=steps.append)
    assert [s.step for s in steps] == [1, 2, 3]
    assert result.start["semantic"] == steps[0].terms["semantic"] > 0
    assert result.end["semantic"] == steps[-1].terms["semantic"] > 0
    assert result.start["objective"] == steps[0].objective and result.end["objective"] == steps[-1].objective
    assert ("textural" in result.start) == (mode == "fused")
    if mode == "fused":
        assert result.start["textural"] == steps[0].terms["textural"]
        assert result.end["textural"] == steps[-1].terms["textural"]


def _seed_of_tile_only(seed: int, digest: str, tile: int, stream: str = "attack") -> int:
    """Tile k of a run with seed s draws what tile 0 of a run with seed s + k draws."""
    return 2 * (seed + tile) + (stream == "target")


def test_tiles_are_protected_separately_and_stitched_in_place(tiny_model, painting, tmp_path, monkeypatch):
    """A 2 x 2 block run equals four single-tile runs, each on its own tile with its tile of the target (with tile
    seeds made to depend on the seed and tile only, so the single-tile runs can be given tile k's streams)."""
    monkeypatch.setattr(pipeline, "tile_seed", _seed_of_tile_only)
    size, half = 64, 32
    full_target = mist_target().resize((size, size), Image.Resampling.BICUBIC)
    full_target.save(tmp_path / "target.png")
    resized = painting.resize((size, size), Image.Resampling.BICUBIC)
    blocks = _protect(tiny_model, resized, block_num=2, target=tmp_path / "target.png", seed=11)
    stitched = _pixels(blocks.image)
    for tile in range(4):
        row, col = divmod(tile, 2)
        box = (col * half, row * half, col * half + half, row * half + half)
        full_target.crop(box).save(tmp_path / f"target{tile}.png")
        alone = _protect(tiny_model, resized.crop(box), input_size=half, target=tmp_path / f"target{tile}.png",
                         seed=11 + tile)
        assert np.array_equal(stitched[box[1]:box[3], box[0]:box[2]], _pixels(alone.image)), tile


def test_no_resize_keeps_the_aspect_ratio(tiny_model, painting):
    wide = painting.resize((100, 60))
    result = _protect(tiny_model, wide, keep_aspect=True, block_num=2)
    # shorter side 60 -> 64; longer side 100 * 64 / 60 = 106.7 -> floored to a multiple of 16
    assert result.size == (96, 64) and result.image.size == (96, 64)


def test_object_prompt_conditions_on_a_photo(tiny_model):
    style = Protector(tiny_model, ProtectConfig(input_size=64))
    thing = Protector(tiny_model, ProtectConfig.of(input_size=64, object_prompt=True))
    assert (style.method.text.states == tiny_model.text_embedding("a painting")).all()
    assert (thing.method.text.states == tiny_model.text_embedding("a photo")).all()


def test_custom_target_changes_the_result(tiny_model, painting, tmp_path):
    Image.new("RGB", (64, 64), (255, 0, 0)).save(tmp_path / "red.png")
    default = _protect(tiny_model, painting, mode="textural")
    custom = _protect(tiny_model, painting, mode="textural", target=tmp_path / "red.png")
    assert default.image.tobytes() != custom.image.tobytes()


def test_progress_counts_steps_across_tiles(tiny_model, painting):
    seen = []
    Protector(tiny_model, ProtectConfig(steps=2, input_size=64, block_num=2)).protect(painting, None, seen.append)
    assert [(p.step, p.batch) for p in seen] == [(1, 0), (2, 0), (3, 1), (4, 1), (5, 2), (6, 2), (7, 3), (8, 3)]
    assert all(p.total == 8 and p.batches == 4 and p.images == (0,) for p in seen)


def test_python_api_takes_paths_and_images_and_reports_progress(tiny_model, painting, tmp_path):
    import mist

    painting.save(tmp_path / "a.png")
    seen = []
    results = mist.protect([tmp_path / "a.png", painting], model=tiny_model, steps=2, input_size=64, epsilon=8,
                           precision="fp32", callback=seen.append)
    assert len(results) == 2 and all(r.image.size == (64, 64) and r.random_weights for r in results)
    assert results[0].image.tobytes() == results[1].image.tobytes()  # same pixels, same seed, same result
    assert [p.step for p in seen] == [1, 2, 3, 4] and seen[0].images == (0,) and seen[-1].images == (1,)
    single = mist.protect(painting, mist.ProtectConfig(steps=1, input_size=64, precision="fp32"), model=tiny_model)
    assert len(single) == 1


def test_python_api_gives_the_test_model_named_by_name_its_ten_steps(painting, monkeypatch):
    import mist

    monkeypatch.delenv("MIST_MODEL", raising=False)
    seen = []
    mist.protect(painting, model="tiny-random", input_size=32, precision="fp32", callback=seen.append)
    assert seen[-1].total == 10
    seen.clear()
    mist.protect(painting, model="tiny-random", input_size=32, precision="fp32", steps=3, callback=seen.append)
    assert seen[-1].total == 3
