"""Checks every face runs before any model is loaded: is this input usable with these settings, can outputs be
written there. Each answer is one line naming the file or folder and the problem, or None when all is well."""

from __future__ import annotations

import secrets
from pathlib import Path
from typing import Callable

from PIL import Image

from mist.common import files, images
from mist.engine.config import ProtectConfig
from mist.models.families import LARGEST_SIDE_MULTIPLE

_PROBE_BYTES = 64 * 1024  # written and fsynced once per output folder: a full disk refuses it


def input_problem(path: Path, config: ProtectConfig,
                  side_multiple: Callable[[], tuple[int, str]] | None = None) -> str | None:
    """What makes the image file `path` unusable with `config`, found from its header alone; None if it is usable.

    Any image is accepted in resize mode (tiny ones are upscaled, as Mist v1.2 did). With `keep_aspect` the shorter
    side is scaled to `input_size`, so an extreme aspect ratio can ask for a processed image over Pillow's pixel limit
    (`PIL.Image.MAX_IMAGE_PIXELS`): that is refused. A mask of any size is resized to the processed size by the
    engine, so masks need no check here. `side_multiple` gives the multiple of pixels the model needs each side of a
    tile to be, and why (`ModelCache.side_multiple`); it is asked only when a side is not a multiple of the largest
    any family needs, so a model is told only then. Keeping the aspect ratio, the sides are rounded down to that
    multiple, as the engine does; resized to a square, a side that is not one is refused."""
    try:
        width, height = images.probe_image(path)
        size = config.processed_size(width, height)
        if config.aspect_kept and side_multiple is not None and not _whole_tiles(config, size, LARGEST_SIDE_MULTIPLE):
            size = config.processed_size(width, height, side_multiple()[0])
    except ValueError as exc:
        return str(exc)
    limit = Image.MAX_IMAGE_PIXELS
    if limit is not None and size[0] * size[1] > limit:
        return (f"{path}: keeping its aspect ratio, this {width} x {height} image would be processed at {size[0]} x "
                f"{size[1]} pixels, over the limit of {limit}; crop it or let it be resized to a square")
    return _side_problem(path, config, size, side_multiple) if side_multiple is not None else None


def _side_problem(path: Path, config: ProtectConfig, size: tuple[int, int],
                  side_multiple: Callable[[], tuple[int, str]]) -> str | None:
    """Why the model cannot take `path` processed at `size` (in `config.block_num` x `block_num` tiles), or None."""
    if _whole_tiles(config, size, LARGEST_SIDE_MULTIPLE):
        return None
    multiple, why = side_multiple()
    if _whole_tiles(config, size, multiple):
        return None
    tile = (size[0] // config.block_num, size[1] // config.block_num)
    tiles = f" in {config.block_num} x {config.block_num} tiles of {tile[0]} x {tile[1]}" if config.block_num > 1 \
        else ""
    return (f"{path}: processed at {size[0]} x {size[1]} pixels{tiles}, but this model needs sides that are multiples "
            f"of {multiple} pixels ({why}); choose an input size that is a multiple of {multiple * config.block_num}")


def _whole_tiles(config: ProtectConfig, size: tuple[int, int], multiple: int) -> bool:
    """Whether each side of a tile of an image processed at `size` is a multiple of `multiple` pixels."""
    return all(side // config.block_num % multiple == 0 for side in size)


def output_folder_problem(folder: Path) -> str | None:
    """Why outputs cannot be written into `folder` (created if missing), or None: a test file is written, fsynced and
    removed, so a path that is a file, a read-only or full file system, or a missing permission shows now."""
    probe = folder / f".mist-write-test.{secrets.token_hex(6)}"
    try:
        folder.mkdir(parents=True, exist_ok=True)
        files.write_atomic(probe, bytes(_PROBE_BYTES))
        probe.unlink()
    except FileExistsError:
        return f"{folder}: cannot hold outputs: it exists and is not a folder"
    except OSError as exc:
        return f"{folder}: cannot write outputs there ({exc.strerror or exc})"
    return None
