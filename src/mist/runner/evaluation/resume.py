"""What an evaluation has finished, kept on disk so that the same evaluation started again after an interruption
(Ctrl-C, kill -9, a crash, a cancel) does not redo it: each target reference, each purification of the images (with
the method's losses on them) and each mimicry run is a unit, written when it is done and read back instead of being
computed again.

A unit is `torch.save` of plain tensors, lists and numbers, written atomically (`mist.common.files.write_atomic`) and
read back with `torch.load(weights_only=True)` (nothing is unpickled); a file that cannot be read is computed again. Its
name starts with the evaluation's key: the SHA-256 of the image files, the settings that shape the units, the method's
scoring settings, the model and Mist's version, so a changed input or setting never reuses a unit.
"""

from __future__ import annotations

import hashlib
import io
import json
import pickle
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Sequence, TypeVar

from mist.common.files import write_atomic
from mist.version import __version__

if TYPE_CHECKING:
    from mist.runner.evaluation.pairs import Pair
    from mist.runner.evaluation.settings import EvaluationSettings

T = TypeVar("T")
SUFFIX = ".unit"
UNFINISHED = ".unfinished"  # the folder in a report folder that keeps the units until the report is written


def evaluation_key(pairs: Sequence[Pair], settings: EvaluationSettings, method: str, scored_with: dict[str, Any],
                   model: str) -> str:
    """What the units of an evaluation depend on, as a SHA-256: the bytes of every original and protected file, the
    evaluation's settings (not the verdict's threshold nor the CLIP tower, which only read them), the method and the
    settings its loss is scored with, the model (its name and checksum) and Mist's version."""
    digest = hashlib.sha256()
    for pair in pairs:
        for path in (pair.original, pair.protected):
            digest.update(hashlib.sha256(Path(path).read_bytes()).digest())
    shaping = {name: value for name, value in asdict(settings).items() if name not in ("ssim_threshold", "clip")}
    digest.update(json.dumps([shaping, method, scored_with, model, __version__], sort_keys=True, default=str).encode())
    return digest.hexdigest()


class Finished:
    """The finished units of one evaluation (key `key`) in `folder`; None: keep nothing (every unit is computed)."""

    def __init__(self, folder: Path | None, key: str) -> None:
        self.folder, self.key = folder, key[:32]
        self.reused = 0  # units read back instead of computed, in this run

    def unit(self, name: str, make: Callable[[], T]) -> T:
        """The unit `name`: read back when an earlier run finished it, else `make()`, kept, returned."""
        if self.folder is None:
            return make()
        path = self.folder / f"{self.key}-{hashlib.sha256(name.encode()).hexdigest()[:24]}{SUFFIX}"
        if path.is_file():
            import torch

            try:
                value = torch.load(path, weights_only=True)
            except (OSError, RuntimeError, EOFError, pickle.UnpicklingError):
                path.unlink(missing_ok=True)  # damaged: computed again
            else:
                self.reused += 1
                return value
        value = make()
        import torch

        buffer = io.BytesIO()
        torch.save(value, buffer)
        write_atomic(path, buffer.getvalue())
        return value

    def clear(self) -> None:
        """Delete this evaluation's units (its report is written), and the folder when that leaves it empty."""
        if self.folder is None or not self.folder.is_dir():
            return
        for path in self.folder.glob(f"{self.key}-*{SUFFIX}"):
            path.unlink(missing_ok=True)
        try:
            self.folder.rmdir()
        except OSError:
            pass
