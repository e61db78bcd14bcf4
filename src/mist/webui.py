"""The Mist web UI: `mist webui` (or `python mist-webui.py`) serves a gradio page on http://127.0.0.1:7860.

The page only builds a `ProtectConfig` and calls the engine (`Protector.protect_many`); reading uploads, masks and
PNG metadata go through `mist.images` and `mist.batch`, exactly as the command line's outputs. The handlers are plain
functions (`run_job`, `editor_upload`, `file_uploads`, `Settings.config`) that the tests call without a browser; the
gradio layer (`build_app`, `launch`) only wires them to components. Importing this module loads no model and imports
no gradio: the model is loaded on the first job (then kept), gradio when the app is built.

Safety: the server listens on 127.0.0.1 unless `--listen` or `--share` is given (with a warning when there is no
`--auth`); uploads are size-limited; one attack runs at a time, later jobs wait in gradio's queue and see their
position; a bad upload gets a message in the page.
"""

from __future__ import annotations

import logging
import os
import secrets
import shutil
import signal
import sys
import tempfile
import threading
import time
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Sequence

import numpy as np
from PIL import Image

from . import images as image_io
from .attack import Cancelled
from .batch import output_metadata, settings_text
from .config import MODES, PRECISIONS, ProtectConfig
from .download import sha256_file
from .webui_text import EN, LABEL_KEYS, LANGUAGES, TEXTS, detect_language, duration, text

if TYPE_CHECKING:
    from .models import StableDiffusion
    from .pipeline import Protector

log = logging.getLogger(__name__)

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 7860
DEFAULT_MAX_UPLOAD_MB = 50
AUTH_ENV = "MIST_WEBUI_AUTH"
SIZES = (256, 512, 768)
ZIP_NAME = "mist-protected.zip"
EDITOR_NAME = "image.png"  # what outputs record as the source name of an image painted in the editor
JOB_MAX_AGE_S = 24 * 3600  # job folders older than this are removed when a new job starts

_DEFAULTS = ProtectConfig()


# --------------------------------------------------------------------------
# Settings and inputs


@dataclass(frozen=True)
class Settings:
    """The page's controls, in the page's units; `config()` turns them into the engine's ProtectConfig."""

    epsilon: float = _DEFAULTS.epsilon
    steps: int = _DEFAULTS.steps
    size: int = _DEFAULTS.input_size
    mode: str = _DEFAULTS.mode
    fused_weight: float = _DEFAULTS.fused_weight
    low_vram: bool = False  # block_num 2, the original's low-VRAM mode
    no_resize: bool = _DEFAULTS.keep_aspect
    seed: int = _DEFAULTS.seed
    precision: str = _DEFAULTS.precision
    fast: bool = _DEFAULTS.fast

    def config(self) -> ProtectConfig:
        """The engine's settings; raises ValueError (one line, naming the setting) for an invalid value."""
        return ProtectConfig(
            mode=self.mode, epsilon=_whole(self.epsilon), steps=_whole(self.steps), input_size=_whole(self.size),
            fused_weight=_whole(self.fused_weight), block_num=2 if self.low_vram else 1,
            keep_aspect=bool(self.no_resize), seed=_whole(self.seed), precision=self.precision, fast=bool(self.fast),
        )


def _whole(value: Any) -> Any:
    """Sliders and number boxes send floats; a float with no fraction becomes an int (others pass on, and are
    refused by ProtectConfig with a message)."""
    if isinstance(value, str):
        try:
            value = float(value)
        except ValueError:
            return value
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return value


@dataclass(frozen=True)
class Upload:
    """One image to protect: the file as uploaded, the name it had on the user's computer (only the name goes into
    the output), and the region to protect (white, 255 = protect; None = everything)."""

    path: Path
    name: str
    mask: Image.Image | None = None


def file_uploads(files: Sequence[Any] | None) -> list[Upload]:
    """Uploads from a multi-file input: paths (gradio keeps each upload under its own name) or gradio file dicts."""
    uploads = []
    for item in files or []:
        if isinstance(item, dict):  # a raw gradio FileData
            path, name = Path(item["path"]), item.get("orig_name") or Path(item["path"]).name
        else:
            path = Path(item if isinstance(item, (str, os.PathLike)) else item.name)  # a path, or a tempfile object
            name = path.name
        uploads.append(Upload(path, name))
    return uploads


