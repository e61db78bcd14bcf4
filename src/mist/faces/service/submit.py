"""A job submitted over HTTP, from form fields and uploaded files to a folder of checked files and the settings the
store records: the same settings and the same checks as `mist protect`.

Settings come as form fields named like the command line's flags (`steps`, `step-size` or `step_size`, `mode`,
`no-resize`...) or as one JSON object in the field `settings`. Files: `images` (one or more), `mask` (one mask for every
image), `masks` (a mask per image, named like its image), and a method's file parameter under its own name (`target`).
Every problem raises `SubmitError` with an HTTP status and one line naming the field or the file.
"""

from __future__ import annotations

import contextlib
import json
import shutil
import unicodedata
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO, Iterable, Iterator

from mist.common import images
from mist.runner import preflight
from mist.engine.config import ProtectConfig, RUN_SETTINGS
from mist.runner.flags import RUN_KINDS, fields_as_flags, protect_flags, typed_value
from mist.runner.inputs import collect_jobs
from mist.runner.manifest import METADATA_LEVELS
from mist.engine.methods import get_method, param_specs
from mist.faces.service.layout import OUTPUT_FOLDER

FILE_FIELDS = ("images", "mask", "masks")
_COPY_CHUNK = 1024 * 1024


class SubmitError(Exception):
    """A submission refused: `status` is the HTTP status, the message one line for the client."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


@dataclass(frozen=True)
class Upload:
    """An uploaded file: the name the client gave and its content."""

    filename: str | None
    file: BinaryIO


@dataclass(frozen=True)
class Submission:
    """A checked job: settings for the store (`_files` lists those that are files in the job's folder), the metadata
    level, and per image (name, source, mask, output) relative to the job's folder."""

    settings: dict[str, Any]
    metadata_level: str
    images: list[tuple[str, str, str | None, str]]


def given_settings(fields_: dict[str, str]) -> dict[str, Any]:
    """The settings as sent: form fields (strings), over those of the JSON object the field `settings` may hold."""
    given: dict[str, Any] = {}
    if "settings" in fields_:
        try:
            loaded = json.loads(fields_["settings"])
        except ValueError as exc:
            raise SubmitError(400, f"settings: not JSON ({exc})") from None
        if not isinstance(loaded, dict):
            raise SubmitError(400, "settings: must be a JSON object")
        given.update(loaded)
    given.update({name: value for name, value in fields_.items() if name != "settings"})
    return given


def parse_settings(fields_: dict[str, str]) -> tuple[dict[str, Any], str]:
    """Settings from form fields (strings), typed as the command line types them; the `settings` field may hold them
    as a JSON object. Returns (settings for ProtectConfig.of, metadata level)."""
    given = given_settings(fields_)
    metadata = str(given.pop("metadata", "full"))
    if metadata not in METADATA_LEVELS:
        raise SubmitError(400, f"metadata: must be one of {', '.join(METADATA_LEVELS)}, got {metadata!r}")
    method_name = str(given.get("method", ProtectConfig.method))
    try:
        method = get_method(method_name)
    except ValueError as exc:
        raise SubmitError(400, f"method: {exc}") from None
    kinds = {spec.name: spec.kind for spec in param_specs(method.Params)}
    settings: dict[str, Any] = {}
    sent_as: dict[str, str] = {}
    setting_of_flag = {flag: name for name, flag in protect_flags().items()}  # --no-resize: keep_aspect...
    for raw_name, value in given.items():
        name = setting_of_flag.get("--" + raw_name.replace("_", "-"), raw_name.replace("-", "_"))
        if name in RUN_SETTINGS and RUN_SETTINGS[name].local:  # like the model: the server's choice
            raise SubmitError(400, f"{raw_name}: a path on the server, set by whoever runs it, not by a request")
        if name in RUN_KINDS and name != "mask":  # the mask is a file field; device and model are the server's
            kind = RUN_KINDS[name]
        elif name in kinds:
            kind = kinds[name]
        else:
            raise SubmitError(400, f"{raw_name}: not a setting of method {method.name}")
        if kind == "file":
            raise SubmitError(400, f"{raw_name}: is a file: upload it as the file field {name!r}")
        settings[name] = _typed(raw_name, value, kind)
        sent_as[name] = raw_name
    try:
        with fields_as_flags(sent_as):  # a bad value is named as its field was sent (`input-size: ...`)
            ProtectConfig.of(**settings)
    except ValueError as exc:
        raise SubmitError(400, str(exc)) from None
    return settings, metadata


def _typed(name: str, value: Any, kind: str) -> Any:
    """A form value (a string) or a JSON value in the setting's kind, as every face types it."""
    try:
        return typed_value(value, kind)
    except ValueError as exc:
        raise SubmitError(400, f"{name}: {exc}") from None


def safe_name(field: str, filename: str | None) -> str:
    """The uploaded file's name if it is a plain file name; SubmitError otherwise (a path, a hidden or empty name,
    control characters): names never choose where a file is written."""
    name = unicodedata.normalize("NFC", filename or "")
    if (not name or name in (".", "..") or name.startswith(".") or "/" in name or "\\" in name
            or any(unicodedata.category(ch)[0] == "C" for ch in name) or len(name.encode()) > 200):
        raise SubmitError(400, f"{field}: {filename!r} is not a plain file name")
    return name


def save_submission(folder: Path, settings: dict[str, Any], metadata: str, uploads: dict[str, list[Upload]],
                    max_images: int) -> Submission:
    """Write the uploads into the job's `folder` and check them all; SubmitError (the folder removed) on the first
    problem."""
    with removed_on_failure(folder):
        return _save(folder, settings, metadata, uploads, max_images)


@contextlib.contextmanager
def removed_on_failure(folder: Path) -> Iterator[None]:
    """A submission's folder, removed with all that was written there when anything in the block fails."""
    try:
        yield
    except BaseException:
        shutil.rmtree(folder, ignore_errors=True)
        raise


def _save(folder: Path, settings: dict[str, Any], metadata: str, uploads: dict[str, list[Upload]],
          max_images: int) -> Submission:
    method = get_method(str(settings.get("method", ProtectConfig.method)))
    file_params = {spec.name for spec in param_specs(method.Params) if spec.kind == "file"}
    unknown = sorted(set(uploads) - set(FILE_FIELDS) - file_params)
    if unknown:
        raise SubmitError(400, f"{unknown[0]}: not a file field of method {method.name} "
                               f"(file fields: {', '.join(FILE_FIELDS + tuple(sorted(file_params)))})")
    pictures = uploads.get("images", [])
    if not pictures:
        raise SubmitError(400, "images: no image uploaded")
    if len(pictures) > max_images:
        raise SubmitError(413, f"images: {len(pictures)} images, more than this token's limit of {max_images} per job")
    for name in ("mask", *sorted(file_params)):
        if len(uploads.get(name, [])) > 1:
            raise SubmitError(400, f"{name}: one file expected, got {len(uploads[name])}")
    stored = dict(settings)
    file_settings = []
    for name in sorted(file_params & set(uploads)):
        upload = uploads[name][0]
        stored[name] = f"files/{name}{_suffix(safe_name(name, upload.filename))}"
        check_image(name, upload.filename, write_upload(upload, folder / stored[name]))
        file_settings.append(name)
    if "mask" in uploads:
        upload = uploads["mask"][0]
        shared_mask = f"files/mask{_suffix(safe_name('mask', upload.filename))}"
        check_image("mask", upload.filename, write_upload(upload, folder / shared_mask))
    else:
        shared_mask = None
    sources: list[Path] = []
    names: list[str] = []
    for upload in pictures:
        name = safe_name("images", upload.filename)
        if name in names:
            raise SubmitError(400, f"images: two files named {name!r}")
        names.append(name)
        sources.append(write_upload(upload, folder / "in" / name))
    stems = {Path(name).stem: name for name in names}
    masks: dict[str, str] = {}
    for upload in uploads.get("masks", []):
        name = safe_name("masks", upload.filename)
        image = stems.get(Path(name).stem)
        if image is None:
            raise SubmitError(400, f"masks: {name!r} is named like none of the images (a mask is named like its "
                                   "image: art.png for art.jpg)")
        if image in masks:
            raise SubmitError(400, f"masks: two masks for {image!r}")
        masks[image] = f"masks/{Path(image).stem}{_suffix(name)}"
        check_image("masks", name, write_upload(upload, folder / masks[image]))
    try:
        config = ProtectConfig.of(**{**settings, **{name: folder / stored[name] for name in file_settings}})
    except ValueError as exc:
        raise SubmitError(400, str(exc)) from None
    for name, path in zip(names, sources, strict=True):
        check_image("images", name, path, config)
    if file_settings:
        stored["_files"] = file_settings
    jobs = collect_jobs(sources, folder / OUTPUT_FOLDER)
    rows = [(name, str(job.source.relative_to(folder)), masks.get(name, shared_mask),
             str(job.output.relative_to(folder))) for name, job in zip(names, jobs, strict=True)]
    return Submission(stored, metadata, rows)


def _suffix(name: str) -> str:
    suffix = Path(name).suffix.lower()
    return suffix if suffix.isascii() and suffix[1:].isalnum() else ""


def write_upload(upload: Upload, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "xb") as out:
        shutil.copyfileobj(upload.file, out, _COPY_CHUNK)
    return path


def check_image(field: str, filename: str | None, path: Path, config: ProtectConfig | None = None) -> None:
    """Decode the file fully (a non-image, a truncated file or a decompression bomb is refused) and, for an image to
    protect, run the command line's pre-flight check; errors name the file as the client named it."""
    try:
        images.read_image(path)
        problem = preflight.input_problem(path, config) if config is not None else None
    except ValueError as exc:
        problem = str(exc)
    if problem:
        detail = problem.split(": ", 1)[1] if problem.startswith(f"{path}: ") else problem
        status = 413 if "too large" in detail or "over the limit" in detail else 400
        raise SubmitError(status, f"{field}: {filename}: {detail}")


def uploads_by_field(items: Iterable[tuple[str, Any]]) -> tuple[dict[str, str], dict[str, list[Upload]]]:
    """Split a parsed form's items into text fields and file uploads by field name."""
    texts: dict[str, str] = {}
    files: dict[str, list[Upload]] = {}
    for name, value in items:
        if isinstance(value, str):
            if name in texts:
                raise SubmitError(400, f"{name}: given twice")
            texts[name] = value
        else:
            files.setdefault(name, []).append(Upload(value.filename, value.file))
    return texts, files
