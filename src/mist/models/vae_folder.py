"""A diffusers VAE folder alone: config.json (an AutoencoderKL's) beside its weights, no pipeline around it, as VAE
repositories publish them. Its family is told from the latent channels, scale and shift its config carries
(`families.lone_vae_family`), which also tells SD 3.x's 16-channel VAE from Flux's; only its encoder (and decoder for
evaluation) is loaded, and only the encoder-side methods run on it."""

from __future__ import annotations

from pathlib import Path

from mist.models import families
from mist.models.architectures import FAMILIES, Family, encoder_only
from mist.models.components import StableDiffusion
from mist.models.loading import assemble, empty_modules, read_json, vae_state


def is_vae_folder(path: str | Path) -> bool:
    """Whether `path` is a diffusers VAE folder alone (config.json of an AutoencoderKL, no model_index.json)."""
    path = Path(path)
    config = path / "config.json"
    return (path.is_dir() and config.is_file() and not (path / "model_index.json").is_file()
            and read_json(config).get("_class_name") == "AutoencoderKL")


def vae_folder_family(folder: Path) -> Family:
    """The family of the VAE folder `folder`, as one without its denoiser; ValueError naming it for factors that
    match no family."""
    return families.lone_vae_family(folder, read_json(folder / "config.json"))


def load_vae_folder(folder: Path, parts: frozenset[str]) -> StableDiffusion:
    """The VAE encoder (and decoder if `parts` has it) of the VAE folder `folder`; ValueError naming the folder when
    `parts` asks for a denoiser or text encoder."""
    family = vae_folder_family(folder)
    families.refuse_denoiser_parts(folder, family, parts)
    arch = encoder_only(FAMILIES[family.key], read_json(folder / "config.json"), folder.name)
    _, encoder, _, decoder = empty_modules(arch, parts)
    return assemble(folder, arch, None, encoder, None, decoder, {}, vae_state(folder, parts), {})

