"""Image files and pixel tensors: everything Mist does with pixels, no model code.

Conventions used throughout:

* Pixel tensors are NCHW ``float32`` with values in [-1, 1] (the Stable
  Diffusion convention: ``value = uint8 / 127.5 - 1``).
* Sizes are ``(width, height)`` in pixels, as PIL uses them; tensor shapes
  are ``(N, C, height, width)``.
* 8-bit RGB ``PIL.Image.Image`` objects appear only at the edges (reading
  and writing files).
* Every problem with an input file is reported as a one-line
  ``ValueError("<path>: <what is wrong>")`` so a batch run can tell the user
  which file to fix.
"""

from __future__ import annotations

import contextlib
import io
import os
import re
import stat
import warnings
from collections.abc import Iterator

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError
from PIL.PngImagePlugin import PngInfo

from mist.common import files

__all__ = [
    "IMAGE_SUFFIXES",
    "encode_png",
    "image_to_tensor",
    "probe_image",
    "processed_size",
    "read_image",
    "read_mask",
    "read_png_text",
    "resize_tensor",
    "split_tiles",
    "stitch_tiles",
    "tensor_to_image",
    "write_png_atomic",
]

IMAGE_SUFFIXES: frozenset[str] = frozenset(
    {".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff", ".gif"}
)
"""Lower-case file suffixes treated as images when scanning a folder."""

_EXIF_ORIENTATION_TAG = 0x0112
# Orientations 5-8 rotate by 90 degrees, so width and height trade places.
_SWAPPING_ORIENTATIONS = frozenset({5, 6, 7, 8})


# --------------------------------------------------------------------------
# Reading


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return text or type(exc).__name__


def _check_regular_file(path: str | os.PathLike[str]) -> None:
    name = os.fspath(path)
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise ValueError(f"{name}: file not found") from None
    except OSError as exc:
        raise ValueError(f"{name}: cannot access file ({exc.strerror or _one_line(exc)})") from exc
    if stat.S_ISDIR(st.st_mode):
        raise ValueError(f"{name}: is a directory, not an image file")
    if not stat.S_ISREG(st.st_mode):
        raise ValueError(f"{name}: is not a regular file")
    if st.st_size == 0:
        raise ValueError(f"{name}: file is empty (0 bytes)")


def _too_large(name: str, size: tuple[int, int] | None, limit: int) -> ValueError:
    if size is None:
        return ValueError(
            f"{name}: image is too large (more than {2 * limit} pixels, limit {limit})"
        )
    return ValueError(f"{name}: image is too large ({size[0]} x {size[1]} pixels, limit {limit})")


def _unchecked_header_size(path: str | os.PathLike[str]) -> tuple[int, int] | None:
    """Header (width, height) of an image Pillow refused as a decompression bomb.

    Pillow raises before handing out the image object, so the dimensions for
    the error message are recovered by running Pillow's format identifiers
    ourselves.  Only headers are parsed (nothing is decoded), which is exactly
    what Pillow had already done before refusing.  Returns None if that fails.
    """
    try:
        Image.init()
        with open(path, "rb") as fp:
            prefix = fp.read(16)
            for fmt in Image.ID:
                factory, accept = Image.OPEN[fmt]
                if accept is not None and not accept(prefix):
                    continue
                fp.seek(0)
                try:
                    im = factory(fp, os.fspath(path))
                except Exception:
                    continue
                return im.size
    except Exception:
        return None
    return None


@contextlib.contextmanager
def _open_checked(path: str | os.PathLike[str]) -> Iterator[Image.Image]:
    """Open an image lazily (header only) after every check that needs no decoding."""
    name = os.fspath(path)
    _check_regular_file(path)
    limit = Image.MAX_IMAGE_PIXELS
    try:
        # Pillow only warns between 1x and 2x its limit; the size check below
        # turns that band into an error too, so the warning would be noise.
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            img = Image.open(path)
    except Image.DecompressionBombError as exc:
        raise _too_large(name, _unchecked_header_size(path), int(limit or 0)) from exc
    except UnidentifiedImageError as exc:
        raise ValueError(f"{name}: not an image file (or a format Pillow cannot read)") from exc
    except FileNotFoundError:
        raise ValueError(f"{name}: file not found") from None
    except PermissionError as exc:
        reason = exc.strerror or "permission denied"
        raise ValueError(f"{name}: cannot read file ({reason})") from exc
    except MemoryError:
        raise
    except Exception as exc:
        # Plugins raise OSError, SyntaxError, struct.error, ... for bad headers.
        detail = _one_line(exc)
        raise ValueError(f"{name}: image header is truncated or corrupt ({detail})") from exc
    with img:
        width, height = img.size
        if width <= 0 or height <= 0:
            raise ValueError(f"{name}: image has zero size ({width} x {height} pixels)")
        if limit is not None and width * height > limit:
            raise _too_large(name, (width, height), limit)
        yield img


