"""The web UI's handlers: what happens when a user presses Protect, apart from the page itself (`mist.faces.webui.app`).

`mist webui` (or `python mist-webui.py`) serves the page on http://127.0.0.1:7860. The page only builds a
`ProtectConfig` (the method and its parameters included) and hands the uploads to the job runner the command line
uses (`mist.runner.jobs.run_jobs`): the same checks of each file, the same model cache, the same outputs and metadata.
The handlers are plain functions (`run_job`, `artwork_upload`, `file_uploads`, `Settings.config`, the methods of
`WebUI`) that the tests call without a browser. Importing this module loads no model and imports no gradio: the model is
loaded on the first job (then kept).

The one-image tab takes the artwork as a file (its bytes as they are, so anything the command line reads works and a
large JPEG is not re-encoded by the browser into a PNG many times larger); the editor only shows a preview of it to
paint the mask on, and the painted mask is scaled to the artwork's own size.

Safety: the server listens on 127.0.0.1 unless `--listen` or `--share` is given (with a warning when there is no
`--auth`); uploads are size-limited; one attack runs at a time, later jobs wait in gradio's queue; a bad upload gets a
message in the page. A job's uploaded originals are deleted when the job ends.

A page is known to the server by a random key the browser keeps for its tab (sessionStorage), so a reload finds the
page's job again: a running job goes on and the reloaded page follows it, a finished one is shown again, one that was
still waiting for its turn is reported as not run. A page that goes away and does not come back within
RELOAD_GRACE_S is closed for good: its job is cancelled and its files deleted. The Evaluate tab needs the originals of
the page's last job: a copy of them stays in that job's folder until the evaluation ran, the page's next job starts or
the page is closed for good; an evaluation is stopped at once when its page goes away.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import secrets
import shutil
import tempfile
import threading
import time
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Mapping, Sequence

import numpy as np
from PIL import Image

from mist.common import images as image_io
from mist.engine.config import ProtectConfig
from mist.runner.estimate import Estimate
from mist.runner.offers import Offer, model_offer
from mist.runner.evaluation.resume import UNFINISHED
from mist.common.files import remove_old_folders, write_zip
from mist.runner.flags import RUN_FLAGS, RUN_KINDS, fields_as_flags, protect_flags, typed_value
from mist.engine.methods import get_method, param_specs
from mist.engine.robust import DEFAULT_TRANSFORMS
from mist.runner.work_limits import WorkLimits, check_work
from mist.faces.webui.text import duration, text

if TYPE_CHECKING:
    from mist.runner.evaluation.run import Evaluation
    from mist.runner.jobs import ModelCache

log = logging.getLogger(__name__)

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 7860
DEFAULT_MAX_UPLOAD_MB = 50
AUTH_ENV = "MIST_WEBUI_AUTH"
SIZES = (256, 512, 768)
ZIP_NAME = "mist-protected.zip"
PAINTED_MASK = "painted"  # the name outputs record for a mask painted in the page (with the SHA-256 of its PNG)
PREVIEW_SIDE = 1280  # longest side in pixels of the preview the mask is painted on
PREVIEW_PREFIX = "mist-preview-"
EDITOR_FILES = ("background.png", "composite.png")  # what the browser's image editor uploads (and layer_N.png)
JOB_MAX_AGE_S = 24 * 3600  # job folders older than this are removed when a new job starts
EVALUATE_STRENGTH = 0.35  # the Evaluate tab's img2img strength by default (the middle one of Mist's protocol)
EVALUATE_STEPS = 20  # DDIM steps of the full schedule there (strength x steps of them run): usable on a CPU
EVALUATE_PURIFY = "jpeg:75"  # the purification its checkbox adds
RELOAD_GRACE_S = 30.0  # how long a page that went away may come back (a reload) before its job is cancelled
STALE_UPLOAD_S = 600.0  # a partial upload (gradio's tmp* file) unchanged this long was abandoned by its browser
STALE_EXPORT_S = 60.0  # an export of the image editor this old, held by no page, is not on its way to a job
SWEEP_EVERY_S = 60.0  # how often the server looks for both
MAX_AWAY_PAGES = 256  # pages kept for their reload at once (each with a timer); more are closed for good at once
PAGE_KEY_CHARACTERS = frozenset("0123456789abcdef")
PAGE_KEY_LENGTH = 32  # the browser's key of its tab: 128 random bits in hex

_DEFAULTS = ProtectConfig()


# --------------------------------------------------------------------------
# Settings and inputs


@dataclass(frozen=True)
class Settings:
    """The page's controls, in the page's units; `config()` turns them into the engine's ProtectConfig.

    params: the values of the method parameters' controls by parameter name (the page has one control per name,
    shared by the methods that take it); only the chosen method's are used, missing ones keep its defaults."""

    epsilon: float = _DEFAULTS.epsilon
    steps: int = _DEFAULTS.steps
    size: int = _DEFAULTS.input_size
    method: str = _DEFAULTS.method
    params: Mapping[str, Any] = field(default_factory=dict)
    low_vram: bool = False  # block_num 2, the original's low-VRAM mode
    no_resize: bool = _DEFAULTS.keep_aspect
    robust: bool = False  # the command line's --robust with its default transforms
    seed: int = _DEFAULTS.seed
    precision: str = _DEFAULTS.precision
    original_size: bool = True  # unlike the command line, the page gives the artwork's own size by default

    def config(self) -> ProtectConfig:
        """The engine's settings; raises ValueError (one line, naming the setting as the command line does) for an
        invalid value. Each value is typed as every face types it (`flags.typed_value`): a slider's 16.0 is the
        command line's 16, so the outputs record the same settings."""
        specs = {spec.name: spec for spec in param_specs(get_method(self.method).Params)}
        params = {name: _typed(value, specs[name].kind, specs[name].flag)
                  for name, value in self.params.items() if name in specs and value is not None}
        run = {name: _typed(value, RUN_KINDS[name], RUN_FLAGS[name])
               for name, value in (("epsilon", self.epsilon), ("steps", self.steps), ("input_size", self.size),
                                   ("seed", self.seed))}
        with fields_as_flags(protect_flags()):
            return ProtectConfig(
                method=self.method, params=params, **run, block_num=2 if self.low_vram else 1,
                keep_aspect=bool(self.no_resize), robust=DEFAULT_TRANSFORMS if self.robust else (),
                precision=self.precision, original_size=bool(self.original_size),
            )


