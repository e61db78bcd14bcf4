"""How much of the attack's gain survives a mimic's purification, with and without `--robust` and `--shape blur`,
for purifications the robust run trained on and for ones it held out.

One painting is protected at `--size` with the same method, budget and number of PGD steps: plainly, with `--robust`
(expectation over the transforms given, `--eot-samples` draws per step), and each of those two results shaped with
`--shape blur` (applied here to the saved 8-bit result; the pipeline applies it before the 8-bit rounding, which
differs by that rounding only). Every saved 8-bit image, and the clean painting, is then purified by the purifiers of
`mist evaluate` (`mist.runner.evaluation.purify`, named as its `--purify` names them; `--purify` here picks them).
Each image is scored with the method's own objective (the loss PGD minimises, prepared from the clean painting) at
fixed random draws, the same draws for every image. The "gain" is how much lower the protected image's objective is
than the clean painting's after the same purification; "kept" is the gain after purification as a fraction of the
same result's gain before. A row for the attack's random start alone (0 steps) shows what untargeted noise of the same
budget scores.

Each purification is marked against the `--robust` set: "trained on" where a transform of the set applies the same
kind of processing at a setting inside its random range (see `mist.engine.robust`), "stand-in trained on" for noisy
upscaling when the set has its stand-in `upscale`, "parts trained on" for JPEG + resize when the set has both (each is
drawn alone, never the two together), and "held out" otherwise: AdverseCleaner, and anything outside the trained
ranges or kinds, always are. Held-out purifications say whether robustness carries beyond what the attack saw.
Purifications this machine cannot run (weights absent) are listed as skipped with why.

With random weights this measures how the perturbation survives the purifications as seen by the same networks, not
protection: whether a trained model's mimicry is disrupted needs real weights (and a mimicry check). Treat the
fractions as a proxy.

    python benchmarks/robustness.py --size 512 --steps 8 --mode textural
    python benchmarks/robustness.py --model tiny --size 64 --steps 4      # a quick check of the script

Prints a Markdown section; paste it into benchmarks/RESULTS.md.
"""

from __future__ import annotations

import argparse
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
from mist.engine.pipeline import Protector, tile_seed  # noqa: E402
from mist.engine.robust import (BLUR_SIGMA, CROP_SIDE, JPEG_QUALITY, NOISE_STD, RESIZE_FACTOR,  # noqa: E402
                                UPSCALE_NOISE_STD)
from mist.engine.shaping import shape_blur  # noqa: E402
from mist.models import DEFAULT_PARTS  # noqa: E402
from mist.models.loading import build_random  # noqa: E402
from mist.runner.evaluation.purify import Context, Purification, parse_purifications  # noqa: E402

HERE = Path(__file__).resolve().parent
PAINTINGS = [parent / "shared" / "data" / "vangogh" for parent in (HERE.parents[1], HERE.parents[2])]
PURIFY = "jpeg:75,jpeg:50,resize:0.5,blur:1,noise:8,crop:0.9,jpeg-resize:75,adverse:64,vae,upscale"


def _within(value: float, bounds: tuple[float, float]) -> bool:
    return bounds[0] <= value <= bounds[1]


# purification kind -> (the robust transforms that apply it, whether its value lies inside their random ranges)
TRAINED_BY = {
    "jpeg": (("jpeg",), lambda quality: _within(quality, JPEG_QUALITY)),
    "resize": (("resize",), lambda factor: _within(factor, RESIZE_FACTOR)),
    "jpeg-resize": (("jpeg", "resize"), lambda quality: _within(quality, JPEG_QUALITY) and _within(0.5, RESIZE_FACTOR)),
    "blur": (("blur",), lambda sigma: _within(sigma, BLUR_SIGMA)),
    "noise": (("noise",), lambda levels: _within(levels / 127.5, NOISE_STD)),  # levels of 0..255 in [-1, 1] units
    "crop": (("crop",), lambda fraction: _within(fraction, CROP_SIDE)),
    "vae": (("vae",), lambda passes: passes == 1),
    "upscale": (("upscale",), lambda sigma: _within(sigma * 2, UPSCALE_NOISE_STD)),  # sigma of 0..1 in [-1, 1] units
}


def mark(purification: Purification, robust: tuple[str, ...]) -> str:
    """Whether the robust set `robust` trained on `purification` (see the module's docstring for the marks)."""
    transforms, in_range = TRAINED_BY.get(purification.kind, ((), None))
    if not transforms or not set(transforms) <= set(robust) or not in_range(purification.value):
        return "held out"
    if len(transforms) > 1:
        return "parts trained on"
    return "stand-in trained on" if purification.kind == "upscale" else "trained on"


def painting(path: Path | None, size: int) -> Image.Image:
    """The given image, else the first painting of ../shared/data/vangogh (beside the checkout or its worktree
    folder), else a synthetic one; resized to size x size."""
    if path is None:
        found = [p for folder in PAINTINGS if folder.is_dir() for p in sorted(folder.glob("*.png"))]
        path = found[0] if found else None
    picture = images.read_image(path) if path else Image.radial_gradient("L").convert("RGB")
    return picture.resize((size, size), Image.Resampling.LANCZOS)


