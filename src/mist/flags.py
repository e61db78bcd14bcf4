"""The name each setting has where a user types it: the command line's flags, which the HTTP service's form fields
and the web UI's messages use too, and the rewording of a settings error (`input_size: ...`) with those names.
It belongs to no face: every face imports it, and it imports only the method registry."""

from __future__ import annotations

import contextlib
import re
from typing import Iterator, Mapping

from .methods import shared_params

# The `mist protect` flag of each run setting (and of the device), to name them in error messages; the methods'
# parameters have theirs in their declarations (see `protect_flags`).
RUN_FLAGS: dict[str, str] = {
    "method": "--method", "epsilon": "--epsilon", "steps": "--steps", "step_size": "--step-size",
    "input_size": "--input-size", "block_num": "--block-num", "mask": "--mask", "keep_aspect": "--no-resize",
    "seed": "--seed", "precision": "--precision", "device": "--device", "original_size": "--original-size",
    "robust": "--robust", "eot_samples": "--eot-samples", "shape": "--shape", "compile": "--compile",
}


def protect_flags() -> dict[str, str]:
    """The `mist protect` flag of every setting: the run's and every registered method's parameters."""
    return RUN_FLAGS | {name: spec.flag for name, (spec, _) in shared_params().items()}


@contextlib.contextmanager
def fields_as_flags(flags: Mapping[str, str]) -> Iterator[None]:
    """Re-raise a ValueError of the settings (`input_size: ...`, `device: ...`) with the names a face's user typed."""
    try:
        yield
    except ValueError as exc:
        raise ValueError(flag_message(str(exc), flags)) from None


def flag_message(message: str, flags: Mapping[str, str]) -> str:
    """`message` with the field it begins with (`input_size: ...`) and the fields it mentions (`8 x block_num`)
    replaced by their flags; a field name inside a path (`/art/block_num.png`) is left alone."""
    field, colon, rest = message.partition(": ")
    if colon and field in flags:
        message = f"{flags[field]}: {rest}"
    for name, flag in flags.items():
        if "_" in name:
            message = re.sub(rf"(?<![\w./\\-]){name}(?![\w./\\-])", flag, message)
    return message