def _typed(value: Any, kind: str, flag: str) -> Any:
    """`value` in `kind`'s type; ValueError naming `flag`."""
    try:
        return typed_value(value, kind)
    except ValueError as exc:
        raise ValueError(f"{flag}: {exc}") from None


@dataclass(frozen=True)
class Artwork:
    """One image to protect: the file as uploaded, the name it had on the user's computer (only the name goes into
    the output), and the region to protect (white, 255 = protect; None = everything)."""

    path: Path
    name: str
    mask: Image.Image | None = None


def file_uploads(files: Sequence[Any] | None) -> list[Artwork]:
    """Uploads from a multi-file input: paths (gradio keeps each upload under its own name) or gradio file dicts."""
    uploads = []
    for item in files or []:
        if isinstance(item, dict):  # a raw gradio FileData
            path, name = Path(item["path"]), item.get("orig_name") or Path(item["path"]).name
        else:
            path = Path(item if isinstance(item, (str, os.PathLike)) else item.name)  # a path, or a tempfile object
            name = path.name
        uploads.append(Artwork(path, name))
    return uploads


def editor_mask(value: dict[str, Any] | None, size: tuple[int, int]) -> Image.Image | None:
    """The region painted in an image editor value ({"background", "layers", "composite"}) as an "L" image of `size`
    (width, height in pixels: the artwork's, whatever the size of the preview it was painted on), 255 where any layer
    has a painted (not fully transparent) pixel; None when nothing is painted (protect everything)."""
    if not value:
        return None
    painted = np.zeros((size[1], size[0]), dtype=bool)
    for layer in value.get("layers") or []:
        if layer is None:
            continue
        layer = _as_pil(layer)
        if "A" not in layer.getbands():
            continue
        alpha = layer.getchannel("A")
        if alpha.size != size:
            alpha = alpha.resize(size, Image.Resampling.NEAREST)
        painted |= np.asarray(alpha) > 0
    if not painted.any():
        return None
    return Image.fromarray(np.where(painted, 255, 0).astype(np.uint8), mode="L")


def artwork_upload(path: str | os.PathLike | None, editor: dict[str, Any] | None) -> Artwork | None:
    """The one-image tab's job: the uploaded file as it is (gradio keeps the user's file name) and the mask painted on
    its preview, at the artwork's size; None when no file was uploaded. An unreadable file gets no mask (the checks
    of `run_job` say what is wrong with it)."""
    if not path:
        return None
    path = Path(path)
    try:
        size = image_io.probe_image(path)
    except ValueError:
        return Artwork(path, path.name)
    return Artwork(path, path.name, editor_mask(editor, size))


def preview(path: Path, folder: Path) -> Path:
    """A PNG of the artwork, upright, at most PREVIEW_SIDE pixels on its longest side, in `folder` under a unique
    name starting with PREVIEW_PREFIX (the mask is painted on it). Raises ValueError for an unreadable image."""
    picture = _scaled_for_screen(image_io.read_image(path))
    folder.mkdir(parents=True, exist_ok=True)
    target = folder / f"{PREVIEW_PREFIX}{secrets.token_hex(8)}.png"
    picture.save(target, format="PNG")
    return target


def _as_pil(item: Any) -> Image.Image:
    if isinstance(item, Image.Image):
        return item
    if isinstance(item, np.ndarray):
        return Image.fromarray(item)
    if isinstance(item, dict):
        item = item["path"]
    with Image.open(item) as img:
        img.load()
        return img.copy()


# --------------------------------------------------------------------------
# A job


@dataclass(frozen=True)
class Output:
    name: str  # the uploaded file's name
    png: Path  # the protected PNG, with Mist's metadata
    original: Path  # preview: the input resized as the engine processed it
    perturbation: Path  # preview: |protected - original|, scaled so that epsilon is white
    source: Path | None = None  # the uploaded original (deleted when the job ends, or kept for the Evaluate tab)
    shown: Path | None = None  # preview of the protected PNG (the previews are at most PREVIEW_SIDE pixels wide)


@dataclass
class JobResult:
    outputs: list[Output] = field(default_factory=list)
    zip: Path | None = None
    messages: list[str] = field(default_factory=list)  # one per skipped or failed image, or the job's problem
    status: str = ""  # what the page says at the end, in the job's language
    cancelled: bool = False
    no_protection: bool = False  # made with the random-weight test model
    seconds: float = 0.0
    uploads_removed: bool = False  # the job's uploaded originals were deleted from the server
    originals_kept: bool = False  # a copy of them stays for the Evaluate tab (`WebUI.evaluate`)

    @property
    def files(self) -> list[Path]:
        """What the page offers for download: each PNG, then the ZIP of a batch."""
        return [o.png for o in self.outputs] + ([self.zip] if self.zip else [])


Progress = Callable[[float, str], None]