def editor_mask(value: dict[str, Any] | None) -> Image.Image | None:
    """The region painted in an image editor value ({"background", "layers", "composite"}): an "L" image of the
    background's size, 255 where any layer has a painted (not fully transparent) pixel; None when nothing is painted
    (protect everything)."""
    if not value or value.get("background") is None:
        return None
    background = _as_pil(value["background"])
    painted = np.zeros((background.height, background.width), dtype=bool)
    for layer in value.get("layers") or []:
        if layer is None:
            continue
        layer = _as_pil(layer)
        if "A" not in layer.getbands():
            continue
        alpha = layer.getchannel("A")
        if alpha.size != background.size:
            alpha = alpha.resize(background.size, Image.Resampling.NEAREST)
        painted |= np.asarray(alpha) > 0
    if not painted.any():
        return None
    return Image.fromarray(np.where(painted, 255, 0).astype(np.uint8), mode="L")


def editor_upload(value: dict[str, Any] | None, folder: Path, name: str = EDITOR_NAME) -> Upload | None:
    """The image and painted mask of an image editor value, the image saved losslessly as a PNG in `folder` (the
    bytes that are checked and whose SHA-256 the output records); None when no image was uploaded."""
    if not value or value.get("background") is None:
        return None
    background = _as_pil(value["background"])
    if "A" in background.getbands():
        background = background.convert("RGBA").convert("RGB")  # drop alpha, as Mist v1.2 and mist.images do
    path = folder / "inputs" / secrets.token_hex(4) / name
    path.parent.mkdir(parents=True, exist_ok=True)
    background.save(path, format="PNG")
    return Upload(path, name, editor_mask(value))


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
# The engine: one model, loaded on the first job


class Engine:
    """The model (loaded on the first job, kept for the next ones, one at a time) and the lock that lets one attack at
    a time use the device."""

    def __init__(self, model: str | os.PathLike | None = None, device: str | None = None,
                 low_memory: bool | None = None) -> None:
        self.model_spec = model
        self.device_name = device
        self.low_memory = low_memory
        self.attack_lock = threading.Lock()
        self._load_lock = threading.Lock()
        self._models: dict[str, StableDiffusion] = {}
        self.loads = 0  # how many times a model was read (tests check it is once)

    def where(self):
        """Where the model is (`tiny-random` or a path), without loading it; raises ModelNotFoundError."""
        from .models import resolve_model

        return resolve_model(self.model_spec)

    def protector(self, config: ProtectConfig, on_load: Callable[[], None] | None = None) -> tuple[Protector, str]:
        """A Protector for `config` on the cached model (loaded now if it is not yet) and the name outputs record.
        Raises ModelNotFoundError, or ValueError for a precision the device cannot run."""
        import torch

        from .cli import model_label
        from .device import pick_device, resolve_precision
        from .models import load_model
        from .objectives import PRECISION_DTYPES
        from .pipeline import Protector

        with self._load_lock:
            where = self.where()
            device = pick_device(self.device_name)
            precision = resolve_precision(config.precision, device)
            key = str(where)
            model = self._models.get(key)
            if model is not None and model.dtype not in (torch.float32, PRECISION_DTYPES[precision]):
                # A Protector casts the weights in place; once half precision, they cannot be cast back exactly.
                model = None
            if model is None:
                if on_load is not None:
                    on_load()
                self._models.clear()  # one model in memory at a time
                model = load_model(where)
                self.loads += 1
                self._models[key] = model
            return Protector(model, config, device, low_memory=self.low_memory), model_label(where)


# --------------------------------------------------------------------------
# A job


@dataclass(frozen=True)
class Output:
    name: str  # the uploaded file's name
    png: Path  # the protected PNG, with Mist's metadata
    original: Path  # preview: the input resized as the engine processed it
    perturbation: Path  # preview: |protected - original|, scaled so that epsilon is white


@dataclass
class JobResult:
    outputs: list[Output] = field(default_factory=list)
    zip: Path | None = None
    messages: list[str] = field(default_factory=list)  # one per skipped or failed image, or the job's problem
    status: str = ""  # what the page says at the end, in the job's language
    cancelled: bool = False
    no_protection: bool = False  # made with the random-weight test model
    seconds: float = 0.0

    @property
    def files(self) -> list[Path]:
        """What the page offers for download: each PNG, then the ZIP of a batch."""
        return [o.png for o in self.outputs] + ([self.zip] if self.zip else [])


