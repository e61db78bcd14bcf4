from __future__ import annotations

import os
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from mist.common import images

from mist.common.images import (IMAGE_SUFFIXES, image_to_tensor, probe_image, processed_size, read_image, read_mask,
                                read_png_text, split_tiles, stitch_tiles, tensor_to_image, write_png_atomic)


def _noise(width: int, height: int, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8), "RGB")


def _save(img: Image.Image, path: Path, **kwargs: object) -> Path:
    img.save(path, **kwargs)
    return path


def _truncate(path: Path) -> Path:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    return path


def _expect_error(func, path: Path, *args: object) -> str:
    with pytest.raises(ValueError) as info:
        func(path, *args)
    message = str(info.value)
    assert path.name in message
    assert "\n" not in message
    return message


# --------------------------------------------------------------------------
# Bad inputs


def test_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "nope.png"
    assert "not found" in _expect_error(read_image, path)
    assert "not found" in _expect_error(probe_image, path)


def test_directory(tmp_path: Path) -> None:
    path = tmp_path / "folder.png"
    path.mkdir()
    assert "directory" in _expect_error(read_image, path)
    assert "directory" in _expect_error(probe_image, path)


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="needs mkfifo")
def test_fifo_is_not_opened(tmp_path: Path) -> None:
    path = tmp_path / "pipe.png"
    os.mkfifo(path)
    assert "regular file" in _expect_error(read_image, path)


def test_text_file_named_png(tmp_path: Path) -> None:
    path = tmp_path / "notes.png"
    path.write_text("these are not pixels\n")
    assert "not an image" in _expect_error(read_image, path)
    assert "not an image" in _expect_error(probe_image, path)


def test_empty_file(tmp_path: Path) -> None:
    path = tmp_path / "empty.jpg"
    path.write_bytes(b"")
    assert "empty" in _expect_error(read_image, path)
    assert "empty" in _expect_error(probe_image, path)


@pytest.mark.parametrize("suffix, fmt", [(".png", "PNG"), (".jpg", "JPEG")])
def test_truncated(tmp_path: Path, suffix: str, fmt: str) -> None:
    path = _truncate(_save(_noise(64, 64), tmp_path / f"cut{suffix}", format=fmt))
    assert "truncated or corrupt" in _expect_error(read_image, path)
    # The header survives, so the cheap probe cannot tell.
    assert probe_image(path) == (64, 64)


def test_truncated_header(tmp_path: Path) -> None:
    path = _save(_noise(64, 64), tmp_path / "stub.jpg")
    path.write_bytes(path.read_bytes()[:40])
    assert "truncated or corrupt" in _expect_error(read_image, path)
    assert "truncated or corrupt" in _expect_error(probe_image, path)


@pytest.mark.parametrize("limit", [10, 40])  # over 2x (Pillow errors) and 1x-2x (Pillow warns)
def test_decompression_bomb(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, limit: int) -> None:
    path = _save(_noise(8, 8), tmp_path / "bomb.png")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", limit)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for func in (read_image, probe_image):
            message = _expect_error(func, path)
            assert f"image is too large (8 x 8 pixels, limit {limit})" in message


def test_within_pixel_limit(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = _save(_noise(8, 8), tmp_path / "ok.png")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 64)
    assert read_image(path).size == (8, 8)


def test_mask_errors_name_mask_file(tmp_path: Path) -> None:
    path = tmp_path / "mask.png"
    _expect_error(read_mask, path, (8, 8))


# --------------------------------------------------------------------------
# Good inputs


def test_unicode_and_spaces_in_name(tmp_path: Path) -> None:
    img = _noise(12, 7)
    path = _save(img, tmp_path / "été peinture 01.png")
    assert probe_image(path) == (12, 7)
    out = read_image(str(path))
    assert out.mode == "RGB"
    assert np.array_equal(np.asarray(out), np.asarray(img))


def test_read_image_does_not_modify_file(tmp_path: Path) -> None:
    path = _save(Image.new("RGBA", (5, 5), (1, 2, 3, 4)), tmp_path / "keep.png")
    before = path.read_bytes()
    read_image(path)
    probe_image(path)
    assert path.read_bytes() == before


