"""Golden outputs of the float32 engine on the tiny random model, for tests/test_golden.py.

The regression test recomputes everything below and compares it with the files saved here, so that no change to the
engine's arithmetic goes unnoticed:

- `golden.json`: the textural and semantic losses and the fused objective of one evaluation, plus what the files were
  made with (versions, Pillow's zlib);
- `golden.npz`: the gradient d(objective)/d(image) of that evaluation and the image after one PGD step;
- `protected.png`: the file `mist protect --model tiny-random --precision fp32 --steps 2 --input-size 64` writes for
  `source_image()`, the default command-line path end to end.

The source image is generated here (no file from outside the repository is read), the model is
`mist.models.loading.build_random()` and every random draw comes from fixed seeds.

Regenerate ONLY for a deliberate change of the numbers, and say in the commit message what changed and why:

    python tests/golden/make_golden.py
"""

from __future__ import annotations

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


def source_image() -> Image.Image:
    """A 48 x 40 RGB test card computed from integer formulas (identical on every machine)."""
    y, x = np.mgrid[0:40, 0:48]
    rgb = np.stack([(x * 5 + y * 3) % 256, (x * y) % 256, ((x - 24) ** 2 + (y - 20) ** 2) % 256], axis=-1)
    return Image.fromarray(rgb.astype(np.uint8))


def compute(workdir: Path) -> dict:
    """Every golden value, computed now with the installed code; `workdir` receives the command-line run's files."""
    from mist import cli, images
    from mist.attack import masked_linf_pgd
    from mist.config import ProtectConfig
    from mist.models.loading import build_random
    from mist.objectives import MistObjective, target_latent
    from mist.pipeline import default_target

    model = build_random()
    config = ProtectConfig(precision="fp32")
    x = images.image_to_tensor(source_image(), (SIZE, SIZE))
    y = images.image_to_tensor(default_target(), (SIZE, SIZE))
    target = target_latent(model, y, [torch.Generator().manual_seed(11)])
    objective = MistObjective(model, "fused", config.semantic_weight, target, model.text_embedding("a painting"))

    pixels = x.clone().requires_grad_(True)
    terms = objective(pixels, [torch.Generator().manual_seed(12)])
    (gradient,) = torch.autograd.grad(terms.objective.sum(), pixels)
    step = masked_linf_pgd(x, objective, radius=config.radius, step=config.step, steps=1,
                           generators=[torch.Generator().manual_seed(13)])

    source = workdir / "source.png"
    source_image().save(source)
    code = cli.main(["protect", str(source), "-o", str(workdir / "out"), "--quiet", *CLI_ARGS])
    if code != 0:
        raise RuntimeError(f"mist protect exited with {code}")
    return {
        "losses": {name: getattr(terms, name).item() for name in ("textural", "semantic", "objective")},
        "gradient": gradient.numpy(),
        "pgd_step": step.numpy(),
        "png": (workdir / "out" / "source.png").read_bytes(),
    }


def main() -> int:
    import mist

    with tempfile.TemporaryDirectory() as work:
        values = compute(Path(work))
    about = {
        "made_with": {"mist": mist.__version__, "torch": torch.__version__, "numpy": np.__version__,
                      "pillow_zlib": features.version("zlib")},
        "command": "mist protect source.png -o out " + " ".join(CLI_ARGS),
        "losses": values["losses"],
    }
    JSON.write_text(json.dumps(about, indent=2) + "\n", encoding="utf-8")
    np.savez_compressed(ARRAYS, gradient=values["gradient"], pgd_step=values["pgd_step"])
    PNG.write_bytes(values["png"])
    print(f"wrote {JSON.name}, {ARRAYS.name}, {PNG.name} in {HERE}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
