"""An evaluation submitted over HTTP: `mist evaluate`'s settings from form fields, and the originals and protected
images written into the job's folder, checked and paired before the job is queued.

Settings come as form fields named like `mist evaluate`'s flags without their dashes (`purify`, `strengths`,
`ssim-threshold`, `lora-lr`...) or as one JSON object in the field `settings`. Files: `originals` and `protected`, one
or more each, paired as `mist evaluate` pairs them (by file name, or by the source checksum a Mist output records).
Every problem raises `SubmitError` with an HTTP status and one line naming the field or the file.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mist.common.images import probe_image
from mist.runner.evaluation.pairs import match_pairs
from mist.runner.evaluation.settings import EVALUATION_OPTIONS, evaluation_settings, settings_record
from mist.runner.work_limits import WorkLimits
from mist.faces.service.layout import ORIGINALS, OUTPUT_FOLDER, PROTECTED
from mist.faces.service.submit import (SubmitError, Upload, check_image, given_settings, removed_on_failure, safe_name,
                                       write_upload)

FILE_FIELDS = (ORIGINALS, PROTECTED)
REPORT_INDEX = f"{OUTPUT_FOLDER}/index.html"


@dataclass(frozen=True)
class EvaluationSubmission:
    """A checked evaluation: its settings for the store, and per pair (name, protected file, None, report index)
    relative to the job's folder."""

    settings: dict[str, Any]
    images: list[tuple[str, str, str | None, str]]


def parse_evaluation_settings(fields: dict[str, str]) -> dict[str, Any]:
    """The evaluation's settings from form fields (or the JSON `settings` field), checked and recorded as JSON
    values; SubmitError naming the field as it was sent."""
    given = given_settings(fields)
    values: dict[str, Any] = {}
    sent_as: dict[str, str] = {}
    flag_names = {option.flag[2:]: name for name, option in EVALUATION_OPTIONS.items()}  # lora-lr: lora_learning_rate
    for raw_name, value in given.items():
        name = flag_names.get(raw_name.replace("_", "-"), raw_name.replace("-", "_"))
        if name not in EVALUATION_OPTIONS:
            raise SubmitError(400, f"{raw_name}: not a setting of an evaluation (settings: "
                                   f"{', '.join(o.flag[2:] for o in EVALUATION_OPTIONS.values() if not o.local)})")
        if EVALUATION_OPTIONS[name].local:
            raise SubmitError(400, f"{raw_name}: a path on the server, set by whoever runs it, not by a request")
        values[name], sent_as[name] = value, raw_name
    try:
        return settings_record(evaluation_settings(values, sent_as))
    except ValueError as exc:
        raise SubmitError(400, str(exc)) from None


def save_evaluation(folder: Path, settings: dict[str, Any], uploads: dict[str, list[Upload]], max_images: int,
                    limits: WorkLimits) -> EvaluationSubmission:
    """Write the uploads into the job's `folder`, check and pair them; SubmitError (the folder removed) on the first
    problem."""
    with removed_on_failure(folder):
        return _save(folder, settings, uploads, max_images, limits)


def _save(folder: Path, settings: dict[str, Any], uploads: dict[str, list[Upload]], max_images: int,
          limits: WorkLimits) -> EvaluationSubmission:
    unknown = sorted(set(uploads) - set(FILE_FIELDS))
    if unknown:
        raise SubmitError(400, f"{unknown[0]}: not a file field of an evaluation (file fields: originals, protected)")
    for field in FILE_FIELDS:
        count = len(uploads.get(field, []))
        if not count:
            raise SubmitError(400, f"{field}: no image uploaded")
        if count > max_images:
            raise SubmitError(413, f"{field}: {count} images, more than this token's limit of {max_images} per job")
        names: set[str] = set()
        for upload in uploads[field]:
            name = safe_name(field, upload.filename)
            if name in names:
                raise SubmitError(400, f"{field}: two files named {name!r}")
            names.add(name)
            path = write_upload(upload, folder / field / name)
            check_image(field, name, path)
            if field == PROTECTED:
                _check_size(name, path, limits)
    try:
        pairs, _ = match_pairs(folder / ORIGINALS, folder / PROTECTED)
    except ValueError:  # none matches
        pairs = []
    if not pairs:
        raise SubmitError(400, "protected: no protected image matches an original (by file name, or by the source "
                               "checksum a Mist output records)")
    rows = [(pair.protected.name, str(pair.protected.relative_to(folder)), None, REPORT_INDEX) for pair in pairs]
    return EvaluationSubmission(settings, rows)


def _check_size(name: str, path: Path, limits: WorkLimits) -> None:
    """An image is evaluated at its own size: at most as many pixels as a square at the server's processing limit."""
    width, height = probe_image(path)
    if width * height > limits.max_input_size ** 2:
        raise SubmitError(413, f"protected: {name}: {width} x {height} pixels is over this server's limit of "
                               f"{limits.max_input_size} x {limits.max_input_size} (its --max-input-size)")
