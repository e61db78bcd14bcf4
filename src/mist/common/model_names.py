"""The name of the random-weight test model and what it changes about a run's defaults, known without importing
PyTorch, so that the command line settles its options before anything heavy loads."""

from __future__ import annotations

import os
from pathlib import Path

TINY_RANDOM = "tiny-random"
# PGD steps a run with the test model takes when no step count is given. Its weights are random, so it protects
# nothing and a run only shows that the tool works; 10 steps keep three 512 x 512 images well under 30 s on a 2-core
# CPU (benchmarks/try_it.py). A step count that is given is always used as it is.
TEST_MODEL_STEPS = 10


def names_test_model(spec: str | os.PathLike | None) -> bool:
    """Whether the model `spec` names (None or empty: what $MIST_MODEL names) is the random-weight test model."""
    named = spec if spec is not None and str(spec) != "" else os.environ.get("MIST_MODEL", "").strip()
    return str(named) == TINY_RANDOM


def default_steps(spec: str | os.PathLike | None, steps: int) -> int:
    """The PGD steps of a run on the model `spec` names when the user gave none: `TEST_MODEL_STEPS` for the test
    model, else `steps` (the settings' own default)."""
    return TEST_MODEL_STEPS if names_test_model(spec) else steps


def model_label(where: str | Path) -> str:
    """How outputs name a resolved model: `tiny-random`, a file or folder name, or a Hugging Face repository id (never
    a full path, which would leak into published images)."""
    if isinstance(where, str):
        return where
    if where.parent.name == "snapshots" and where.parent.parent.name.startswith("models--"):
        return where.parent.parent.name.removeprefix("models--").replace("--", "/")
    return where.name