def _exif_orientation(img: Image.Image) -> int:
    """EXIF orientation 1-8 of an opened image; 1 when absent or unreadable.

    A broken EXIF block should not make an otherwise fine picture unusable,
    so any failure reading it means "no rotation".
    """
    try:
        # Image.getexif reads only what the header already parsed; the PNG
        # override would decode the whole image to look for a trailing eXIf.
        value = Image.Image.getexif(img).get(_EXIF_ORIENTATION_TAG, 1)
        orientation = int(value)
    except Exception:
        return 1
    return orientation if 1 <= orientation <= 8 else 1


def _scale_to_uint8(values: np.ndarray, full_scale: float) -> np.ndarray:
    scaled = np.rint(values.astype(np.float64) * (255.0 / full_scale))
    return np.clip(scaled, 0, 255).astype(np.uint8)


def _stretch_to_uint8(values: np.ndarray) -> np.ndarray:
    lo, hi = float(values.min()), float(values.max())
    if hi <= lo:
        return np.zeros(values.shape, dtype=np.uint8)
    return _scale_to_uint8(values.astype(np.float64) - lo, hi - lo)


def _high_bit_depth_gray_to_l(img: Image.Image) -> Image.Image:
    """Map a 16/32-bit integer or float grayscale image to 8-bit "L".

    Pillow's own conversion clips (anything above 255 becomes white), which
    would wipe out 16-bit images, so the range is scaled here instead:

    * ``I;16*`` and ``I`` with values in 0..65535: 16-bit, ``v / 257``.
    * ``I`` outside that range: stretched from its minimum to its maximum.
    * ``F`` with values in [0, 1]: multiplied by 255; in [0, 255]: used as
      is; anything else: stretched from minimum to maximum.  Non-finite
      values become 0.
    """
    values = np.asarray(img)
    if img.mode == "F":
        values = np.nan_to_num(values.astype(np.float64), nan=0.0, posinf=0.0, neginf=0.0)
        lo, hi = float(values.min()), float(values.max())
        if lo >= 0.0 and hi <= 1.0:
            out = _scale_to_uint8(values, 1.0)
        elif lo >= 0.0 and hi <= 255.0:
            out = _scale_to_uint8(values, 255.0)
        else:
            out = _stretch_to_uint8(values)
    else:
        lo, hi = int(values.min()), int(values.max())
        if lo >= 0 and hi <= 65535:
            out = _scale_to_uint8(values, 65535.0)
        else:
            out = _stretch_to_uint8(values)
    return Image.fromarray(np.ascontiguousarray(out), mode="L")


def _to_rgb(img: Image.Image) -> Image.Image:
    """Convert any decoded image to a new, file-independent 8-bit RGB image.

    Alpha is dropped, not composited: Mist v1.2 kept the first three
    channels, so transparent pixels keep whatever colour they store.
    Raises ValueError (without a file name) for a mode that has no RGB
    conversion.
    """
    mode = img.mode
    if mode == "RGB":
        return img.copy()
    if mode == "I" or mode.startswith("I;16") or mode == "F":
        return _high_bit_depth_gray_to_l(img).convert("RGB")
    if mode == "PA":
        return img.convert("RGBA").convert("RGB")
    # RGBA/RGBX/LA -> RGB keeps the colour bands and discards alpha; L, 1,
    # P, CMYK and YCbCr are converted by Pillow (P through its palette).
    try:
        return img.convert("RGB")
    except ValueError as exc:
        raise ValueError(f"unsupported colour mode {mode!r}") from exc


