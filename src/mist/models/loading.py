"""Build a `StableDiffusion` from a single-file checkpoint, a diffusers folder, or random weights; never online.

Every format ends in the same place: three state dicts in diffusers / transformers naming, loaded strictly into modules
built from an `Architecture`. Single files (`.ckpt`, `.safetensors`) carry the original CompVis layout and are renamed
with diffusers' own converters; `.ckpt` files are read with `torch.load(weights_only=True)`, which refuses to run code.

SD 1.x, 2.x and XL load whole (`mist.models.families` tells them): a single file's UNet and text encoders take the
family's shipped shapes (`architectures.whole`), a diffusers folder's its own configs. SD 3.x and Flux load whole from
diffusers folders (`flow_loading`: the transformer, and the prompts embedded by the text encoders, which are then
freed) and from single files (`flow_files`: shapes from the weights; `text_files`: the text encoders inside the file
or named beside it; a Flux transformer's VAE from the ae.safetensors beside it), the transformer read in the run's
type. A single file's VAE shape is read from its weights (its scale and shift factors are the family's shipped
config's); a diffusers folder's VAE from its vae/config.json. What cannot fit in memory is refused before this module
reads anything (`mist.models.load_model`, with `mist.models.footprint`'s count).
"""

from __future__ import annotations

import json
import logging
import re
from dataclasses import replace
from pathlib import Path

import torch
from torch import nn

from mist.models import families, flow_files, flow_loading, flow_text, text_files
from mist.models.architectures import FAMILIES, SD_V1, TINY, Architecture, Family, encoder_only, whole
from mist.models.components import PROMPTS, StableDiffusion, latent_decoder, latent_encoder
from mist.models.families import FIRST_CONV, UNET, VAE_PARTS, first_cross_attention
from mist.models.noising import check_prediction_type

log = logging.getLogger(__name__)

_TEXT = "cond_stage_model.transformer."
# Where single files keep their text encoders: SD 1.x's CLIP and SD 2.x's OpenCLIP under cond_stage_model., SDXL's
# CLIP-L under conditioner.embedders.0.transformer. and its OpenCLIP-G under conditioner.embedders.1.model.
TEXT_PREFIXES = ("cond_stage_model.", "conditioner.embedders.")
_SDXL_TOWERS = ("conditioner.embedders.0.transformer.", "conditioner.embedders.1.model.")
# The key prefixes of each model part a caller can ask for beside the VAE's (`families.VAE_PARTS`, below the file's VAE
# prefix); EMA copies and optimiser state are never read, and a part the run does not need is not read either (the
# UNet is 3.4 GB in float32). The VAE decoder only serves evaluation. "text_encoder" keeps the embeddings of Mist's
# prompts; "text_model" keeps the text encoder itself (and them).
_PART_PREFIXES = {"unet": (UNET,), "text_encoder": TEXT_PREFIXES, "text_model": TEXT_PREFIXES}
KNOWN_PARTS = frozenset(_PART_PREFIXES) | frozenset(VAE_PARTS)
# What is loaded when no parts are named: every part a protection method can use; never the decoder or text model.
DEFAULT_PARTS = KNOWN_PARTS - {"decoder", "text_model"}
TEXT_PARTS = frozenset({"text_encoder", "text_model"})
# Parts of the error `torch.load(weights_only=True)` raises for a pickle it refuses (PyTorch 2.5 to 2.13 wording).
_PICKLED_GLOBAL = re.compile(r"Unsupported global: GLOBAL (\S+)")
_UNPICKLER_REASON = re.compile(r"WeightsUnpickler error:\s*(.+?)\s*(?:Please use|\n\n|$)", re.S)


class _InertPickledObject:
    """Stands in for metadata objects (e.g. Lightning callbacks) pickled into some .ckpt files; keeps no state."""

    def __init__(self, *args: object, **kwargs: object) -> None:
        pass

    def __setstate__(self, state: object) -> None:
        pass


