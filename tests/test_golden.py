"""The fp32 engine's numbers against golden files saved from the release (tests/golden/make_golden.py).

A failure here means the arithmetic changed. If the change is deliberate, regenerate the files with
`python tests/golden/make_golden.py` and explain the change in the commit; otherwise it is a regression.
Each value is recomputed with 1 and with 2 CPU threads: machines differ in how many they use. Losses are compared to
1e-6 relative, the gradient as a whole to 1e-5 relative (L2): on this project's machine the float32 results are
identical for 1 and 2 threads, but other CPUs pick other kernels (with the release's channels-last layout the thread
count alone moved the gradient by 5.4e-6). The PGD step and the pixels, which only see the gradient's signs, must
match exactly.
"""

from __future__ import annotations

import io
import json
import struct

import numpy as np
import pytest
import torch
from PIL import Image, features

from golden import make_golden as golden

RTOL = 1e-6
GRADIENT_RTOL = 1e-5


@pytest.fixture(scope="module", params=[1, 2], ids=["1-thread", "2-threads"])
def computed(request, tmp_path_factory):
    before = torch.get_num_threads()
    torch.set_num_threads(request.param)
    try:
        return golden.compute(tmp_path_factory.mktemp(f"golden-{request.param}"))
    finally:
        torch.set_num_threads(before)


@pytest.fixture(scope="module")
def saved():
    with np.load(golden.ARRAYS) as arrays:
        values = {name: arrays[name] for name in arrays.files}
    return {**json.loads(golden.JSON.read_text(encoding="utf-8")), **values, "png": golden.PNG.read_bytes()}


def test_losses(computed, saved):
    for name, value in saved["losses"].items():
        assert computed["losses"][name] == pytest.approx(value, rel=RTOL, abs=0), name


def test_gradient(computed, saved):
    assert computed["gradient"].shape == saved["gradient"].shape
    error = np.linalg.norm(computed["gradient"] - saved["gradient"]) / np.linalg.norm(saved["gradient"])
    assert error <= GRADIENT_RTOL


def test_one_pgd_step(computed, saved):
    # Any flipped gradient sign moves a pixel by two steps (about 0.016); rounding alone stays far below the tolerance.
    np.testing.assert_allclose(computed["pgd_step"], saved["pgd_step"], rtol=0, atol=1e-6)


def test_saved_png_pixels(computed, saved):
    mine, theirs = Image.open(io.BytesIO(computed["png"])), Image.open(io.BytesIO(saved["png"]))
    assert (mine.mode, mine.size) == (theirs.mode, theirs.size)
    assert mine.tobytes() == theirs.tobytes()


def test_saved_png_bytes(computed, saved):
    """The file itself, chunk by chunk, except its text chunks (settings and version, not arithmetic; other tests
    check them). The compressed pixel stream depends on the zlib that Pillow is built with."""
    if features.version("zlib") != saved["made_with"]["pillow_zlib"]:
        pytest.skip(f"Pillow's zlib is {features.version('zlib')}, the golden PNG was compressed with "
                    f"{saved['made_with']['pillow_zlib']}; the pixels are compared in test_saved_png_pixels")
    assert _binary_chunks(computed["png"]) == _binary_chunks(saved["png"])


def _binary_chunks(png: bytes) -> list[tuple[bytes, bytes]]:
    """(type, data + CRC) of every chunk of a PNG file but tEXt, zTXt and iTXt."""
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    chunks, offset = [], 8
    while offset < len(png):
        (length,) = struct.unpack(">I", png[offset : offset + 4])
        kind = png[offset + 4 : offset + 8]
        if kind not in (b"tEXt", b"zTXt", b"iTXt"):
            chunks.append((kind, png[offset + 8 : offset + 12 + length]))
        offset += 12 + length
    return chunks


def test_every_setting_writes_the_release_pixels(tmp_path, saved):
    """Other modes, fast mode, tiles with a mask, another target and prompt, the original size: each run of
    `mist protect` writes exactly the pixels the release wrote."""
    computed = golden.compute_variants(tmp_path)
    assert computed == {name: variant["pixels_sha256"] for name, variant in saved["variants"].items()}