def read_image(path: str | os.PathLike[str]) -> Image.Image:
    """Read an image file fully and return it as a new 8-bit RGB image.

    The file is never modified.  The EXIF orientation is applied, so the
    result is upright as viewers show it.  Animated images give their first
    frame.  Grayscale, palette, CMYK and YCbCr images are converted to RGB;
    16-bit and float grayscale are scaled to 0..255 (not clipped); 16-bit
    per channel colour images are reduced to 8 bits as Pillow opens them.

    Alpha is dropped, NOT composited onto white: like Mist v1.2, which took
    the first three channels, fully transparent pixels keep the RGB values
    stored in them.

    Raises:
        ValueError: ``"<path>: <problem>"`` when the file is missing, not a
            regular file, empty, not an image, has zero size, is over
            ``PIL.Image.MAX_IMAGE_PIXELS`` pixels, or its data is truncated
            or corrupt.
    """
    name = os.fspath(path)
    with _open_checked(path) as img:
        try:
            # A full decode here, so truncated files fail now rather than
            # hand back a partly grey picture.
            img.load()
            orientation = _exif_orientation(img)
            upright = ImageOps.exif_transpose(img) if orientation != 1 else img
        except MemoryError:
            raise
        except Image.DecompressionBombError as exc:
            # Formats whose real size is only known once decoded (ICO, ...).
            raise _too_large(name, None, int(Image.MAX_IMAGE_PIXELS or 0)) from exc
        except Exception as exc:
            detail = _one_line(exc)
            raise ValueError(f"{name}: image data is truncated or corrupt ({detail})") from exc
        try:
            return _to_rgb(upright)
        except ValueError as exc:
            raise ValueError(f"{name}: {_one_line(exc)}") from exc


def probe_image(path: str | os.PathLike[str]) -> tuple[int, int]:
    """(width, height) in pixels of an image file as ``read_image`` returns it.

    Only the header is read (no pixel decoding), so a whole batch can be
    validated before any model is loaded.  The EXIF orientation is taken
    into account (orientations 5-8 swap width and height).  Raises the same
    ``ValueError`` as ``read_image`` for missing, empty, non-image, zero-size
    and oversized files; truncated pixel data is only found by
    ``read_image``.
    """
    with _open_checked(path) as img:
        width, height = img.size
        if _exif_orientation(img) in _SWAPPING_ORIENTATIONS:
            return height, width
        return width, height


def read_mask(path: str | os.PathLike[str], size: tuple[int, int]) -> torch.Tensor:
    """Read a mask file (errors name it) and binarise it at ``size`` as `mask_to_tensor` does."""
    return mask_to_tensor(read_image(path), size)


def mask_to_tensor(mask: Image.Image, size: tuple[int, int]) -> torch.Tensor:
    """A mask image as a (1, 1, H, W) float32 tensor of 0.0 and 1.0; ``size`` is (width, height) in pixels.

    The mask is resized bicubic to ``size`` and binarised as Mist v1.2 does: a pixel is protected (1.0) exactly where
    the red channel of the RGB mask is 255, else 0.0.
    """
    width, height = _check_size(size)
    mask = mask.convert("RGB")
    if mask.size != (width, height):
        mask = mask.resize((width, height), resample=Image.Resampling.BICUBIC)
    red = np.asarray(mask)[:, :, 0]
    protected = (red == 255).astype(np.float32)
    return torch.from_numpy(protected)[None, None]


# --------------------------------------------------------------------------
# Geometry and tensors


def _check_size(size: tuple[int, int]) -> tuple[int, int]:
    try:
        width, height = (int(v) for v in size)
    except (TypeError, ValueError):
        raise ValueError(f"size must be (width, height), got {size!r}") from None
    if width <= 0 or height <= 0:
        raise ValueError(f"size must be positive, got {width} x {height}")
    return width, height


