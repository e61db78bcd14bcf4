"""How much of the attack's gain survives a mimic's purification, with and without `--robust` and `--shape blur`.

One painting is protected at `--size` with the same method, budget and number of PGD steps: plainly, with `--robust`
(expectation over the transforms given, `--eot-samples` draws per step), and each of those two results shaped with
`--shape blur` (applied here to the saved 8-bit result; the pipeline applies it before the 8-bit rounding, which
differs by that rounding only). Every saved 8-bit image, and the clean painting, is then purified the way a scraper
would: Pillow JPEG at quality 75 and 50, and a 0.5x bicubic resize round trip. Each image is scored with the
method's own objective (the loss PGD minimises, prepared from the clean painting) at fixed random draws, the same
draws for every image. The "gain" is how much lower the protected image's objective is than the clean painting's
after the same purification; "kept" is the gain after purification as a fraction of the same result's gain before.
A row for the attack's random start alone (0 steps) shows what untargeted noise of the same budget scores.

With random weights this measures how the perturbation survives the purifications as seen by the same networks, not
protection: whether a trained model's mimicry is disrupted needs real weights (and a mimicry check). Treat the
fractions as a proxy.

    python benchmarks/robustness.py --size 512 --steps 8 --mode textural
    python benchmarks/robustness.py --model tiny --size 64 --steps 4      # a quick check of the script

Prints a Markdown section; paste it into benchmarks/RESULTS.md.
"""

from __future__ import annotations

import argparse
import io
import os
import sys
import time
from pathlib import Path

import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench import build_full_size_model, machine  # noqa: E402

from mist.common import images  # noqa: E402
from mist.engine.config import ProtectConfig  # noqa: E402
from mist.engine.methods import TileInputs  # noqa: E402
from mist.models.loading import build_random  # noqa: E402
from mist.engine.pipeline import Protector, tile_seed  # noqa: E402
from mist.engine.shaping import shape_blur  # noqa: E402

HERE = Path(__file__).resolve().parent
PAINTINGS = [parent / "shared" / "data" / "vangogh" for parent in (HERE.parents[1], HERE.parents[2])]


def painting(path: Path | None, size: int) -> Image.Image:
    """The given image, else the first painting of ../shared/data/vangogh (beside the checkout or its worktree
    folder), else a synthetic one; resized to size x size."""
    if path is None:
        found = [p for folder in PAINTINGS if folder.is_dir() for p in sorted(folder.glob("*.png"))]
        path = found[0] if found else None
    picture = images.read_image(path) if path else Image.radial_gradient("L").convert("RGB")
    return picture.resize((size, size), Image.Resampling.LANCZOS)


