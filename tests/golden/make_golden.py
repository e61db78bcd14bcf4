"""Golden outputs of the float32 engine on the tiny random model, for tests/test_golden.py.

The regression test recomputes everything below and compares it with the files saved here, so that no change to the
engine's arithmetic goes unnoticed:

- `golden.json`: the textural and semantic losses and the fused objective of one evaluation, plus what the files were
  made with (versions, Pillow's zlib);
- `golden.npz`: the gradient d(objective)/d(image) of that evaluation and the image after one PGD step;
- `protected.png`: the file `mist protect --model tiny-random --precision fp32 --steps 2 --input-size 64` writes for
  `source_image()`, the default command-line path end to end;
- in `golden.json` also the SHA-256 of the pixels that command writes with each of `VARIANTS`' extra options (other
  modes, fast mode, tiles with a mask, another target and prompt, the original size), so that every setting of Mist
  v1.2 is held to its release's output, not only the default.

The source image is generated here (no file from outside the repository is read), the model is
`mist.models.loading.build_random()` and every random draw comes from fixed seeds.

Regenerate ONLY for a deliberate change of the numbers, and say in the commit message what changed and why:

    python tests/golden/make_golden.py
"""

from __future__ import annotations

import hashlib
import json
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch
from PIL import Image, features

HERE = Path(__file__).resolve().parent
JSON, ARRAYS, PNG = HERE / "golden.json", HERE / "golden.npz", HERE / "protected.png"
SIZE = 32  # side of the image the objective and the PGD step are evaluated on
CLI_ARGS = ["--model", "tiny-random", "--precision", "fp32", "--steps", "2", "--input-size", "64"]
# Extra options of the variant runs; MASK and TARGET stand for files made by `mask_image` and `target_image`.
VARIANTS: dict[str, list[str]] = {
    "textural": ["--mode", "textural"],
    "semantic": ["--mode", "semantic"],
    "fast": ["--fast"],
    "tiles-mask": ["--block-num", "2", "--mask", "MASK"],
    "target-object-weight": ["--target", "TARGET", "--object", "--fused-weight", "0"],
    "original-size": ["--original-size"],
}


def source_image() -> Image.Image:
    """A 48 x 40 RGB test card computed from integer formulas (identical on every machine)."""
    y, x = np.mgrid[0:40, 0:48]
    rgb = np.stack([(x * 5 + y * 3) % 256, (x * y) % 256, ((x - 24) ** 2 + (y - 20) ** 2) % 256], axis=-1)
    return Image.fromarray(rgb.astype(np.uint8))


def mask_image() -> Image.Image:
    """A 48 x 40 mask: pure white (protect) on a diagonal band, black elsewhere."""
    y, x = np.mgrid[0:40, 0:48]
    return Image.fromarray(np.where(abs(x - y) < 12, 255, 0).astype(np.uint8)).convert("RGB")


def target_image() -> Image.Image:
    """A 30 x 30 checkerboard target pattern."""
    y, x = np.mgrid[0:30, 0:30]
    return Image.fromarray(np.where((x // 5 + y // 5) % 2, 230, 20).astype(np.uint8)).convert("RGB")


def pixel_sha256(png: Path) -> str:
    """SHA-256 of a PNG's mode, size and decoded pixels (not of its compressed stream or text)."""
    with Image.open(png) as picture:
        return hashlib.sha256(f"{picture.mode} {picture.size}".encode() + picture.tobytes()).hexdigest()


def run_cli(workdir: Path, name: str, extra: list[str]) -> Path:
    """`mist protect source.png` into workdir/name with CLI_ARGS and `extra`; the output file."""
    from mist.faces import cli

    source = workdir / "source.png"
    if not source.exists():
        source_image().save(source)
        mask_image().save(workdir / "mask.png")
        target_image().save(workdir / "target.png")
    files = {"MASK": str(workdir / "mask.png"), "TARGET": str(workdir / "target.png")}
    extra = [files.get(arg, arg) for arg in extra]
    code = cli.main(["protect", str(source), "-o", str(workdir / name), "--quiet", *CLI_ARGS, *extra])
    if code != 0:
        raise RuntimeError(f"mist protect {' '.join(extra)} exited with {code}")
    return workdir / name / "source.png"


def compute_variants(workdir: Path) -> dict[str, str]:
    """The pixel SHA-256 of every variant run."""
    return {name: pixel_sha256(run_cli(workdir, name, extra)) for name, extra in VARIANTS.items()}


def compute(workdir: Path) -> dict:
    """Every golden value, computed now with the installed code; `workdir` receives the command-line run's files."""
    from mist.common import images
    from mist.engine.attack import masked_linf_pgd
    from mist.engine.config import ProtectConfig
    from mist.models.loading import build_random
    from mist.engine.methods import TileInputs, get_method
    from mist.engine.methods.common import mist_target

    model = build_random()
    config = ProtectConfig(precision="fp32")
    x = images.image_to_tensor(source_image(), (SIZE, SIZE))
    y = images.image_to_tensor(mist_target(), (SIZE, SIZE))
    method = get_method(config.method)(config.params, model, "fp32")
    objective = method.prepare([TileInputs(clean=x, target=y, seed=lambda stream: 11)])  # 11: the target's draw

    pixels = x.clone().requires_grad_(True)
    terms = objective(pixels, [torch.Generator().manual_seed(12)])
    (gradient,) = torch.autograd.grad(terms.objective.sum(), pixels)
    step = masked_linf_pgd(x, objective, radius=config.radius, step=config.step, steps=1,
                           generators=[torch.Generator().manual_seed(13)])

    png = run_cli(workdir, "out", [])
    return {
        "losses": {"objective": terms.objective.item(), **{name: value.item() for name, value in terms.terms.items()}},
        "gradient": gradient.numpy(),
        "pgd_step": step.numpy(),
        "png": png.read_bytes(),
    }


def main() -> int:
    import mist

    with tempfile.TemporaryDirectory() as work:
        values = compute(Path(work))
        variants = compute_variants(Path(work))
    about = {
        "made_with": {"mist": mist.__version__, "torch": torch.__version__, "numpy": np.__version__,
                      "pillow_zlib": features.version("zlib")},
        "command": "mist protect source.png -o out " + " ".join(CLI_ARGS),
        "losses": values["losses"],
        "variants": {name: {"options": " ".join(VARIANTS[name]), "pixels_sha256": digest}
                     for name, digest in variants.items()},
    }
    JSON.write_text(json.dumps(about, indent=2) + "\n", encoding="utf-8")
    np.savez_compressed(ARRAYS, gradient=values["gradient"], pgd_step=values["pgd_step"])
    PNG.write_bytes(values["png"])
    print(f"wrote {JSON.name}, {ARRAYS.name}, {PNG.name} in {HERE}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