def processed_size(
    width: int,
    height: int,
    input_size: int,
    block_num: int = 1,
    keep_aspect: bool = False,
    side_multiple: int = 8,
) -> tuple[int, int]:
    """(width, height) in pixels at which Mist processes a width x height image.

    By default every image is resized to ``input_size`` x ``input_size``.
    With ``keep_aspect`` (Mist v1.2's "no-resize" mode) the shorter side is
    scaled to ``input_size`` and both sides are then rounded down to a
    multiple of ``side_multiple * block_num`` (8 for the VAE's downsampling,
    16 where an SD 3.x or Flux transformer cuts the latent into 2 x 2
    patches; times the number of tiles per side).  The scaling is done in exact integer
    arithmetic, ``side * input_size // min(width, height)``, where v1.2
    divided floats and could lose a pixel to rounding.

    Raises:
        ValueError: for non-positive arguments, or when a side comes out as
            0 (``input_size`` is smaller than one ``8 * block_num`` block).
    """
    for label, value in (("width", width), ("height", height), ("input_size", input_size)):
        if value <= 0:
            raise ValueError(f"{label} must be positive, got {value}")
    if block_num < 1:
        raise ValueError(f"block_num must be at least 1, got {block_num}")
    if not keep_aspect:
        return input_size, input_size

    unit = side_multiple * block_num
    shorter = min(width, height)
    out_w = width * input_size // shorter // unit * unit
    out_h = height * input_size // shorter // unit * unit
    if out_w == 0 or out_h == 0:
        raise ValueError(
            f"a {width} x {height} image scaled to input size {input_size} gives "
            f"{out_w} x {out_h} pixels: a side is smaller than one {unit}-pixel block "
            f"({side_multiple} x block_num {block_num})"
        )
    return out_w, out_h


def image_to_tensor(img: Image.Image, size: tuple[int, int]) -> torch.Tensor:
    """Resize ``img`` bicubic to ``size`` = (width, height) in pixels and return
    a (1, 3, height, width) float32 tensor with values ``uint8 / 127.5 - 1``,
    i.e. in [-1, 1].  No resampling happens when the image already has that
    size.  Non-RGB images are converted like ``read_image`` does.
    """
    width, height = _check_size(size)
    if img.mode != "RGB":
        img = _to_rgb(img)
    if img.size != (width, height):
        img = img.resize((width, height), resample=Image.Resampling.BICUBIC)
    pixels = np.asarray(img, dtype=np.float32)
    values = pixels / np.float32(127.5) - np.float32(1.0)
    return torch.from_numpy(np.ascontiguousarray(values.transpose(2, 0, 1)))[None]


