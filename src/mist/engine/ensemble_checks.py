"""What an ensemble (`--against`, `mist.engine.ensemble`) is checked for before any member is read, each answer one
line naming the models by file or folder name (never a full path):

- a member that cannot run the method: a denoiser-side method needs each member's denoiser and text encoders, which a
  VAE alone (a file or folder) lacks, and which an SD 3.x or Flux single file keeps in files of their own (named with
  `--text-encoders` for the run's model only): as members only their diffusers folders run a denoiser. Told from the
  member's key names and configs (`mist.models.identify`).
- models that together cannot fit in memory: each member's float32 size with the parts the method reads, counted from
  its files' headers as loading counts it (`mist.models.footprint`: the most it holds at once while it loads), plus
  the run's own model where it is still to be read (with its text encoder files), against the
  memory this machine has available. Models already in memory (the run's model in its cache, kept members) are named
  but not counted: the available memory already lacks them. Members load one after the other onto the CPU in float32
  whatever the device, so the check is of the CPU's memory; on a GPU each member then moves there in the run's
  precision.

A member's family is told once per file or folder as it is on disk (`mist.models.identify`); its size is counted
from its headers at each check.
"""

from __future__ import annotations

from pathlib import Path

from mist.common.model_names import TINY_RANDOM
from mist.engine.config import ProtectConfig
from mist.engine.ensemble import kept_member, source_label
from mist.engine.methods import get_method
from mist.models import StableDiffusion, resolve_model
from mist.models.architectures import Family
from mist.models.device import available_ram_bytes
from mist.models.families import refuse_denoiser_parts, side_multiple
from mist.models.footprint import model_footprint
from mist.models.identify import model_family


def ensemble_refusal(config: ProtectConfig, run: str | Path | StableDiffusion | None = None) -> str | None:
    """Why `config`'s ensemble cannot run (see the module's notes), or None (also without `against`). `run` is the
    run's own model: its source when it is still to be read, the model when it is loaded, None to leave it out.
    ValueError naming a member file Mist refuses or cannot read."""
    if not config.against:
        return None
    parts = get_method(config.method).parts_for(config.params)
    named = {_same_file_key(run.source if isinstance(run, StableDiffusion) else resolve_model(run)): "the run's own "
             "model (--model)"} if run is not None else {}
    for spec in config.against:
        where = resolve_model(spec)
        key = _same_file_key(where)
        if key is not None and key in named:
            return f"against: {source_label(spec)}: is {named[key]}: each model counts once; name other models"
        named[key] = "named twice"
        family = model_family(where)
        try:
            refuse_denoiser_parts(source_label(spec), family, parts)
        except ValueError as exc:
            return f"against: {exc}"
        if family.flow and "unet" in parts and Path(where).is_file():
            return (f"against: {source_label(spec)}: a {family.title} single file: as a member only its diffusers "
                    "folder runs the denoiser (a single file's text encoders are named with --text-encoders, for the "
                    "run's own model only)")
    return _memory_refusal(config, parts, run)


def _same_file_key(where: str | Path) -> str | None:
    """What tells two names of one model file or folder apart from others: its resolved path (None: the test model,
    which has no file)."""
    return None if str(where) == TINY_RANDOM else str(Path(where).resolve())


def ensemble_side_multiple(config: ProtectConfig, family: Family) -> tuple[int, str]:
    """The multiple of pixels each side (of each tile) of `config`'s images must be, and why, for the run's model (of
    `family`) and every `against` member alike: the largest (`mist.models.families.side_multiple`)."""
    parts = get_method(config.method).parts_for(config.params)
    members = [side_multiple(model_family(resolve_model(spec)), parts) for spec in config.against]
    return max([side_multiple(family, config.parts), *members], key=lambda found: found[0])


def _memory_refusal(config: ProtectConfig, parts: frozenset[str], run: str | Path | StableDiffusion | None
                    ) -> str | None:
    """The one-line refusal of models that together need more memory than this machine has available, or None."""
    available = available_ram_bytes()
    if available is None:
        return None
    models: list[tuple[str, int, bool]] = []  # label, bytes, in memory already
    if isinstance(run, StableDiffusion):
        models.append((source_label(run.source), _held(run), True))
    elif run is not None:
        files = tuple(Path(f).expanduser() for f in config.text_encoders)
        models.append((source_label(run), model_footprint(resolve_model(run), config.parts, text_encoders=files).peak,
                       False))
    for spec in config.against:
        kept = kept_member(spec, parts)
        models.append((source_label(spec), _held(kept), True) if kept is not None
                      else (source_label(spec), model_footprint(resolve_model(spec), parts).peak, False))
    needed = sum(size for _, size, loaded in models if not loaded)
    if needed <= available:
        return None
    to_read = ", ".join(f"{label} {_size(size)}" for label, size, loaded in models if not loaded)
    loaded = ", ".join(f"{label} {_size(size)}" for label, size, loaded in models if loaded)
    return (f"against: these models need about {_size(needed)} of memory together to load in float32 ({to_read}"
            f"{'; in memory already: ' + loaded if loaded else ''}), and {_size(available)} is available: leave a "
            "model out, or run on a machine with more memory")


def _size(size: int) -> str:
    """Bytes in GB (one decimal), or MB below a tenth of a GB."""
    return f"{size / 1e9:.1f} GB" if size >= 1e8 else f"{size / 1e6:.1f} MB"


def _held(model: StableDiffusion) -> int:
    """The bytes a loaded model's weights take, in whatever type they are now."""
    modules = (model.encoder, model.unet, model.decoder, model.text_encoder)
    return sum(p.numel() * p.element_size() for module in modules if module is not None for p in module.parameters())