Progress = Callable[[float, str], None]


def run_job(uploads: Sequence[Upload], settings: Settings | ProtectConfig, engine: Engine, workdir: Path, *,
            lang: str = "en", cancel: threading.Event | None = None, progress: Progress | None = None,
            max_upload_bytes: int | None = None) -> JobResult:
    """Protect `uploads` into a new folder under `workdir` and say how it went; never raises for a bad input, a
    missing model, a bad setting or a cancel (each gives a message in the result). `progress(fraction, text)` hears
    every step; setting `cancel` stops the attack after the current step (finished images are kept)."""
    from .models import ModelNotFoundError

    started = time.perf_counter()
    result = JobResult()
    say = progress or (lambda fraction, desc: None)
    if not uploads:
        return _finish(result, text(lang, "no_input"), started)
    try:
        config = settings if isinstance(settings, ProtectConfig) else settings.config()
    except ValueError as exc:
        return _finish(result, f"{text(lang, 'invalid_settings')} {exc}", started)
    accepted = []  # (upload, SHA-256): files that pass the checks that need no decoding and no model
    for upload in uploads:
        problem = _upload_problem(upload, config, max_upload_bytes, lang)
        if problem:
            result.messages.append(problem)
        else:
            accepted.append((upload, sha256_file(upload.path)))
    if not accepted:
        return _finish(result, text(lang, "nothing_done"), started)
    if cancel is not None and cancel.is_set():  # cancelled while waiting in the queue
        result.cancelled = True
        return _finish(result, text(lang, "cancelled", done=0), started)

    with engine.attack_lock:
        try:
            protector, model_name = engine.protector(config, on_load=lambda: say(0.0, text(lang, "loading_model")))
        except ModelNotFoundError as exc:
            return _finish(result, f"{text(lang, 'no_model')}\n\n```\n{exc}\n```", started)
        except (ValueError, OSError, RuntimeError) as exc:
            return _finish(result, f"{text(lang, 'model_failed')} {exc}", started)
        result.no_protection = protector.model.random_weights
        job = Path(tempfile.mkdtemp(prefix="job-", dir=_prepare(workdir)))
        clock = _Clock(len(accepted))
        names: set[str] = set()
        for number, (upload, digest) in enumerate(accepted):
            if cancel is not None and cancel.is_set():
                result.cancelled = True
                break
            say(number / len(accepted), text(lang, "preparing", image=number + 1, images=len(accepted)))
            try:
                output = _protect_one(upload, digest, number, protector, config, model_name, job, names, clock,
                                      lang, cancel, say)
            except Cancelled:
                result.cancelled = True
                break
            if isinstance(output, str):
                result.messages.append(output)
            else:
                result.outputs.append(output)

    if len(result.outputs) > 1:
        result.zip = job / ZIP_NAME
        with zipfile.ZipFile(result.zip, "w", compression=zipfile.ZIP_STORED) as archive:  # PNGs do not shrink
            for output in result.outputs:
                archive.write(output.png, output.png.name)
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


class _Clock:
    """Steps done so far in a job, for the time-left estimate (the average step time so far)."""

    def __init__(self, images: int) -> None:
        self.images = images
        self.started = time.perf_counter()
        self.steps = 0

    def eta(self, image: int, step: int, total: int) -> float:
        self.steps += 1
        remaining = (total - step) + (self.images - image - 1) * total
        return (time.perf_counter() - self.started) / self.steps * remaining