@pytest.mark.parametrize(
    "img, expected",
    [
        (Image.new("L", (3, 2), 77), (77, 77, 77)),
        (Image.new("1", (3, 2), 1), (255, 255, 255)),
        (Image.new("LA", (3, 2), (90, 0)), (90, 90, 90)),
    ],
    ids=["L", "1", "LA"],
)
def test_grayscale(tmp_path: Path, img: Image.Image, expected: tuple[int, int, int]) -> None:
    out = read_image(_save(img, tmp_path / "gray.png"))
    assert out.mode == "RGB" and out.size == (3, 2)
    assert out.getpixel((1, 1)) == expected


def test_rgba_alpha_dropped_not_composited(tmp_path: Path) -> None:
    rgba = np.zeros((2, 3, 4), dtype=np.uint8)
    rgba[..., :3] = np.arange(18, dtype=np.uint8).reshape(2, 3, 3) * 10
    rgba[..., 3] = [[0, 128, 255], [0, 1, 2]]
    path = _save(Image.fromarray(rgba, "RGBA"), tmp_path / "alpha.png")
    out = read_image(path)
    assert out.mode == "RGB"
    assert np.array_equal(np.asarray(out), rgba[..., :3])


def test_palette_with_transparency(tmp_path: Path) -> None:
    img = Image.new("P", (4, 4), 0)
    img.putpalette([10, 20, 30, 200, 100, 50] + [0] * (256 * 3 - 6))
    img.putpixel((1, 1), 1)
    path = _save(img, tmp_path / "pal.png", transparency=0)
    with Image.open(path) as check:
        assert check.mode == "P" and "transparency" in check.info
    out = read_image(path)
    assert out.mode == "RGB"
    assert out.getpixel((0, 0)) == (10, 20, 30)
    assert out.getpixel((1, 1)) == (200, 100, 50)


def test_16bit_grayscale_scaled(tmp_path: Path) -> None:
    values = np.array([[0, 32768, 65535]], dtype=np.uint16)
    path = _save(Image.fromarray(values), tmp_path / "deep.png")
    with Image.open(path) as check:
        assert check.mode.startswith("I")
    out = np.asarray(read_image(path))
    assert out.shape == (1, 3, 3)
    assert np.all(np.abs(out[0].astype(int) - [[0] * 3, [128] * 3, [255] * 3]) <= 1)


def test_32bit_int_grayscale_scaled(tmp_path: Path) -> None:
    values = np.array([[0, 32768, 65535]], dtype=np.uint16)
    path = _save(Image.fromarray(values).convert("I"), tmp_path / "int.tif")
    with Image.open(path) as check:
        assert check.mode == "I"
    out = np.asarray(read_image(path))[0, :, 0]
    assert np.all(np.abs(out.astype(int) - [0, 128, 255]) <= 1)


def test_float_grayscale_scaled(tmp_path: Path) -> None:
    values = np.array([[0.0, 0.5, 1.0]], dtype=np.float32)
    path = _save(Image.fromarray(values, "F"), tmp_path / "float.tif")
    out = np.asarray(read_image(path))[0, :, 0]
    assert np.all(np.abs(out.astype(int) - [0, 128, 255]) <= 1)


def test_cmyk_jpeg(tmp_path: Path) -> None:
    path = _save(Image.new("CMYK", (16, 16), (0, 255, 255, 0)), tmp_path / "print.jpg", quality=95)
    with Image.open(path) as check:
        assert check.mode == "CMYK"
    out = read_image(path)
    assert out.mode == "RGB"
    r, g, b = out.getpixel((8, 8))
    assert r > 230 and g < 30 and b < 30


def test_exif_rotated_jpeg(tmp_path: Path) -> None:
    img = Image.new("RGB", (40, 20), (255, 0, 0))
    img.paste((0, 0, 255), (20, 0, 40, 20))  # stored: left red, right blue
    exif = Image.Exif()
    exif[0x0112] = 6  # display rotated 90 degrees clockwise
    path = _save(img, tmp_path / "phone.jpg", exif=exif.tobytes(), quality=95)
    assert probe_image(path) == (20, 40)
    out = read_image(path)
    assert out.size == (20, 40)
    # Clockwise: the stored left half becomes the top half.
    top, bottom = out.getpixel((10, 5)), out.getpixel((10, 35))
    assert top[0] > 200 and top[2] < 60
    assert bottom[2] > 200 and bottom[0] < 60