def run_job(uploads: Sequence[Artwork], settings: Settings | ProtectConfig, engine: ModelCache, workdir: Path, *,
            lang: str = "en", cancel: threading.Event | None = None, progress: Progress | None = None,
            max_upload_bytes: int | None = None, work_limits: WorkLimits | None = None) -> JobResult:
    """Protect `uploads` into a new folder under `workdir` through the job runner (`mist.runner.jobs.run_jobs`, as the
    command line does) and say how it went; never raises for a bad input, a missing model, a bad setting or a cancel
    (each gives a message in the result). `progress(fraction, text)` hears every step; setting `cancel` stops the
    attack after the current step (finished images are kept)."""
    from mist.runner.jobs import Job, run_jobs, without_model_path
    from mist.models import ModelNotFoundError

    started = time.perf_counter()
    result = JobResult()
    if not uploads:
        return _finish(result, text(lang, "no_input"), started)
    try:
        config = settings if isinstance(settings, ProtectConfig) else settings.config()
        if work_limits is not None:  # what the page's controls allow, whatever a crafted request sends
            check_work(config, work_limits)
    except ValueError as exc:
        return _finish(result, f"{text(lang, 'invalid_settings')} {exc}", started)
    problem = _model_problem(engine, config, lang)
    if problem is not None:
        return _finish(result, problem, started)
    accepted = []
    for upload in uploads:  # the upload limit is the page's own; the runner checks the files themselves
        problem = _upload_problem(upload, max_upload_bytes, lang, probe=False)
        if problem:
            result.messages.append(text(lang, "bad_file", name=upload.name, problem=problem))
        else:
            accepted.append(upload)
    if not accepted:
        return _finish(result, text(lang, "nothing_done"), started)
    job = Path(tempfile.mkdtemp(prefix="job-", dir=_prepare(workdir)))
    names: set[str] = set()
    jobs = [Job(upload.path, job / _unique_png_name(upload.name, names), label=upload.name,
                mask=_painted_mask_file(upload.mask, job / "masks" / str(number)))
            for number, upload in enumerate(accepted)]
    reporter = _PageReporter(lang, progress or (lambda fraction, desc: None), dict(zip(jobs, accepted, strict=True)),
                             config, result)
    try:
        summary = run_jobs(jobs, config, engine, reporter, overwrite=True, cancel=cancel)
    except ModelNotFoundError as exc:
        return _finish(result, _no_model(exc, lang), started)
    except (ValueError, OSError, RuntimeError) as exc:
        return _finish(result, f"{text(lang, 'model_failed')} {without_model_path(str(exc), engine)}", started)
    result.cancelled = summary.cancelled
    if len(result.outputs) > 1:
        result.zip = job / ZIP_NAME
        write_zip(((output.png, output.png.name) for output in result.outputs), result.zip)
    if result.cancelled:
        status = text(lang, "cancelled", done=len(result.outputs))
    elif result.outputs:
        status = text(lang, "done", done=len(result.outputs), images=len(uploads),
                      time=duration(time.perf_counter() - started, lang))
    else:
        status = text(lang, "nothing_done")
    if result.no_protection and result.outputs:
        status = f"**{text(lang, 'no_protection')}**\n\n{status}"
    return _finish(result, status, started)


def _model_problem(engine: ModelCache, config: ProtectConfig, lang: str) -> str | None:
    """The status line when the server's model cannot run `config` (no model, one Mist refuses, or a family whose
    denoiser the chosen method needs and Mist does not run), told before any upload is taken; None when it can."""
    from mist.models import ModelNotFoundError
    from mist.runner.jobs import without_model_path

    try:
        refused = engine.refusal(config)
    except ModelNotFoundError as exc:
        return _no_model(exc, lang)
    except ValueError as exc:
        return f"{text(lang, 'model_failed')} {without_model_path(str(exc), engine)}"
    return None if refused is None else f"{text(lang, 'method_refused')} {refused}"


def _no_model(exc: Exception, lang: str) -> str:
    return f"{text(lang, 'no_model')}\n\n```\n{exc}\n```"


class _PageReporter:
    """What the page hears from the job runner: the status line (model loading, each step with the time left), the
    finished images with their previews, and one message per image that failed, in the page's language."""

    def __init__(self, lang: str, say: Progress, uploads: dict, config: ProtectConfig, result: JobResult) -> None:
        self.lang, self.say, self.uploads, self.epsilon, self.result = lang, say, uploads, config.epsilon, result
        self.steps_per_image = config.steps_per_image()
        self.images = 1
        self.image = 0
        self.estimate = Estimate([])

    def batch_started(self, jobs, to_do: int) -> None:
        self.images = max(to_do, 1)
        self.estimate = Estimate([self.steps_per_image] * self.images)

    def model_loading(self, where, device) -> None:
        self.estimate.pause()
        self.say(0.0, text(self.lang, "loading_model"))

    def images_started(self, jobs, first: int, to_do: int) -> None:
        self.image = first - 1
        self.estimate.pause()
        self.say(self.estimate.fraction, text(self.lang, "preparing", image=first, images=self.images))

    def step(self, jobs, progress) -> None:
        self.estimate.step(self.image, progress.step)
        self.say(self.estimate.fraction,
                 text(self.lang, "progress", image=self.image + 1, images=self.images, step=progress.step,
                      steps=progress.total, eta=duration(self.estimate.seconds_left() or 0.0, self.lang)))

    def image_done(self, job, protected) -> None:
        self.estimate.finished(self.image)
        self.result.no_protection |= protected.random_weights
        previews = job.output.parent / "previews"
        names = {kind: previews / f"{kind}-{job.output.name}" for kind in ("original", "protected", "perturbation")}
        try:
            original, perturbation = _previews(image_io.read_image(job.source), protected.image, self.epsilon)
            previews.mkdir(exist_ok=True)
            for kind, picture in zip(names, (original, protected.image, perturbation), strict=True):
                _scaled_for_screen(picture).save(names[kind])
        except (OSError, ValueError) as exc:
            self.image_failed(job, str(exc), "output")
            return
        self.result.outputs.append(Output(job.name, job.output, names["original"], names["perturbation"], job.source,
                                          names["protected"]))

    def image_skipped(self, job, reason: str) -> None:  # outputs are new files: nothing is ever skipped
        pass

    def image_failed(self, job, message: str, stage: str) -> None:
        if message.endswith("not done: cancelled"):
            return  # the status line says the job was cancelled
        problem = _without_path(message, self.uploads[job])
        if "out of memory" in problem:
            problem = text(self.lang, "out_of_memory")
        self.result.messages.append(text(self.lang, "bad_file" if stage == "input" else "failed", name=job.name,
                                         problem=problem))