def purified(picture: Image.Image) -> dict[str, Image.Image]:
    """The picture as saved, and after each purification of a mimic's data pipeline."""
    def jpeg(quality: int) -> Image.Image:
        buffer = io.BytesIO()
        picture.save(buffer, "JPEG", quality=quality)
        return Image.open(io.BytesIO(buffer.getvalue())).convert("RGB")

    half = picture.resize((picture.width // 2, picture.height // 2), Image.Resampling.BICUBIC)
    return {"as saved (PNG)": picture, "JPEG q75": jpeg(75), "JPEG q50": jpeg(50),
            "0.5x resize round trip": half.resize(picture.size, Image.Resampling.BICUBIC)}


class Scorer:
    """The method's objective of an 8-bit image, averaged over fixed draws (generators seeded 1000, 1001, ...)."""

    def __init__(self, protector: Protector, clean: Image.Image, draws: int) -> None:
        self.protector, self.draws = protector, draws
        device = protector.device
        x = images.image_to_tensor(clean, clean.size).to(device)
        target = protector.target
        y = None if target is None else images.image_to_tensor(target, clean.size).to(device)
        fixed = TileInputs(clean=x, target=y, seed=lambda stream: tile_seed(0, "score", 0, stream))
        self.loss = protector.method.prepare([fixed])

    def __call__(self, picture: Image.Image) -> float:
        x = images.image_to_tensor(picture, picture.size).to(self.protector.device)
        with torch.no_grad():
            return sum(self.loss(x, [torch.Generator().manual_seed(1000 + d)]).objective.item()
                       for d in range(self.draws)) / self.draws


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", choices=("tiny", "sd-v1"), default="sd-v1",
                        help="tiny random test model, or the full SD v1 architecture with random weights")
    parser.add_argument("--size", type=int, default=512, help="processing size (square)")
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--epsilon", type=float, default=16)
    parser.add_argument("--method", default="mist")
    parser.add_argument("--mode", default="textural", help="the mist method's mode (ignored by other methods)")
    parser.add_argument("--robust", default="jpeg,resize,blur")
    parser.add_argument("--eot-samples", type=int, default=1)
    parser.add_argument("--precision", default="bf16", choices=("fp32", "bf16"))
    parser.add_argument("--draws", type=int, default=2, help="random draws each score is averaged over")
    parser.add_argument("--image", type=Path)
    args = parser.parse_args()
    torch.manual_seed(0)
    dtype = torch.bfloat16 if args.precision == "bf16" else torch.float32
    model = build_random() if args.model == "tiny" else build_full_size_model(dtype)
    picture = painting(args.image, args.size)
    settings = dict(method=args.method, input_size=args.size, steps=args.steps, epsilon=args.epsilon,
                    precision=args.precision)
    if args.method == "mist":
        settings["mode"] = args.mode
    plain = ProtectConfig.of(**settings)
    robust = plain.but(robust=args.robust, eot_samples=args.eot_samples)
    load = os.getloadavg()

    results: dict[str, Image.Image] = {}
    seconds = {}
    for label, config in (("plain", plain), (f"--robust {args.robust}", robust)):
        started = time.perf_counter()
        results[label] = Protector(model, config).protect(picture).image
        seconds[label] = time.perf_counter() - started
    results["random start alone (0 steps)"] = Protector(model, plain.but(steps=0)).protect(picture).image
    clean_tensor = images.image_to_tensor(picture, picture.size)
    for label in ("plain", f"--robust {args.robust}"):
        shaped = shape_blur(clean_tensor, images.image_to_tensor(results[label], picture.size), plain.radius)
        results[f"{label} + --shape blur"] = images.tensor_to_image(shaped)

    started = time.perf_counter()
    score = Scorer(Protector(model, plain), picture, args.draws)
    clean = {name: score(image) for name, image in purified(picture).items()}
    rows = []
    for label, result in results.items():
        gains = {name: clean[name] - score(image) for name, image in purified(result).items()}
        rows.append((label, gains))
    scoring = time.perf_counter() - started

    what = args.method + (f" ({args.mode})" if args.method == "mist" else "")
    model_name = "tiny random test model" if args.model == "tiny" else "full-size SD v1, random weights"
    print(f"Machine: {machine()}  \nCommand: `python benchmarks/robustness.py {' '.join(sys.argv[1:])}`  \n"
          f"Load average before the run: {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}; attacks: "
          + ", ".join(f"{label} {s:.0f} s" for label, s in seconds.items()) + f"; scoring {scoring:.0f} s.  \n"
          f"Model: {model_name}; method {what}; {args.size} x {args.size}; epsilon {args.epsilon:g}; "
          f"{args.steps} PGD steps; {args.precision}; --eot-samples {args.eot_samples}; "
          f"objectives averaged over {args.draws} fixed draws. Clean objective: {clean['as saved (PNG)']:.5g}.\n")
    names = list(clean)
    print("| result | " + " | ".join(f"gain {n}" for n in names) + " | " +
          " | ".join(f"kept {n}" for n in names[1:]) + " |")
    print("|---" * (2 * len(names)) + "|")
    for label, gains in rows:
        before = gains[names[0]]
        kept = [f"{gains[n] / before:.0%}" if before > 0 else "n/a" for n in names[1:]]  # n/a: no gain to keep
        print(f"| {label} | " + " | ".join(f"{gains[n]:.4g}" for n in names) + " | " + " | ".join(kept) + " |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
