"""The gradio page of the web UI: layout, wiring of the handlers in `mist.faces.webui.pages`, launch and `mist webui`.

Nothing here protects an image: every button calls a handler of `mist.faces.webui.pages`, which calls the engine.
"""

from __future__ import annotations

import os
import queue
import shutil
import signal
import sys
import tempfile
import threading
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mist.engine.config import PRECISIONS
from mist.engine.methods import list_methods, param_specs, shared_params
from mist.common.model_names import default_steps
from mist.faces.webui.pages import (AUTH_ENV, DEFAULT_HOST, DEFAULT_PORT, EVALUATE_STRENGTH, SIZES, JobResult, Settings,
                                    WebUI, log, parse_auth)
from mist.runner.offers import Offer
from mist.runner.work_limits import work_limits_from
from mist.faces.webui.text import (CHINESE_LOCALES, EN, GRADIO_ZH, LABEL_KEYS, LANGUAGES, METHODS_ZH, TEXTS,
                                   detect_language, text)

if TYPE_CHECKING:
    from mist.runner.jobs import ModelCache


def _status_markdown(result: JobResult, lang: str) -> str:
    lines = [result.status] + [f"- {message}" for message in result.messages]
    status = "\n\n".join(lines[:1]) + ("\n\n" + "\n".join(lines[1:]) if len(lines) > 1 else "")
    return (status + (f"\n\n{text(lang, 'uploads_removed')}" if result.uploads_removed else "")
            + (f" {text(lang, 'originals_kept')}" if result.originals_kept else ""))


# The page's labels are rendered by gradio's i18n in gradio's locale, which it takes from the browser (its own strings
# too); the language switch sets that locale through the function gradio's settings panel uses (found among the
# page's loaded modules), so the labels follow the switch. Without it, only the server's messages would.
SET_GRADIO_LOCALE = r"""(lang) => {
    const core = performance.getEntriesByType("resource").map((entry) => entry.name)
        .find((name) => /\/assets\/core-[^/]*\.js$/.test(name));
    if (core) import(core).then((module) => module.changeLocale && module.changeLocale(lang === "zh" ? "zh-CN" : "en"))
        .catch(() => {});
    return lang;
}"""

# On a phone the page is one long column: bring the status line (just under Protect) into view when Protect is tapped.
SHOW_STATUS = """(lang) => {
    document.getElementById("mist-status")?.scrollIntoView({behavior: "smooth", block: "center"});
    return lang;
}"""

# On a phone (a narrow window) the results are below the settings: bring the protected image into view when they come.
SHOW_RESULT = """() => {
    if (window.innerWidth < 768) {
        document.getElementById("mist-protected")?.scrollIntoView({behavior: "smooth", block: "start"});
    }
}"""

# The tab's key, which the server knows the page by across reloads (`WebUI.attach`): 128 random bits kept in the tab's
# sessionStorage (a reload keeps it, another tab has its own); crypto.getRandomValues works on plain http too.
PAGE_KEY = """() => {
    let key = sessionStorage.getItem("mist-page");
    if (!/^[0-9a-f]{32}$/.test(key || "")) {
        key = Array.from(crypto.getRandomValues(new Uint8Array(16)), (b) => b.toString(16).padStart(2, "0")).join("");
        sessionStorage.setItem("mist-page", key);
    }
    return key;
}"""
FOLLOW_EVERY_S = 1.0  # how often a reloaded page asks how its running job is doing

# The status line says what the job does, in the page's language; gradio's own timer and "queue:" or "processing"
# badge over it would repeat that in English.
CSS = "#mist-status [data-testid=status-tracker] { display: none !important; }"