def _painted_mask_file(mask: Image.Image | None, folder: Path) -> Path | None:
    """A mask painted in the page, saved as a PNG named PAINTED_MASK in `folder` (so the output records its name and
    SHA-256 exactly as for a mask file given to the command line); None when nothing was painted."""
    if mask is None:
        return None
    folder.mkdir(parents=True, exist_ok=True)
    mask.save(folder / PAINTED_MASK, format="PNG")
    return folder / PAINTED_MASK


def _finish(result: JobResult, status: str, started: float) -> JobResult:
    result.status = status
    result.seconds = time.perf_counter() - started
    return result


def _upload_problem(upload: Artwork, max_upload_bytes: int | None, lang: str, *, probe: bool = True) -> str | None:
    """What is wrong with an upload that shows without decoding it, without the file's name, or None: over the upload
    limit, and with `probe` not an image (its header). When the artwork is chosen the page probes it; before a job
    only the limit is the page's own check, the job runner checks the files as it does for the command line."""
    try:
        size = upload.path.stat().st_size
        if max_upload_bytes is not None and size > max_upload_bytes:
            return text(lang, "too_large", size=f"{size / 2**20:.1f}", limit=f"{max_upload_bytes / 2**20:g}")
        if probe:
            image_io.probe_image(upload.path)
    except OSError as exc:
        return exc.strerror or str(exc)
    except ValueError as exc:
        return _without_path(str(exc), upload)
    return None


def _without_path(message: str, upload: Artwork) -> str:
    """An engine message names the server's temporary file; the page names the upload."""
    prefix = f"{upload.path}: "
    return message[len(prefix):] if message.startswith(prefix) else message.replace(str(upload.path), upload.name)


def _unique_png_name(name: str, taken: set[str]) -> str:
    stem = Path(name).stem or "image"
    candidate, counter = f"{stem}.png", 1
    while candidate in taken or candidate == ZIP_NAME:
        counter += 1
        candidate = f"{stem}_{counter}.png"
    taken.add(candidate)
    return candidate


def _previews(picture: Image.Image, protected: Image.Image, epsilon: float) -> tuple[Image.Image, Image.Image]:
    """The input as the engine saw it (bicubic to the processed size) and the perturbation made visible: the
    per-pixel change |protected - original| scaled so that a change of epsilon levels is full brightness."""
    original = picture
    if original.size != protected.size:
        original = original.resize(protected.size, resample=Image.Resampling.BICUBIC)
    change = np.abs(np.asarray(protected, dtype=np.int16) - np.asarray(original, dtype=np.int16))
    scale = 255.0 / epsilon if epsilon > 0 else 0.0
    amplified = np.clip(change * scale, 0, 255).round().astype(np.uint8)
    return original, Image.fromarray(amplified, mode="RGB")


def _scaled_for_screen(picture: Image.Image) -> Image.Image:
    """What the page shows of an image: at most PREVIEW_SIDE pixels on its longest side (a 6000 x 4000 artwork's
    three views would be 40 MB each at full size); the PNG to download keeps the full size."""
    if max(picture.size) <= PREVIEW_SIDE:
        return picture
    scaled = picture.copy()
    scaled.thumbnail((PREVIEW_SIDE, PREVIEW_SIDE), Image.Resampling.LANCZOS)
    return scaled


def _prepare(workdir: Path) -> Path:
    """Create the job root and drop job folders from previous days."""
    workdir.mkdir(parents=True, exist_ok=True)
    remove_old_folders(workdir, JOB_MAX_AGE_S, pattern="job-*")
    return workdir


# --------------------------------------------------------------------------
# The page


def parse_auth(value: str | None) -> tuple[str, str] | None:
    """`user:password` (from --auth or $MIST_WEBUI_AUTH) as gradio's auth pair; None for none given."""
    if value is None or value == "":
        return None
    user, colon, password = value.partition(":")
    if not colon or not user or not password:
        raise ValueError("--auth: expected user:password (a non-empty user and password separated by a colon)")
    return user, password


@dataclass
class _Page:
    """What the server keeps for one open page (a browser tab, across its reloads): its cancel flag, where its job
    is, and the uploads to delete when that job ends or the page goes away."""

    cancel: threading.Event = field(default_factory=threading.Event)
    phase: str = "idle"  # "idle", "pending" (Protect pressed, the job waits for its turn) or "running"
    activity: str = "protect"  # what runs while the phase is "running": "protect" or "evaluate"
    key: str | None = None  # the tab's key (see `WebUI.attach`); None: the page cannot be found again
    latest: str = ""  # the job's last progress line, for a reloaded page that follows it
    result: JobResult | None = None  # the last finished job's result, shown again after a reload
    notice: str = ""  # what a reloaded page is told about its job (a key of `text`), once
    expiry: threading.Timer | None = None  # closes the page for good unless it comes back (a reload) before
    uploads: set[Path] = field(default_factory=set)
    closed: bool = False  # closed for good: it went away and did not come back in time
    served: set[Path] = field(default_factory=set)  # gradio's folders holding what it served of this page's previews
    kept: Path | None = None  # copies of the last job's originals, for the Evaluate tab (see `WebUI.evaluate`)
    shown: list[Path] = field(default_factory=list)  # the last job's previews (the original's among them)


