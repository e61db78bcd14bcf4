"""The pipeline's seeding, mask and output geometry on the tiny model: per-image random streams, one owner of the
mask, and results at the input's own size."""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image

from mist.common import images
from mist.engine.config import ProtectConfig
from mist.engine.pipeline import Protector, pixel_digest, tile_seed


def _protector(model, **settings) -> Protector:
    return Protector(model, ProtectConfig.of(**{"steps": 2, "input_size": 32, "precision": "fp32", **settings}))


def _levels(picture: Image.Image) -> np.ndarray:
    return np.asarray(picture).astype(np.int16)


def _flat(level: int, size: tuple[int, int] = (32, 32)) -> Image.Image:
    return Image.new("RGB", size, (level, level, level))


# --------------------------------------------------------------------------- seeding


def test_different_images_start_from_unrelated_random_deltas(tiny_model):
    """With no step, the output is the image plus its random start: two images must not share it."""
    protector = _protector(tiny_model, steps=0, epsilon=8)
    dark, light = protector.protect_many([_flat(100), _flat(140)])
    delta_dark, delta_light = _levels(dark.image) - 100, _levels(light.image) - 140
    assert np.abs(delta_dark).max() == 8 and np.abs(delta_light).max() == 8  # no clipping at the range's ends
    correlation = np.corrcoef(delta_dark.ravel(), delta_light.ravel())[0, 1]
    assert abs(correlation) < 0.1, correlation


def test_an_image_gives_the_same_bytes_whatever_else_is_in_the_run(tiny_model, painting):
    protector = _protector(tiny_model)
    other = painting.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    alone = protector.protect(painting).image.tobytes()
    assert protector.protect_many([other, painting])[1].image.tobytes() == alone
    assert protector.protect_many([painting, other])[0].image.tobytes() == alone
    assert _protector(tiny_model, seed=24).protect(painting).image.tobytes() != alone


def test_every_face_gives_the_same_bytes_for_the_same_pixels(tiny_model, painting, tmp_path):
    """The streams follow the processed pixels: a file's name and the face that reads it do not matter."""
    import mist
    from mist.faces.cli import main

    painting.save(tmp_path / "one name.png")
    painting.save(tmp_path / "another.png")
    direct = _protector(tiny_model).protect(painting).image.tobytes()
    from_files = mist.protect([tmp_path / "one name.png", tmp_path / "another.png"], model=tiny_model, steps=2,
                              input_size=32, precision="fp32")
    assert [r.image.tobytes() for r in from_files] == [direct, direct]
    code = main(["protect", str(tmp_path / "another.png"), "-o", str(tmp_path / "out"), "--model", "tiny-random",
                 "--steps", "2", "--input-size", "32", "--precision", "fp32", "--device", "cpu"])
    assert code == 0
    assert Image.open(tmp_path / "out" / "another.png").convert("RGB").tobytes() == direct


def test_the_target_sample_is_drawn_per_image_from_its_own_stream(tiny_model, monkeypatch):
    seen: list[int] = []
    from mist.engine import objectives

    real = objectives.target_latent

    def spy(model, target, generators, precision="fp32"):
        seen.extend(g.initial_seed() for g in generators)
        return real(model, target, generators, precision)

    monkeypatch.setattr(objectives, "target_latent", spy)
    protector = _protector(tiny_model, steps=1, mode="textural")
    first, second = _flat(100), _flat(140)
    protector.protect_many([first, second])
    digests = [pixel_digest(images.image_to_tensor(p, (32, 32))) for p in (first, second)]
    assert seen == [tile_seed(23, digest, 0, "target") for digest in digests]
    assert len(set(seen)) == 2 and tile_seed(23, digests[0], 0) not in seen


def test_tile_seeds_depend_on_the_seed_the_pixels_the_tile_and_the_stream():
    base = tile_seed(23, "a" * 64, 0)
    variants = [tile_seed(24, "a" * 64, 0), tile_seed(23, "b" * 64, 0), tile_seed(23, "a" * 64, 1),
                tile_seed(23, "a" * 64, 0, "target")]
    assert len({base, *variants}) == 5
    assert all(0 <= s < 2**63 for s in (base, *variants)) and tile_seed(23, "a" * 64, 0) == base