def _protect_one(upload: Upload, digest: str, number: int, protector: Protector, config: ProtectConfig,
                 model_name: str, job: Path, names: set[str], clock: _Clock, lang: str,
                 cancel: threading.Event | None, say: Progress) -> Output | str:
    """Read, protect and write one image; its Output, or the message that says why it failed. Raises Cancelled."""
    try:
        picture = image_io.read_image(upload.path)
    except ValueError as exc:
        return text(lang, "bad_file", name=upload.name, problem=_without_path(str(exc), upload))

    def on_step(p) -> None:
        if cancel is not None and cancel.is_set():
            raise Cancelled
        eta = clock.eta(number, p.step, p.total)
        say((number + p.step / p.total) / clock.images,
            text(lang, "progress", image=number + 1, images=clock.images, step=p.step, steps=p.total,
                 eta=duration(eta, lang)))

    try:
        [protected] = protector.protect_many([picture], [upload.mask], on_step)
    except (RuntimeError, ValueError) as exc:
        problem = str(exc).splitlines()[0][:300] if str(exc) else type(exc).__name__
        if "out of memory" in problem:
            problem = text(lang, "out_of_memory")
        return text(lang, "failed", name=upload.name, problem=problem)
    name = _unique_png_name(upload.name, names)
    png = job / name
    original, perturbation = _previews(picture, protected.image, config.epsilon)
    previews = job / "previews"
    try:
        image_io.write_png_atomic(protected.image, png,
                                  output_metadata(settings_text(config), model_name, protector, Path(upload.name),
                                                  digest))
        previews.mkdir(exist_ok=True)
        original.save(previews / f"original-{name}")
        perturbation.save(previews / f"perturbation-{name}")
    except (OSError, ValueError) as exc:
        return text(lang, "failed", name=upload.name, problem=str(exc))
    return Output(upload.name, png, previews / f"original-{name}", previews / f"perturbation-{name}")


def _finish(result: JobResult, status: str, started: float) -> JobResult:
    result.status = status
    result.seconds = time.perf_counter() - started
    return result


def _upload_problem(upload: Upload, config: ProtectConfig, max_upload_bytes: int | None, lang: str) -> str | None:
    """What is wrong with an upload that shows without decoding it (size on disk, header, image size), or None."""
    try:
        size = upload.path.stat().st_size
        if max_upload_bytes is not None and size > max_upload_bytes:
            return text(lang, "too_large", name=upload.name, size=f"{size / 2**20:.1f}",
                        limit=f"{max_upload_bytes / 2**20:g}")
        width, height = image_io.probe_image(upload.path)
        image_io.processed_size(width, height, config.input_size, config.block_num, config.keep_aspect)
    except OSError as exc:
        return text(lang, "bad_file", name=upload.name, problem=exc.strerror or str(exc))
    except ValueError as exc:
        return text(lang, "bad_file", name=upload.name, problem=_without_path(str(exc), upload))
    return None


def _without_path(message: str, upload: Upload) -> str:
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


def _prepare(workdir: Path) -> Path:
    """Create the job root and drop job folders from previous days."""
    workdir.mkdir(parents=True, exist_ok=True)
    now = time.time()
    for old in workdir.glob("job-*"):
        try:
            if now - old.stat().st_mtime > JOB_MAX_AGE_S:
                shutil.rmtree(old, ignore_errors=True)
        except OSError:
            pass
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


class WebUI:
    """The handlers the page calls: a job per click, one cancel flag per browser session, labels per language."""

    def __init__(self, engine: Engine, workdir: Path, max_upload_mb: float = DEFAULT_MAX_UPLOAD_MB) -> None:
        self.engine = engine
        self.workdir = Path(workdir)
        self.max_upload_mb = max_upload_mb
        self._cancels: dict[str, threading.Event] = {}
        self._cancels_lock = threading.Lock()

    @property
    def max_upload_bytes(self) -> int:
        return int(self.max_upload_mb * 2**20)

    def cancel_flag(self, session: str | None) -> threading.Event:
        with self._cancels_lock:
            if len(self._cancels) > 10_000:  # sessions that left long ago
                self._cancels = {k: v for k, v in list(self._cancels.items())[-1000:]}
            return self._cancels.setdefault(session or "", threading.Event())

    def banner(self, lang: str) -> str:
        """A line above everything when no model is found (how to get one) or the test model runs."""
        from .models import TINY_RANDOM, ModelNotFoundError

        try:
            where = self.engine.where()
        except ModelNotFoundError as exc:
            return f"**{text(lang, 'no_model')}**\n\n```\n{exc}\n```"
        return f"**{text(lang, 'no_protection')}**" if where == TINY_RANDOM else ""

    # --- event handlers (gradio passes component values; `session` comes from the request) ---

    def start(self, lang: str, session: str | None) -> str:
        """Before a job enters the queue: forget an old cancel, say it is waiting."""
        self.cancel_flag(session).clear()
        return text(lang, "waiting")

    def cancel(self, lang: str, session: str | None) -> str:
        self.cancel_flag(session).set()
        return text(lang, "cancel_requested")

    def run(self, source: str, editor: dict | None, files: Sequence[Any] | None, settings: Settings, lang: str,
            session: str | None, progress: Progress | None = None) -> JobResult:
        """One click of Protect: the editor's image and mask, or every file of the batch tab."""
        self.workdir.mkdir(parents=True, exist_ok=True)
        if source == "batch":
            uploads = file_uploads(files)
        else:
            try:
                upload = editor_upload(editor, Path(tempfile.mkdtemp(prefix="upload-", dir=_prepare(self.workdir))))
            except (OSError, ValueError) as exc:
                return JobResult(messages=[text(lang, "bad_file", name=EDITOR_NAME, problem=str(exc))],
                                 status=text(lang, "nothing_done"))
            uploads = [upload] if upload else []
        return run_job(uploads, settings, self.engine, self.workdir, lang=lang, cancel=self.cancel_flag(session),
                       progress=progress, max_upload_bytes=self.max_upload_bytes)


