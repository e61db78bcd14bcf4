"""The options of every command that opens the job runner (`mist protect`, `mist_v3.py`, `mist evaluate`, `mist
doctor`, `mist webui`, `mist serve`): `--model`, `--device` and, where the command takes them, `--low-memory`,
`--compile`, `--ray`, `--ray-resource` and a server's `--text-encoders`, declared once, as
`mist.runner.entrance.open_models` takes them. Light: parsing imports no model library."""

from __future__ import annotations

import argparse

from mist.common.device_names import DEVICE_NAMES, check_device_name
from mist.runner.flags import fields_as_flags

MODEL_HELP = ("SD v1 .ckpt / .safetensors file or diffusers folder; 'tiny-random' for a test model that protects "
              "nothing (default: $MIST_MODEL, then models/ldm/stable-diffusion-v1/model.ckpt, then the Hugging Face "
              "cache)")


def add_runner_options(parser: argparse.ArgumentParser | argparse._ArgumentGroup, *, low_memory: bool = False,
                       compile: bool = False, ray: bool = False, text_encoders: bool = False) -> None:
    """--model and --device, and the runner's other options the command takes."""
    parser.add_argument("--model", help=MODEL_HELP)
    parser.add_argument("--device", default="auto", help=f"{DEVICE_NAMES} (default: %(default)s)")
    if low_memory:
        parser.add_argument("--low-memory", action=argparse.BooleanOptionalAction, default=None,
                            help="gradient checkpointing: much less memory, about a third more time per step "
                                 "(default: on where memory is short: GPUs under 12 GiB, under 8 GiB of free RAM)")
    if compile:
        parser.add_argument("--compile", action="store_true",
                            help="compile the networks with torch.compile: minutes the first time an image size is "
                                 "met (cached in Mist's home); on a CPU steps were no faster, peak memory a little "
                                 "lower; needs a C++ compiler there (default: off)")
    if ray:
        parser.add_argument("--ray", metavar="ADDRESS",
                            help="spread the images over a Ray cluster's GPU workers, e.g. 10.0.0.5:6379 or auto (pip "
                                 "install 'mist-protect[ray]'; every worker node needs Mist and the model)")
        parser.add_argument("--ray-resource", default="GPU", metavar="NAME",
                            help="with --ray: one worker per unit of this resource (default: %(default)s)")
    if text_encoders:
        parser.add_argument("--text-encoders", default="", metavar="FILE[,FILE...]",
                            help="the text encoder files (CLIP-L, OpenCLIP-G, T5-XXL) of an SD 3.x or Flux single "
                                 "file given as --model, which every job runs with, so that the denoiser-side methods "
                                 "are offered; checked at start-up, named by file name only (default: none)")


def check_device_option(args: argparse.Namespace) -> None:
    """The early check of --device, before anything heavy is imported: ValueError("--device: ...") for a word that
    names no device (whether this machine has it is `mist.runner.entrance.open_models`'s to say)."""
    with fields_as_flags({"device": "--device"}):
        check_device_name(args.device)