class WebUI:
    """The handlers the page calls: a job per click (one per page at a time), a cancel flag per page, the page's
    uploads deleted when its job ends or the page goes away."""

    def __init__(self, engine: ModelCache, workdir: Path, max_upload_mb: float = DEFAULT_MAX_UPLOAD_MB, *,
                 upload_root: Path | None = None, served_to_others: bool = False,
                 reload_grace_s: float = RELOAD_GRACE_S, work_limits: WorkLimits | None = None) -> None:
        """`workdir`: where jobs write (private to this server); `upload_root`: gradio's upload folder, the only
        place whose files this server deletes as uploads (None: delete none); `served_to_others`: --listen or
        --share (the page says where images are processed); `reload_grace_s`: how long a page that went away is
        kept for its reload."""
        self.engine = engine
        self.workdir = Path(workdir)
        self.max_upload_mb = max_upload_mb
        self.upload_root = Path(upload_root).resolve() if upload_root is not None else None
        self.served_to_others = served_to_others
        self.reload_grace_s = reload_grace_s
        self.work_limits = work_limits or WorkLimits()
        self._pages: dict[str, _Page] = {}  # by gradio session (one per page load)
        self._away: dict[str, _Page] = {}  # pages that went away and may come back, by key
        self._pages_lock = threading.Lock()
        self._stopping = threading.Event()

    @property
    def max_upload_bytes(self) -> int:
        return int(self.max_upload_mb * 2**20)

    def _page(self, session: str | None) -> _Page:
        with self._pages_lock:
            return self._pages.setdefault(session or "", _Page())

    def cancel_flag(self, session: str | None) -> threading.Event:
        return self._page(session).cancel

    @cached_property
    def offer(self) -> Offer:
        """The methods (and choices of their parameters) the served model runs, told once without loading it; the
        page offers only those (`mist.runner.offers`)."""
        return model_offer(self.engine)

    def banner(self, lang: str) -> str:
        """A line above everything when no model is found (how to get one) or the test model runs, and which methods
        are not offered because the served model cannot run them (and why)."""
        from mist.models import TINY_RANDOM, ModelNotFoundError

        try:
            where = self.engine.where()
        except ModelNotFoundError as exc:
            return f"**{text(lang, 'no_model')}**\n\n```\n{exc}\n```"
        refused = self.offer.refused
        lines = [f"**{text(lang, 'no_protection')}**" if where == TINY_RANDOM else "",
                 text(lang, "not_offered", methods=", ".join(refused)) if refused else "",
                 *dict.fromkeys(refused.values())]  # the engine's reason, in English as its other messages
        return "\n\n".join(filter(None, lines))

    # --- event handlers (gradio passes component values; `session` comes from the request) ---

    def artwork(self, path: str | os.PathLike | None, lang: str, session: str | None) -> tuple[Path | None, str]:
        """The one-image tab's file was chosen: the preview to paint on and "", or None and why the file cannot be
        used (then it is deleted)."""
        if not path:
            return None, ""
        path = Path(path)
        self._page(session).uploads.add(path)
        upload = Artwork(path, path.name)
        problem = _upload_problem(upload, self.max_upload_bytes, lang)
        if not problem:
            try:
                shown = preview(path, self.workdir / "previews")
            except ValueError as exc:
                problem = _without_path(str(exc), upload)
            else:
                self._page(session).uploads.add(shown)
                return shown, ""
        self.forget_uploads(session)  # a refused file is not kept
        return None, text(lang, "unusable", name=upload.name, problem=problem)

    def start(self, lang: str, session: str | None) -> str | None:
        """Protect was pressed, before the job enters the queue: forget an old cancel and say how many jobs of other
        pages run first; None when this page's job is already running (a second tap starts nothing)."""
        page = self._page(session)
        with self._pages_lock:
            if page.phase == "running":
                return None
            page.phase = "pending"
            ahead = sum(1 for other in self._every_page() if other is not page and other.phase != "idle")
        page.cancel.clear()
        return text(lang, "waiting", ahead=ahead) if ahead else text(lang, "starting")

    def cancel(self, lang: str, session: str | None) -> str:
        self.cancel_flag(session).set()
        return text(lang, "cancel_requested")

    def attach(self, session: str | None, key: str | None, lang: str) -> Resumed:
        """A page was loaded with its tab's `key` (kept by the browser across reloads; with the login's user name
        when there is one): when that page went away less than `reload_grace_s` ago, it is this one again (its
        running job goes on, its last result is shown again). A key that is malformed, unknown or held by another
        open page (a duplicated tab) starts a new page; only the first of them can be found again."""
        key = key if _well_formed(key) else None
        with self._pages_lock:
            page = self._away.pop(key, None) if key else None
            if page is None:
                page = self._pages.setdefault(session or "", _Page())
                held = any(other.key == key for other in self._pages.values() if other is not page)
                page.key = None if held else key
                return Resumed("", None, False)
            if page.expiry is not None:
                page.expiry.cancel()
            self._pages[session or ""] = page
            notice, page.notice = page.notice, ""
            if page.phase == "running" and page.activity == "protect":
                return Resumed(text(lang, "reload_running", latest=page.latest or text(lang, "starting")), None,
                               True)
            message = text(lang, notice or "reload_found") if notice or page.result is not None else ""
            return Resumed(message, page.result, False)

    def follow(self, session: str | None, lang: str) -> Resumed:
        """How the page's job is doing, for a page that found its running job again after a reload: the last progress
        line while it runs (`running`), then its result."""
        with self._pages_lock:
            page = self._pages.get(session or "")
            if page is None:
                return Resumed("", None, False)
            if page.phase == "running" and page.activity == "protect":
                return Resumed(page.latest or text(lang, "starting"), None, True)
            return Resumed("", page.result, False)

    def closed(self, session: str | None) -> None:
        """The page went away (closed or reloaded). A job still waiting for its turn is dropped at once: it will not
        run (`run` finds no pressed Protect) and no other page waits for it; an evaluation is cancelled; the uploads
        of a page without a job are deleted. A page with something to find again (a running protect job, a result,
        a notice) is kept for `reload_grace_s` so that its reload finds it (`attach`), and is closed for good after
        that (`_abandon`); others, and any beyond MAX_AWAY_PAGES kept at once, are closed for good now."""
        with self._pages_lock:
            page = self._pages.pop(session or "", None)
            if page is None:
                return
            if page.phase == "pending":
                page.phase = "idle"
                page.notice = "reload_dropped"
            if page.phase == "running" and page.activity == "evaluate":
                page.cancel.set()
                page.notice = "reload_evaluate"
            if page.phase == "idle":
                self._discard(page)  # the reloaded page no longer shows the artwork chosen before
            worth_finding = page.phase == "running" or page.result is not None or bool(page.notice)
            if (page.key is None or self.reload_grace_s <= 0 or not worth_finding
                    or len(self._away) >= MAX_AWAY_PAGES):  # a flood of pages that come and go keeps no timers
                self._abandon(page)
                return
            self._away[page.key] = page
            page.expiry = threading.Timer(self.reload_grace_s, self._expire, (page,))
            page.expiry.daemon = True
            page.expiry.start()

    def _every_page(self) -> list[_Page]:
        """The open pages and those kept for their reload (with the pages lock held)."""
        return [*self._pages.values(), *self._away.values()]

    def _expire(self, page: _Page) -> None:
        with self._pages_lock:
            if self._away.get(page.key or "") is page:  # not found again meanwhile
                del self._away[page.key]
                self._abandon(page)

    def _abandon(self, page: _Page) -> None:
        """Close a page for good (with the pages lock held): cancel its job (it stops after the current step,
        freeing the queue) and delete its files; a running job deletes its own when it ends (`run`)."""
        page.closed = True
        page.cancel.set()
        if page.phase != "running":
            self._discard(page)
            _drop_kept(page)
            self._drop_previews(page)

    def sweep(self, now: float | None = None) -> int:
        """Delete what browsers left in gradio's upload folder that no page holds; returns how many files:
        - partial uploads: gradio writes an upload to a tmp* file and renames it when it is complete, so a browser
          that hangs up midway leaves the file behind (deleted when unchanged for STALE_UPLOAD_S);
        - the image editor's exports of its canvas (background.png, composite.png, layer_N.png: the preview, an
          unprotected copy of the artwork, and the painted strokes), which the browser uploads with a job and again
          when the editor is cleared after it. Deleted when older than STALE_EXPORT_S and no page waits for its
          turn: a waiting page's exports are uploaded before its job starts and are read only then."""
        if self.upload_root is None:
            return 0
        now = time.time() if now is None else now
        with self._pages_lock:
            waiting = any(page.phase == "pending" for page in self._every_page())
            held = {path for page in self._every_page() for path in page.uploads}
            stale = [(path, STALE_UPLOAD_S) for path in self.upload_root.glob("tmp*")]
            if not waiting:
                stale += [(path, STALE_EXPORT_S) for path in self.upload_root.glob("*/*")
                          if path.name in EDITOR_FILES or re.fullmatch(r"layer_\d+\.png", path.name)]
            removed = 0
            for path, age in stale:
                with contextlib.suppress(OSError):
                    if path not in held and path.is_file() and now - path.stat().st_mtime > age:
                        path.unlink()
                        removed += 1
                        if path.parent != self.upload_root:
                            with contextlib.suppress(OSError):
                                path.parent.rmdir()
        return removed

    def keep_clean(self, every_s: float = SWEEP_EVERY_S) -> None:
        """Sweep every `every_s` seconds on a thread of its own, until `close_all`."""
        def loop() -> None:
            while not self._stopping.wait(every_s):
                self.sweep()

        threading.Thread(target=loop, name="mist-webui-sweep", daemon=True).start()

    def close_all(self) -> None:
        """The server stops: stop the sweeps and the timers of the pages kept for a reload (their files go with the
        server's private folder)."""
        self._stopping.set()
        with self._pages_lock:
            for page in self._away.values():
                if page.expiry is not None:
                    page.expiry.cancel()
            self._away.clear()

    def uploaded(self, paths: Sequence[str | os.PathLike] | None, session: str | None) -> None:
        """Files arrived in the several-images tab: they are this page's (deleted with its job or when it goes away,
        never while another page holds the same file)."""
        page = self._page(session)
        with self._pages_lock:
            page.uploads.update(Path(path) for path in paths or ())

    def forget_uploads(self, session: str | None) -> None:
        """The page cleared its artwork: delete what it uploaded (unless its job is running; that job deletes them)."""
        page = self._page(session)
        with self._pages_lock:
            if page.phase == "idle":
                self._discard(page)

    def run(self, source: str, artwork: str | os.PathLike | None, editor: dict | None, files: Sequence[Any] | None,
            settings: Settings, lang: str, session: str | None, progress: Progress | None = None) -> JobResult | None:
        """One click of Protect: the artwork and its painted mask, or every file of the batch tab. The job's uploads
        are deleted when it ends. None when there is no pressed Protect to serve (a second tap, already served)."""
        with self._pages_lock:
            page = self._pages.get(session or "")
            if page is None or page.phase != "pending":  # a second tap, or the page went away while it waited
                return None
            page.phase, page.activity, page.latest, page.result = "running", "protect", "", None
        _drop_kept(page)  # the Evaluate tab only ever checks the page's last job
        with self._pages_lock:
            self._drop_previews(page)  # the page shows only its last job's
        try:
            self.workdir.mkdir(parents=True, exist_ok=True)
            if source == "batch":
                uploads = file_uploads(files)
            else:
                upload = artwork_upload(artwork, editor)
                uploads = [upload] if upload else []
            page.uploads.update(upload.path for upload in uploads)
            page.uploads.update(Path(path) for path in (editor or {}).get("uploaded", []))  # the editor's files
            say = progress or (lambda fraction, desc: None)

            def heard(fraction: float, desc: str) -> None:
                page.latest = desc
                say(fraction, desc)

            result = run_job(uploads, settings, self.engine, self.workdir, lang=lang, cancel=page.cancel,
                             progress=heard, max_upload_bytes=self.max_upload_bytes, work_limits=self.work_limits)
            page.kept = _keep_originals(result.outputs)
            page.shown = [path for o in result.outputs for path in (o.original, o.shown, o.perturbation) if path]
        finally:
            with self._pages_lock:
                page.phase = "idle"
                removed = self._discard(page)
                if page.closed:
                    _drop_kept(page)
                    self._drop_previews(page)
        result.uploads_removed = removed
        result.originals_kept = page.kept is not None
        page.result = result
        self.sweep()
        return result

    def evaluate(self, strength: float, jpeg: bool, lang: str, session: str | None,
                 progress: Progress | None = None) -> EvaluationView:
        """One click of Evaluate: the img2img check (`mist.runner.evaluation.evaluate_folders`, one `strength`,
        EVALUATE_STEPS DDIM steps, after JPEG q75 too when `jpeg`) of the page's last job, holding the engine's attack
        lock; then the copy of that job's originals is deleted. Never raises: a problem is the view's summary."""
        from mist.engine.attack import Cancelled
        from mist.runner.evaluation.job import EvaluationJob, run_evaluation
        from mist.runner.evaluation.settings import EvaluationSettings
        from mist.models import ModelNotFoundError

        page = self._page(session)
        with self._pages_lock:
            if page.phase != "idle":
                return EvaluationView([], text(lang, "busy"))
            if page.kept is None:
                return EvaluationView([], text(lang, "evaluate_nothing"))
            page.phase, page.activity = "running", "evaluate"
            page.cancel.clear()
        started = time.perf_counter()
        say = progress or (lambda fraction, desc: None)

        def follow(news) -> None:
            left = "" if news.seconds_left is None or news.done == news.total else text(
                lang, "evaluate_left", eta=duration(news.seconds_left, lang))
            say(news.done / news.total, text(lang, "evaluate_progress", doing=news.doing, done=news.done,
                                             total=news.total) + left)

        try:
            settings = EvaluationSettings(purify=EVALUATE_PURIFY if jpeg else "", strengths=(float(strength),),
                                          steps=EVALUATE_STEPS)
            with self.engine.attack_lock:
                if page.cancel.is_set():  # cancelled while it waited for the protect jobs of other pages
                    raise Cancelled
                job = EvaluationJob(page.kept, page.kept.parent, settings, keep=_unfinished(page.kept))
                evaluation, _ = run_evaluation(job, self.engine, progress=follow, cancel=page.cancel,
                                               on_load=lambda where, device: say(0.0, text(lang, "loading_model")))
        except Cancelled:
            return EvaluationView([], text(lang, "evaluate_cancelled"))
        except ModelNotFoundError as exc:
            return EvaluationView([], f"{text(lang, 'no_model')}\n\n```\n{exc}\n```")
        except (ValueError, OSError, RuntimeError) as exc:
            return EvaluationView([], f"{text(lang, 'evaluate_failed')} {exc}")
        finally:
            with self._pages_lock:
                page.phase = "idle"
                folder = page.kept.parent if page.kept is not None else None
                # A cancelled check can be run again: the originals stay until it ran or the page is closed.
                removed = _drop_kept(page) if not page.cancel.is_set() or page.closed else False
                if page.closed:
                    self._drop_previews(page)
        view = evaluation_view(evaluation, folder / "evaluation", lang)
        with self._pages_lock:  # the grid shows unprotected pictures: they go as the job's previews do
            page.shown += [path for path, _ in view.grid]
            if page.closed:
                self._drop_previews(page)
        view.summary = "\n\n".join(
            [view.summary, text(lang, "evaluate_done", images=len(evaluation.images),
                                time=duration(time.perf_counter() - started, lang))]
            + ([text(lang, "evaluate_removed")] if removed else []))
        view.originals_removed = removed
        return view

    def _drop_previews(self, page: _Page) -> None:
        """Delete the previews of the page's last job (the original's is an unprotected copy of the artwork, at up
        to PREVIEW_SIDE pixels) and the copies gradio made of them to serve them, unless another page shows a file
        of the same name. The protected PNGs and the ZIP stay for download."""
        held = {path.name for other in self._every_page() if other is not page for path in other.shown}
        for path in page.shown:
            path.unlink(missing_ok=True)
            served = list(self.upload_root.glob(f"*/{path.name}")) if self.upload_root is not None else []
            for copy in served:
                if path.name not in held:
                    copy.unlink(missing_ok=True)
                    with contextlib.suppress(OSError):
                        copy.parent.rmdir()
        page.shown = []

    def _discard(self, page: _Page) -> bool:
        """Delete the page's uploads (files under `upload_root` or `workdir`), each with its folder when that is
        left empty, and the folders where gradio keeps what it served of the page's previews; forget the uploads.
        True when something was deleted."""
        removed = False
        for path in page.uploads:
            if path.name.startswith(PREVIEW_PREFIX) and self.upload_root is not None:
                # gradio names such a folder after the content it holds: the preview, and the editor's
                # background.png and composite.png of it, which the browser may send again later.
                page.served.update(served.parent for served in self.upload_root.glob(f"*/{path.name}"))
        for folder in page.served:
            if not _inside(folder, self.upload_root):
                continue
            for copy in folder.glob("*"):  # not the outputs that happen to have the same content
                if copy.name.startswith(PREVIEW_PREFIX) or copy.name in EDITOR_FILES or copy.name.startswith("layer_"):
                    copy.unlink(missing_ok=True)
                    removed = True
            with contextlib.suppress(OSError):
                folder.rmdir()
        held = {path for other in self._every_page() if other is not page for path in other.uploads}
        for path in page.uploads:
            if not (_inside(path, self.upload_root) or _inside(path, self.workdir)) or path in held:
                continue  # not an upload, or another page uploaded the same file (gradio keeps one copy of it)
            try:
                path.unlink()
                removed = True
                path.parent.rmdir()  # gradio keeps each upload in a folder of its own
            except OSError:
                pass
        page.uploads.clear()
        return removed


