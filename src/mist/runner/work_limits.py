"""How much compute one image of a job may ask for on a server that others use (`--max-steps` and `--max-input-size`
of `mist serve` and `mist webui`): a request for a million steps or an 8192-pixel processing size would hold the
worker for days or exhaust its memory. Belongs to no face: the service and the web UI check submissions with it."""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from typing import Any

from mist.engine.config import ProtectConfig


@dataclass(frozen=True)
class WorkLimits:
    """The most a job may ask for per image; `problem` says what in a job's settings is over it."""

    max_steps: int = 1000  # PGD steps x robust samples per image (the web UI's slider ends at 1000)
    max_input_size: int = 1024  # the processing size's side (pixels per tile grow with its square)

    def problem(self, settings: dict[str, Any]) -> str | None:
        """What in `settings` is over these limits, in one line naming the field; None when nothing is."""
        steps = int(settings.get("steps", ProtectConfig.steps)) * int(settings.get("eot_samples", 1))
        if steps > self.max_steps:
            return (f"steps: {steps} steps per image (x eot-samples) is over this server's limit of {self.max_steps} "
                    "(its --max-steps)")
        size = int(settings.get("input_size", ProtectConfig.input_size))
        if size > self.max_input_size:
            return (f"input-size: {size} is over this server's limit of {self.max_input_size} "
                    "(its --max-input-size)")
        return None

    def evaluation_problem(self, settings: dict[str, Any]) -> str | None:
        """What in an evaluation's settings (`mist.runner.evaluation.settings.settings_record`) is over these limits:
        its DDIM steps, and its LoRA and textual inversion training steps where it trains them, each at most
        `max_steps`."""
        counted = [("steps", "steps")] + ([("lora_steps", "lora-steps")] if settings.get("lora") else []) + (
            [("ti_steps", "ti-steps")] if settings.get("ti") else [])
        for name, field in counted:
            if int(settings.get(name, 0)) > self.max_steps:
                return (f"{field}: {settings[name]} is over this server's limit of {self.max_steps} steps "
                        "(its --max-steps)")
        return None


def add_work_limit_options(parser: argparse.ArgumentParser) -> None:
    """--max-steps and --max-input-size of a server."""
    defaults = WorkLimits()
    parser.add_argument("--max-steps", type=int, default=defaults.max_steps,
                        help="most PGD steps per image a job may ask for (x --eot-samples) (default: %(default)s)")
    parser.add_argument("--max-input-size", type=int, default=defaults.max_input_size,
                        help="largest processing size a job may ask for, in pixels per side (default: %(default)s)")


def work_limits_from(args: argparse.Namespace) -> WorkLimits:
    """The limits a server was started with; ValueError naming the option for one below 1."""
    for flag, value in (("--max-steps", args.max_steps), ("--max-input-size", args.max_input_size)):
        if value < 1:
            raise ValueError(f"{flag}: must be at least 1, got {value}")
    return WorkLimits(args.max_steps, args.max_input_size)


def check_work(config: ProtectConfig, limits: WorkLimits) -> None:
    """ValueError naming the setting when `config` asks for more than `limits` allow."""
    problem = limits.problem({"steps": config.steps, "eot_samples": config.eot_samples,
                              "input_size": config.input_size})
    if problem:
        raise ValueError(problem)