def purified(picture: Image.Image, purifications: list[Purification], context: Context) -> dict[str, Image.Image]:
    """The picture as saved, and after each purification (by its label)."""
    return {"as saved (PNG)": picture, **{p.label: p(picture, context) for p in purifications}}


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


def arguments() -> argparse.Namespace:
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
    parser.add_argument("--purify", default=PURIFY, help="purifications, as `mist evaluate --purify` names them")
    parser.add_argument("--image", type=Path)
    return parser.parse_args()


def protected(model, picture: Image.Image, plain: ProtectConfig,
              robust: ProtectConfig) -> tuple[dict[str, Image.Image], dict[str, float]]:
    """The results to purify (plain, robust, the random start alone, the first two shaped), and the seconds each
    attack took."""
    label = f"--robust {','.join(robust.robust)}"
    results: dict[str, Image.Image] = {}
    seconds = {}
    for name, config in (("plain", plain), (label, robust)):
        started = time.perf_counter()
        results[name] = Protector(model, config).protect(picture).image
        seconds[name] = time.perf_counter() - started
    results["random start alone (0 steps)"] = Protector(model, plain.but(steps=0)).protect(picture).image
    clean_tensor = images.image_to_tensor(picture, picture.size)
    for name in ("plain", label):
        shaped = shape_blur(clean_tensor, images.image_to_tensor(results[name], picture.size), plain.radius)
        results[f"{name} + --shape blur"] = images.tensor_to_image(shaped)
    return results, seconds


def print_table(clean: dict[str, float], gains: dict[str, dict[str, float]], marks: dict[str, str],
                robust: str) -> None:
    """One row per purification (the first: none), its mark against the robust set, and per result its gain and the
    fraction of its gain as saved that is kept."""
    results = list(gains)
    print(f"| purification | vs --robust {robust} | " + " | ".join(f"{r}: gain (kept)" for r in results) + " |")
    print("|---" * (2 + len(results)) + "|")
    saved = next(iter(clean))
    for name in clean:
        cells = []
        for result in results:
            gain, before = gains[result][name], gains[result][saved]
            kept = "" if name == saved else f" ({gain / before:.0%})" if before > 0 else " (n/a)"  # n/a: none to keep
            cells.append(f"{gain:.4g}{kept}")
        print(f"| {name} | {marks.get(name, '')} | " + " | ".join(cells) + " |")


def main() -> int:
    args = arguments()
    torch.manual_seed(0)
    dtype = torch.bfloat16 if args.precision == "bf16" else torch.float32
    # the decoder for the VAE round trip (a purification, and a robust transform when asked for)
    model = (build_random(parts=DEFAULT_PARTS | {"decoder"}) if args.model == "tiny"
             else build_full_size_model(dtype, decoder=True))
    picture = painting(args.image, args.size)
    settings = dict(method=args.method, input_size=args.size, steps=args.steps, epsilon=args.epsilon,
                    precision=args.precision)
    if args.method == "mist":
        settings["mode"] = args.mode
    plain = ProtectConfig.of(**settings)
    robust = plain.but(robust=args.robust, eot_samples=args.eot_samples)
    requested = parse_purifications(args.purify)
    purifications = [p for p in requested if p.problem() is None]
    context = Context(model, seed=0)
    load = os.getloadavg()
    results, seconds = protected(model, picture, plain, robust)

    started = time.perf_counter()
    score = Scorer(Protector(model, plain), picture, args.draws)
    clean = {name: score(image) for name, image in purified(picture, purifications, context).items()}
    gains = {label: {name: clean[name] - score(image) for name, image in purified(result, purifications,
                                                                                  context).items()}
             for label, result in results.items()}
    scoring = time.perf_counter() - started

    what = args.method + (f" ({args.mode})" if args.method == "mist" else "")
    model_name = "tiny random test model" if args.model == "tiny" else "full-size SD v1, random weights"
    print(f"Machine: {machine()}  \nCommand: `python benchmarks/robustness.py {' '.join(sys.argv[1:])}`  \n"
          f"Load average before the run: {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}; attacks: "
          + ", ".join(f"{label} {s:.0f} s" for label, s in seconds.items()) + f"; scoring {scoring:.0f} s.  \n"
          f"Model: {model_name}; method {what}; {args.size} x {args.size}; epsilon {args.epsilon:g}; "
          f"{args.steps} PGD steps; {args.precision}; --eot-samples {args.eot_samples}; "
          f"objectives averaged over {args.draws} fixed draws. Clean objective: {clean['as saved (PNG)']:.5g}.\n")
    for p in requested:
        if p.problem() is not None:
            print(f"Skipped {p.name}: {p.problem()}.  ")
    print_table(clean, gains, {p.label: mark(p, robust.robust) for p in purifications}, ",".join(robust.robust))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
