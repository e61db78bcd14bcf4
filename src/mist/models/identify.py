"""Which model family (`mist.models.architectures.FAMILIES`) a model belongs to, told without building it, so that a
face can refuse a method the model cannot run before it accepts the work (the HTTP service at submission, the web UI
before its job starts)."""

from __future__ import annotations

import os
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
    if is_vae_folder(path):
        return vae_folder_family(path)
    if path.is_dir():
        return pipeline_family(path)
    if not path.is_file():
        raise ValueError(f"{path}: no such model file or folder")
    state, keys = read_original_state_dict(path, frozenset())
    return families.file_family(path, state, keys)

