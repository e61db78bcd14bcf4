"""Protecting files: plan outputs, check every input and the output folders before the model loads, skip finished
work, keep going on errors, stop when the disk is full.

A batch never modifies an input and never leaves a partial output: each PNG is written to a temporary file and renamed
into place (`mist.files`). An output whose record (settings with the batch size, Mist version, the model's SHA-256 and
the source's SHA-256) matches the current run is complete and is skipped, so re-running an interrupted command resumes
it; an output made otherwise is only replaced with `overwrite`. The record is the output's own PNG text, or with
minimal metadata the folder's private manifest (`mist.manifest`).
"""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import os
import stat
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Protocol

from PIL import Image

from . import __version__, files, images, manifest, preflight
from .config import ProtectConfig
from .download import sha256_file
from .model_identity import ModelIdentity
from .pipeline import Progress, ProtectedImage, Protector

log = logging.getLogger(__name__)

NO_PROTECTION_WARNING = "made with a random-weight test model: this image has NO protection"
# What minimal metadata leaves out of published images: where the image came from and which model made it.
PRIVATE_KEYS = frozenset({"mist:model", "mist:model-sha256", "mist:source", "mist:source-sha256"})
_DISK_FULL = frozenset({errno.ENOSPC, errno.EDQUOT})


@dataclass(frozen=True)
class Job:
    """One input file and the PNG it becomes."""

    source: Path
    output: Path


@dataclass
class BatchSummary:
    done: list[Path] = field(default_factory=list)
    skipped: list[Path] = field(default_factory=list)
    failed: list[tuple[Path, str]] = field(default_factory=list)  # also the images a full disk left undone
    seconds_per_image: list[float] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.failed


class Reporter(Protocol):
    """What a front end hears from a running batch (the CLI draws progress bars, the web UI its progress display)."""

    def batch_started(self, jobs: list[Job], to_do: int) -> None: ...
    def images_started(self, jobs: list[Job], first: int, to_do: int) -> None: ...
    def step(self, jobs: list[Job], progress: Progress) -> None: ...
    def image_done(self, job: Job, result: ProtectedImage) -> None: ...
    def image_skipped(self, job: Job, reason: str) -> None: ...
    def image_failed(self, job: Job, message: str) -> None: ...


def collect_jobs(paths: Iterable[Path], output_dir: Path, recursive: bool = False,
                 suffixes: frozenset[str] = images.IMAGE_SUFFIXES,
                 on_skip: Callable[[Path, str], None] | None = None) -> list[Job]:
    """A job per input: named files as they are, image files (by suffix) inside named folders, sub-folders too
    with `recursive` (hidden ones and the output folder itself excluded). Outputs go to `output_dir` (a folder's
    sub-folders mirrored) as `<name>.png`; names that would clash (a.jpg beside a.png) become `<name>_<suffix>.png`,
    and any clash left (a.png in two named folders) gets a counter: `a_2.png`. A file named twice is done once.

    An entry found in a folder with an image's suffix that is not a file (a symbolic link loop or a broken link, a
    folder not entered, a device) is left out, and `on_skip(path, reason)` hears of it. A named path is always a job
    (or a folder to scan): if it cannot be read, the batch reports it as failed."""
    planned: list[tuple[Path, Path]] = []
    outputs_root = _resolved(output_dir)
    for path in paths:
        path = Path(path)
        if path.is_dir():
            found = path.rglob("*") if recursive else path.iterdir()
            for file in sorted(found):
                relative = file.relative_to(path)
                if file.suffix.lower() not in suffixes or any(part.startswith(".") for part in relative.parts):
                    continue
                if file.is_file():
                    if not _resolved(file).is_relative_to(outputs_root):
                        planned.append((file, relative.parent))
                elif not (recursive and file.is_dir() and not file.is_symlink()):  # a sub-folder rglob enters
                    if on_skip is not None:
                        on_skip(file, _not_a_file(file))
        else:
            planned.append((path, Path()))
    seen_sources: set[Path] = set()
    unique = []
    for source, folder in planned:
        if _resolved(source) not in seen_sources:
            seen_sources.add(_resolved(source))
            unique.append((source, folder))
    suffixes_of: dict[Path, set[str]] = {}
    for source, folder in unique:
        suffixes_of.setdefault(folder / source.stem, set()).add(source.suffix.lower())
    jobs: list[Job] = []
    taken: set[Path] = set()
    for source, folder in unique:
        stem = source.stem
        if len(suffixes_of[folder / stem]) > 1:
            stem = f"{stem}_{source.suffix.lstrip('.').lower()}"
        output, counter = output_dir / folder / f"{stem}.png", 1
        while output in taken:
            counter += 1
            output = output_dir / folder / f"{stem}_{counter}.png"
        taken.add(output)
        jobs.append(Job(source, output))
    return jobs


