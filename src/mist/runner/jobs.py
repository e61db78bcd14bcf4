"""The one job runner every face uses (command line, web UI, HTTP service): the model cache and its lock, the checks
of every input and of the output folders before the model loads, resume (finished work is skipped), progress events,
cancel, writing outputs with their metadata; it keeps going on errors and stops when the disk is full.

A run never modifies an input and never leaves a partial output: each PNG is written to a temporary file and renamed
into place (`mist.common.files`). An output whose record (settings with the batch size, Mist version, the model's
SHA-256 and the source's SHA-256) matches the current run is complete and is skipped, so re-running an interrupted
command resumes it; an output made otherwise is only replaced with `overwrite`. The record is the output's own PNG text,
or with minimal metadata the folder's private manifest (`mist.runner.manifest`).
"""

from __future__ import annotations

import errno
import functools
import hashlib
import json
import logging
import os
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Protocol

from PIL import Image

from mist.common import files, images
from mist.runner import manifest, preflight
from mist.engine.attack import Cancelled
from mist.engine.config import ProtectConfig
from mist.engine.ensemble import term_name
from mist.models.device import resolve_precision
from mist.common.download import sha256_file
from mist.runner.model_identity import ModelIdentity
from mist.engine.pipeline import Progress, ProtectedImage, Protector
from mist.version import __version__

if TYPE_CHECKING:
    import torch

    from mist.models import StableDiffusion
    from mist.models.architectures import Family

log = logging.getLogger(__name__)

NO_PROTECTION_WARNING = "made with a random-weight test model: this image has NO protection"
# What minimal metadata leaves out of published images: where the image came from and which model made it.
PRIVATE_KEYS = frozenset({"mist:model", "mist:model-sha256", "mist:source", "mist:source-sha256", "mist:ensemble"})
_DISK_FULL = frozenset({errno.ENOSPC, errno.EDQUOT})
# Where an image failed: its file cannot be used, the attack failed, its output could not be written, or the run
# stopped (disk full, cancelled) before it.
FAILURE_STAGES = ("input", "attack", "output", "not done")


@dataclass(frozen=True)
class Job:
    """One input file and the PNG it becomes. `label`: the name its output records as its source (default: the file's
    own name; the web UI gives the name the file had on the user's computer). `mask`: this image's own mask file,
    in place of the run's."""

    source: Path
    output: Path
    label: str | None = None
    mask: Path | None = None

    @property
    def name(self) -> str:
        return self.label or self.source.name


@dataclass
class BatchSummary:
    done: list[Path] = field(default_factory=list)
    skipped: list[Path] = field(default_factory=list)
    failed: list[tuple[Path, str]] = field(default_factory=list)  # also the images a full disk left undone
    seconds_per_image: list[float] = field(default_factory=list)
    cancelled: bool = False

    @property
    def ok(self) -> bool:
        return not self.failed


class Reporter(Protocol):
    """What a front end hears from a running batch (the CLI draws progress bars, the web UI its progress display)."""

    def batch_started(self, jobs: list[Job], to_do: int) -> None: ...
    def model_loading(self, where: str | Path, device: torch.device) -> None: ...
    def images_started(self, jobs: list[Job], first: int, to_do: int) -> None: ...
    def step(self, jobs: list[Job], progress: Progress) -> None: ...
    def image_done(self, job: Job, result: ProtectedImage) -> None: ...
    def image_skipped(self, job: Job, reason: str) -> None: ...
    def image_failed(self, job: Job, message: str, stage: str) -> None: ...  # stage: one of FAILURE_STAGES