def test_pixel_digest_sees_values_and_shape():
    x = torch.zeros(1, 3, 8, 16)
    assert pixel_digest(x) == pixel_digest(x.clone())
    assert pixel_digest(x) != pixel_digest(x.reshape(1, 3, 16, 8))
    y = x.clone()
    y[0, 0, 0, 0] = 2 / 255
    assert pixel_digest(x) != pixel_digest(y)


# --------------------------------------------------------------------------- mask


def _half_mask(size: tuple[int, int]) -> Image.Image:
    """White on the left 40% of the width, black elsewhere."""
    pixels = np.zeros((size[1], size[0], 3), np.uint8)
    pixels[:, : size[0] * 2 // 5] = 255
    return Image.fromarray(pixels)


def test_a_protector_applies_the_configs_mask_of_any_size(tiny_model, painting, tmp_path):
    _half_mask((50, 30)).save(tmp_path / "mask.png")  # neither the image's size nor the processed size
    result = _protector(tiny_model, mask=tmp_path / "mask.png").protect(painting)
    protected = images.read_mask(tmp_path / "mask.png", (32, 32))[0, 0].numpy().astype(bool)
    original = _levels(painting.resize((32, 32), Image.Resampling.BICUBIC))
    out = _levels(result.image)
    assert np.array_equal(out[~protected], original[~protected])
    assert np.abs(out[protected] - original[protected]).max() > 0


def test_a_mask_given_to_the_call_replaces_the_configs(tiny_model, painting, tmp_path):
    _half_mask((32, 32)).save(tmp_path / "mask.png")
    everywhere = Image.new("RGB", (7, 5), (255, 255, 255))
    with_config_mask = _protector(tiny_model, mask=tmp_path / "mask.png")
    without_mask = _protector(tiny_model)
    assert with_config_mask.protect(painting, everywhere).image.tobytes() == \
        without_mask.protect(painting).image.tobytes()


def test_tiles_the_mask_leaves_out_are_not_attacked(tiny_model, painting):
    """Block mode with a mask on the top-left quarter: one tile of four is attacked (a quarter of the steps), the
    rest come back as they went in, and the attacked tile is what a whole-image mask gives it."""
    quarter = np.zeros((64, 64, 3), np.uint8)
    quarter[:32, :32] = 255
    steps: list[int] = []
    protector = _protector(tiny_model, input_size=64, block_num=2)
    masked = protector.protect(painting, Image.fromarray(quarter), callback=lambda p: steps.append(p.total))
    whole = protector.protect(painting, Image.new("RGB", (64, 64), (255, 255, 255)))
    assert set(steps) == {2}  # one tile x 2 steps (four tiles: 8)
    original = _levels(painting.resize((64, 64), Image.Resampling.BICUBIC))
    out = _levels(masked.image)
    assert np.array_equal(out[:, 32:], original[:, 32:]) and np.array_equal(out[32:], original[32:])
    assert np.array_equal(out[:32, :32], _levels(whole.image)[:32, :32])
    assert np.abs(out[:32, :32] - original[:32, :32]).max() > 0


def test_an_empty_mask_leaves_the_image_as_it_is_without_an_attack(tiny_model, painting):
    steps: list[int] = []
    result = _protector(tiny_model).protect(painting, Image.new("RGB", (32, 32)), callback=steps.append)
    assert steps == []
    assert np.array_equal(_levels(result.image), _levels(painting.resize((32, 32), Image.Resampling.BICUBIC)))


def test_the_api_and_the_protector_read_the_configs_mask_alike(tiny_model, painting, tmp_path):
    import mist

    _half_mask((40, 96)).save(tmp_path / "mask.png")
    painting.save(tmp_path / "a.png")
    config = ProtectConfig(steps=2, input_size=32, precision="fp32", mask=tmp_path / "mask.png")
    [from_api] = mist.protect(tmp_path / "a.png", config, model=tiny_model)
    explicit = _protector(tiny_model).protect(painting, Image.open(tmp_path / "mask.png"))
    assert from_api.image.tobytes() == explicit.image.tobytes()


def test_protection_is_where_the_red_channel_is_255():
    """Mist v1.2's test (mist_utils.load_mask): after the bicubic resize, a pixel is protected iff red == 255."""
    colours = [(255, 0, 0), (255, 255, 255), (254, 255, 255), (0, 255, 255), (255, 0, 255), (128, 128, 128)]
    mask = Image.new("RGB", (len(colours), 1))
    mask.putdata(colours)
    assert images.mask_to_tensor(mask, mask.size)[0, 0, 0].tolist() == [1, 1, 0, 0, 1, 0]


# --------------------------------------------------------------------------- output at the input's own size


def _original_size_run(model, picture, mask=None, **settings):
    settings = {"epsilon": 6, "steps": 3, "original_size": True, **settings}
    return _protector(model, **settings).protect(picture, mask)


def test_original_size_returns_the_inputs_resolution_within_the_budget(tiny_model, painting):
    picture = painting.resize((100, 60), Image.Resampling.BICUBIC)
    result = _original_size_run(tiny_model, picture)
    assert result.image.size == (100, 60)
    assert result.size == (48, 32)  # the aspect is kept while protecting: 100 * 32 // 60 = 53, floored to 48
    change = np.abs(_levels(result.image) - _levels(picture))
    assert change.max() == 6  # the bound, reached and never exceeded, at the input's own size
    assert (change > 0).mean() > 0.5


def test_original_size_changes_nothing_outside_the_mask(tiny_model, painting):
    picture = painting.resize((90, 70), Image.Resampling.BICUBIC)
    mask = _half_mask((45, 35))
    result = _original_size_run(tiny_model, picture, mask)
    protected = images.mask_to_tensor(mask, picture.size)[0, 0].numpy().astype(bool)
    out, original = _levels(result.image), _levels(picture)
    assert np.array_equal(out[~protected], original[~protected])
    assert np.abs(out[protected] - original[protected]).max() == 6


def test_original_size_carries_the_processed_perturbation(tiny_model, painting):
    """Shrunk back to the processing size, the full-size perturbation is the one computed there."""
    picture = painting.resize((120, 80), Image.Resampling.BICUBIC)
    full = _original_size_run(tiny_model, picture)
    processed = _original_size_run(tiny_model, picture, original_size=False, keep_aspect=True)
    assert processed.image.size == full.size == (48, 32)
    x = images.image_to_tensor(picture, full.size)
    carried = images.resize_tensor(images.image_to_tensor(full.image, picture.size)
                                   - images.image_to_tensor(picture, picture.size), full.size)
    computed = images.image_to_tensor(processed.image, full.size) - x
    correlation = torch.corrcoef(torch.stack([carried.flatten(), computed.flatten()]))[0, 1]
    assert correlation > 0.9, correlation


def test_original_size_of_an_image_already_at_the_processing_size_is_the_plain_result(tiny_model, painting):
    picture = painting.resize((48, 32), Image.Resampling.BICUBIC)
    full = _original_size_run(tiny_model, picture)
    plain = _original_size_run(tiny_model, picture, original_size=False, keep_aspect=True)
    assert np.abs(_levels(full.image) - _levels(plain.image)).max() <= 1  # equal up to float rounding at .5


def test_resize_tensor_takes_width_and_height_and_keeps_constants():
    x = torch.linspace(-1, 1, 3 * 16 * 24).reshape(1, 3, 16, 24)
    assert images.resize_tensor(x, (24, 16)) is x
    assert images.resize_tensor(x, (12, 8)).shape == (1, 3, 8, 12)
    constant = images.resize_tensor(torch.full((1, 3, 5, 7), 0.25), (19, 11))
    assert torch.allclose(constant, torch.full_like(constant, 0.25))