def test_animated_gif_first_frame(tmp_path: Path) -> None:
    frames = [Image.new("RGB", (6, 6), (255, 0, 0)), Image.new("RGB", (6, 6), (0, 0, 255))]
    path = tmp_path / "anim.gif"
    frames[0].save(path, save_all=True, append_images=frames[1:], duration=50)
    assert read_image(path).getpixel((3, 3)) == (255, 0, 0)


def test_suffixes() -> None:
    assert {".png", ".jpg", ".jpeg", ".webp", ".tif", ".tiff", ".bmp", ".gif"} <= IMAGE_SUFFIXES
    assert all(s == s.lower() and s.startswith(".") for s in IMAGE_SUFFIXES)


# --------------------------------------------------------------------------
# Geometry


def test_processed_size_default() -> None:
    assert processed_size(1000, 1500, 512) == (512, 512)
    assert processed_size(30, 4000, 512, block_num=2) == (512, 512)


@pytest.mark.parametrize(
    "width, height, input_size, block_num, expected",
    [
        (1000, 1500, 512, 1, (512, 768)),
        (1000, 1500, 512, 2, (512, 768)),
        (1920, 1080, 512, 1, (904, 512)),  # 1920 * 512 / 1080 = 910.2
        (1920, 1080, 512, 2, (896, 512)),
        (600, 600, 512, 3, (504, 504)),
        (512, 512, 512, 1, (512, 512)),
    ],
)
def test_processed_size_keep_aspect(
    width: int, height: int, input_size: int, block_num: int, expected: tuple[int, int]
) -> None:
    got = processed_size(width, height, input_size, block_num=block_num, keep_aspect=True)
    assert got == expected
    assert all(side % (8 * block_num) == 0 for side in got)


def test_processed_size_too_small() -> None:
    with pytest.raises(ValueError, match="block"):
        processed_size(30, 4000, 12, block_num=2, keep_aspect=True)
    with pytest.raises(ValueError):
        processed_size(0, 10, 512, keep_aspect=True)


def test_split_stitch_round_trip() -> None:
    x = torch.randn(2, 3, 12, 18)
    tiles = split_tiles(x, 3)
    assert len(tiles) == 9 and all(t.shape == (2, 3, 4, 6) for t in tiles)
    assert torch.equal(stitch_tiles(tiles, 3), x)
    assert torch.equal(stitch_tiles(split_tiles(x, 1), 1), x)


def test_split_tiles_row_major() -> None:
    blocks = 3
    x = torch.empty(1, 1, 6, 9)
    for i in range(blocks):
        for j in range(blocks):
            x[:, :, i * 2 : (i + 1) * 2, j * 3 : (j + 1) * 3] = i * blocks + j
    for index, tile in enumerate(split_tiles(x, blocks)):
        assert torch.all(tile == index)


def test_split_tiles_indivisible() -> None:
    with pytest.raises(ValueError):
        split_tiles(torch.zeros(1, 3, 10, 12), 4)
    with pytest.raises(ValueError):
        stitch_tiles([torch.zeros(1, 3, 2, 2)] * 3, 2)


# --------------------------------------------------------------------------
# Tensors


def test_image_to_tensor_range_shape() -> None:
    img = Image.fromarray(np.array([[[0, 255, 51]] * 4] * 2, dtype=np.uint8), "RGB")  # 4 x 2
    x = image_to_tensor(img, (4, 2))
    assert x.shape == (1, 3, 2, 4) and x.dtype == torch.float32
    assert torch.allclose(x[0, :, 0, 0], torch.tensor([-1.0, 1.0, 51 / 127.5 - 1]))
    assert image_to_tensor(_noise(30, 20), (16, 8)).shape == (1, 3, 8, 16)


def test_tensor_to_image_rounds() -> None:
    levels = torch.tensor([100.6, 100.4, 0.5001, 254.6, -7.0, 300.0])
    x = (levels / 127.5 - 1).reshape(1, 1, 1, 6).expand(1, 3, 1, 6)
    out = np.asarray(tensor_to_image(x))[0, :, 0]
    assert out.tolist() == [101, 100, 1, 255, 0, 255]
    assert tensor_to_image(x).mode == "RGB"


def test_round_trip_exact() -> None:
    img = _noise(9, 5)
    back = tensor_to_image(image_to_tensor(img, (9, 5)))
    assert np.array_equal(np.asarray(back), np.asarray(img))


