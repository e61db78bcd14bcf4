"""The name and kind each setting has where a user types it: the command line's flags, which the HTTP service's form
fields and the web UI's messages use too; the one coercion of a value as a face received it (`typed_value`); and the
rewording of a settings error (`input_size: ...`) with those names, all from the declarations of the settings
(`mist.engine.config.RUN_SETTINGS`, the methods' parameters). It belongs to no face: every face imports it."""

from __future__ import annotations

import contextlib
import math
import re
from typing import Any, Iterator, Mapping

from mist.engine.config import RUN_SETTINGS
from mist.engine.methods import shared_params

# The `mist protect` flag of each run setting (`mist.engine.config.RUN_SETTINGS`) and of the runner's options, to
# name them in error messages; the methods' parameters have theirs in their declarations (see `protect_flags`).
RUN_FLAGS: dict[str, str] = {name: setting.flag for name, setting in RUN_SETTINGS.items()} | {
    "device": "--device", "compile": "--compile"}

# The kind of each run setting's value as the faces take it: what `typed_value` turns a command-line word, a form
# field or a page control's value into. The Python API takes Python values (ProtectConfig accepts a fractional
# epsilon, for one).
RUN_KINDS: dict[str, str] = {name: setting.kind for name, setting in RUN_SETTINGS.items()}

_TRUE, _FALSE = ("1", "true", "yes", "on"), ("0", "false", "no", "off")


def typed_value(value: Any, kind: str) -> Any:
    """A setting's value as a face received it (a command-line word, a form field, a JSON value, a page slider's
    float) in its kind's type ("int", "float", "bool", "choice", else as it is), the same whatever the face, so that a
    setting is recorded alike in every output (16, not 16.0, for an int; 1.0 for a float given as 1). ValueError with
    the problem (without the setting's name: the face names it as its user typed it)."""
    if kind in ("int", "float"):
        number = _number(value)
        if number is None or (kind == "int" and not float(number).is_integer()):
            raise ValueError(f"must be {'a whole number' if kind == 'int' else 'a number'}, got {value!r}")
        return int(number) if kind == "int" else float(number)
    if kind == "bool" and not isinstance(value, bool):
        word = str(value).strip().lower()
        if word not in _TRUE + _FALSE:
            raise ValueError(f"must be true or false, got {value!r}")
        return word in _TRUE
    if kind == "choice" and isinstance(value, str):
        with contextlib.suppress(ValueError):
            return int(value)
    return value


def _number(value: Any) -> int | float | None:
    """A finite number from a number or its text; None for anything else (a bool, "nan", "many")."""
    if isinstance(value, bool):
        return None
    if isinstance(value, str):
        text = value.strip()
        try:
            return int(text)
        except ValueError:
            try:
                value = float(text)
            except ValueError:
                return None
    if isinstance(value, (int, float)) and math.isfinite(value):
        return value
    return None


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
