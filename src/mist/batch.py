"""Protecting files: plan outputs, check every input before the model loads, skip finished work, keep going on errors.

A batch never modifies an input and never leaves a partial output: each PNG is written to a temporary file and renamed
into place. An output whose recorded settings, model and source checksum match the current run is complete and is
skipped, so re-running an interrupted command resumes it; an output made otherwise is only replaced with `overwrite`.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Protocol

from . import __version__, images
from .config import ProtectConfig
from .protect import Progress, ProtectedImage, Protector

log = logging.getLogger(__name__)

NO_PROTECTION_WARNING = "made with a random-weight test model: this image has NO protection"
ALGORITHM = "Mist v1.2 masked L-inf PGD (textural / semantic / fused)"


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
    def image_started(self, job: Job, number: int, to_do: int) -> None: ...
    def step(self, job: Job, progress: Progress) -> None: ...
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


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def output_metadata(config: ProtectConfig, model_name: str, random_weights: bool, source: Path,
                    source_sha256: str) -> dict[str, str]:
    """The PNG text chunks of an output. Only file names, never full paths, go into an image that will be posted."""
    settings = json.loads(config.to_json())
    for name in ("mask", "target"):
        path = getattr(config, name)
        if path is not None:
            settings[name] = {"name": path.name, "sha256": file_sha256(path)}
    text = {
        "Software": f"Mist {__version__}",
        "mist:version": __version__,
        "mist:algorithm": ALGORITHM,
        "mist:settings": json.dumps(settings, sort_keys=True, ensure_ascii=False),
        "mist:model": model_name,
        "mist:source": source.name,
        "mist:source-sha256": source_sha256,
    }
    if random_weights:
        text["mist:warning"] = NO_PROTECTION_WARNING
    return text


_RESUME_KEYS = ("mist:settings", "mist:model", "mist:source-sha256")


def run_batch(jobs: list[Job], config: ProtectConfig, load: Callable[[], Protector], reporter: Reporter,
              model_name: str, overwrite: bool = False) -> BatchSummary:
    """Protect every job's file. `load` is called once, and only if some image needs work. `model_name` is what the
    outputs record (and what resuming compares); the loaded model's own flag decides the no-protection warning."""
    summary = BatchSummary()
    pending: list[tuple[Job, str]] = []
    mask = images.read_image(config.mask) if config.mask else None  # a bad mask stops the batch before it starts
    mask_size = mask.size if mask is not None else None
    for job in jobs:
        problem = _preflight(job, config, mask_size)
        if problem:
            summary.failed.append((job.source, problem))
            reporter.image_failed(job, problem)
            continue
        digest = file_sha256(job.source)
        existing = images.read_png_text(job.output)
        if existing is not None and not overwrite:
            wanted = {"mist:settings": output_metadata(config, model_name, False, job.source, digest)["mist:settings"],
                      "mist:model": model_name, "mist:source-sha256": digest}
            if all(existing.get(k) == wanted[k] for k in _RESUME_KEYS):
                summary.skipped.append(job.source)
                reporter.image_skipped(job, f"already protected: {job.output}")
                continue
            message = f"{job.output}: exists and was not made from this file with these settings; use --overwrite"
            summary.failed.append((job.source, message))
            reporter.image_failed(job, message)
            continue
        if job.output.exists() and existing is None and not overwrite:
            message = f"{job.output}: exists and is not a Mist output; use --overwrite to replace it"
            summary.failed.append((job.source, message))
            reporter.image_failed(job, message)
            continue
        pending.append((job, digest))
    reporter.batch_started(jobs, len(pending))
    if not pending:
        return summary
    protector = load()
    for number, (job, digest) in enumerate(pending, start=1):
        reporter.image_started(job, number, len(pending))
        try:
            image = images.read_image(job.source)
            result = protector.protect(image, mask, callback=lambda progress, job=job: reporter.step(job, progress))
            metadata = output_metadata(config, model_name, protector.model.random_weights, job.source, digest)
            images.write_png_atomic(result.image, job.output, metadata)
        except (ValueError, OSError) as exc:
            message = str(exc) if str(job.source) in str(exc) else f"{job.source}: {exc}"
            summary.failed.append((job.source, message))
            reporter.image_failed(job, message)
            continue
        except RuntimeError as exc:
            hint = " (out of memory: try --block-num 2 or a smaller --input-size)" if "out of memory" in str(exc) else ""
            message = f"{job.source}: {str(exc).splitlines()[0][:300]}{hint}"
            summary.failed.append((job.source, message))
            reporter.image_failed(job, message)
            continue
        summary.done.append(job.source)
        summary.seconds_per_image.append(result.seconds)
        reporter.image_done(job, result)
    return summary


def _preflight(job: Job, config: ProtectConfig, mask_size: tuple[int, int] | None) -> str | None:
    """Everything about one input that can be checked without decoding it fully or loading the model."""
    try:
        if job.output.resolve() == job.source.resolve():
            return f"{job.source}: its output would replace the input file; choose another output folder"
        width, height = images.probe_image(job.source)
        block = 8 * config.block_num
        if min(width, height) < block:
            return f"{job.source}: image is {width} x {height} pixels, smaller than one {block} x {block} block"
        size = images.processed_size(width, height, config.input_size, config.block_num, config.keep_aspect)
    except ValueError as exc:
        return str(exc)
    if mask_size is not None and mask_size not in ((width, height), size):
        return (f"{job.source}: the mask {config.mask} is {mask_size[0]} x {mask_size[1]} pixels; it must match the "
                f"image ({width} x {height}) or the processed size ({size[0]} x {size[1]})")
    return None