def build_app(ui: WebUI):
    """The gradio Blocks of the page (not launched)."""
    try:
        import gradio as gr
    except ImportError as exc:
        raise ValueError("the web UI needs gradio: pip install 'mist-protect[webui]' (or pip install gradio)") from exc

    methods_en, methods_zh = method_labels()
    english = {**{k: EN[k] for k in LABEL_KEYS}, **methods_en}
    chinese = {**{k: TEXTS["zh"][k] for k in LABEL_KEYS}, **GRADIO_ZH, **methods_zh}
    i18n = gr.I18n(en=english, **{locale: chinese for locale in CHINESE_LOCALES})
    with gr.Blocks(title=EN["title"], analytics_enabled=False, delete_cache=(3600, 24 * 3600)) as demo:
        page = _Page(gr, i18n)
        page.header(ui)
        with gr.Row():
            with gr.Column(scale=3, min_width=320):
                page.sources()
            with gr.Column(scale=2, min_width=320):
                page.settings(Settings(steps=default_steps(ui.engine.model_spec, Settings.steps)), ui.offer)
        page.views()
        _wire(gr, demo, ui, page)
    demo.queue(default_concurrency_limit=1)
    demo.mist_i18n = i18n
    return demo


_NO_SHARE = ["download", "fullscreen"]  # gradio's share button works only on Hugging Face Spaces


