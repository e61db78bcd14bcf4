"""Mist v1.2's `mist_v3.py` command line, every flag kept, mapped onto the same engine as `mist protect`.

Outputs go where the original wrote them, relative to the working directory (the repository root in the seed's
guide): a folder of images to `outputs/dirs/<output_dir>_<eps>_<steps>_<size>_<blocks>_<mode>_<rate>_<mask>_<resize>/`
under each input's name, a single image to `outputs/images/<output_name>_<same suffix>.png`. Differences from the
original, on purpose: outputs are always PNG (a JPEG input `a.jpg` becomes `a.png`: re-encoding as JPEG would erode the
perturbation), and pixel values are rounded, not truncated, so the change stays within epsilon.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from mist.faces.cli import (configure_logging, guarded, interrupt_on_hang_up, print_skipped, run_protect, word_as,
                            word_of_kind)
from mist.engine.config import ProtectConfig
from mist.common.device_names import check_device_name
from mist.runner.flags import fields_as_flags, typed_value
from mist.engine.methods.mist import MODE_CODES
from mist.runner.runner_options import add_runner_options
from mist.common.model_names import TEST_MODEL_STEPS, TINY_RANDOM, default_steps

if TYPE_CHECKING:
    from mist.runner.jobs import Job

# The flag of each setting mist_v3.py takes, to name it in error messages.
LEGACY_FLAGS: dict[str, str] = {
    "epsilon": "--epsilon", "steps": "--steps", "input_size": "--input_size", "block_num": "--block_num",
    "fused_weight": "--rate", "keep_aspect": "--non_resize", "mask": "--mask_path", "device": "--device",
}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="mist_v3.py", description="Mist v1.2 compatible command line.")
    p.add_argument("-img", "--input_image_path", default="test/sample.png", help="path of input image")
    p.add_argument("--output_name", default="misted_sample", help="name of the saved image")
    p.add_argument("--output_dir", default="vangogh", help="name of the output folder under outputs/dirs")
    p.add_argument("-inp", "--input_dir_path", default=None, help="folder of images to process")
    p.add_argument("-e", "--epsilon", type=word_as("epsilon"), default=16, help="strength (0..255)")
    p.add_argument("-s", "--steps", type=word_as("steps"), default=None,
                   help=f"PGD steps (default: 100; {TEST_MODEL_STEPS} with --model {TINY_RANDOM})")
    p.add_argument("-in_size", "--input_size", type=word_as("input_size"), default=512, help="input size")
    p.add_argument("-b", "--block_num", type=word_as("block_num"), default=1, help="tiles per side (2 = low VRAM)")
    p.add_argument("--mode", type=word_of_kind("int"), default=2, help="0 semantic, 1 textural, 2 fused")
    p.add_argument("--rate", type=word_of_kind("int"), default=1,
                   help="fused weight w (semantic loss weighted 10**(w+3))")
    p.add_argument("--mask", action="store_true", help="protect only the mask's white region (single image only)")
    p.add_argument("--mask_path", default="test/processed_mask.png", help="path of the mask")
    p.add_argument("--non_resize", action="store_true", help="keep the aspect ratio of the image")
    # Additions; the original had neither.
    add_runner_options(p)
    return p


def parameter_suffix(args: argparse.Namespace, masked: bool) -> str:
    """The original's `_<eps>_<steps>_<size>_<blocks>_<mode>_<rate>_<mask>_<resize>` naming of its outputs; `<mask>`
    says whether a mask was applied (v1.2 wrote 1 for a folder too, where it ignored the mask)."""
    values = (args.epsilon, args.steps, args.input_size, args.block_num, args.mode, args.rate, int(masked),
              int(args.non_resize))
    return "".join(f"_{v}" for v in values)


def plan(args: argparse.Namespace) -> tuple[ProtectConfig, list[Job]]:
    """The settings and the jobs of a mist_v3.py command line; ValueError naming the flag for an invalid option."""
    if args.steps is None:  # named in the output folder, so settled before anything else
        args.steps = default_steps(args.model, ProtectConfig.steps)
    if args.mode not in MODE_CODES:
        raise ValueError(f"--mode: must be 0 (semantic), 1 (textural) or 2 (fused), got {args.mode}")
    masked = args.mask and not args.input_dir_path
    if args.mask and args.input_dir_path:
        print("Alert: the mask only applies to a single image (-img); it is ignored for a folder.", file=sys.stderr)
    with fields_as_flags(LEGACY_FLAGS):
        config = ProtectConfig(
            method="mist", params={"mode": MODE_CODES[args.mode], "fused_weight": typed_value(args.rate, "float")},
            epsilon=args.epsilon,
            steps=args.steps, input_size=args.input_size, block_num=args.block_num, keep_aspect=args.non_resize,
            mask=Path(args.mask_path) if masked else None,
        )
        check_device_name(args.device)
    from mist.runner.jobs import Job  # the options are valid: from here on the engine's modules are needed

    if args.input_dir_path:
        folder = Path(args.input_dir_path)
        if not folder.is_dir():
            raise ValueError(f"{folder}: no such folder")
        jobs = folder_jobs(folder, Path("outputs/dirs") / (args.output_dir + parameter_suffix(args, masked)))
    else:
        output = Path("outputs/images") / (args.output_name + parameter_suffix(args, masked) + ".png")
        jobs = [Job(Path(args.input_image_path), output)]
    return config, jobs


def folder_jobs(folder: Path, output: Path) -> list[Job]:
    """A job for each image file directly in `folder` (the image types `mist protect` reads), and one line on stderr
    for every other entry: v1.2 tried to open every entry as an image (and stopped at the first it could not read)."""
    from mist.runner.inputs import collect_jobs
    from mist.common.images import IMAGE_SUFFIXES

    reasons: dict[Path, str] = {}
    jobs = collect_jobs([folder], output, recursive=False, on_skip=reasons.__setitem__)
    protected = {job.source for job in jobs}
    for entry in sorted(folder.iterdir()):
        if entry in protected:
            continue
        if entry in reasons:
            reason = reasons[entry]
        elif entry.is_dir():
            reason = "a folder (mist_v3.py reads only the files directly in --input_dir_path)"
        elif not entry.is_file():
            reason = "not a regular file (a broken or looping link, a device or a pipe)"
        elif entry.name.startswith("."):
            reason = "a hidden file"
        elif entry.suffix.lower() not in IMAGE_SUFFIXES:
            reason = f"not an image type Mist reads ({' '.join(sorted(IMAGE_SUFFIXES))})"
        else:
            reason = "inside the output folder"
        print_skipped(entry, reason)
    return jobs


def main(argv: list[str] | None = None) -> int:
    def run() -> int:
        args = build_parser().parse_args(argv)
        configure_logging(False)
        with interrupt_on_hang_up():
            config, jobs = plan(args)
            return run_protect(jobs, config, args.model, args.device, flags=LEGACY_FLAGS)

    return guarded("mist_v3.py", run)