def _checkpoint_metadata_globals() -> list:
    """Globals that SD checkpoints saved by PyTorch Lightning reference outside their tensors: its callback objects
    (mapped onto an inert class, so nothing is imported or run) and NumPy scalars and arrays in the training metadata
    (pure data; pickles name them under numpy 1's `numpy.core` or numpy 2's `numpy._core`)."""
    import codecs

    import numpy as np

    allowed: list = [(_InertPickledObject, f"{package}.callbacks.model_checkpoint.ModelCheckpoint")
                     for package in ("pytorch_lightning", "lightning.pytorch")]
    multiarray = np._core.multiarray if hasattr(np, "_core") else np.core.multiarray
    for module in ("numpy.core.multiarray", "numpy._core.multiarray"):
        allowed += [(multiarray.scalar, f"{module}.scalar"), (multiarray._reconstruct, f"{module}._reconstruct")]
    allowed += [np.dtype, np.ndarray, (codecs.encode, "_codecs.encode")]
    allowed += [type(np.dtype(code)) for code in "?bhilqBHILQefdgFDG"]  # the dtype classes numpy 2 pickles by name
    return allowed


def build_random(arch: Architecture = TINY, seed: int = 0, parts: frozenset[str] = DEFAULT_PARTS) -> StableDiffusion:
    """A randomly initialised model of `arch` (the tiny one by default), reproducible from `seed` (the same weights
    whatever `parts` keeps). Protects nothing."""
    from diffusers import UNet2DConditionModel

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        unet = UNet2DConditionModel(**arch.unet)
        encoder = latent_encoder(arch)
        text = _text_module(arch)
        decoder = latent_decoder(arch)  # drawn last, so the other parts' weights are those of earlier releases
    return StableDiffusion.assemble(arch, encoder, unet if "unet" in parts else None,
                                    text if parts & TEXT_PARTS else None, source=arch.name, random_weights=True,
                                    decoder=decoder if "decoder" in parts else None,
                                    keep_text_encoder="text_model" in parts)


def load_single_file(path: Path, arch: Architecture = SD_V1, parts: frozenset[str] = DEFAULT_PARTS,
                     text_encoders: tuple[Path, ...] = (), dtype: torch.dtype = torch.float32) -> StableDiffusion:
    """Load an original-layout checkpoint (`.ckpt`/`.pt`/`.pth` or `.safetensors`): SD v1 (of shape `arch`), NovelAI
    text keys included, SD 2.x, SDXL, SD 3.x or Flux (`mist.models.families`), or another family's VAE; only `parts`
    (and the VAE encoder) are read. `text_encoders`: SD 3.x's or Flux's text encoder files; `dtype`: the type their
    transformer is read in."""
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint, convert_ldm_vae_checkpoint

    state, keys = read_original_state_dict(path, parts)
    family = families.file_family(path, state, keys)
    if family.flow:
        with flow_loading.quiet_progress():
            return _load_file_flow(path, family, keys, parts, text_encoders, dtype)
    if text_encoders:
        raise ValueError(f"text_encoders: {path.name} is a {family.title} file, which takes no text encoder files "
                         "(only SD 3.x's and Flux's single files do)")
    if not family.denoiser:
        return _load_file_vae(path, family, state, keys, parts)
    if family.key != "sd1":
        return _load_file_whole(path, family, state, keys, parts, arch)
    _check_original_layout(path, state, keys, arch)
    unet, encoder, text, decoder = empty_modules(arch, parts)
    try:
        unet_state = convert_ldm_unet_checkpoint(state, dict(unet.config)) if unet is not None else {}
        vae_state = convert_ldm_vae_checkpoint(state, {**arch.vae})
    except (KeyError, IndexError) as exc:  # the converters index the weights they expect directly
        raise ValueError(f"{path}: not a Stable Diffusion v1 model: weights missing ({exc})") from exc
    text_state = _tower_states(text, [_below(state, _TEXT)])
    return assemble(path, arch, unet, encoder, text, decoder, unet_state, vae_state, text_state,
                     keep_text="text_model" in parts)