def _status_markdown(result: JobResult) -> str:
    lines = [result.status] + [f"- {message}" for message in result.messages]
    return "\n\n".join(lines[:1]) + ("\n\n" + "\n".join(lines[1:]) if len(lines) > 1 else "")


def build_app(ui: WebUI):
    """The gradio Blocks of the page (not launched)."""
    try:
        import gradio as gr
    except ImportError as exc:
        raise ValueError("the web UI needs gradio: pip install 'mist-protect[webui]' (or pip install gradio)") from exc

    i18n = None
    if hasattr(gr, "I18n"):
        from .webui_text import CHINESE_LOCALES

        english = {k: EN[k] for k in LABEL_KEYS}
        chinese = {k: TEXTS["zh"][k] for k in LABEL_KEYS}
        i18n = gr.I18n(en=english, **{locale: chinese for locale in CHINESE_LOCALES})

    def L(key: str):  # noqa: N802 - a label that follows the browser's language where gradio can do that
        return i18n(key) if i18n is not None else EN[key]

    def mode_choices(lang: str | None):
        pick = (lambda k: text(lang, k)) if lang else L
        return [(pick(f"mode_{m}"), m) for m in MODES]

    relabel: list[tuple[Any, str, tuple[str, ...]]] = []  # component, what to update, keys

    def labelled(component, key: str, info: bool = False):
        relabel.append((component, "label", (key, f"{key}_info") if info else (key,)))
        return component

    def control(factory, key: str, *args, **kwargs):
        """A settings control labelled (with help text) in the page's language; elem_id mist-<key>."""
        component = factory(*args, label=L(key), info=L(f"{key}_info"), elem_id="mist-" + key.replace("_", "-"),
                            **kwargs)
        return labelled(component, key, info=True)

    d = Settings()
    with gr.Blocks(title=EN["title"], analytics_enabled=False, delete_cache=(3600, 24 * 3600)) as demo:
        with gr.Row(equal_height=True):
            heading = gr.Markdown(L("heading"), elem_id="mist-heading")
            relabel.append((heading, "value", ("heading",)))
            language = gr.Radio(choices=[(name, code) for code, name in LANGUAGES.items()], value="en",
                                label=L("language"), elem_id="mist-language", scale=0, min_width=260)
            labelled(language, "language")
        intro = gr.Markdown(L("intro"))
        relabel.append((intro, "value", ("intro",)))
        banner = gr.Markdown("", elem_id="mist-banner")
        source = gr.State("single")
        results = gr.State([])
        with gr.Row():
            with gr.Column(scale=3):
                with gr.Tabs():
                    with gr.Tab(L("tab_single"), id="single") as tab_single:
                        editor = gr.ImageEditor(
                            label=L("editor"), type="pil", image_mode="RGBA", sources=["upload", "clipboard"],
                            brush=gr.Brush(colors=[("#ff2d55", 0.6)], color_mode="fixed"),
                            eraser=gr.Eraser(), layers=False, transforms=(), format="png", elem_id="mist-editor",
                        )
                        labelled(editor, "editor")
                        editor_hint = gr.Markdown(L("editor_hint"))
                        relabel.append((editor_hint, "value", ("editor_hint",)))
                    with gr.Tab(L("tab_batch"), id="batch") as tab_batch:
                        files = gr.File(label=L("files"), file_count="multiple", file_types=["image"],
                                        type="filepath", elem_id="mist-files")
                        labelled(files, "files")
                        files_hint = gr.Markdown(L("files_hint"))
                        relabel.append((files_hint, "value", ("files_hint",)))
                relabel += [(tab_single, "tab", ("tab_single",)), (tab_batch, "tab", ("tab_batch",))]
            with gr.Column(scale=2):
                epsilon = control(gr.Slider, "strength", 0, 32, value=d.epsilon, step=1)
                steps = control(gr.Slider, "steps", 1, 1000, value=d.steps, step=1)
                size = control(gr.Radio, "size", [(str(s), s) for s in SIZES], value=d.size)
                mode = control(gr.Radio, "mode", mode_choices(None), value=d.mode)
                relabel[-1] = (mode, "mode", ("mode", "mode_info"))
                fused_weight = control(gr.Slider, "fused_weight", 0, 5, value=d.fused_weight, step=0.1)
                with gr.Accordion(L("advanced"), open=False, elem_id="mist-advanced") as advanced:
                    low_vram = control(gr.Checkbox, "low_vram", d.low_vram)
                    no_resize = control(gr.Checkbox, "no_resize", d.no_resize)
                    seed = control(gr.Number, "seed", d.seed, precision=0)
                    precision = control(gr.Dropdown, "precision", list(PRECISIONS), value=d.precision)
                    fast = control(gr.Checkbox, "fast", d.fast)
                relabel.append((advanced, "label", ("advanced",)))
                with gr.Row():
                    run = gr.Button(L("run"), variant="primary", elem_id="mist-run")
                    cancel = gr.Button(L("cancel"), variant="stop", elem_id="mist-cancel")
                relabel += [(run, "value", ("run",)), (cancel, "value", ("cancel",))]
        status = gr.Markdown("", elem_id="mist-status")
        with gr.Row():
            original = labelled(gr.Image(label=L("original"), type="filepath", interactive=False, format="png",
                                         elem_id="mist-original"), "original")
            protected = labelled(gr.Image(label=L("protected"), type="filepath", interactive=False, format="png",
                                          elem_id="mist-protected"), "protected")
            perturbation = labelled(gr.Image(label=L("perturbation"), type="filepath", interactive=False,
                                             format="png", elem_id="mist-perturbation"), "perturbation")
        gallery = labelled(gr.Gallery(label=L("gallery"), columns=6, height=260, object_fit="contain", format="png",
                                      visible=False, elem_id="mist-gallery"), "gallery")
        downloads = labelled(gr.File(label=L("downloads"), file_count="multiple", interactive=False,
                                     elem_id="mist-downloads"), "downloads")

        controls = [epsilon, steps, size, mode, fused_weight, low_vram, no_resize, seed, precision, fast]

        # gradio finds the request and event arguments by their annotations, which this module's postponed
        # evaluation would leave as strings it cannot resolve: `typed` sets them as the classes themselves.
        def typed(fn):
            fn.__annotations__ = {name: {"request": gr.Request, "event": gr.SelectData}[name]
                                  for name in ("request", "event") if name in fn.__code__.co_varnames}
            return fn

        @typed
        def on_run(source_value, editor_value, files_value, epsilon_value, steps_value, size_value, mode_value,
                   fused_weight_value, low_vram_value, no_resize_value, seed_value, precision_value, fast_value, lang,
                   request, progress=gr.Progress()):  # noqa: B008
            settings = Settings(epsilon_value, steps_value, size_value, mode_value, fused_weight_value, low_vram_value,
                                no_resize_value, seed_value, precision_value, fast_value)
            try:
                result = ui.run(source_value, editor_value, files_value, settings, lang, _session(request),
                                lambda fraction, desc: progress(fraction, desc=desc))
            except Exception as exc:  # the page must say something; the server goes on
                log.exception("web UI job failed")
                result = JobResult(status=f"{type(exc).__name__}: {exc}")
            for message in result.messages:
                gr.Warning(message)
            previews = [(str(o.original), str(o.png), str(o.perturbation)) for o in result.outputs]
            first = previews[0] if previews else (None, None, None)
            several = len(result.outputs) > 1  # the gallery picks which image the three views show
            return (_status_markdown(result), *first,
                    gr.update(value=[(str(o.png), o.name) for o in result.outputs], visible=several),
                    [str(f) for f in result.files] or None, previews)

        @typed
        def on_select(previews, event):
            if not previews or event.index is None or event.index >= len(previews):
                return None, None, None
            return tuple(previews[event.index])

        def on_language(lang: str):
            updates = []
            for _component, kind, keys in relabel:
                strings = [text(lang, k) for k in keys]
                if kind == "label" and len(strings) == 2:
                    updates.append(gr.update(label=strings[0], info=strings[1]))
                elif kind in ("label", "tab"):
                    updates.append(gr.update(label=strings[0]))
                elif kind == "mode":
                    updates.append(gr.update(label=strings[0], info=strings[1], choices=mode_choices(lang)))
                else:
                    updates.append(gr.update(value=strings[0]))
            return [*updates, ui.banner(lang)]

        @typed
        def on_load(request):
            lang = detect_language(request.headers.get("accept-language") if request else None)
            return lang, ui.banner(lang)

        @typed
        def on_start(lang, request):
            return ui.start(lang, _session(request))

        @typed
        def on_cancel(lang, request):
            return ui.cancel(lang, _session(request))

        tab_single.select(lambda: "single", None, source, queue=False)
        tab_batch.select(lambda: "batch", None, source, queue=False)
        run.click(on_start, [language], [status], queue=False) \
            .then(on_run, [source, editor, files, *controls, language],
                  [status, original, protected, perturbation, gallery, downloads, results],
                  concurrency_limit=1, concurrency_id="mist-attack", api_visibility="private",
                  show_progress_on=[original, protected, perturbation])
        cancel.click(on_cancel, [language], [status], queue=False)
        gallery.select(on_select, [results], [original, protected, perturbation], queue=False)
        language.change(on_language, [language], [c for c, _, _ in relabel] + [banner], queue=False)
        demo.load(on_load, None, [language, banner], queue=False)
    demo.queue(default_concurrency_limit=1)
    demo.mist_i18n = i18n
    return demo


