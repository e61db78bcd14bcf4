"""Which model family (`mist.models.architectures.FAMILIES`) a model belongs to, told without building it, so that a
face can refuse a method the model cannot run before it accepts the work (the HTTP service at submission, the web UI
before its job starts).

A process tells each model once: the answer is remembered by the model's resolved path and the modification times and
sizes of the file, or of the folder and the JSON files that tell its family, so a model edited or replaced in place
is told again.
"""

from __future__ import annotations

import os
from functools import lru_cache
from pathlib import Path

from mist.models import families
from mist.models.architectures import FAMILIES, Family
from mist.models.loading import pipeline_family, read_original_state_dict
from mist.models.locate import TINY_RANDOM
from mist.models.vae_folder import is_vae_folder, vae_folder_family


def model_family(where: str | os.PathLike) -> Family:
    """The family of the resolved model `where` (`tiny-random`, a diffusers folder or a single file). A folder is
    told by its JSON files alone; a single file by its key names and the few tensors that tell families apart (with
    the VAE encoder's, a few hundred MB memory-mapped at most, released on return). ValueError naming the file for
    one Mist refuses or cannot read."""
    if str(where) == TINY_RANDOM:
        return FAMILIES["sd1"]
    path = Path(where)
    if not path.exists():
        raise ValueError(f"{path}: no such model file or folder")
    return _told(path, _stamp(path))


def _stamp(path: Path) -> tuple:
    """What changes when the model at `path` is edited: its resolved path, and the modification time and size of the
    file, or of the folder, its JSON files and its components' configs."""
    seen = [path, *sorted(path.glob("*.json")), *sorted(path.glob("*/config.json"))] if path.is_dir() else [path]
    return (str(path.resolve()), *((item.stat().st_mtime_ns, item.stat().st_size) for item in seen))


@lru_cache(maxsize=64)
def _told(path: Path, stamp: tuple) -> Family:
    """`model_family` of the existing `path`, once per `stamp` (`_stamp`)."""
    if is_vae_folder(path):
        return vae_folder_family(path)
    if path.is_dir():
        return pipeline_family(path)
    state, keys = read_original_state_dict(path, frozenset())
    return families.file_family(path, state, keys)