def settings_text(config: ProtectConfig, batch_size: int = 1, metadata: str = "full") -> str:
    """The settings as recorded in outputs: canonical JSON with the attack batch size (batching changes the last bits
    of a result) and the metadata level. Files (the mask, a method's target) appear as SHA-256, with their file names
    only under full metadata (never full paths: the image will be posted)."""
    settings = json.loads(config.to_json())
    for name, path in config.files().items():
        settings[name] = {"sha256": sha256_file(path)} | ({"name": path.name} if metadata == "full" else {})
    settings["batch_size"] = batch_size
    settings["metadata"] = metadata
    return json.dumps(settings, sort_keys=True, ensure_ascii=False)


def output_metadata(settings: str, model_name: str, protector: Protector, source: Path, source_sha256: str, *,
                    model_sha256: str | None = None, metadata: str = "full") -> dict[str, str]:
    """The PNG text chunks of an output; minimal metadata leaves out `PRIVATE_KEYS` (source name and SHA-256,
    model name and SHA-256)."""
    text = {
        "Software": f"Mist {__version__}",
        "mist:version": __version__,
        "mist:method": protector.config.method,
        "mist:algorithm": protector.method.algorithm(),
        "mist:settings": settings,
        "mist:precision": protector.precision,
        "mist:model": model_name,
        "mist:source": source.name,
        "mist:source-sha256": source_sha256,
    }
    if model_sha256 is not None:
        text["mist:model-sha256"] = model_sha256
    if protector.model.random_weights:
        text["mist:warning"] = NO_PROTECTION_WARNING
    if metadata == "minimal":
        return {key: value for key, value in text.items() if key not in PRIVATE_KEYS}
    return text