def _session(request: Any) -> str | None:
    return getattr(request, "session_hash", None)


def launch(ui: WebUI, *, host: str = DEFAULT_HOST, port: int = DEFAULT_PORT, share: bool = False,
           auth: tuple[str, str] | None = None, block: bool = True, quiet: bool = False):
    """Build the page and serve it; with `block` False, return the running Blocks (call `.close()`)."""
    demo = build_app(ui)
    demo.launch(**launch_options(ui, demo, host=host, port=port, share=share, auth=auth),
                prevent_thread_lock=not block, quiet=quiet)
    return demo


def launch_options(ui: WebUI, demo, *, host: str, port: int, share: bool, auth: tuple[str, str] | None) -> dict:
    """gradio's launch settings: where to listen, the login, the upload limit, the files it may serve."""
    options = dict(server_name=host, server_port=port, share=share, auth=auth, max_file_size=f"{ui.max_upload_mb:g}mb",
                   allowed_paths=[str(ui.workdir)], show_error=False, inbrowser=False, footer_links=["gradio"])
    if getattr(demo, "mist_i18n", None) is not None:
        options["i18n"] = demo.mist_i18n
    return options


def main(args) -> int:
    """`mist webui`: args has model, device, low_memory, listen, port, share, auth, max_upload_mb."""
    auth = parse_auth(args.auth if args.auth is not None else os.environ.get(AUTH_ENV))
    if args.max_upload_mb <= 0:
        raise ValueError(f"--max-upload-mb: must be above 0, got {args.max_upload_mb:g}")
    host = "0.0.0.0" if args.listen else DEFAULT_HOST
    if (args.listen or args.share) and auth is None:
        reach = "a public gradio.live link" if args.share else "every machine that can reach this one"
        print(f"WARNING: the web UI is open to {reach} without a password: anyone there can use this machine's "
              f"GPU. Add --auth user:password (or set {AUTH_ENV}).", file=sys.stderr, flush=True)
    workdir = Path(tempfile.mkdtemp(prefix="mist-webui-"))
    ui = WebUI(Engine(args.model, args.device, args.low_memory), workdir, args.max_upload_mb)
    previous = None
    if threading.current_thread() is threading.main_thread():  # `kill`, systemd stop: leave no job files behind
        previous = signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(0))
    try:
        print(f"Mist web UI: http://{'localhost' if host == DEFAULT_HOST else host}:{args.port}"
              " (the model is loaded on the first job)", flush=True)
        launch(ui, host=host, port=args.port, share=args.share, auth=auth, block=True, quiet=not args.share)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
    return 0
