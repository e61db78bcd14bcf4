"""Where Mist finds a Stable Diffusion v1 model, in order: `--model`, `$MIST_MODEL`, the seed's path, the HF cache."""

from __future__ import annotations

import os
from pathlib import Path

TINY_RANDOM = "tiny-random"
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
    for candidate in (SEED_MODEL_PATH, SEED_MODEL_PATH.with_suffix(".safetensors")):
        if candidate.is_file():
            return candidate.resolve()
    snapshot = _cached_snapshot(hf_cache_dir())
    if snapshot is not None:
        return snapshot
    raise ModelNotFoundError(
        "no Stable Diffusion v1 model found. Looked at: --model (not given), $MIST_MODEL (not set), "
        f"{Path.cwd() / SEED_MODEL_PATH} (and .safetensors), and SD v1.4/v1.5 snapshots in {hf_cache_dir()}.\n"
        f"Get one with:  wget -c {DOWNLOAD_URL}\n"
        f"then:  mkdir -p {SEED_MODEL_PATH.parent} && mv sd-v1-4.ckpt {SEED_MODEL_PATH}\n"
        "or name a .ckpt / .safetensors file or diffusers folder with --model PATH "
        f"(--model {TINY_RANDOM} runs a test model that gives no protection)."
    )


def hf_cache_dir() -> Path:
    """The Hugging Face hub cache folder, following HF_HUB_CACHE and HF_HOME as huggingface_hub does."""
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"]).expanduser()
    home = os.environ.get("HF_HOME") or Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "huggingface"
    return Path(home).expanduser() / "hub"


def _cached_snapshot(cache: Path) -> Path | None:
    """The newest complete diffusers snapshot of a known SD v1 repository in `cache`, if any."""
    for repo in HF_REPOSITORIES:
        snapshots = cache / ("models--" + repo.replace("/", "--")) / "snapshots"
        if not snapshots.is_dir():
            continue
        complete = [s for s in snapshots.iterdir()
                    if all((s / part / "config.json").is_file() for part in ("unet", "vae", "text_encoder"))]
        if complete:
            return max(complete, key=lambda s: s.stat().st_mtime)
    return None