def run_batch(jobs: list[Job], config: ProtectConfig, load: Callable[[], Protector], reporter: Reporter,
              model: ModelIdentity, overwrite: bool = False, *, batch_size: int = 1,
              metadata: str = "full") -> BatchSummary:
    """Protect every job's file. `load` is called once, and only if some image needs work; it must give a Protector
    with `batch_size`. `model` names the model in outputs and tells resuming whether it is the same (by SHA-256);
    the loaded model's own flag decides the no-protection warning. `metadata` is "full" or "minimal" (see
    `mist.manifest.METADATA_LEVELS`).

    Raises ValueError, before the model loads, for an unreadable mask or an output folder that cannot be written."""
    if metadata not in manifest.METADATA_LEVELS:
        raise ValueError(f"metadata: must be one of {', '.join(manifest.METADATA_LEVELS)}, got {metadata!r}")
    summary = BatchSummary()
    settings = settings_text(config, batch_size, metadata)
    mask = images.read_image(config.mask) if config.mask else None  # a bad mask stops the batch before it starts
    pending: list[tuple[Job, str]] = []
    for job in jobs:
        files.remove_stale_temporaries(job.output)  # left by a killed run; a live writer's are locked and kept
        problem = _preflight(job, config)
        if problem is None:
            digest = sha256_file(job.source)
            problem = _existing_output_problem(job, _resume_record(settings, model, digest), overwrite)
            if problem == "":
                summary.skipped.append(job.source)
                reporter.image_skipped(job, f"already protected: {job.output}")
                continue
        if problem:
            _fail(summary, reporter, job, problem)
            continue
        pending.append((job, digest))
    for folder in sorted({job.output.parent for job, _ in pending}):
        problem = preflight.output_folder_problem(folder)
        if problem:
            raise ValueError(problem)
    reporter.batch_started(jobs, len(pending))
    if not pending:
        return summary
    protector = load()
    if protector.batch_size != batch_size:
        raise ValueError(f"batch_size: the run records {batch_size} but the Protector uses {protector.batch_size}")
    per_chunk = max(1, batch_size // config.block_num**2)
    stopped: str | None = None
    for first in range(0, len(pending), per_chunk):
        chunk = pending[first : first + per_chunk]
        if stopped is not None:
            for job, _ in chunk:
                _fail(summary, reporter, job, f"{job.source}: not done: {stopped}")
            continue
        reporter.images_started([job for job, _ in chunk], first + 1, len(pending))
        stopped = _protect_chunk(chunk, protector, mask, settings, model, metadata, reporter, summary)
    return summary


def _protect_chunk(chunk: list[tuple[Job, str]], protector: Protector, mask: Image.Image | None, settings: str,
                   model: ModelIdentity, metadata: str, reporter: Reporter, summary: BatchSummary) -> str | None:
    """Read, protect together and write one attack batch of files; a failure costs only the files it touches.
    Returns why the batch must stop (the disk is full), else None."""
    readable: list[tuple[Job, str, Image.Image]] = []
    for job, digest in chunk:
        try:
            readable.append((job, digest, images.read_image(job.source)))
        except ValueError as exc:
            _fail(summary, reporter, job, str(exc))
    if not readable:
        return None
    jobs = [job for job, _, _ in readable]
    try:
        results = protector.protect_many([picture for _, _, picture in readable], [mask] * len(readable),
                                         lambda progress: reporter.step(jobs, progress))
    except (RuntimeError, FloatingPointError) as exc:
        hint = " (out of memory: try --block-num 2 or a smaller --input-size)" if "out of memory" in str(exc) else ""
        for job in jobs:
            _fail(summary, reporter, job, f"{job.source}: {str(exc).splitlines()[0][:300]}{hint}")
        return None
    stopped = None
    for (job, digest, _), result in zip(readable, results, strict=True):
        try:
            _write_output(job, result, protector, settings, model, digest, metadata)
        except (ValueError, OSError) as exc:
            problem = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
            _fail(summary, reporter, job, problem if str(job.output) in problem else f"{job.output}: {problem}")
            if isinstance(exc, OSError) and exc.errno in _DISK_FULL:
                stopped = (f"the batch stopped because the disk holding {job.output.parent} is full; free some space "
                           "and run the same command again")
            continue
        summary.done.append(job.source)
        summary.seconds_per_image.append(result.seconds)
        reporter.image_done(job, result)
    return stopped


def _write_output(job: Job, result: ProtectedImage, protector: Protector, settings: str, model: ModelIdentity,
                  digest: str, metadata: str) -> None:
    """Write one output atomically; with minimal metadata, its private record first (see `mist.manifest`)."""
    text = output_metadata(settings, model.name, protector, job.source, digest, model_sha256=model.sha256,
                           metadata=metadata)
    data = images.encode_png(result.image, text, str(job.output))
    if metadata == "minimal":
        record = {key: value for key, value in _resume_record(settings, model, digest).items() if value is not None}
        manifest.write_record(job.output, hashlib.sha256(data).hexdigest(), record)
    files.write_atomic(job.output, data)


def _fail(summary: BatchSummary, reporter: Reporter, job: Job, message: str) -> None:
    summary.failed.append((job.source, message))
    reporter.image_failed(job, message)


def _resume_record(settings: str, model: ModelIdentity, source_sha256: str) -> dict[str, str | None]:
    """What a complete output of this run records; None means "recorded as absent". A model with a SHA-256 is
    known by it alone (a renamed file is the same model), one without by its name."""
    record = {"mist:version": __version__, "mist:settings": settings, "mist:source-sha256": source_sha256,
              "mist:model-sha256": model.sha256}
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
    if existing.get("mist:settings") == wanted["mist:settings"]:
        return "was made with another model"
    try:
        old, new = json.loads(existing.get("mist:settings", "")), json.loads(wanted["mist:settings"] or "")
        changed = ", ".join(f"{key} {old.get(key)!r} (now {new.get(key)!r})"
                            for key in sorted(old.keys() | new.keys()) if old.get(key) != new.get(key))
    except (ValueError, AttributeError):
        changed = ""
    return f"was made with other settings: {changed}" if changed else "was made with other settings"


def _preflight(job: Job, config: ProtectConfig) -> str | None:
    """Everything about one job that can be checked without decoding its image fully or loading the model."""
    if _resolved(job.output) == _resolved(job.source):
        return f"{job.source}: its output would replace the input file; choose another output folder"
    return preflight.input_problem(job.source, config)


def _resolved(path: Path) -> Path:
    """`path` made absolute with symbolic links resolved, as far as they resolve (a link loop stays as it is)."""
    try:
        return path.resolve()
    except (OSError, RuntimeError):  # RuntimeError: a symbolic link loop, before Python 3.13
        return path.absolute()


def _not_a_file(path: Path) -> str:
    """Why `path`, found with an image's suffix, is not an image file."""
    try:
        mode = os.stat(path).st_mode
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            return "symbolic link loop"
        if path.is_symlink():
            return "broken symbolic link (its target does not exist)"
        return f"cannot access it ({exc.strerror or exc})"
    return "a folder, not an image file" if stat.S_ISDIR(mode) else "not a regular file"
