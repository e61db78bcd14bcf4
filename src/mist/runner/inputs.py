"""Which files a command protects and where their outputs go: named files, the images in named folders (and their
sub-folders), each with its output path in the output folder."""

from __future__ import annotations

import errno
import os
import stat
from pathlib import Path
from typing import Callable, Iterable

from mist.common import files, images
from mist.runner.jobs import Job


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
    outputs_root = files.resolved(output_dir)
    for path in paths:
        path = Path(path)
        if path.is_dir():
            found = path.rglob("*") if recursive else path.iterdir()
            for file in sorted(found):
                relative = file.relative_to(path)
                if file.suffix.lower() not in suffixes or any(part.startswith(".") for part in relative.parts):
                    continue
                if file.is_file():
                    if not files.resolved(file).is_relative_to(outputs_root):
                        planned.append((file, relative.parent))
                elif not (recursive and file.is_dir() and not file.is_symlink()):  # a sub-folder rglob enters
                    if on_skip is not None:
                        on_skip(file, _not_a_file(file))
        else:
            planned.append((path, Path()))
    seen_sources: set[Path] = set()
    unique = []
    for source, folder in planned:
        if files.resolved(source) not in seen_sources:
            seen_sources.add(files.resolved(source))
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
