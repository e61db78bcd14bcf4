"""How much of the attack's gain survives when the protected image is returned at its own size (`original_size`) and
the mimic shrinks it back to the processing size itself.

For one painting at `--scale` times the processing size: (a) the result at the processing size (keep-aspect geometry,
the perturbation as computed); (0) the attack's random start alone, for scale; (b) the `original_size` result (the same
perturbation resized to the painting's size and added there), shrunk back to the processing size with Pillow's bicubic
and Lanczos filters, as a mimic's data pipeline would. Each is scored with the objective's terms at fixed random draws
(the same draws for every image), against the clean painting shrunk with the same filter. "kept" is the gain of (b) as
a fraction of the gain of (a).

With random weights this measures geometry and resampling, not protection: the losses of a random network respond to
a perturbation differently from a trained one's. Treat the fractions as a proxy.

    python benchmarks/original_size.py --model tiny --input-size 64 --scale 3 --steps 20
    python benchmarks/original_size.py --model sd-v1 --input-size 128 --scale 2 --steps 5 --draws 4

Prints a Markdown section; paste it into benchmarks/RESULTS.md.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench import build_full_size_model, machine  # noqa: E402

from mist.common import images  # noqa: E402
from mist.engine.config import ProtectConfig  # noqa: E402
from mist.models.loading import build_random  # noqa: E402
from mist.engine.pipeline import Protector  # noqa: E402

PAINTINGS = Path(__file__).resolve().parents[2] / "shared" / "data" / "vangogh"
FILTERS = {"bicubic": Image.Resampling.BICUBIC, "lanczos": Image.Resampling.LANCZOS}


def painting(path: Path | None, size: tuple[int, int]) -> Image.Image:
    """The given image, else the first of ../shared/data/vangogh, else a synthetic one; resized to `size`."""
    if path is None:
        found = sorted(PAINTINGS.glob("*.png")) if PAINTINGS.is_dir() else []
        path = found[0] if found else None
    picture = images.read_image(path) if path else Image.radial_gradient("L").convert("RGB")
    return picture.resize(size, Image.Resampling.LANCZOS)


def scores(protector: Protector, picture: Image.Image, draws: int, mode: str) -> dict[str, float]:
    """Textural loss, semantic loss and `mode`'s objective of an 8-bit image at its own size, each the mean
    over `draws` fixed random draws (posterior sample, t, noise): the same draws for every image scored."""
    c = protector.config.params
    x = images.image_to_tensor(picture, picture.size)
    both = protector.loss_for(x, seed=0)  # a fused scorer: both losses, whatever the mode scored
    textural = semantic = 0.0
    with torch.no_grad():
        for draw in range(draws):
            terms = both(x.to(protector.device), [torch.Generator().manual_seed(1000 + draw)]).terms
            textural += terms["textural"].item() / draws
            semantic += terms["semantic"].item() / draws
    objective = {"textural": textural, "semantic": -semantic, "fused": textural - c.semantic_weight * semantic}
    return {"textural": textural, "semantic": semantic, "objective": objective[mode]}


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", choices=("tiny", "sd-v1"), default="tiny",
                        help="tiny random test model, or the full SD v1 architecture with random weights")
    parser.add_argument("--input-size", type=int, default=64, help="processing size (shorter side)")
    parser.add_argument("--scale", type=float, default=3, help="the painting's shorter side / the processing size")
    parser.add_argument("--aspect", type=float, default=1.5, help="the painting's width / height")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--epsilon", type=float, default=16)
    parser.add_argument("--modes", default="textural,fused")
    parser.add_argument("--draws", type=int, default=8, help="random draws each score is averaged over")
    parser.add_argument("--image", type=Path)
    args = parser.parse_args()
    torch.manual_seed(0)
    model = build_random() if args.model == "tiny" else build_full_size_model(torch.float32)
    height = round(args.input_size * args.scale)
    picture = painting(args.image, (round(height * args.aspect), height))
    header = [f"Machine: {machine()}  ",
             f"Command: `python benchmarks/original_size.py {' '.join(sys.argv[1:])}`  ",
             f"Model: {'tiny random test model' if args.model == 'tiny' else 'full-size SD v1, random weights'}; "
             f"painting {picture.width} x {picture.height}; epsilon {args.epsilon:g}; {args.steps} steps; fp32; "
             f"scores averaged over {args.draws} fixed draws.\n",
             "| mode | processing size | clean objective | result | textural gain | semantic gain | objective gain "
             "| kept |", "|---|---|---|---|---|---|---|---|"]
    print("\n".join(header), flush=True)
    for mode in args.modes.split(","):
        settings = dict(mode=mode, input_size=args.input_size, steps=args.steps, epsilon=args.epsilon,
                        precision="fp32")
        started = time.perf_counter()
        at_processing = Protector(model, ProtectConfig.of(keep_aspect=True, **settings)).protect(picture)
        noise_only = Protector(model, ProtectConfig.of(keep_aspect=True, **{**settings, "steps": 0})).protect(picture)
        at_original = Protector(model, ProtectConfig.of(original_size=True, **settings)).protect(picture)
        seconds = time.perf_counter() - started
        size = at_processing.size
        scorer = Protector(model, ProtectConfig.of(**{**settings, "mode": "fused"}))
        clean = scores(scorer, picture.resize(size, Image.Resampling.BICUBIC), args.draws, mode)
        rows = {"(a) computed at the processing size": (scores(scorer, at_processing.image, args.draws, mode), clean),
                "(0) its random start alone (0 steps)": (scores(scorer, noise_only.image, args.draws, mode), clean)}
        for name, resample in FILTERS.items():
            resized = picture.resize(size, resample)
            clean_here = clean if name == "bicubic" else scores(scorer, resized, args.draws, mode)
            shrunk = at_original.image.resize(size, resample)
            rows[f"(b) original size, shrunk ({name})"] = (scores(scorer, shrunk, args.draws, mode), clean_here)
        reference = None
        for label, (values, base) in rows.items():
            textural_gain = base["textural"] - values["textural"]  # lower is the aim
            semantic_gain = values["semantic"] - base["semantic"]  # higher is the aim
            objective_gain = base["objective"] - values["objective"]  # minimised
            reference = objective_gain if reference is None else reference
            kept = objective_gain / reference if reference else float("nan")
            print(f"| {mode} | {size[0]} x {size[1]} | {base['objective']:.5g} | {label} | "
                  f"{textural_gain:.4g} | {semantic_gain:.4g} | {objective_gain:.4g} | {kept:.0%} |", flush=True)
        print(f"{mode}: {seconds:.0f} s for the attacks", file=sys.stderr)
    print("\nGains compare the protected image with the clean one shrunk the same way: textural loss and objective, "
          "how much lower; semantic loss, how much higher. \"kept\": the objective's gain as a fraction of (a)'s.")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