def resize_tensor(x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Resample an (N, C, H, W) float tensor bicubic to ``size`` = (width, height) in pixels.

    Shrinking is antialiased (the kernel widens with the scale, as Pillow's
    BICUBIC does), so no detail aliases into the result.  Values are not
    clipped: bicubic can overshoot the input's range slightly.  The tensor
    comes back unchanged when it already has that size.
    """
    width, height = _check_size(size)
    if x.dim() != 4:
        raise ValueError(f"expected an (N, C, H, W) tensor, got shape {tuple(x.shape)}")
    if tuple(x.shape[-2:]) == (height, width):
        return x
    return torch.nn.functional.interpolate(
        x, size=(height, width), mode="bicubic", align_corners=False, antialias=True
    )


def tensor_to_image(x: torch.Tensor) -> Image.Image:
    """Convert a (1, 3, H, W) (or (3, H, W)) tensor in [-1, 1] to 8-bit RGB.

    Computes ``(x + 1) / 2 * 255``, clamps to [0, 255] and rounds to the
    nearest integer.  Mist v1.2 truncated instead; rounding guarantees that
    a perturbation of at most epsilon/255 per pixel (2 * epsilon / 255 in
    tensor units) stays within epsilon levels in the saved 8-bit image,
    where truncation could add one more level.

    Raises:
        ValueError: for another shape, or NaN values.
    """
    if x.dim() == 4:
        if x.shape[0] != 1:
            raise ValueError(f"expected a batch of one image, got shape {tuple(x.shape)}")
        x = x[0]
    if x.dim() != 3 or x.shape[0] != 3:
        raise ValueError(f"expected a (1, 3, H, W) tensor, got shape {tuple(x.shape)}")
    x = x.detach().to(device="cpu", dtype=torch.float32)
    if torch.isnan(x).any():
        raise ValueError("image tensor contains NaN values")
    levels = ((x + 1.0) / 2.0 * 255.0).clamp(0.0, 255.0).round().to(torch.uint8)
    return Image.fromarray(levels.permute(1, 2, 0).contiguous().numpy(), mode="RGB")


def split_tiles(x: torch.Tensor, blocks: int) -> list[torch.Tensor]:
    """Split an (N, C, H, W) tensor into ``blocks`` x ``blocks`` equal tiles.

    Tiles are listed row-major: tile ``i * blocks + j`` covers tile-row ``i``
    and tile-column ``j``.  Each tile is an independent (contiguous) tensor
    that still carries autograd history.  H and W must be divisible by
    ``blocks``; ``stitch_tiles`` is the exact inverse.
    """
    if x.dim() != 4:
        raise ValueError(f"expected an (N, C, H, W) tensor, got shape {tuple(x.shape)}")
    if blocks < 1:
        raise ValueError(f"blocks must be at least 1, got {blocks}")
    height, width = x.shape[-2:]
    if height % blocks or width % blocks:
        raise ValueError(
            f"a {width} x {height} image cannot be split into {blocks} x {blocks} equal tiles"
        )
    th, tw = height // blocks, width // blocks
    return [
        x[:, :, i * th : (i + 1) * th, j * tw : (j + 1) * tw].contiguous()
        for i in range(blocks)
        for j in range(blocks)
    ]


def stitch_tiles(tiles: list[torch.Tensor], blocks: int) -> torch.Tensor:
    """Reassemble the row-major tiles of ``split_tiles`` into one (N, C, H, W) tensor."""
    if blocks < 1:
        raise ValueError(f"blocks must be at least 1, got {blocks}")
    if len(tiles) != blocks * blocks:
        raise ValueError(
            f"expected {blocks * blocks} tiles for {blocks} x {blocks}, got {len(tiles)}"
        )
    shape = tiles[0].shape
    if len(shape) != 4 or any(t.shape != shape for t in tiles):
        raise ValueError("tiles must all be (N, C, H, W) tensors of the same shape")
    rows = [torch.cat(tiles[i * blocks : (i + 1) * blocks], dim=3) for i in range(blocks)]
    return torch.cat(rows, dim=2)


# --------------------------------------------------------------------------
# Writing and output metadata


def _png_info(text: dict[str, str], name: str) -> PngInfo:
    info = PngInfo()
    for key, value in text.items():
        # PNG keywords are 1-79 Latin-1 characters without leading, trailing
        # or doubled spaces; NUL is the chunk's field separator.
        if (
            not isinstance(key, str)
            or not 1 <= len(key) <= 79
            or key != key.strip()
            or "  " in key
            or not re.fullmatch(r"[\x20-\x7e\xa1-\xff]+", key)
        ):
            raise ValueError(f"{name}: invalid PNG text key {key!r}")
        if not isinstance(value, str) or "\x00" in value:
            raise ValueError(f"{name}: invalid PNG text value for key {key!r}")
        if value.isascii():
            info.add_text(key, value)
        else:
            # tEXt is Latin-1 only; iTXt carries UTF-8 and is read back as such.
            info.add_itxt(key, value)
    return info


def encode_png(img: Image.Image, text: dict[str, str], name: str = "PNG") -> bytes:
    """``img`` encoded as a PNG file with ``text`` as tEXt chunks (iTXt for non-Latin-1 values).

    Raises:
        ValueError: ``"<name>: ..."`` for a key PNG does not allow (1-79
            printable Latin-1 characters, no leading, trailing or doubled
            spaces) or a value that is not a string or contains NUL.
    """
    info = _png_info(text, name)
    buffer = io.BytesIO()
    img.save(buffer, format="PNG", pnginfo=info)
    return buffer.getvalue()


def write_png_atomic(
    img: Image.Image, path: str | os.PathLike[str], text: dict[str, str]
) -> None:
    """Write ``img`` as a PNG at ``path`` with ``text`` as tEXt/iTXt chunks.

    Atomic, through ``mist.common.files.write_atomic``: a reader sees either the
    old file or the complete new one, never a partial PNG; on failure an
    existing file is left untouched and no temporary file stays behind.
    Parent directories are created.
    """
    files.write_atomic(path, encode_png(img, text, os.fspath(path)))


def read_png_text(path: str | os.PathLike[str]) -> dict[str, str] | None:
    """The text chunks (tEXt, zTXt, iTXt) of a PNG file as a plain dict.

    The whole image is decoded, so a truncated file counts as unreadable.
    Returns None when the file is missing, not a PNG, or cannot be read,
    which callers take as "this output is not complete".
    """
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(path, formats=["PNG"]) as img:
                img.load()
                return {str(k): str(v) for k, v in img.text.items()}
    except MemoryError:
        raise
    except Exception:
        return None