class _Page:
    """The page's components, made in the Blocks being built (each method places its own), labelled through gradio's
    i18n in the page's language; elem_ids mist-<key> for the browser tests."""

    def __init__(self, gr, label) -> None:
        self.gr, self.L = gr, label

    def control(self, factory, key: str, *args, **kwargs):
        """A settings control labelled (with help text) in the page's language; elem_id mist-<key>."""
        return factory(*args, label=self.L(key), info=self.L(f"{key}_info"), elem_id="mist-" + key.replace("_", "-"),
                       **kwargs)

    def header(self, ui: WebUI) -> None:
        gr, L = self.gr, self.L  # noqa: N806 - L: a label that the browser shows in the page's language
        with gr.Row(equal_height=True):
            with gr.Column(scale=3, min_width=300):
                gr.Markdown(L("heading"), elem_id="mist-heading")
            self.language = gr.Radio(choices=[(name, code) for code, name in LANGUAGES.items()], value="en",
                                     label=L("language"), elem_id="mist-language", scale=1, min_width=220)
        gr.Markdown(L("intro_served" if ui.served_to_others else "intro"), elem_id="mist-intro")
        self.banner = gr.Markdown("", elem_id="mist-banner")
        self.source = gr.State("single")
        self.results = gr.State([])
        self.key = gr.Textbox(visible=False)  # the tab's key (PAGE_KEY), set when the page loads
        self.follow = gr.Timer(FOLLOW_EVERY_S, active=False)  # ticks while a reloaded page follows its job

    def sources(self) -> None:
        """The tabs: one image (with the mask editor), several images, and Evaluate."""
        gr, L = self.gr, self.L  # noqa: N806
        with gr.Tabs():
            with gr.Tab(L("tab_single"), id="single") as self.tab_single:
                self.artwork = gr.File(label=L("artwork"), file_count="single", type="filepath", height=120,
                                       elem_id="mist-artwork")
                self.editor = _editor_class(gr)(
                    label=L("editor"), type="pil", image_mode="RGBA", sources=[], buttons=[],
                    brush=gr.Brush(colors=[("#ff2d55", 0.6)], color_mode="fixed"),
                    eraser=gr.Eraser(), layers=False, transforms=(), format="png", elem_id="mist-editor",
                )
                gr.Markdown(L("editor_hint"))
            with gr.Tab(L("tab_batch"), id="batch") as self.tab_batch:
                self.files = gr.File(label=L("files"), file_count="multiple", type="filepath", elem_id="mist-files")
                gr.Markdown(L("files_hint"))
            with gr.Tab(L("tab_evaluate"), id="evaluate") as self.tab_evaluate:
                gr.Markdown(L("evaluate_intro"))
                self.evaluate_strength = gr.Slider(0.05, 1.0, value=EVALUATE_STRENGTH, step=0.05,
                                                   label=L("evaluate_strength"), elem_id="mist-evaluate-strength")
                self.evaluate_jpeg = gr.Checkbox(False, label=L("evaluate_jpeg"), elem_id="mist-evaluate-jpeg")
                self.evaluate_run = gr.Button(L("evaluate_run"), elem_id="mist-evaluate-run")
                self.evaluate_summary = gr.Markdown("", elem_id="mist-evaluate-summary")
                self.evaluate_grid = gr.Gallery(label=L("evaluate_grid"), columns=4, object_fit="contain",
                                                format="png", buttons=_NO_SHARE, elem_id="mist-evaluate-grid")

    def settings(self, d: Settings, offer: Offer) -> None:
        """The run's settings (a method's parameters shown while it is chosen), Protect, Cancel, status, downloads;
        the methods and choices offered are those the served model runs (`offer`)."""
        gr, L, control = self.gr, self.L, self.control  # noqa: N806
        epsilon = control(gr.Slider, "strength", 0, 32, value=d.epsilon, step=1)
        steps = control(gr.Slider, "steps", 1, 1000, value=d.steps, step=1)
        original_size = control(gr.Checkbox, "original_size", d.original_size)
        size = control(gr.Radio, "size", [(str(s), s) for s in SIZES], value=d.size)
        method = offer.default(d.method)
        self.method = control(gr.Dropdown, "method", [(L(f"method_{m}"), m) for m in offer.methods], value=method)
        self.shared = shared_params()
        self.params = {name: param_control(gr, L, spec, users, method, offer.choices.get(name))
                       for name, (spec, users) in self.shared.items() if not spec.advanced and spec.kind != "file"}
        with gr.Accordion(L("advanced"), open=False, elem_id="mist-advanced"):
            self.params |= {name: param_control(gr, L, spec, users, method, offer.choices.get(name))
                            for name, (spec, users) in self.shared.items() if spec.advanced and spec.kind != "file"}
            low_vram = control(gr.Checkbox, "low_vram", d.low_vram)
            no_resize = control(gr.Checkbox, "no_resize", d.no_resize)
            robust = control(gr.Checkbox, "robust", d.robust)
            seed = control(gr.Number, "seed", d.seed, precision=0)
            precision = control(gr.Dropdown, "precision", list(PRECISIONS), value=d.precision)
        with gr.Row():
            self.run = gr.Button(L("run"), variant="primary", elem_id="mist-run")
            self.cancel = gr.Button(L("cancel"), variant="stop", elem_id="mist-cancel")
        self.status = gr.Markdown("", elem_id="mist-status")
        self.downloads = gr.File(label=L("downloads"), file_count="multiple", interactive=False,
                                 elem_id="mist-downloads")
        # In the order `_run_handler`'s function takes their values.
        self.controls = [epsilon, steps, size, self.method, low_vram, no_resize, robust, seed, precision,
                         original_size, *self.params.values()]

    def views(self) -> None:
        """The original, protected image and perturbation of the chosen result, and the gallery of several."""
        gr, L = self.gr, self.L  # noqa: N806
        with gr.Row():
            self.original = gr.Image(label=L("original"), type="filepath", interactive=False, format="png",
                                     buttons=_NO_SHARE, elem_id="mist-original")
            self.protected = gr.Image(label=L("protected"), type="filepath", interactive=False, format="png",
                                      buttons=_NO_SHARE, elem_id="mist-protected")
            self.perturbation = gr.Image(label=L("perturbation"), type="filepath", interactive=False, format="png",
                                         buttons=_NO_SHARE, elem_id="mist-perturbation")
        self.gallery = gr.Gallery(label=L("gallery"), columns=6, height=260, object_fit="contain", format="png",
                                  visible=False, buttons=["download", "download_all", "fullscreen"],
                                  elem_id="mist-gallery")


def _editor_class(gr):
    class Editor(gr.ImageEditor):
        """gradio's image editor, whose value also lists the files the browser uploaded for it (under "uploaded":
        the preview as background.png, composite.png, the painted layers) so that the job deletes them."""

        is_template = True  # the browser shows gradio's own image editor

        def preprocess(self, payload):
            value = super().preprocess(payload)
            if value is not None and payload is not None:
                parts = [payload.background, payload.composite, *(payload.layers or [])]
                value["uploaded"] = [Path(part.path) for part in parts if getattr(part, "path", None)]
            return value

    return Editor


