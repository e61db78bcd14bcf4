"""Files written safely next to other runs: atomic replacement, temporary files that their writer locks, and removal of
the temporary files that no live writer holds; and the two things every face does with a job's files: a ZIP of its
PNGs, and removing job folders once they are old.

A writer creates `.<name>.<random>.tmp` beside the destination, takes an exclusive `flock` on it, writes, fsyncs and
renames it over the destination while still holding the lock. A run killed mid-write leaves its temporary file behind,
unlocked (the kernel drops a dead process's locks), so another run can tell leftovers from files being written right
now: it removes only the temporary files whose lock it can take. POSIX only (`fcntl`), like the rest of the tool.
"""

from __future__ import annotations

import contextlib
import fcntl
import glob
import os
import secrets
import shutil
import stat
import time
import zipfile
from collections.abc import Container, Iterable, Iterator
from pathlib import Path
from typing import BinaryIO

_NAME_LIMIT = 50  # characters of the destination's name kept in a temporary file's name (NAME_MAX is 255 bytes)


def file_problem(path: str | os.PathLike[str]) -> str | None:
    """Why `path` (a user's `~` expanded) is not a file Mist can read, in a few words ("no such file", "a folder, not a
    file"), or None when it is one."""
    found = Path(path).expanduser()
    if found.is_file():
        return None
    return "a folder, not a file" if found.is_dir() else "no such file"


def temporary_files_of(path: str | os.PathLike[str]) -> list[Path]:
    """Temporary files `write_atomic` creates (or a killed run left) for `path`, live or stale."""
    dest = Path(path)
    if not dest.parent.is_dir():
        return []
    return sorted(dest.parent.glob(f".{glob.escape(dest.name[:_NAME_LIMIT])}.*.tmp"))


def remove_stale_temporaries(path: str | os.PathLike[str]) -> list[Path]:
    """Remove the temporary files of `path` that no live writer holds (left by a killed run); returns those removed.

    A temporary file being written by another process or thread is locked by its writer and left alone. Symbolic links
    and anything but regular files are never touched."""
    removed = []
    for candidate in temporary_files_of(path):
        try:
            fd = os.open(candidate, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
        except OSError:
            continue  # gone meanwhile, a symbolic link, or not ours to read
        try:
            if not stat.S_ISREG(os.fstat(fd).st_mode) or not _try_lock(fd):
                continue
            if _is_still_at(fd, candidate):  # not already removed and replaced by a writer reusing the name
                os.unlink(candidate)
                removed.append(candidate)
        except OSError:
            continue
        finally:
            os.close(fd)
    return removed


def write_atomic(path: str | os.PathLike[str], data: bytes) -> None:
    """Write `data` to `path` so that readers see the old file or the complete new one, never a part.

    The bytes go to a locked temporary file in the destination's folder, are fsynced, and the file is renamed over
    `path` (then the folder is fsynced, best effort). Parent folders are created. On any failure the temporary file is
    removed and the exception re-raised, leaving an existing `path` untouched. New files get 0o666 minus the umask."""
    dest = Path(path)
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = _create_locked_temporary(dest)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
        os.fsync(fd)
        os.replace(tmp, dest)  # still locked: a cleaner cannot take it between the last write and the rename
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    finally:
        os.close(fd)
    _fsync_directory(dest.parent)


@contextlib.contextmanager
def locked(lock_file: str | os.PathLike[str]) -> Iterator[None]:
    """Hold an exclusive lock on `lock_file` (created if missing, never removed) for the `with` block; waits while
    another process or thread holds it."""
    fd = os.open(lock_file, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o666)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # closing releases the lock


def _create_locked_temporary(dest: Path) -> tuple[int, Path]:
    """A new temporary file beside `dest`, open for writing and exclusively locked by the caller."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC
    while True:
        tmp = dest.with_name(f".{dest.name[:_NAME_LIMIT]}.{secrets.token_hex(6)}.tmp")
        try:
            fd = os.open(tmp, flags, 0o666)
        except FileExistsError:
            continue
        fcntl.flock(fd, fcntl.LOCK_EX)  # a cleaner holds it only for an instant
        if _is_still_at(fd, tmp):
            return fd, tmp
        os.close(fd)  # a cleaner removed it between its creation and our lock: take another name


def _try_lock(fd: int) -> bool:
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    return True


def _is_still_at(fd: int, path: Path) -> bool:
    """Whether the open file `fd` is still the file named `path`."""
    try:
        named = os.stat(path, follow_symlinks=False)
    except FileNotFoundError:
        return False
    opened = os.fstat(fd)
    return (named.st_dev, named.st_ino) == (opened.st_dev, opened.st_ino)


def _fsync_directory(directory: Path) -> None:
    # Makes the rename itself durable; best effort, as some file systems refuse to fsync a folder.
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def resolved(path: Path) -> Path:
    """`path` made absolute with symbolic links resolved, as far as they resolve (a link loop stays as it is)."""
    try:
        return path.resolve()
    except (OSError, RuntimeError):  # RuntimeError: a symbolic link loop, before Python 3.13
        return path.absolute()


def write_zip(members: Iterable[tuple[Path, str]], target: BinaryIO | Path) -> None:
    """A ZIP of files, each `(path, name in the archive)`, into `target` (a file object or a path). PNG files are
    stored, not deflated (they are compressed already, so deflating only costs time); others are deflated."""
    with zipfile.ZipFile(target, "w", compression=zipfile.ZIP_STORED) as archive:
        for path, name in members:
            packed = zipfile.ZIP_STORED if path.suffix.lower() == ".png" else zipfile.ZIP_DEFLATED
            archive.write(path, name, compress_type=packed)


def remove_old_folders(parent: Path, max_age_seconds: float, *, pattern: str = "*", keep: Container[str] = (),
                       now: float | None = None) -> None:
    """Delete the folders in `parent` matching `pattern` whose last change is over `max_age_seconds` ago, except those
    named in `keep` (the retention sweep of the web UI's and the HTTP service's job folders)."""
    now = time.time() if now is None else now
    for folder in parent.glob(pattern) if parent.is_dir() else ():
        try:
            old = folder.is_dir() and folder.name not in keep and now - folder.stat().st_mtime > max_age_seconds
        except OSError:
            continue
        if old:
            shutil.rmtree(folder, ignore_errors=True)