@dataclass(frozen=True)
class Resumed:
    """What a page shows of its job when it is loaded again (`WebUI.attach`) or follows it (`WebUI.follow`): a
    status line ("" for none), the finished job's result to show (or None), and whether the job still runs."""

    status: str
    result: JobResult | None
    running: bool


def _well_formed(key: str | None) -> bool:
    return (isinstance(key, str) and len(key.rpartition("\n")[2]) == PAGE_KEY_LENGTH
            and set(key.rpartition("\n")[2]) <= PAGE_KEY_CHARACTERS)


@dataclass
class EvaluationView:
    """What the Evaluate tab shows: the grid (picture file, caption), `columns` pictures per image, and the summary
    (markdown: the random-weights warning, one verdict line per image, how it went)."""

    grid: list[tuple[Path, str]]
    summary: str
    columns: int = 4
    originals_removed: bool = False  # the copy of the job's originals was deleted from the server


def evaluation_view(evaluation: Evaluation, folder: Path, lang: str) -> EvaluationView:
    """The grid and verdicts of `evaluation` (one img2img strength), its pictures saved as PNGs in `folder`."""
    from mist.runner.evaluation.report import headline_lines, image_verdict
    from mist.runner.evaluation.words import purification_label

    (name, _, _), = evaluation.mimicries
    purified = [p for p in evaluation.purifications if p.name != "none"]
    folder.mkdir(parents=True, exist_ok=True)
    grid: list[tuple[Path, str]] = []
    lines = [f"**{text(lang, 'no_protection')}**"] if evaluation.random_weights else []
    for number, result in enumerate(evaluation.images):
        ssim = {s.purification: f"{s.ssim:.2f}" for s in evaluation.scores
                if s.image == result.pair.name and s.mimicry == name}
        cells = [("clean", text(lang, "col_clean")), ("protected", text(lang, "col_protected")),
                 (f"{name} clean", text(lang, "col_mimic_clean")),
                 (f"{name} none", text(lang, "col_mimic_protected", ssim=ssim["none"]))]
        for p in purified:
            label = purification_label(p.kind, p.value, p.label, lang)
            cells += [(p.name, text(lang, "col_purified", purification=label)),
                      (f"{name} {p.name}", text(lang, "col_mimic_purified", purification=label, ssim=ssim[p.name]))]
        for column, (key, caption) in enumerate(cells):
            path = folder / f"{number}-{column}.png"
            result.pictures[key].save(path, format="PNG")
            grid.append((path, f"{result.pair.name}: {caption}"))
        lines.append(f"- {result.pair.name}: {image_verdict(evaluation, result, lang)}")
    lines += [f"**{line}**" for line in headline_lines(evaluation, lang)]  # the set's answer, as the report begins
    return EvaluationView(grid, "\n".join(lines), columns=4 + 2 * len(purified))