def _typed(gr, fn):
    """gradio finds the request and event arguments by their annotations, which this module's postponed evaluation
    would leave as strings it cannot resolve: set them as the classes themselves."""
    fn.__annotations__ = {name: {"request": gr.Request, "event": gr.SelectData}[name]
                          for name in ("request", "event") if name in fn.__code__.co_varnames}
    return fn


def _warn(gr, lang: str, messages) -> None:
    for message in messages:
        gr.Warning(message, title=text(lang, "warning"))


def _run_handler(gr, ui: WebUI, param_names: list[str]):
    """Protect's handler: a generator whose status line follows the job (every step), then the results replace it.
    When the page goes away the job goes on (a reload finds it again, `WebUI.attach`)."""

    def on_run(request, source_value, artwork_value, editor_value, files_value, lang, epsilon_value, steps_value,
               size_value, method_value, low_vram_value, no_resize_value, robust_value, seed_value,
               precision_value, original_size_value, *param_values):
        settings = Settings(epsilon=epsilon_value, steps=steps_value, size=size_value, method=method_value,
                            params=dict(zip(param_names, param_values, strict=True)), low_vram=low_vram_value,
                            no_resize=no_resize_value, robust=robust_value, seed=seed_value,
                            precision=precision_value, original_size=original_size_value)

        def work(progress) -> JobResult | None:
            try:
                return ui.run(source_value, artwork_value, editor_value, files_value, settings, lang,
                              _session(request), progress)
            except Exception as exc:  # the page must say something; the server goes on
                log.exception("web UI job failed")
                return JobResult(status=f"{type(exc).__name__}: {exc}")

        result = yield from _in_thread(work, lambda desc: (desc, *[gr.skip()] * 6))
        if result is None:  # a second tap on Protect: the first one's job has already answered
            yield (gr.skip(),) * 7
            return
        yield _shown(gr, result, lang)

    return _typed(gr, on_run)


def _shown(gr, result: JobResult, lang: str, status: str = "") -> tuple:
    """What the page shows of a finished job (warnings for its messages): the status line (`status` before it),
    the three views of the first image, the gallery of several, the downloads and the previews by image."""
    _warn(gr, lang, result.messages)
    previews = [(str(o.original), str(o.shown or o.png), str(o.perturbation)) for o in result.outputs]
    first = previews[0] if previews else (None, None, None)
    several = len(result.outputs) > 1  # the gallery picks which image the three views show
    return ("\n\n".join(filter(None, [status, _status_markdown(result, lang)])), *first,
            gr.update(value=[(str(o.png), o.name) for o in result.outputs], visible=several),
            [str(f) for f in result.files] or None, previews)


def _in_thread(work, shown):
    """Run `work(progress)` on a thread of its own; a generator of `shown(text)` for the newest progress text (what
    was said while the page was being updated is skipped) that returns what `work` returned."""
    news: queue.SimpleQueue = queue.SimpleQueue()
    box: dict[str, Any] = {}

    def run() -> None:
        try:
            box["result"] = work(lambda fraction, desc: news.put(desc))
        finally:
            news.put(None)

    threading.Thread(target=run, name="mist-job", daemon=True).start()
    while (desc := news.get()) is not None:
        yield shown(_latest(news, desc))
    return box.get("result")


def _latest(news: queue.SimpleQueue, desc: str) -> str:
    """The newest of `desc` and the news queued after it (only the latest is worth showing); the end mark (None) is
    left in the queue."""
    while True:
        try:
            later = news.get_nowait()
        except queue.Empty:
            return desc
        if later is None:
            news.put(None)
            return desc
        desc = later


QUIET = dict(queue=False, show_progress="hidden")  # events that answer at once, beside the queue of jobs


def _wire(gr, demo, ui: WebUI, page: _Page) -> None:
    """Every event of the page, each calling a handler of `mist.faces.webui.pages`."""
    _wire_inputs(gr, ui, page)
    _wire_jobs(gr, ui, page)
    _wire_page(gr, demo, ui, page)


