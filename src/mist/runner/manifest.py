"""The private record of outputs whose published metadata is minimal.

With `--metadata minimal` an output does not carry what resuming compares (the source's SHA-256, the model). That
record is kept instead in `.mist/manifest.json` inside the output's folder: a file that is never part of any image,
keyed by output file name and tied to the output's exact bytes (its SHA-256), so a file replaced or edited since does
not pass for complete. Updates are atomic and serialised by a lock, so concurrent runs writing into one folder keep
each other's records.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

from mist.common import files

log = logging.getLogger(__name__)

METADATA_LEVELS = ("full", "minimal")
"""full: every output records its source's name and SHA-256 and the model; minimal: only settings, version,
algorithm (and the no-protection warning), with the rest kept in the folder's private manifest."""
FOLDER = ".mist"
_FORMAT = 1


def manifest_path(output: Path) -> Path:
    """The manifest that holds the record of `output`."""
    return output.parent / FOLDER / "manifest.json"


def read_record(output: Path, output_sha256: str) -> dict[str, str] | None:
    """The recorded metadata of `output`, if the manifest has a record made for exactly these bytes; else None."""
    entry = _read(manifest_path(output)).get(output.name)
    if not isinstance(entry, dict) or entry.get("output-sha256") != output_sha256:
        return None
    return {key: value for key, value in entry.items() if key != "output-sha256"}


def write_record(output: Path, output_sha256: str, record: dict[str, str]) -> None:
    """Record `record` (string keys and values) for `output`, whose bytes will have SHA-256 `output_sha256`.

    Called before the output itself is put in place, so a run killed in between leaves a record that matches no file
    (harmless) rather than a finished output without a record. Raises OSError when the folder cannot be written."""
    path = manifest_path(output)
    path.parent.mkdir(parents=True, exist_ok=True)
    with files.locked(path.with_name("manifest.lock")):
        outputs = _read(path)
        outputs[output.name] = {**record, "output-sha256": output_sha256}
        files.remove_stale_temporaries(path)
        text = json.dumps({"format": _FORMAT, "outputs": outputs}, indent=1, sort_keys=True, ensure_ascii=False)
        files.write_atomic(path, text.encode("utf-8"))


def _read(path: Path) -> dict[str, object]:
    """The manifest's records by output name; empty when there is none or it cannot be read."""
    try:
        content = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return {}
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        log.warning("%s: unreadable (%s); its records are ignored", path, exc)
        return {}
    outputs = content.get("outputs") if isinstance(content, dict) else None
    return dict(outputs) if isinstance(outputs, dict) else {}