def settings_text(config: ProtectConfig, batch_size: int = 1, metadata: str = "full",
                  compiled: bool = False) -> str:
    """The settings as recorded in outputs: canonical JSON with the attack batch size and, when on, compilation (both
    change the last bits of a result), and the metadata level. Files (the mask, a method's target) appear as SHA-256,
    with their file names only under full metadata (never full paths: the image will be posted)."""
    settings = json.loads(config.to_json())
    for name, path in config.files().items():
        settings[name] = {"sha256": sha256_file(path)} | ({"name": path.name} if metadata == "full" else {})
    if metadata != "full" and "against" in settings:  # model names only under full metadata, as the run's own
        settings["against"] = len(settings["against"])
    settings["batch_size"] = batch_size
    if compiled:
        settings["compiled"] = True
    settings["metadata"] = metadata
    return json.dumps(settings, sort_keys=True, ensure_ascii=False)


def output_metadata(settings: str, model_name: str, protector: Protector, source_name: str, source_sha256: str, *,
                    model_sha256: str | None = None, metadata: str = "full",
                    result: ProtectedImage | None = None) -> dict[str, str]:
    """The PNG text chunks of an output; minimal metadata leaves out `PRIVATE_KEYS` (source name and SHA-256,
    model name and SHA-256, the ensemble's members). With `against` models, `mist:ensemble` records each member (by
    model name) and its loss at the first and the last step of `result`."""
    text = {
        "Software": f"Mist {__version__}",
        "mist:version": __version__,
        "mist:method": protector.config.method,
        "mist:algorithm": protector.method.algorithm(),
        "mist:settings": settings,
        "mist:precision": protector.precision,
        "mist:model": model_name,
        "mist:source": source_name,
        "mist:source-sha256": source_sha256,
    }
    if model_sha256 is not None:
        text["mist:model-sha256"] = model_sha256
    if protector.model.random_weights:
        text["mist:warning"] = NO_PROTECTION_WARNING
    if protector.ensemble and result is not None:
        text["mist:ensemble"] = ensemble_record(protector, result)
    if metadata == "minimal":
        return {key: value for key, value in text.items() if key not in PRIVATE_KEYS}
    return text


def ensemble_record(protector: Protector, result: ProtectedImage) -> str:
    """JSON of an ensemble run's members: how the losses were combined, and each member's model name and raw loss at
    the first and the last step (summed over the image's tiles)."""
    members = [{"model": label, "start": result.start.get(term_name(label)), "end": result.end.get(term_name(label))}
               for label in protector.ensemble]
    return json.dumps({"combine": protector.config.against_combine, "members": members}, sort_keys=True)


def without_model_path(message: str, models: ModelCache | Any) -> str:
    """`message` with the path of the model of `models` (where the server keeps it) and of its server-wide text
    encoder files written as their file or folder names, as faces that serve others show a model's problems;
    unchanged when there is nothing to name."""
    from mist.models import ModelNotFoundError, model_label

    for file in models.text_encoders:
        message = message.replace(str(Path(file).expanduser()), Path(file).name)
    try:
        where = models.where()
    except ModelNotFoundError:
        return message
    return message.replace(str(where), model_label(where))


def served(config: ProtectConfig, models: ModelCache | Any) -> ProtectConfig:
    """`config` as the server of `models` runs it: with the text encoder files its operator named
    (`ModelCache.text_encoders`, for every job: a served job names none of its own); unchanged without them."""
    return config.but(text_encoders=models.text_encoders) if models.text_encoders else config