def _wire_inputs(gr, ui: WebUI, p: _Page) -> None:
    """The tabs, the uploads, the method's parameters and the gallery's choice of views."""

    def on_artwork(path, lang, request):
        shown, problem = ui.artwork(path, lang, _session(request))
        if problem:  # the file is refused (and deleted): the page asks for another one
            _warn(gr, lang, [problem])
            return None, problem, None
        return str(shown), "", gr.skip()

    def on_files(paths, request):
        ui.uploaded(paths, _session(request))

    def on_artwork_cleared(request):
        ui.forget_uploads(_session(request))
        return None, ""

    def on_select(previews, event):
        if not previews or event.index is None or event.index >= len(previews):
            return None, None, None
        return tuple(previews[event.index])

    for handler in (on_artwork, on_files, on_artwork_cleared, on_select):
        _typed(gr, handler)
    p.tab_single.select(lambda: "single", None, p.source, **QUIET)
    p.tab_batch.select(lambda: "batch", None, p.source, **QUIET)
    p.artwork.upload(on_artwork, [p.artwork, p.language], [p.editor, p.status, p.artwork], show_progress="hidden",
                     concurrency_id="mist-preview")
    p.artwork.clear(on_artwork_cleared, None, [p.editor, p.status], **QUIET)
    p.files.upload(on_files, [p.files], None, **QUIET)
    p.method.change(lambda name: [gr.update(visible=name in p.shared[param][1]) for param in p.params], [p.method],
                    list(p.params.values()), **QUIET)
    p.gallery.select(on_select, [p.results], [p.original, p.protected, p.perturbation], **QUIET)


def _wire_jobs(gr, ui: WebUI, p: _Page) -> None:
    """Protect (start, run, done), Cancel and Evaluate."""

    def on_start(lang, request):
        said = ui.start(lang, _session(request))
        if said is None:  # this page's job is running: nothing new starts
            return gr.skip(), gr.skip()
        return said, gr.update(interactive=False)

    def on_done(request):
        """The job deleted its uploads: the page asks for them again (and what the editor sent of its preview
        meanwhile is deleted too)."""
        ui.forget_uploads(_session(request))
        return None, None, None, gr.update(interactive=True)

    def on_evaluate(request, strength_value, jpeg_value, lang):
        """The summary line follows the check (in the page's language), then the grid and verdicts replace it."""
        view = yield from _in_thread(
            lambda progress: ui.evaluate(strength_value, jpeg_value, lang, _session(request), progress),
            lambda desc: (desc, gr.skip()))
        yield view.summary, gr.update(value=[(str(path), caption) for path, caption in view.grid] or None,
                                      columns=view.columns)

    def on_cancel(lang, request):
        return ui.cancel(lang, _session(request))

    for handler in (on_start, on_done, on_evaluate, on_cancel):
        _typed(gr, handler)
    p.run.click(on_start, [p.language], [p.status, p.run], js=SHOW_STATUS, trigger_mode="once", **QUIET) \
        .then(_run_handler(gr, ui, list(p.params)), [p.source, p.artwork, p.editor, p.files, p.language, *p.controls],
              [p.status, p.original, p.protected, p.perturbation, p.gallery, p.downloads, p.results],
              concurrency_limit=1, concurrency_id="mist-attack", api_visibility="private", show_progress="hidden") \
        .then(on_done, None, [p.artwork, p.editor, p.files, p.run], **QUIET) \
        .then(None, None, None, js=SHOW_RESULT, **QUIET)
    p.cancel.click(on_cancel, [p.language], [p.status], **QUIET)
    p.evaluate_run.click(on_evaluate, [p.evaluate_strength, p.evaluate_jpeg, p.language],
                         [p.evaluate_summary, p.evaluate_grid], concurrency_limit=1, concurrency_id="mist-attack",
                         api_visibility="private", show_progress="hidden")


