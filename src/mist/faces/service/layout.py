"""Where a job's files live in the service's data folder: one folder per job, with its uploads and its results."""

from __future__ import annotations

from pathlib import Path

OUTPUT_FOLDER = "out"  # a protection's PNGs, or an evaluation's report; kept until the job expires
ORIGINALS, PROTECTED = "originals", "protected"  # an evaluation's uploads
INPUT_FOLDERS = ("in", "masks", "files", ORIGINALS, PROTECTED)  # removed once a job is done or failed (a cancelled
# job keeps them until it expires: it may be resumed)


def job_folder(data: Path, job_id: str) -> Path:
    return data / "jobs" / job_id