def _keep_originals(outputs: Sequence[Output]) -> Path | None:
    """Copies of the uploaded originals of `outputs`, for the Evaluate tab, in an `originals` folder beside the
    protected PNGs (each named after its PNG, so the evaluation pairs them); None when there is no output or the
    copy failed (the page then has nothing to evaluate; the job's outputs are unaffected)."""
    if not outputs:
        return None
    folder = outputs[0].png.parent / "originals"
    try:
        folder.mkdir(exist_ok=True)
        for output in outputs:
            if output.source is not None:
                shutil.copyfile(output.source, folder / f"{output.png.stem}{output.source.suffix.lower()}")
    except OSError as exc:
        log.warning("the originals could not be kept for the Evaluate tab: %s", exc)
        shutil.rmtree(folder, ignore_errors=True)
        return None
    return folder


def _unfinished(kept: Path) -> Path:
    """Where an evaluation of the originals `kept` keeps its finished units: a cancelled one, run again, goes on
    from there (they hold purified copies of the originals, so they go with them)."""
    return kept.parent / UNFINISHED


def _drop_kept(page: _Page) -> bool:
    """Delete the page's copy of its last job's originals and what an evaluation of them kept; True when there was
    one."""
    if page.kept is None:
        return False
    shutil.rmtree(page.kept, ignore_errors=True)
    shutil.rmtree(_unfinished(page.kept), ignore_errors=True)
    page.kept = None
    return True


def _inside(path: Path, folder: Path | None) -> bool:
    if folder is None:
        return False
    try:
        return path.resolve().is_relative_to(folder.resolve())
    except OSError:
        return False
