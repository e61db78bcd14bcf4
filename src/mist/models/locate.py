"""Where Mist finds a Stable Diffusion v1 model, in order: `--model`, `$MIST_MODEL`, the seed's path (under the current
folder, then under Mist's home: `$MIST_HOME`, or the persistent folder install.sh recorded in its environment), the
Hugging Face cache."""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

from mist.common.model_names import TINY_RANDOM

SEED_MODEL_PATH = Path("models/ldm/stable-diffusion-v1/model.ckpt")
DOWNLOAD_URL = "https://huggingface.co/CompVis/stable-diffusion-v-1-4-original/resolve/main/sd-v1-4.ckpt"
# Hugging Face repositories whose diffusers snapshots are SD v1.4 / v1.5.
HF_REPOSITORIES = (
    "CompVis/stable-diffusion-v1-4",
    "stable-diffusion-v1-5/stable-diffusion-v1-5",
    "runwayml/stable-diffusion-v1-5",
)


class ModelNotFoundError(FileNotFoundError):
    """No model at the place the user named, or none anywhere Mist looks by default."""


def resolve_model(spec: str | os.PathLike | None = None) -> str | Path:
    """`TINY_RANDOM` or the path of an existing model file or folder; raises ModelNotFoundError with the places seen."""
    for origin, value in (("--model", spec), ("MIST_MODEL", os.environ.get("MIST_MODEL", "").strip() or None)):
        if value is None or str(value) == "":
            continue
        if str(value) == TINY_RANDOM:
            return TINY_RANDOM
        path = Path(value).expanduser()
        if not path.exists():
            raise ModelNotFoundError(f"{path}: model not found (named by {origin})")
        return path
    for root in default_roots():
        for candidate in (root / SEED_MODEL_PATH, root / SEED_MODEL_PATH.with_suffix(".safetensors")):
            if candidate.is_file():
                return candidate.resolve()
    snapshot = _cached_snapshot(hf_cache_dir())
    if snapshot is not None:
        return snapshot
    places = " and ".join(str(root / SEED_MODEL_PATH) for root in default_roots())
    raise ModelNotFoundError(
        "no Stable Diffusion v1 model found. Looked at: --model (not given), $MIST_MODEL (not set), "
        f"{places} (and .safetensors), and SD v1.4/v1.5 snapshots in {hf_cache_dir()}.\n"
        f"Get one with:  {mist_command()} download-model   (saves it to {default_model_path()})\n"
        f"or:  wget -c {DOWNLOAD_URL}  then:  mkdir -p {SEED_MODEL_PATH.parent} && mv sd-v1-4.ckpt {SEED_MODEL_PATH}\n"
        "or name a .ckpt / .safetensors file or diffusers folder with --model PATH "
        f"(--model {TINY_RANDOM} runs a test model that gives no protection)."
    )


HOME_RECORD = "mist-home"  # written by install.sh into the Python environment it builds: the folder it installed to
LAUNCHER_ENV = "MIST_LAUNCHER"  # set by install.sh's launcher to its own path


def mist_home() -> Path | None:
    """Mist's persistent folder: `$MIST_HOME` (set by install.sh's launcher), else the folder install.sh recorded in
    the running Python environment (so `WORK/mist-env/bin/python mist_v3.py` finds what the launcher finds)."""
    home = os.environ.get("MIST_HOME", "").strip()
    if home:
        return Path(home).expanduser()
    try:
        recorded = (Path(sys.prefix) / HOME_RECORD).read_text(encoding="utf-8").strip()
    except (OSError, UnicodeDecodeError):
        return None
    return Path(recorded) if recorded else None


def default_roots() -> list[Path]:
    """Folders under which the seed's model path is looked for: the current folder, then Mist's home if known."""
    roots = [Path.cwd()]
    home = mist_home()
    if home is not None and home.resolve() != Path.cwd().resolve():
        roots.append(home)
    return roots


def default_model_path(suffix: str = ".ckpt") -> Path:
    """Where `mist download-model` puts a model: under Mist's home when known (a cloud install's persistent folder),
    else under the current folder, at the seed's `models/ldm/stable-diffusion-v1/model.ckpt` (or `.safetensors`)."""
    home = mist_home()
    return (home if home is not None else Path.cwd()) / SEED_MODEL_PATH.with_suffix(suffix)


def mist_command() -> str:
    """How a message should tell the user to run Mist: `mist` when that is on PATH, else the launcher's (or the
    environment's `mist` script's) full path, so that a printed command can be pasted as it is."""
    home = mist_home()
    candidates = [os.environ.get(LAUNCHER_ENV, "").strip(), home / "bin" / "mist" if home else "",
                  Path(sys.executable).parent / "mist"]
    on_path = shutil.which("mist")
    for candidate in candidates:
        if candidate and Path(candidate).is_file():
            if on_path and Path(on_path).resolve() == Path(candidate).resolve():
                return "mist"
            return str(candidate)
    return "mist"


def hf_cache_dir() -> Path:
    """The Hugging Face hub cache folder, following HF_HUB_CACHE and HF_HOME as huggingface_hub does."""
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"]).expanduser()
    home = os.environ.get("HF_HOME") or Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "huggingface"
    return Path(home).expanduser() / "hub"


def hf_repository_dir(repo: str, cache: Path | None = None) -> Path:
    """The folder the Hugging Face cache (`cache`, default `hf_cache_dir()`) keeps repository `repo` ("owner/name")
    in: `models--owner--name`."""
    return (cache if cache is not None else hf_cache_dir()) / ("models--" + repo.replace("/", "--"))


def hf_snapshot(repo: str) -> Path | None:
    """The snapshot of `repo` that the cache's `refs/main` names (`snapshots/<commit>`), as huggingface_hub resolves
    it offline; None when the cache holds no such snapshot."""
    folder = hf_repository_dir(repo)
    try:
        commit = (folder / "refs" / "main").read_text(encoding="utf-8").strip()
    except (OSError, UnicodeDecodeError):
        return None
    snapshot = folder / "snapshots" / commit
    return snapshot if commit and snapshot.is_dir() else None


def _cached_snapshot(cache: Path) -> Path | None:
    """The newest complete diffusers snapshot of a known SD v1 repository in `cache`, if any."""
    for repo in HF_REPOSITORIES:
        snapshots = hf_repository_dir(repo, cache) / "snapshots"
        if not snapshots.is_dir():
            continue
        complete = [s for s in snapshots.iterdir()
                    if all((s / part / "config.json").is_file() for part in ("unet", "vae", "text_encoder"))]
        if complete:
            return max(complete, key=lambda s: s.stat().st_mtime)
    return None