class ModelCache:
    """The model every job of a face uses: found without loading (for pre-flight checks and resume records), loaded
    on the first job that needs it and kept for the next ones (one model in memory at a time), and a lock that lets
    one attack at a time use the device.

    `model` is what `mist protect --model` accepts (None: the default places), or a loaded StableDiffusion that the
    caller keeps (it is never changed: Protectors work on their own placement of it). `low_memory` and `compile` go
    to every Protector (see `mist.engine.pipeline.Protector`). `text_encoders`: a server's text encoder files for its
    SD 3.x or Flux single file (`mist webui` / `mist serve --text-encoders`), which every job runs with (`served`;
    checked by `check_text_encoders`)."""

    def __init__(self, model: str | os.PathLike | StableDiffusion | None = None, device: str | None = None,
                 low_memory: bool | None = None, compile: bool = False, text_encoders: tuple[str, ...] = ()) -> None:
        from mist.models import StableDiffusion

        self._given = model if isinstance(model, StableDiffusion) else None
        self.model_spec = None if self._given is not None else model
        self.device_name = device
        self.low_memory = low_memory
        self.compile = compile
        self.text_encoders = tuple(text_encoders)
        self.attack_lock = threading.Lock()
        self._load_lock = threading.Lock()
        self._models: dict[str, StableDiffusion] = {}
        self._families: dict[str, Family] = {}  # by resolved path: told once, without loading (`refusal`)
        self._towers_checked: set[str] = set()  # SD 3.x / Flux single files whose text encoders were found
        self.loads = 0  # how many times a model was read (tests check it is once)

    images_at_once = 1  # images the job runner hands `protector().protect_many` per attack batch (a Ray pool: more)

    def where(self) -> str | Path:
        """Where the model is (`tiny-random`, a path, or the given model's source), without loading it; raises
        ModelNotFoundError."""
        from mist.models import resolve_model

        return self._given.source if self._given is not None else resolve_model(self.model_spec)

    def identity(self) -> ModelIdentity:
        """How outputs name the model and resuming recognises it."""
        return ModelIdentity(self.where())

    def refusal(self, config: ProtectConfig) -> str | None:
        """Why the model cannot run `config`'s method (a family whose denoiser Mist does not run, asked for it; an SD
        3.x or Flux single file without the text encoders its denoiser needs), or its `against` members cannot run
        with it: one line naming the model by its file or folder name, never its path; None when it can. The family
        is told once per model without loading it (`mist.models.identify`), the text encoders from the files'
        headers. Raises ModelNotFoundError, or ValueError for a model file Mist refuses or cannot read."""
        from mist.models import model_label
        from mist.models.families import refuse_denoiser_parts

        config = served(config, self)
        where, family = self._family()
        try:
            refuse_denoiser_parts(model_label(where), family, config.parts)
            if family.flow and "unet" in config.parts and Path(str(where)).is_file():
                self._text_towers(Path(str(where)), family.key, config.text_encoders)
        except ValueError as exc:
            return without_model_path(str(exc), self)
        return self._ensemble_refusal(config)

    def check_text_encoders(self) -> None:
        """The start-up check of the server's `text_encoders`: ValueError in one line naming the file and its problem
        when the model is not an SD 3.x or Flux single file (none is taken), or when they and the file do not hold the
        text encoders its family needs (a file that is no text encoder, one its family does not read, two of a kind,
        one missing: `mist.models.text_files.towers`, on the files' headers). Raises as `refusal` does."""
        from mist.models import takes_no_text_encoders

        if not self.text_encoders:
            return
        where, family = self._family()
        if not (family.flow and Path(str(where)).is_file()):
            raise takes_no_text_encoders(where)
        self._text_towers(Path(str(where)), family.key, self.text_encoders)

    def _text_towers(self, model: Path, family: str, files: tuple[str, ...]) -> None:
        """ValueError unless the SD 3.x / Flux single file `model` and the text encoder `files` hold the text
        encoders its family needs (read from their headers, once per model and files)."""
        from mist.models.flow_files import header
        from mist.models.text_files import towers

        key = _cache_key(model, files)
        if key not in self._towers_checked:
            towers(model, header(model), [Path(f).expanduser() for f in files], family)
            self._towers_checked.add(key)

    def _ensemble_refusal(self, config: ProtectConfig) -> str | None:
        """Why `config`'s `against` members cannot run with this model (`mist.engine.ensemble_checks`), counting the
        model's memory as in use when it is loaded already."""
        from mist.engine.ensemble_checks import ensemble_refusal

        where = self.where()
        return ensemble_refusal(config, self._given or self._models.get(_cache_key(where, config.text_encoders))
                                or where)

    def side_multiple(self, config: ProtectConfig) -> tuple[int, str]:
        """The multiple of pixels each side of a processed image (of each tile, in block mode) must be for the model
        and its `against` members to run `config`, and why (`mist.models.families.side_multiple`), told without
        loading a model. Raises as `refusal` does."""
        from mist.engine.ensemble_checks import ensemble_side_multiple

        return ensemble_side_multiple(config, self._family()[1])

    def _family(self) -> tuple[str | Path, Family]:
        """Where the model is and its family (told once per model, without loading it)."""
        from mist.models.architectures import FAMILIES
        from mist.models.identify import model_family

        where = self.where()
        if self._given is not None:
            return where, FAMILIES[self._given.arch.family]
        if str(where) not in self._families:
            self._families[str(where)] = model_family(where)
        return where, self._families[str(where)]

    def device(self) -> torch.device:
        """The device jobs run on; ValueError("device: ...") for one this machine lacks."""
        from mist.models.device import pick_device

        return pick_device(self.device_name)

    def precision(self, precision: str) -> str:
        """What `precision` ("auto" too) is on this cache's device; ValueError for one the device cannot run."""
        return resolve_precision(precision, self.device())

    def protector(self, config: ProtectConfig, *, batch_size: int = 1,
                  on_load: Callable[[str | Path, torch.device], None] | None = None) -> Protector:
        """A Protector for `config` on the cached model, loaded now (`on_load(where, device)` hears of it first) if it
        is not loaded yet, lacks a part `config` needs (`ProtectConfig.parts`: only those are loaded), or cannot serve
        `config`'s precision. Raises ModelNotFoundError, or ValueError for a precision the device cannot run."""
        from mist.engine.objectives import PRECISION_DTYPES

        with self._load_lock:
            device = self.device()
            precision = resolve_precision(config.precision, device)
            if self._given is not None:
                return Protector(self._given, config, device, low_memory=self.low_memory, batch_size=batch_size,
                                 compile=self.compile)
            refused = self._ensemble_refusal(config)  # before the model is read
            if refused:
                raise ValueError(refused)
            model = self._cached(config.parts, PRECISION_DTYPES[precision], device, on_load, config.text_encoders)
            return Protector(model, config, device, low_memory=self.low_memory, batch_size=batch_size,
                             hand_over=True, compile=self.compile)

    def model(self, parts: frozenset[str], on_load: Callable[[str | Path, torch.device], None] | None = None,
              text_encoders: tuple[str, ...] = ()) -> StableDiffusion:
        """The model with at least `parts` (see `mist.models.load_model`; "decoder" for evaluation) in float32, for
        callers that only read it (they place it with `StableDiffusion.placed`, never in place): the given model, or
        the cached one, loaded now if it is not loaded yet, lacks a part, or was converted to half precision
        (`text_encoders`: the files of an SD 3.x or Flux single file's; none: the server's). Raises
        ModelNotFoundError, or ValueError when a given model lacks a part."""
        import torch

        with self._load_lock:
            if self._given is not None:
                missing = parts - self._given.parts
                if missing:
                    raise ValueError(f"model: this model was loaded without its {', '.join(sorted(missing))}")
                return self._given
            return self._cached(parts, torch.float32, self.device(), on_load, text_encoders or self.text_encoders)

    def _cached(self, parts: frozenset[str], dtype: torch.dtype, device: torch.device,
                on_load: Callable[[str | Path, torch.device], None] | None,
                text_encoders: tuple[str, ...] = ()) -> StableDiffusion:
        """The cached model if it has `parts`, float32 or `dtype` weights and the same `text_encoders` (files of an
        SD 3.x or Flux single file's), else a new one with `parts` (and the parts the cached one had), whose SD 3.x or
        Flux transformer is read in `dtype`. The caller holds the load lock."""
        import torch

        from mist.models import load_model

        where = self.where()
        key = _cache_key(where, text_encoders)
        model = self._models.get(key)
        if model is not None and model.dtype not in (torch.float32, dtype):
            # The cached model is handed to each Protector to convert in place (no second copy in memory); once
            # half precision, it cannot be cast back exactly.
            model = None
        if model is not None and not parts <= model.parts:
            parts, model = parts | model.parts, None
        if model is None:
            if on_load is not None:
                on_load(where, device)
            self._models.clear()  # one model in memory at a time
            model = load_model(where, parts=parts, text_encoders=text_encoders, dtype=dtype)
            self.loads += 1
            self._models[key] = model
        return model