def _wire_page(gr, demo, ui: WebUI, p: _Page) -> None:
    """The page's load (a reload finds its job again) and unload, the follow timer and the language switch."""

    def on_load(request, key):
        """The page is loaded (or reloaded): its language, the banner, and its job when a reload found it again."""
        lang = detect_language(request.headers.get("accept-language") if request else None)
        user = getattr(request, "username", None)
        resumed = ui.attach(_session(request), f"{user}\n{key}" if user else key, lang)
        return (lang, ui.banner(lang), *_resumed(resumed, lang))

    def on_follow(lang, request):
        return _resumed(ui.follow(_session(request), lang), lang)

    def _resumed(resumed, lang):
        """status, the seven views of a result, Protect's state and the follow timer's."""
        following = gr.Timer(active=resumed.running)
        if resumed.result is not None:
            return (*_shown(gr, resumed.result, lang, resumed.status), gr.update(interactive=True), following)
        status = resumed.status or gr.skip()
        return (status, *[gr.skip()] * 6, gr.update(interactive=not resumed.running), following)

    def on_unload(request):
        ui.closed(_session(request))

    for handler in (on_load, on_follow, on_unload):
        _typed(gr, handler)
    # gradio re-translates the tab labels it shows only for the selected tab: the switch sets all of them itself.
    tabs = {"tab_single": p.tab_single, "tab_batch": p.tab_batch, "tab_evaluate": p.tab_evaluate}
    p.language.change(lambda lang: (ui.banner(lang), *(gr.Tab(label=text(lang, key)) for key in tabs)), [p.language],
                      [p.banner, *tabs.values()], js=SET_GRADIO_LOCALE, **QUIET) \
        .then(lambda: (gr.update(visible=False),) * 2, None, [p.artwork, p.files], **QUIET) \
        .then(lambda: (gr.update(visible=True),) * 2, None, [p.artwork, p.files], **QUIET)  # remounted: gradio's
    # upload boxes take their "Drop File Here" text in the language they were shown in first
    shown = [p.status, p.original, p.protected, p.perturbation, p.gallery, p.downloads, p.results, p.run, p.follow]
    demo.load(on_load, [p.key], [p.language, p.banner, *shown], js=PAGE_KEY, **QUIET)
    p.follow.tick(on_follow, [p.language], shown, **QUIET)
    demo.unload(on_unload)


def method_labels() -> tuple[dict[str, str], dict[str, str]]:
    """The page's labels of the methods and their parameters, in English (from their declarations) and Chinese (from
    `text.METHODS_ZH`, else the English): `method_<name>`, `param_<name>`, `param_<name>_info` and
    `param_<name>_<choice>`."""
    english: dict[str, str] = {}
    for method in list_methods():
        english[f"method_{method.name}"] = method.title
        for spec in param_specs(method.Params):
            english.setdefault(f"param_{spec.name}", spec.label)
            english.setdefault(f"param_{spec.name}_info", spec.help)
            for choice in spec.choices or ():
                english.setdefault(f"param_{spec.name}_{choice}", spec.choice_labels.get(choice, str(choice)))
    return english, {key: METHODS_ZH.get(key, text) for key, text in english.items()}


def param_control(gr, label, spec, users: list[str], method: str, choices: tuple | None = None):
    """The control of one method parameter (elem_id mist-<name>), shown while a method that takes it is chosen;
    a choice offers `choices` (those the served model runs; None: all). File parameters have none: the page offers
    no upload for them (the command line and the API take them)."""
    choices = spec.choices if choices is None else choices
    value = spec.default if spec.kind != "choice" or spec.default in choices else choices[0]
    common = dict(label=label(f"param_{spec.name}"), info=label(f"param_{spec.name}_info"), value=value,
                  elem_id="mist-" + spec.name.replace("_", "-"), visible=method in users)
    if spec.kind == "bool":
        return gr.Checkbox(**common)
    if spec.kind == "choice":
        return gr.Radio([(label(f"param_{spec.name}_{c}"), c) for c in choices], **common)
    if spec.slider or (spec.low is not None and spec.high is not None):
        fine = 1 if spec.kind == "int" else (spec.high - spec.low) / 100
        low, high, step = spec.slider or (spec.low, spec.high, fine)
        return gr.Slider(low, high, step=step, **common)
    return gr.Number(precision=0 if spec.kind == "int" else None, **common)


