"""Which model made an output: the name outputs show and the SHA-256 resuming compares.

Two checkpoints can share a file name (SD v1.4 and v1.5 are both saved as `model.ckpt`), so a model file is known by
its SHA-256. Hashing 4 GB takes a while, so the digest is read from the `.sha256` file `mist doctor` and
`mist download-model` keep beside the model (valid while its size and modification time are unchanged), and computed
and cached there when missing. The random-weight test model and diffusers folders have no file to hash; they are
known by name.
"""

from __future__ import annotations

import logging
from functools import cached_property
from pathlib import Path

from mist.common.download import sha256_file
from mist.models import model_label

log = logging.getLogger(__name__)


def _checksum_cache(path: Path) -> tuple[Path, str]:
    stat = path.stat()
    return path.with_name(path.name + ".sha256"), f"{stat.st_size} {stat.st_mtime_ns}"


def cached_checksum(path: Path) -> str | None:
    cache, key = _checksum_cache(path)
    if not cache.is_file():
        return None
    cached_key, _, digest = cache.read_text(encoding="ascii", errors="replace").strip().rpartition(" ")
    return digest if cached_key == key else None


def remember_checksum(path: Path, digest: str) -> None:
    """Record a verified checksum beside the file, valid while its size and modification time stay the same."""
    cache, key = _checksum_cache(path)
    try:
        cache.write_text(f"{key} {digest}\n", encoding="ascii")
    except OSError:
        pass  # a read-only model folder only means hashing again next time


def model_sha256(path: Path) -> str:
    """SHA-256 (hex) of the model file `path`: the cached one when it is current, else computed and cached."""
    digest = cached_checksum(path)
    if digest is None:
        log.warning("%s: computing the model's SHA-256 (once; it is cached beside the file)", path)
        digest = sha256_file(path)
        remember_checksum(path, digest)
    return digest


class ModelIdentity:
    """How outputs name the model at `where` (`tiny-random` or a resolved path) and, for a file, its SHA-256.

    The digest is computed on first use only: a run that finds nothing to compare or write never hashes the model."""

    def __init__(self, where: str | Path) -> None:
        self.name = model_label(where)
        self._file = where if isinstance(where, Path) and where.is_file() else None

    @cached_property
    def sha256(self) -> str | None:
        """The model file's SHA-256, or None for the test model and for diffusers folders."""
        return model_sha256(self._file) if self._file is not None else None