def _cache_key(where: str | Path, text_encoders: tuple[str, ...]) -> str:
    """How `ModelCache` files a model: where it is, and the text encoder files an SD 3.x / Flux single file takes."""
    return "\n".join((str(where), *text_encoders))


def run_jobs(jobs: list[Job], config: ProtectConfig, models: ModelCache, reporter: Reporter, *,
             overwrite: bool = False, batch_size: int = 1, metadata: str = "full",
             cancel: threading.Event | None = None) -> BatchSummary:
    """Protect every job's file: the one runner of the command line, the web UI and the HTTP service.

    Each input is checked (`preflight.input_problem`), and outputs already complete are skipped (resume), before the
    model is loaded, and the model is loaded only if some image needs work. `metadata` is "full" or "minimal" (see
    `mist.runner.manifest.METADATA_LEVELS`). Setting `cancel` stops the run after the current step; the images not
    finished are reported as not done and `summary.cancelled` is set. Raises ValueError, before the model loads, for an
    unreadable mask or an output folder that cannot be written, and ModelNotFoundError when there is no model."""
    if metadata not in manifest.METADATA_LEVELS:
        raise ValueError(f"metadata: must be one of {', '.join(manifest.METADATA_LEVELS)}, got {metadata!r}")
    config = served(config, models)  # outputs record the server's text encoder files by name, as the CLI's
    summary = BatchSummary()
    model = models.identity()
    precision = models.precision(config.precision)  # what "auto" means here: outputs record it
    side = functools.cache(lambda: models.side_multiple(config))  # told only if a size needs it (`preflight`)
    masks: dict[Path | None, Image.Image | None] = {None: None}
    settings_of: dict[Path | None, str] = {}  # by the job's own mask (None: the run's)
    pending: list[_Pending] = []
    for job in jobs:
        files.remove_stale_temporaries(job.output)  # left by a killed run; a live writer's are locked and kept
        mask_file = job.mask or config.mask
        if mask_file not in masks:  # each mask file read once; a bad one stops the run before it starts
            masks[mask_file] = images.read_image(mask_file)
        if job.mask not in settings_of:  # the settings hash the files they name: once per distinct mask
            settings_of[job.mask] = settings_text(config if job.mask is None else config.but(mask=job.mask),
                                                  batch_size, metadata, models.compile)
        settings = settings_of[job.mask]
        problem = _preflight(job, config, side)
        if problem is None:
            digest = sha256_file(job.source)
            problem = _existing_output_problem(job, _resume_record(settings, model, digest, precision), overwrite)
            if problem == "":
                summary.skipped.append(job.source)
                reporter.image_skipped(job, f"already protected: {job.output}")
                continue
        if problem:
            _fail(summary, reporter, job, problem, "input")
            continue
        pending.append(_Pending(job, digest, settings, masks[mask_file]))
    for folder in sorted({item.job.output.parent for item in pending}):
        problem = preflight.output_folder_problem(folder)
        if problem:
            raise ValueError(problem)
    reporter.batch_started(jobs, len(pending))
    if not pending:
        return summary
    with models.attack_lock:
        if cancel is not None and cancel.is_set():  # cancelled while waiting for the device
            _cancel(summary, reporter, pending)
            return summary
        protector = models.protector(config, batch_size=batch_size, on_load=reporter.model_loading)
        per_chunk = max(1, batch_size // config.block_num**2) * models.images_at_once
        stopped: str | None = None
        for first in range(0, len(pending), per_chunk):
            chunk = pending[first : first + per_chunk]
            if stopped is not None:
                for item in chunk:
                    _fail(summary, reporter, item.job, f"{item.job.source}: not done: {stopped}", "not done")
                continue
            if cancel is not None and cancel.is_set():
                _cancel(summary, reporter, pending[first:])
                break
            reporter.images_started([item.job for item in chunk], first + 1, len(pending))
            try:
                stopped = _protect_chunk(chunk, protector, model, metadata, reporter, summary, cancel)
            except Cancelled:
                _cancel(summary, reporter, pending[first:])
                break
    return summary


@dataclass(frozen=True)
class _Pending:
    """A job that passed its checks: its source's SHA-256, the settings its output records, its mask image."""

    job: Job
    digest: str
    settings: str
    mask: Image.Image | None


def _protect_chunk(chunk: list[_Pending], protector: Protector, model: ModelIdentity, metadata: str,
                   reporter: Reporter, summary: BatchSummary, cancel: threading.Event | None) -> str | None:
    """Read, protect together and write one attack batch of files; a failure costs only the files it touches.
    Returns why the run must stop (the disk is full), else None. Raises Cancelled when `cancel` is set."""
    readable: list[tuple[_Pending, Image.Image]] = []
    for item in chunk:
        try:
            readable.append((item, images.read_image(item.job.source)))
        except ValueError as exc:
            _fail(summary, reporter, item.job, str(exc), "input")
    if not readable:
        return None
    jobs = [item.job for item, _ in readable]

    def on_step(progress: Progress) -> None:
        if cancel is not None and cancel.is_set():
            raise Cancelled
        reporter.step(jobs, progress)

    try:
        results = protector.protect_many([picture for _, picture in readable], [item.mask for item, _ in readable],
                                         on_step)
    except (RuntimeError, FloatingPointError) as exc:
        hint = " (out of memory: try --block-num 2 or a smaller --input-size)" if "out of memory" in str(exc) else ""
        for job in jobs:
            _fail(summary, reporter, job, f"{job.source}: {str(exc).splitlines()[0][:300]}{hint}", "attack")
        return None
    stopped = None
    for (item, _), result in zip(readable, results, strict=True):
        job = item.job
        if isinstance(result, Exception):  # a remote worker's failure costs only its own image
            _fail(summary, reporter, job, f"{job.source}: {str(result).splitlines()[0][:300]}", "attack")
            continue
        try:
            _write_output(item, result, protector, model, metadata)
        except (ValueError, OSError) as exc:
            problem = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
            _fail(summary, reporter, job, problem if str(job.output) in problem else f"{job.output}: {problem}",
                  "output")
            if isinstance(exc, OSError) and exc.errno in _DISK_FULL:
                stopped = (f"the batch stopped because the disk holding {job.output.parent} is full; free some space "
                           "and run the same command again")
            continue
        summary.done.append(job.source)
        summary.seconds_per_image.append(result.seconds)
        reporter.image_done(job, result)
    return stopped


def _write_output(item: _Pending, result: ProtectedImage, protector: Protector, model: ModelIdentity,
                  metadata: str) -> None:
    """Write one output atomically; with minimal metadata, its private record first (see `mist.runner.manifest`)."""
    job = item.job
    text = output_metadata(item.settings, model.name, protector, job.name, item.digest, model_sha256=model.sha256,
                           metadata=metadata, result=result)
    data = images.encode_png(result.image, text, str(job.output))
    if metadata == "minimal":
        record = _resume_record(item.settings, model, item.digest, protector.precision)
        manifest.write_record(job.output, hashlib.sha256(data).hexdigest(),
                              {key: value for key, value in record.items() if value is not None})
    files.write_atomic(job.output, data)


def _cancel(summary: BatchSummary, reporter: Reporter, left: list[_Pending]) -> None:
    """The run was cancelled: the jobs `left` are not done."""
    summary.cancelled = True
    for item in left:
        if item.job.source not in summary.done:
            _fail(summary, reporter, item.job, f"{item.job.source}: not done: cancelled", "not done")


def _fail(summary: BatchSummary, reporter: Reporter, job: Job, message: str, stage: str) -> None:
    summary.failed.append((job.source, message))
    reporter.image_failed(job, message, stage)


def _resume_record(settings: str, model: ModelIdentity, source_sha256: str, precision: str) -> dict[str, str | None]:
    """What a complete output of this run records; None means "recorded as absent". A model with a SHA-256 is
    known by it alone (a renamed file is the same model), one without by its name. The precision is the one the run
    resolved (`--precision auto` is bf16 on one machine and fp32 on another, with other results)."""
    record = {"mist:version": __version__, "mist:settings": settings, "mist:source-sha256": source_sha256,
              "mist:model-sha256": model.sha256, "mist:precision": precision}
    if model.sha256 is None:
        record["mist:model"] = model.name
    return record


def _existing_output_problem(job: Job, wanted: dict[str, str | None], overwrite: bool) -> str | None:
    """None when the output may be written, "" when it is already complete (skip), else why it must be left alone."""
    if overwrite or not job.output.exists():
        return None
    existing = images.read_png_text(job.output)
    if existing is None or "mist:version" not in existing:
        return f"{job.output}: exists and is not a Mist output; use --overwrite to replace it"
    if "mist:source-sha256" not in existing:  # minimal metadata: the record is private
        existing = manifest.read_record(job.output, sha256_file(job.output))
        if existing is None:
            return (f"{job.output}: exists, but {manifest.manifest_path(job.output)} has no record of it, so it cannot "
                    "be told complete; use --overwrite")
    if all(existing.get(key) == value for key, value in wanted.items()):
        return ""
    return f"{job.output}: exists and {_difference(existing, wanted)}; use --overwrite to replace it"


def _difference(existing: dict[str, str], wanted: dict[str, str | None]) -> str:
    """How an existing output's record differs from this run's, in words."""
    if existing.get("mist:version") != wanted["mist:version"]:
        return f"was made by Mist {existing.get('mist:version')} (this is Mist {wanted['mist:version']})"
    if existing.get("mist:source-sha256") != wanted["mist:source-sha256"]:
        return "was made from another file, or from an earlier version of this one"
    if existing.get("mist:precision") != wanted["mist:precision"]:
        return (f"was made in {existing.get('mist:precision', 'an unrecorded precision')} arithmetic (this run: "
                f"{wanted['mist:precision']})")
    if existing.get("mist:settings") == wanted["mist:settings"]:
        return "was made with another model"
    try:
        old, new = json.loads(existing.get("mist:settings", "")), json.loads(wanted["mist:settings"] or "")
        changed = ", ".join(f"{key} {old.get(key)!r} (now {new.get(key)!r})"
                            for key in sorted(old.keys() | new.keys()) if old.get(key) != new.get(key))
    except (ValueError, AttributeError):
        changed = ""
    return f"was made with other settings: {changed}" if changed else "was made with other settings"


def _preflight(job: Job, config: ProtectConfig, side: Callable[[], tuple[int, str]]) -> str | None:
    """Everything about one job that can be checked without decoding its image fully or loading the model (`side`:
    the multiple of pixels the model needs, `ModelCache.side_multiple`)."""
    if files.resolved(job.output) == files.resolved(job.source):
        return f"{job.source}: its output would replace the input file; choose another output folder"
    return preflight.input_problem(job.source, config, side)