def _session(request: Any) -> str | None:
    return getattr(request, "session_hash", None)


def launch(ui: WebUI, *, host: str = DEFAULT_HOST, port: int = DEFAULT_PORT, share: bool = False,
           auth: tuple[str, str] | None = None, block: bool = True, quiet: bool = False):
    """Build the page and serve it; with `block` False, return the running Blocks (call `.close()`)."""
    demo = build_app(ui)
    ui.keep_clean()
    demo.launch(**launch_options(ui, demo, host=host, port=port, share=share, auth=auth),
                prevent_thread_lock=not block, quiet=quiet)
    return demo


def launch_options(ui: WebUI, demo, *, host: str, port: int, share: bool, auth: tuple[str, str] | None) -> dict:
    """gradio's launch settings: where to listen, the login, the upload limit, the files it may serve."""
    options = dict(server_name=host, server_port=port, share=share, auth=auth, max_file_size=f"{ui.max_upload_mb:g}mb",
                   allowed_paths=[str(ui.workdir)], show_error=False, inbrowser=False, footer_links=["gradio"],
                   css=CSS)
    options["i18n"] = demo.mist_i18n
    return options


def private_folder() -> Path:
    """A new folder only this user can open (mode 0700), under $GRADIO_TEMP_DIR when set, else the system's
    temporary folder: uploads (gradio's cache) and jobs go there, and it is removed when the server stops."""
    base = os.environ.get("GRADIO_TEMP_DIR") or None
    if base:
        Path(base).mkdir(parents=True, exist_ok=True)
    root = Path(tempfile.mkdtemp(prefix="mist-webui-", dir=base))  # mkdtemp creates it with mode 0700
    root.chmod(0o700)
    return root


def login(args) -> tuple[str, str] | None:
    """The page's login from --auth or $MIST_WEBUI_AUTH, and the other options of `mist webui` that need checking;
    ValueError naming the option. Checked before the runner is opened."""
    auth = parse_auth(args.auth if args.auth is not None else os.environ.get(AUTH_ENV))
    if args.max_upload_mb <= 0:
        raise ValueError(f"--max-upload-mb: must be above 0, got {args.max_upload_mb:g}")
    work_limits_from(args)
    return auth


def main(args, models: ModelCache, auth: tuple[str, str] | None) -> int:
    """`mist webui`: args has listen, port, share, max_upload_mb; `models`: the runner's models, opened (and checked)
    by the command line (`mist.runner.entrance.open_models`); `auth`: the login (`login`)."""
    host = "0.0.0.0" if args.listen else DEFAULT_HOST
    if (args.listen or args.share) and auth is None:
        reach = "a public gradio.live link" if args.share else "every machine that can reach this one"
        print(f"WARNING: the web UI is open to {reach} without a password: anyone there can use this machine's "
              f"GPU. Add --auth user:password (or set {AUTH_ENV}).", file=sys.stderr, flush=True)
    root = private_folder()
    uploads = root / "uploads"
    gradio_temp = os.environ.get("GRADIO_TEMP_DIR")
    os.environ["GRADIO_TEMP_DIR"] = str(uploads)  # read by gradio when the page is built (gradio is imported then)
    ui = WebUI(models, root / "jobs", args.max_upload_mb, work_limits=work_limits_from(args),
               upload_root=uploads, served_to_others=bool(args.listen or args.share))
    previous = None
    if threading.current_thread() is threading.main_thread():  # `kill`, systemd stop: leave no files behind
        previous = signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(0))
    try:
        print(f"Mist web UI: http://{'localhost' if host == DEFAULT_HOST else host}:{args.port}"
              " (the model is loaded on the first job)", flush=True)
        launch(ui, host=host, port=args.port, share=args.share, auth=auth, block=True, quiet=not args.share)
    finally:
        ui.close_all()
        shutil.rmtree(root, ignore_errors=True)
        if gradio_temp is None:
            os.environ.pop("GRADIO_TEMP_DIR", None)
        else:
            os.environ["GRADIO_TEMP_DIR"] = gradio_temp
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
    return 0