def _below(state: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    """The tensors of `state` under `prefix`, named without it."""
    return {key[len(prefix) :]: tensor for key, tensor in state.items() if key.startswith(prefix)}


def _load_file_whole(path: Path, family: Family, state: dict[str, torch.Tensor], keys: list[str],
                     parts: frozenset[str], shapes: Architecture) -> StableDiffusion:
    """An SD 2.x or SDXL single file: the family's shipped shapes (or `shapes`, when they are of this family: a test's
    tiny model), the VAE's read from its weights, the prediction type from its name (`file_prediction_type`)."""
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint, convert_open_clip_checkpoint

    families.refuse_denoiser_parts(path, family, parts)
    prefix = families.vae_prefix(keys)
    vae = families.vae_config_from_weights(path, family, state, keys, prefix)
    arch = whole(family, vae, path.name, families.file_prediction_type(path, family),
                 shapes if shapes.family == family.key else None)
    unet, encoder, text, decoder = _buildable_modules(path, family, arch, parts)
    try:
        unet_state = convert_ldm_unet_checkpoint(state, dict(unet.config)) if unet is not None else {}
    except (KeyError, IndexError) as exc:  # the converter indexes the weights it expects directly
        raise ValueError(f"{path}: not a {family.title} model: UNet weights missing ({exc})") from exc
    towers = []
    if text is not None and family.key == "sdxl":
        towers = [_below(state, _SDXL_TOWERS[0]), convert_open_clip_checkpoint(text[1], state, _SDXL_TOWERS[1])]
    elif text is not None:
        towers = [convert_open_clip_checkpoint(text, state, families.SD2_TEXT)]
    return assemble(path, arch, unet, encoder, text, decoder, unet_state, _file_vae_state(state, prefix, vae),
                     _tower_states(text, towers))


def _load_file_vae(path: Path, family: Family, state: dict[str, torch.Tensor], keys: list[str],
                   parts: frozenset[str]) -> StableDiffusion:
    """The VAE (encoder, and decoder if asked) of a single file of an encoder-only `family`, or of SD 3.x or Flux."""
    families.refuse_denoiser_parts(path, family, parts)
    prefix = families.vae_prefix(keys)
    vae = families.vae_config_from_weights(path, family, state, keys, prefix)
    arch = encoder_only(family, vae, path.name)
    _, encoder, _, decoder = empty_modules(arch, parts)
    return assemble(path, arch, None, encoder, None, decoder, {}, _file_vae_state(state, prefix, vae), {})


def _load_file_flow(path: Path, family: Family, keys: list[str], parts: frozenset[str],
                    text_encoders: tuple[Path, ...], dtype: torch.dtype) -> StableDiffusion:
    """An SD 3.x or Flux single file: its VAE (a Flux transformer's: the ae.safetensors beside it), and for the
    denoiser-side methods its transformer, in `dtype`, and the prompts' conditioning by the text encoders inside it
    or in `text_encoders`, run and freed before the transformer is read."""
    families.refuse_denoiser_parts(path, family, parts)
    vae_path = families.vae_file(path, family, keys)
    state, vae_keys = read_original_state_dict(vae_path, parts & frozenset(VAE_PARTS))
    model = replace(_load_file_vae(vae_path, family, state, vae_keys, parts & frozenset(VAE_PARTS)), source=str(path))
    text = bool(parts & TEXT_PARTS)
    if not text and "unet" not in parts:
        return model
    head = flow_files.header(path)
    inner = flow_files.below(head, flow_files.transformer_prefix(head))
    config = flow_files.transformer_config(path, family.key, inner)
    schedule = "sd3" if family.key == "sd3" else "dev" if config["guidance_embeds"] else "schnell"
    arch = flow_loading.architecture(family, model.arch.vae, path.name, config if "unet" in parts else {},
                                     flow_files.SCHEDULES[schedule])
    states, pooled = {}, {}
    if text:
        found = text_files.towers(path, head, text_encoders, family.key)
        states, pooled = text_files.embed(found, family.key, config["joint_attention_dim"],
                                          config.get("guidance_embeds", False), PROMPTS)
    denoiser = None
    if "unet" in parts:
        denoiser = flow_loading.wrapped(arch, flow_files.load_transformer(path, family.key, head, config, dtype))
    return replace(model, arch=arch, unet=denoiser, text_embeddings=states, pooled_embeddings=pooled)


def _file_vae_state(state: dict[str, torch.Tensor], prefix: str, vae: dict) -> dict[str, torch.Tensor]:
    """A single file's VAE weights (under `prefix`) renamed for diffusers' modules of config `vae`."""
    from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint

    own = tuple(prefix + p for names in VAE_PARTS.values() for p in names)
    return convert_ldm_vae_checkpoint({k[len(prefix) :]: v for k, v in state.items() if k.startswith(own)}, vae)


def load_diffusers_folder(folder: Path, parts: frozenset[str] = DEFAULT_PARTS,
                          dtype: torch.dtype = torch.float32) -> StableDiffusion:
    """Load a diffusers-format folder (`unet/`, `vae/`, `text_encoder/`, as in a Hugging Face snapshot): SD 1.x, 2.x,
    XL, 3.x and Flux whole (the last two's transformer read in `dtype`), or the VAE of another family's pipeline
    (model_index.json names it)."""
    family = pipeline_family(folder)
    if not family.denoiser:
        return _load_folder_vae(folder, family, parts)
    if family.flow:
        with flow_loading.quiet_progress():
            return _load_folder_flow(folder, family, parts, dtype)
    if family.key != "sd1":
        return _load_folder_whole(folder, family, parts)
    configs = {part: read_json(folder / part / "config.json") for part in ("unet", "vae", "text_encoder")}
    prediction = _scheduler_config(folder)[1].get("prediction_type", "epsilon")
    unet_cfg, text_cfg = configs["unet"], configs["text_encoder"]
    problems = []
    if prediction != "epsilon":
        problems.append(f"it predicts '{prediction}', SD v1 predicts noise ('epsilon')")
    if unet_cfg.get("use_linear_projection") or unet_cfg.get("addition_embed_type"):
        problems.append("its UNet is an SD 2.x / SDXL design")
    if unet_cfg.get("in_channels") != 4:
        problems.append(f"its UNet takes {unet_cfg.get('in_channels')} channels (an inpainting or other variant)")
    if unet_cfg.get("cross_attention_dim") != text_cfg.get("hidden_size"):
        problems.append("its UNet and text encoder do not fit together")
    if problems:
        raise ValueError(f"{folder}: not a Stable Diffusion v1 model: {'; '.join(problems)}")
    arch = Architecture(name=folder.name, unet=unet_cfg, vae=configs["vae"], text=text_cfg,
                        latent_scale=configs["vae"].get("scaling_factor", 0.18215))
    unet, encoder, text, decoder = empty_modules(arch, parts)
    return assemble(
        folder, arch, unet, encoder, text, decoder,
        read_weights(folder / "unet", ("diffusion_pytorch_model",)) if unet is not None else {},
        vae_state(folder / "vae", parts),
        read_weights(folder / "text_encoder", ("model", "pytorch_model")) if text is not None else {},
        keep_text="text_model" in parts,
    )


def pipeline_family(folder: Path) -> Family:
    """A diffusers pipeline folder's family, told from its model_index.json and the UNet and text encoder configs it
    has (nothing else is read); ValueError naming the folder for what Mist refuses."""
    index = read_json(folder / "model_index.json") if (folder / "model_index.json").is_file() else {}
    present = {part: read_json(folder / part / "config.json") for part in ("unet", "text_encoder")
               if (folder / part / "config.json").is_file()}
    return families.folder_family(folder, index, present)


def _scheduler_config(folder: Path) -> tuple[Path, dict]:
    """Where a diffusers folder's scheduler config is, and what it holds ({} when there is none)."""
    scheduler = folder / "scheduler" / "scheduler_config.json"
    return scheduler, read_json(scheduler) if scheduler.is_file() else {}


def _load_folder_whole(folder: Path, family: Family, parts: frozenset[str]) -> StableDiffusion:
    """An SD 2.x or SDXL diffusers folder, with its own configs; what its denoiser predicts from its scheduler's."""
    families.refuse_denoiser_parts(folder, family, parts)
    towers = ("text_encoder", "text_encoder_2") if family.key == "sdxl" else ("text_encoder",)
    needed = ("vae", *(("unet",) if "unet" in parts else ()), *(towers if parts & TEXT_PARTS else ()))
    configs = {part: read_json(folder / part / "config.json") for part in needed}
    scheduler, schedule = _scheduler_config(folder)
    prediction = schedule.get("prediction_type", "epsilon")
    shapes = Architecture(name=folder.name, unet=configs.get("unet", {}), vae=configs["vae"],
                          text=configs.get("text_encoder", {}), text_2=configs.get("text_encoder_2", {}),
                          family=family.key)
    arch = whole(family, configs["vae"], folder.name, check_prediction_type(prediction, str(scheduler)), shapes)
    unet, encoder, text, decoder = _buildable_modules(folder, family, arch, parts)
    text_states = [read_weights(folder / tower, ("model", "pytorch_model")) for tower in towers if text is not None]
    return assemble(folder, arch, unet, encoder, text, decoder,
                     read_weights(folder / "unet", ("diffusion_pytorch_model",)) if unet is not None else {},
                     vae_state(folder / "vae", parts), _tower_states(text, text_states))


def _buildable_modules(source: Path, family: Family, arch: Architecture, parts: frozenset[str]
                       ) -> tuple[nn.Module | None, nn.Module, nn.Module | None, nn.Module | None]:
    """`empty_modules(arch, parts)`; ValueError naming `source`, in one line, for shapes diffusers cannot build."""
    try:
        return empty_modules(arch, parts)
    except ValueError as exc:  # diffusers refuses widths its layers cannot take (e.g. group norms)
        raise ValueError(f"{source}: not a {family.title} model Mist can read: {exc}") from exc


def _load_folder_flow(folder: Path, family: Family, parts: frozenset[str], dtype: torch.dtype) -> StableDiffusion:
    """An SD 3.x or Flux diffusers folder: VAE, transformer (transformer/, read in `dtype`) and the prompts'
    conditioning, embedded by the text encoders before the transformer is read (`flow_text`)."""
    families.refuse_denoiser_parts(folder, family, parts)
    text = bool(parts & TEXT_PARTS)
    joint = read_json(folder / "transformer" / "config.json") if "unet" in parts or text else {}
    arch = flow_loading.architecture(family, read_json(folder / "vae" / "config.json"), folder.name,
                                     joint if "unet" in parts else {}, _scheduler_config(folder)[1])
    _, encoder, _, decoder = empty_modules(arch, parts - {"unet"} - TEXT_PARTS)
    states, pooled = {}, {}
    if text:
        states, pooled = flow_text.embed(folder, family.key, joint["joint_attention_dim"],
                                         bool(joint.get("guidance_embeds")), PROMPTS)
    model = assemble(folder, arch, None, encoder, None, decoder, {}, vae_state(folder / "vae", parts), {})
    denoiser = flow_loading.load_denoiser(folder, arch, dtype) if "unet" in parts else None
    return replace(model, unet=denoiser, text_embeddings=states, pooled_embeddings=pooled)


def _load_folder_vae(folder: Path, family: Family, parts: frozenset[str]) -> StableDiffusion:
    """The VAE (encoder, and decoder if asked) of a diffusers folder of an encoder-only `family`."""
    families.refuse_denoiser_parts(folder, family, parts)
    arch = encoder_only(family, read_json(folder / "vae" / "config.json"), folder.name)
    _, encoder, _, decoder = empty_modules(arch, parts)
    return assemble(folder, arch, None, encoder, None, decoder, {}, vae_state(folder / "vae", parts), {})


def vae_state(vae_folder: Path, parts: frozenset[str]) -> dict[str, torch.Tensor]:
    """The weights in a diffusers VAE folder (a pipeline's vae/, or a VAE published alone) that `parts` use: the
    encoder's, and the decoder's if asked."""
    wanted = tuple(p for part in ("encoder", "decoder") if part in parts | {"encoder"} for p in VAE_PARTS[part])
    return {k: v for k, v in read_weights(vae_folder, ("diffusion_pytorch_model",)).items() if k.startswith(wanted)}


def empty_modules(arch: Architecture, parts: frozenset[str]
                   ) -> tuple[nn.Module | None, nn.Module, nn.Module | None, nn.Module | None]:
    """The UNet, VAE encoder, text encoder and VAE decoder, with unallocated weights (meta device) where that is safe,
    so building the 860M UNet costs neither time nor memory; None for a part not in `parts` (the encoder is always
    built)."""
    from diffusers import UNet2DConditionModel

    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(arch.unet) if "unet" in parts else None
        encoder = latent_encoder(arch)
        decoder = latent_decoder(arch) if "decoder" in parts else None
    # The text encoder is built for real: it is small, and some transformers versions give it non-persistent buffers
    # (position ids) that no checkpoint holds and that would stay unallocated on the meta device.
    text = _text_module(arch) if parts & TEXT_PARTS else None
    return unet, encoder, text, decoder


def _text_module(arch: Architecture) -> nn.Module:
    """`arch`'s text encoder: one CLIP text tower, or for SDXL (a `text_2`) an `nn.ModuleList` of CLIP-L and of
    OpenCLIP-G with its projection (for the pooled embedding)."""
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    first = CLIPTextModel(CLIPTextConfig(**arch.text))
    if not arch.text_2:
        return first
    return nn.ModuleList([first, CLIPTextModelWithProjection(CLIPTextConfig(**arch.text_2))])


def _tower_states(text: nn.Module | None, states: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """One state dict for the text module `text` from each tower's weights (`states`, in order), named as the
    module names them (`_match_text_level`; an SDXL `nn.ModuleList`'s towers under "0." and "1.")."""
    if text is None:
        return {}
    if not isinstance(text, nn.ModuleList):
        return _match_text_level(states[0], text)
    return {f"{number}.{key}": tensor for number, (tower, state) in enumerate(zip(text, states, strict=True))
            for key, tensor in _match_text_level(state, tower).items()}


def assemble(source: Path, arch: Architecture, unet: nn.Module | None, encoder: nn.Module, text: nn.Module | None,
              decoder: nn.Module | None, unet_state: dict, vae_state: dict, text_state: dict,
              keep_text: bool = False) -> StableDiffusion:
    title = "Stable Diffusion v1" if arch.family == "sd1" else FAMILIES[arch.family].title
    for name, module, state in (("UNet", unet, unet_state), ("VAE encoder", encoder, vae_state),
                                ("text encoder", text, text_state), ("VAE decoder", decoder, vae_state)):
        if module is None:
            continue
        expected = set(module.state_dict())
        missing = sorted(k for k in expected if state.get(k) is None)  # converters fill gaps with None
        if missing:
            raise ValueError(f"{source}: not a {title} model: {len(missing)} {name} weights missing "
                             f"(first: {missing[0]})")
        try:
            module.load_state_dict({k: state[k].float() for k in expected}, strict=True, assign=True)
        except RuntimeError as exc:
            first_line = str(exc).strip().splitlines()[-1].strip()
            raise ValueError(f"{source}: not a {title} model: {name} weights do not fit ({first_line})") from exc
    return StableDiffusion.assemble(arch, encoder, unet, text, source=str(source), decoder=decoder,
                                    keep_text_encoder=keep_text)


def _match_text_level(state: dict[str, torch.Tensor], text: nn.Module) -> dict[str, torch.Tensor]:
    """Rename CLIP keys to the module's own naming: with or without the `text_model.` level (it differs between
    transformers versions, and NovelAI-style checkpoints drop it); position ids are a buffer, not a weight; a key
    the module has as it is (a projection's `text_projection.weight`) stays."""
    own = set(text.state_dict())
    nested = any(k.startswith("text_model.") for k in own)
    renamed = {}
    for key, tensor in state.items():
        bare = key[len("text_model.") :] if key.startswith("text_model.") else key
        if key in own:
            renamed[key] = tensor
        elif bare != "embeddings.position_ids":
            renamed["text_model." + bare if nested else bare] = tensor
    return renamed


def keys_to_read(keys: list[str], parts: frozenset[str]) -> set[str]:
    """The keys of a checkpoint to read for `parts` (the VAE encoder always): their weights, and the UNet weights the
    family and layout checks read. A family whose denoiser Mist does not run has only its VAE's read, whatever the
    parts (the run is refused before anything is built)."""
    vae = families.vae_prefix(keys)
    named = families.family_from_names(keys)
    prefixes = tuple(vae + p for part in ("encoder", "decoder") if part in parts | {"encoder"} for p in VAE_PARTS[part])
    if named is None or named.denoiser and not named.flow:  # SD 3.x's and Flux's other parts: `_load_file_flow`
        prefixes += tuple(prefix for part in parts & set(_PART_PREFIXES) for prefix in _PART_PREFIXES[part])
    cross = first_cross_attention(keys)
    return {k for k in keys if k.startswith(prefixes) or k == FIRST_CONV or k == cross}


def read_original_state_dict(path: Path, parts: frozenset[str]) -> tuple[dict[str, torch.Tensor], list[str]]:
    """The tensors of `parts` (the VAE encoder always) with the UNet weights the layout check reads, and every key
    name of the checkpoint."""

    try:
        if path.suffix.lower() == ".safetensors":
            from safetensors import safe_open

            with safe_open(str(path), framework="pt") as handle:
                keys = list(handle.keys())
                return {k: handle.get_tensor(k) for k in keys_to_read(keys, parts)}, keys
        with torch.serialization.safe_globals(_checkpoint_metadata_globals()):
            try:
                checkpoint = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
            except RuntimeError as exc:
                if "mmap" not in str(exc):
                    raise
                checkpoint = torch.load(path, map_location="cpu", weights_only=True)  # legacy (non-zip) format
    except Exception as exc:  # a truncated or foreign file fails in many ways; all mean "cannot read it"
        raise unreadable(path, exc, "cannot read as a checkpoint") from exc
    while isinstance(checkpoint, dict) and isinstance(checkpoint.get("state_dict"), dict):
        checkpoint = checkpoint["state_dict"]
    if not isinstance(checkpoint, dict):
        raise ValueError(f"{path}: cannot read as a checkpoint: it holds no state dict")
    keys = [k for k, v in checkpoint.items() if isinstance(k, str) and isinstance(v, torch.Tensor)]
    return {k: checkpoint[k] for k in keys_to_read(keys, parts)}, keys


def unreadable(path: Path, exc: Exception, problem: str) -> ValueError:
    """One line saying why `path` cannot be read. A pickle that asks for a Python global (a function or class: code
    that would run, or objects beyond tensors) is named as such; PyTorch's own text, which explains how to load such a
    file without the safety check, is never passed on."""
    text = str(exc)
    asked = _PICKLED_GLOBAL.search(text)
    if asked:
        return ValueError(f"{path}: refused: the file contains code or Python objects that Mist will not load "
                          f"(it asks for the Python global {asked.group(1)}); a Stable Diffusion checkpoint needs only "
                          "tensors")
    if text.startswith("Weights only load failed"):
        reason = _UNPICKLER_REASON.search(text)
        detail = reason.group(1).strip() if reason else "its pickled data is not plain weights"
        return ValueError(f"{path}: {problem}: not a PyTorch file of plain weights ({detail})")
    detail = text.strip().splitlines()[0] if text.strip() else type(exc).__name__
    return ValueError(f"{path}: {problem}: {detail[:200]}")


def _check_original_layout(path: Path, state: dict[str, torch.Tensor], keys: list[str], arch: Architecture) -> None:
    cross = state.get(first_cross_attention(keys) or "")
    first = state.get(FIRST_CONV)
    if cross is None or first is None or not any(k.startswith(_TEXT) for k in keys):
        raise ValueError(f"{path}: not a Stable Diffusion v1 checkpoint (its UNet or text encoder weights are missing)"
                         " nor another model family Mist recognises")
    if cross.shape[1] != arch.cross_attention_dim:
        raise ValueError(f"{path}: cross-attention width {cross.shape[1]}, SD v1 has {arch.cross_attention_dim}: "
                         "not a Stable Diffusion v1 checkpoint")
    channels = first.shape[1]
    if channels != 4:
        raise ValueError(f"{path}: its UNet takes {channels} input channels (an inpainting or other variant);"
                         " Mist needs a plain SD v1 checkpoint")


def read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ValueError(f"{path}: cannot read model config: {exc}") from exc


def read_weights(folder: Path, stems: tuple[str, ...]) -> dict[str, torch.Tensor]:
    """The weights of one diffusers component (`weights_file`)."""
    from safetensors.torch import load_file

    candidate = weights_file(folder, stems)
    try:
        if candidate.suffix == ".safetensors":
            return load_file(str(candidate))
        return torch.load(candidate, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise unreadable(candidate, exc, "cannot read weights") from exc


def weights_file(folder: Path, stems: tuple[str, ...]) -> Path:
    """The weights file of one diffusers component: safetensors and full precision preferred, `.fp16` variants
    accepted; ValueError naming the folder when there is none."""
    for stem in stems:
        for variant in ("", ".fp16"):
            for suffix in (".safetensors", ".bin"):
                candidate = folder / f"{stem}{variant}{suffix}"
                if candidate.is_file():
                    return candidate
    raise ValueError(f"{folder}: no weights file found (looked for {stems[0]}.safetensors and .bin)")


def load_path(path: Path, arch: Architecture = SD_V1, parts: frozenset[str] = DEFAULT_PARTS,
              text_encoders: tuple[Path, ...] = (), dtype: torch.dtype = torch.float32) -> StableDiffusion:
    """Load whatever model `path` holds, its VAE encoder and `parts`: a diffusers folder or a single checkpoint file
    (`load_single_file`: `text_encoders` and `dtype` are for SD 3.x's and Flux's)."""
    if path.is_dir() and text_encoders:
        raise ValueError(f"text_encoders: {path.name} is a diffusers folder, which holds its own text encoders")
    if path.is_dir():
        model = load_diffusers_folder(path, parts, dtype)
    elif path.is_file():
        model = load_single_file(path, arch, parts, text_encoders, dtype)
    else:
        raise ValueError(f"{path}: no such model file or folder")
    log.info("loaded %s", path)
    return model

