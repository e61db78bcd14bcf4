"""The gradio page of the web UI: layout, wiring of the handlers in `mist.webui`, launch and `mist webui`.

Nothing here protects an image: every button calls a handler of `mist.webui`, which calls the engine.
"""

from __future__ import annotations

import os
import shutil
import signal
import sys
import tempfile
import threading
from pathlib import Path
from typing import Any

from .config import MODES, PRECISIONS
from .webui import (AUTH_ENV, DEFAULT_HOST, DEFAULT_PORT, SIZES, Engine, JobResult, Settings, WebUI, log,
                    parse_auth)
from .webui_text import EN, LABEL_KEYS, LANGUAGES, TEXTS, detect_language, text


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