def test_linf_budget_preserved() -> None:
    u = _noise(32, 32, seed=3)
    x = image_to_tensor(u, (32, 32))
    eps = 16 / 255 * 2
    gen = torch.Generator().manual_seed(0)
    delta = (torch.rand(x.shape, generator=gen) * 2 - 1) * eps
    delta[..., :4, :] = eps
    delta[..., 4:8, :] = -eps
    out = np.asarray(tensor_to_image(x + delta)).astype(int)
    diff = np.abs(out - np.asarray(u).astype(int))
    # Pixels clamped at 0/255 move less; the others use the full budget.
    assert diff.max() == 16


def test_read_mask(tmp_path: Path) -> None:
    red = np.array([[255, 254, 0, 255], [128, 255, 255, 1]], dtype=np.uint8)
    rgb = np.stack([red, np.zeros_like(red), np.full_like(red, 255)], axis=-1)
    path = _save(Image.fromarray(rgb, "RGB"), tmp_path / "mask.png")
    mask = read_mask(path, (4, 2))
    assert mask.shape == (1, 1, 2, 4) and mask.dtype == torch.float32
    assert mask[0, 0].tolist() == [[1, 0, 0, 1], [0, 1, 1, 0]]

    white = _save(Image.new("L", (8, 8), 255), tmp_path / "white.png")
    resized = read_mask(white, (4, 6))
    assert resized.shape == (1, 1, 6, 4) and torch.all(resized == 1)


# --------------------------------------------------------------------------
# Writing


def _leftovers(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir() if p.name.endswith(".tmp"))


def test_write_png_atomic_round_trip(tmp_path: Path) -> None:
    img = _noise(10, 6)
    path = tmp_path / "out" / "nested" / "été 01.png"
    text = {"mist:version": "2.0", "mist:note": "été ✓ 日本語", "empty": ""}
    write_png_atomic(img, path, text)
    assert _leftovers(path.parent) == []
    got = read_png_text(path)
    assert got == text
    assert all(type(v) is str for v in got.values())
    data = path.read_bytes()
    assert b"tEXt" in data and b"iTXt" in data
    with Image.open(path) as check:
        assert np.array_equal(np.asarray(check), np.asarray(img))

    write_png_atomic(_noise(10, 6, seed=1), path, {"mist:version": "2.1"})
    assert read_png_text(path) == {"mist:version": "2.1"}
    assert _leftovers(path.parent) == []


def test_write_png_atomic_failure_keeps_old_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    img = _noise(4, 4)

    def broken_save(*args: object, **kwargs: object) -> None:
        fp = args[0]
        fp.write(b"\x89PNG partial")  # type: ignore[union-attr]
        raise OSError("disk full")

    monkeypatch.setattr(img, "save", broken_save)
    existing = tmp_path / "done.png"
    existing.write_bytes(b"old contents")
    with pytest.raises(OSError, match="disk full"):
        write_png_atomic(img, existing, {"k": "v"})
    assert existing.read_bytes() == b"old contents"

    fresh = tmp_path / "new.png"
    with pytest.raises(OSError):
        write_png_atomic(img, fresh, {"k": "v"})
    assert not fresh.exists()
    assert _leftovers(tmp_path) == []


def test_write_png_atomic_rejects_bad_key(tmp_path: Path) -> None:
    path = tmp_path / "bad.png"
    with pytest.raises(ValueError, match="bad.png"):
        write_png_atomic(_noise(2, 2), path, {"": "x"})
    assert not path.exists()


def test_read_png_text_none(tmp_path: Path) -> None:
    assert read_png_text(tmp_path / "missing.png") is None
    assert read_png_text(tmp_path) is None
    jpeg = _save(_noise(8, 8), tmp_path / "photo.png", format="JPEG")
    assert read_png_text(jpeg) is None
    text = tmp_path / "text.png"
    text.write_text("hello")
    assert read_png_text(text) is None
    partial = tmp_path / "partial.png"
    write_png_atomic(_noise(64, 64), partial, {"k": "v"})
    assert read_png_text(_truncate(partial)) is None


def test_module_exports() -> None:
    assert set(images.__all__) >= {
        "read_image",
        "probe_image",
        "processed_size",
        "image_to_tensor",
        "read_mask",
        "split_tiles",
        "stitch_tiles",
        "tensor_to_image",
        "write_png_atomic",
        "read_png_text",
        "IMAGE_SUFFIXES",
    }
