"""Protecting files: plan outputs, check every input before the model loads, skip finished work, keep going on errors.

A batch never modifies an input and never leaves a partial output: each PNG is written to a temporary file and renamed
into place. An output whose recorded settings, model and source checksum match the current run is complete and is
skipped, so re-running an interrupted command resumes it; an output made otherwise is only replaced with `overwrite`.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Protocol

from PIL import Image

from . import __version__, images
from .config import ProtectConfig
from .download import sha256_file
from .pipeline import Progress, ProtectedImage, Protector

log = logging.getLogger(__name__)

NO_PROTECTION_WARNING = "made with a random-weight test model: this image has NO protection"
ALGORITHM = "Mist v1.2 masked L-inf PGD (textural / semantic / fused)"
FAST_ALGORITHM = ("Mist v1.2 masked L-inf PGD with the score-distillation semantic gradient (fast mode; Xue et al., "
                  "ICLR 2024), not Mist's exact method")


@dataclass(frozen=True)
class Job:
    """One input file and the PNG it becomes."""

    source: Path
    output: Path


@dataclass
class BatchSummary:
    done: list[Path] = field(default_factory=list)
    skipped: list[Path] = field(default_factory=list)
    failed: list[tuple[Path, str]] = field(default_factory=list)
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
                 suffixes: frozenset[str] = images.IMAGE_SUFFIXES) -> list[Job]:
    """A job per input: named files as they are, image files (by suffix) inside named folders, sub-folders too
    with `recursive` (hidden ones and the output folder itself excluded). Outputs go to `output_dir` (a folder's
    sub-folders mirrored) as `<name>.png`; names that would clash (a.jpg beside a.png) become `<name>_<suffix>.png`,
    and any clash left (a.png in two named folders) gets a counter: `a_2.png`. A file named twice is done once."""
    planned: list[tuple[Path, Path]] = []
    outputs_root = output_dir.resolve()
    for path in paths:
        path = Path(path)
        if path.is_dir():
            found = path.rglob("*") if recursive else path.iterdir()
            for file in sorted(found):
                relative = file.relative_to(path)
                if (file.is_file() and file.suffix.lower() in suffixes
                        and not any(part.startswith(".") for part in relative.parts)
                        and not file.resolve().is_relative_to(outputs_root)):
                    planned.append((file, relative.parent))
        else:
            planned.append((path, Path()))
    seen_sources: set[Path] = set()
    unique = []
    for source, folder in planned:
        if source.resolve() not in seen_sources:
            seen_sources.add(source.resolve())
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


def settings_text(config: ProtectConfig) -> str:
    """The settings as recorded in outputs: canonical JSON, with the mask and target as file name and SHA-256 (only
    file names, never full paths, go into an image that will be posted)."""
    settings = json.loads(config.to_json())
    for name in ("mask", "target"):
        path = getattr(config, name)
        if path is not None:
            settings[name] = {"name": path.name, "sha256": sha256_file(path)}
    return json.dumps(settings, sort_keys=True, ensure_ascii=False)


def output_metadata(settings: str, model_name: str, protector: Protector, source: Path,
                    source_sha256: str) -> dict[str, str]:
    """The PNG text chunks of an output."""
    text = {
        "Software": f"Mist {__version__}",
        "mist:version": __version__,
        "mist:algorithm": FAST_ALGORITHM if protector.config.fast else ALGORITHM,
        "mist:settings": settings,
        "mist:precision": protector.precision,
        "mist:model": model_name,
        "mist:source": source.name,
        "mist:source-sha256": source_sha256,
    }
    if protector.model.random_weights:
        text["mist:warning"] = NO_PROTECTION_WARNING
    return text


def run_batch(jobs: list[Job], config: ProtectConfig, load: Callable[[], Protector], reporter: Reporter,
              model_name: str, overwrite: bool = False) -> BatchSummary:
    """Protect every job's file. `load` is called once, and only if some image needs work. `model_name` is what the
    outputs record (and what resuming compares); the loaded model's own flag decides the no-protection warning."""
    summary = BatchSummary()
    settings = settings_text(config)
    mask = images.read_image(config.mask) if config.mask else None  # a bad mask stops the batch before it starts
    pending: list[tuple[Job, str]] = []
    for job in jobs:
        problem = _preflight(job, config)
        if problem is None:
            digest = sha256_file(job.source)
            problem = _existing_output_problem(job, settings, model_name, digest, overwrite)
            if problem == "":
                summary.skipped.append(job.source)
                reporter.image_skipped(job, f"already protected: {job.output}")
                continue
        if problem:
            _fail(summary, reporter, job, problem)
            continue
        pending.append((job, digest))
    reporter.batch_started(jobs, len(pending))
    if not pending:
        return summary
    protector = load()
    per_chunk = max(1, protector.batch_size // config.block_num**2)
    for first in range(0, len(pending), per_chunk):
        chunk = pending[first : first + per_chunk]
        reporter.images_started([job for job, _ in chunk], first + 1, len(pending))
        _protect_chunk(chunk, protector, mask, settings, model_name, reporter, summary)
    return summary


def _protect_chunk(chunk: list[tuple[Job, str]], protector: Protector, mask: Image.Image | None, settings: str,
                   model_name: str, reporter: Reporter, summary: BatchSummary) -> None:
    """Read, protect together and write one attack batch of files; a failure costs only the files it touches."""
    readable: list[tuple[Job, str, Image.Image]] = []
    for job, digest in chunk:
        try:
            readable.append((job, digest, images.read_image(job.source)))
        except ValueError as exc:
            _fail(summary, reporter, job, str(exc))
    if not readable:
        return
    jobs = [job for job, _, _ in readable]
    try:
        results = protector.protect_many([picture for _, _, picture in readable], [mask] * len(readable),
                                         lambda progress: reporter.step(jobs, progress))
    except (RuntimeError, FloatingPointError) as exc:
        hint = " (out of memory: try --block-num 2 or a smaller --input-size)" if "out of memory" in str(exc) else ""
        for job in jobs:
            _fail(summary, reporter, job, f"{job.source}: {str(exc).splitlines()[0][:300]}{hint}")
        return
    for (job, digest, _), result in zip(readable, results, strict=True):
        try:
            for stale in images.temporary_files_of(job.output):  # left by a run killed while writing
                stale.unlink(missing_ok=True)
            metadata = output_metadata(settings, model_name, protector, job.source, digest)
            images.write_png_atomic(result.image, job.output, metadata)
        except (ValueError, OSError) as exc:
            _fail(summary, reporter, job, str(exc) if str(job.output) in str(exc) else f"{job.output}: {exc}")
            continue
        summary.done.append(job.source)
        summary.seconds_per_image.append(result.seconds)
        reporter.image_done(job, result)


def _fail(summary: BatchSummary, reporter: Reporter, job: Job, message: str) -> None:
    summary.failed.append((job.source, message))
    reporter.image_failed(job, message)


def _existing_output_problem(job: Job, settings: str, model_name: str, digest: str, overwrite: bool) -> str | None:
    """None when the output may be written, "" when it is already complete (skip), else why it must be left alone."""
    if overwrite or not job.output.exists():
        return None
    existing = images.read_png_text(job.output)
    if existing is None:
        return f"{job.output}: exists and is not a Mist output; use --overwrite to replace it"
    wanted = {"mist:settings": settings, "mist:model": model_name, "mist:source-sha256": digest}
    if all(existing.get(key) == value for key, value in wanted.items()):
        return ""
    return f"{job.output}: exists and was not made from this file with these settings; use --overwrite"


def _preflight(job: Job, config: ProtectConfig) -> str | None:
    """Everything about one input that can be checked without decoding it fully or loading the model."""
    try:
        if job.output.resolve() == job.source.resolve():
            return f"{job.source}: its output would replace the input file; choose another output folder"
        width, height = images.probe_image(job.source)
        block = 8 * config.block_num
        if min(width, height) < block:
            return f"{job.source}: image is {width} x {height} pixels, smaller than one {block} x {block} block"
        config.processed_size(width, height)  # raises when a side would be under one block
    except ValueError as exc:
        return str(exc)
    return None
