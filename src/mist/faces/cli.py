"""The `mist` command. Front ends only build a ProtectConfig and call the engine; see `run_protect`."""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping

# Only light modules here: options are checked (and --help printed) before PyTorch and diffusers are imported.
from mist.engine.config import DEFAULT_PRESET, PRESET_SETTINGS, RUN_SETTINGS, ProtectConfig, RunSetting
from mist.runner.flags import RUN_FLAGS, RUN_KINDS, fields_as_flags, protect_flags, typed_value
from mist.runner.manifest import METADATA_LEVELS
from mist.common.model_names import TEST_MODEL_STEPS, TINY_RANDOM, names_test_model
from mist.engine.methods import ParamSpec, get_method, list_methods, param_specs, shared_params
from mist.engine.robust import DEFAULT_TRANSFORMS, TRANSFORMS
from mist.faces.evaluate_options import add_evaluate_options, evaluation_settings_from_args
from mist.runner.runner_options import add_runner_options, check_device_option
from mist.runner.work_limits import add_work_limit_options

EXIT_FAILED_IMAGES = 1
EXIT_USAGE = 2
EXIT_THEN_FAILED = 3
EXIT_HANG_UP = 128 + 1  # the shell's convention: 128 + the signal's number (SIGHUP)
EXIT_INTERRUPTED = 128 + 2  # SIGINT (Ctrl-C)

def transform_list(value: str) -> str:
    """--robust's value as given; a file path there (`--robust art.png`: the list is optional, so the path after a
    bare --robust is taken for it) is refused with how to write it instead. Unknown names are the config's to report."""
    for name in value.split(","):
        if name.strip() not in TRANSFORMS and any(mark in name for mark in "./\\"):
            defaults = ",".join(DEFAULT_TRANSFORMS)
            raise argparse.ArgumentTypeError(f"{name.strip()!r} is a path, not a transform: for the default ones, put "
                                             f"--robust after the input paths or name them (--robust {defaults})")
    return value


def word_as(setting: str) -> Callable[[str], Any]:
    """argparse's `type` for a run setting: the coercion every face uses (`flags.typed_value`), its message after the
    flag as argparse shows it (`argument -e/--epsilon: must be a whole number, got '16.5'`)."""
    return word_of_kind(RUN_KINDS[setting])


def word_of_kind(kind: str) -> Callable[[str], Any]:
    """argparse's `type` for a value of `kind` (see `flags.typed_value`)."""

    def convert(word: str) -> Any:
        try:
            return typed_value(word, kind)
        except ValueError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None

    convert.__name__ = kind
    return convert


def add_protect_options(parser: argparse.ArgumentParser) -> None:
    """The options every protect command shares: the run's settings (a flag each, from their table,
    `mist.engine.config.RUN_SETTINGS`), and every method's parameters (a flag per parameter name, from the methods'
    declarations)."""
    d = ProtectConfig()
    g = parser.add_argument_group("protection")
    for name, setting in RUN_SETTINGS.items():
        _add_setting_flag(g, name, setting, getattr(d, name, DEFAULT_PRESET))  # a preset is no field of d
    methods = parser.add_argument_group(
        "methods", "; ".join(f"{m.name}: {m.summary} ({m.paper})" for m in list_methods()))
    for spec, users in shared_params().values():
        _add_param_flag(methods, spec, users)
    r = parser.add_argument_group("model and device")
    add_runner_options(r, low_memory=True, compile=True, ray=True)
    r.add_argument("--batch-size", type=int, default=1,
                   help="tiles (images) protected together in one attack batch; pays on a GPU (default: 1)")


def _add_setting_flag(group, name: str, setting: RunSetting, default: Any) -> None:
    """The flag of one run setting, typed as every face types it. Switches are off unless given; a setting a preset
    may set (--steps, --epsilon...) stays None when not given, so that the preset (and for --steps the test model)
    decides; the flag of a setting with a `bare` value may stand alone."""
    names = ([setting.short] if setting.short else []) + [setting.flag]
    options: dict[str, Any] = {"dest": name, "help": setting.help.replace("%", "%%")}
    shown = {"steps": f"{default}; {TEST_MODEL_STEPS} with --model {TINY_RANDOM}"}.get(name, default)
    if setting.kind == "bool":
        group.add_argument(*names, action="store_true", **options)
        return
    if setting.bare is not None:
        options.update(nargs="?", const=setting.bare, default="", metavar="LIST", type=transform_list)
        shown = "off"
    else:
        choices = [m.name for m in list_methods()] if name == "method" else setting.choices
        options.update(default=None if name in PRESET_SETTINGS else default, choices=choices,
                       type=Path if setting.kind == "file" else word_as(name) if setting.kind in ("int", "float")
                       else None)
        if setting.metavar is not None:
            options["metavar"] = setting.metavar
    if shown not in (None, "", ()) and setting.kind != "file":
        options["help"] += f" (default: {shown})"
    elif setting.choices and shown is None:
        options["help"] += " (default: off)"
    group.add_argument(*names, **options)


def _add_param_flag(group, spec: ParamSpec, users: list[str]) -> None:
    """The flag of one method parameter. Unset flags stay None, so that only the parameters a user typed reach the
    method (the others keep the method's defaults) and a flag the chosen method does not take can be refused."""
    names = ([spec.short] if spec.short else []) + [spec.flag]
    default = "" if spec.default is None or spec.default is False else f"default: {spec.default}; "
    helps = {name: next(s.help for s in param_specs(get_method(name).Params) if s.name == spec.name) for name in users}
    if len(set(helps.values())) == 1:
        help_text = f"{spec.help} ({default}method{'s' if len(users) > 1 else ''} {', '.join(users)})"
    else:  # the methods say what it means for each of them (a target's default differs, say)
        help_text = "; ".join(f"{name}: {text}" for name, text in helps.items())
    help_text = help_text.replace("%", "%%")
    options: dict[str, Any] = {"dest": f"param_{spec.name}", "default": None, "help": help_text}
    if spec.kind == "bool":
        options["action"] = "store_const" if spec.default is False else argparse.BooleanOptionalAction
        if spec.default is False:
            options["const"] = True
    elif spec.kind == "choice":
        options.update(choices=spec.choices, type=type(spec.choices[0]))
    else:
        options.update(type=Path if spec.kind == "file" else word_of_kind(spec.kind),
                       metavar={"file": "FILE"}.get(spec.kind, "N"))
    group.add_argument(*names, **options)


def config_from_args(args: argparse.Namespace) -> ProtectConfig:
    """The settings `mist protect` was given; ValueError naming the flag (`--input-size: ...`) when one is invalid,
    or when a method parameter's flag was given that the chosen method does not take."""
    method = get_method(args.method)
    own = {spec.name for spec in param_specs(method.Params)}
    given = {name: value for name, value in vars(args).items()
             if name.startswith("param_") and value is not None}
    params = {}
    for dest, value in given.items():
        name = dest.removeprefix("param_")
        if name not in own:
            raise ValueError(f"{protect_flags()[name]}: not a parameter of --method {method.name} (its parameters: "
                             f"{', '.join(spec.flag for spec in param_specs(method.Params)) or 'none'})")
        params[name] = value
    run = {name: value for name in RUN_SETTINGS if name != "method" and (value := getattr(args, name)) is not None}
    if "steps" not in run and names_test_model(args.model):
        run["steps"] = TEST_MODEL_STEPS
    with fields_as_flags(protect_flags()):
        return ProtectConfig.of(method=method.name, **params, **run)


def run_protect(jobs, config: ProtectConfig, model_spec: str | None, device_name: str | None,
                overwrite: bool = False, quiet: bool = False, low_memory: bool | None = None,
                batch_size: int = 1, metadata: str = "full", flags: Mapping[str, str] | None = None,
                ray: str | None = None, ray_resource: str = "GPU", compile: bool = False) -> int:
    """Run a batch of file jobs with console progress; returns the exit code. Shared by `mist` and `mist_v3.py`.
    With `ray` (a cluster's address) the attacks run on the cluster's workers (`mist.runner.ray_pool`).

    A KeyboardInterrupt (Ctrl-C) or a `HangUp` (SIGHUP) ends the batch between writes: finished outputs stay.
    """
    from mist.runner.entrance import open_models
    from mist.runner.jobs import run_jobs
    from mist.faces.reporting import ConsoleReporter, warn_if_the_gpu_is_unused

    with fields_as_flags(flags or protect_flags()):  # before any image is touched
        models = open_models(model_spec, device_name, low_memory, compile, ray, ray_resource, config.precision)
    if not ray:
        warn_if_the_gpu_is_unused(models.device())
        if compile and not quiet:
            from mist.engine.compiling import cache_folder

            print(f"--compile: each new image size is compiled first (minutes on a CPU; less once cached in "
                  f"{cache_folder() or 'the system temporary folder'})")
    reporter = ConsoleReporter(quiet)
    started = time.perf_counter()
    try:
        summary = run_jobs(jobs, config, models, reporter, overwrite=overwrite, batch_size=batch_size,
                           metadata=metadata)
    except KeyboardInterrupt as exc:
        reporter.interrupted()
        hang_up = isinstance(exc, HangUp)
        say(f"{HANG_UP_REASON if hang_up else 'interrupted'}: finished outputs are kept; run the same command again "
            "to resume", error=True)
        return EXIT_HANG_UP if hang_up else EXIT_INTERRUPTED
    reporter.finish(summary, time.perf_counter() - started)
    return 0 if summary.ok else EXIT_FAILED_IMAGES


def build_parser() -> argparse.ArgumentParser:
    from mist.version import __version__

    parser = argparse.ArgumentParser(prog="mist", description="Protect artworks from AI mimicry (Mist v1.2).")
    parser.add_argument("--version", action="version", version=f"mist {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="log details")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    protect = commands.add_parser("protect", help="protect image files and folders",
                                  description="Protect image files (and the images in folders) into OUTDIR as PNG.")
    protect.add_argument("paths", nargs="+", type=Path, metavar="PATH", help="image files or folders")
    protect.add_argument("-o", "--output", type=Path, required=True, metavar="OUTDIR", help="folder for the outputs")
    protect.add_argument("-r", "--recursive", action="store_true", help="also protect images in sub-folders")
    protect.add_argument("--overwrite", action="store_true",
                         help="replace existing outputs (default: skip finished ones, refuse others)")
    protect.add_argument("-q", "--quiet", action="store_true", help="print only errors and the summary")
    protect.add_argument("--metadata", choices=METADATA_LEVELS, default="full",
                         help="what each output records: full (settings, model, the source's file name and SHA-256) "
                              "or minimal (settings only; what resuming needs stays in OUTDIR/.mist/) "
                              "(default: %(default)s)")
    protect.add_argument("--then", metavar="COMMAND",
                         help="shell command to run once every output is safely on disk, e.g. the cloud provider's "
                              "shutdown command; not run after a failed or interrupted batch unless --then-always")
    protect.add_argument("--then-always", action="store_true", help="run --then even if the batch failed")
    add_protect_options(protect)

    evaluate = commands.add_parser(
        "evaluate", help="check whether protected images resist purification and img2img mimicry",
        description="Purify the protected images as a mimic would (JPEG, resizing, blur, noise, AdverseCleaner, "
                    "SDEdit, ...), run img2img with your SD checkpoint on them and on the originals with the same "
                    "seeds, and write REPORT_DIR/index.html, results.json and results.csv. Pairs are matched by the "
                    "source SHA-256 Mist records in its outputs, else by file name. Nothing is downloaded.")
    evaluate.add_argument("originals", type=Path, metavar="ORIGINALS", help="the original image file or folder")
    evaluate.add_argument("protected", type=Path, metavar="PROTECTED", help="the protected image file or folder")
    evaluate.add_argument("-o", "--output", type=Path, required=True, metavar="REPORT_DIR",
                          help="folder for the report (created; its report files are replaced)")
    add_evaluate_options(evaluate)
    add_runner_options(evaluate)
    evaluate.add_argument("-q", "--quiet", action="store_true", help="no progress bar")

    download = commands.add_parser("download-model", help="download the Stable Diffusion checkpoint",
                                   description="Download SD v1.4 (or v1.5) to where Mist looks for it, resuming an "
                                               "interrupted download and verifying its SHA-256. Honours HF_ENDPOINT "
                                               "(a mirror), HF_TOKEN and the usual proxy variables.")
    download.add_argument("--version", choices=("v1-4", "v1-5"), default="v1-4", help="(default: %(default)s)")
    download.add_argument("--to", type=Path, metavar="PATH",
                          help="file to write (default: models/ldm/stable-diffusion-v1/model.ckpt under $MIST_HOME "
                               "or the current folder; .safetensors for v1-5)")
    download.add_argument("--url", help="download another SD 1.x checkpoint from this URL (needs --sha256)")
    download.add_argument("--sha256", metavar="HEX", help="the file's published SHA-256, checked before it is used")
    download.add_argument("-q", "--quiet", action="store_true", help="no progress bar")

    doctor = commands.add_parser("doctor", help="check this machine and recommend settings",
                                 description="Versions, GPU and free memory, the model (found and checksum-verified), "
                                             "free disk, and the settings to use on this machine.")
    doctor.add_argument("-o", "--output", type=Path, default=Path("."), metavar="OUTDIR",
                        help="output folder whose free disk to check (default: current folder)")
    add_runner_options(doctor)

    webui = commands.add_parser("webui", help="start the web UI in the browser",
                                description="Serve Mist's web page (gradio; pip install 'mist-protect[webui]') on "
                                            "http://127.0.0.1:7860. The model is loaded on the first job.")
    add_runner_options(webui, low_memory=True, text_encoders=True)
    webui.add_argument("--listen", action="store_true", help="listen on every interface (0.0.0.0), not only 127.0.0.1")
    webui.add_argument("--port", type=int, default=7860, help="(default: %(default)s)")
    webui.add_argument("--share", action="store_true", help="also publish a temporary public gradio.live link")
    webui.add_argument("--auth", metavar="USER:PASSWORD",
                       help="require this login (default: $MIST_WEBUI_AUTH; none: anyone who reaches the page)")
    webui.add_argument("--max-upload-mb", type=float, default=50, help="largest upload accepted (default: %(default)s)")
    add_work_limit_options(webui)

    from mist.faces.compare_command import add_compare_parser
    from mist.faces.service.options import add_serve_parser

    add_compare_parser(commands)
    add_serve_parser(commands)
    return parser


def main(argv: list[str] | None = None) -> int:
    from mist.faces.compare_command import compare_command

    def run() -> int:
        args = build_parser().parse_args(argv)
        configure_logging(args.verbose)
        command = {"protect": protect_command, "download-model": download_command, "doctor": doctor_command,
                   "webui": webui_command, "serve": serve_command, "evaluate": evaluate_command,
                   "compare": compare_command}
        return command[args.command](args)

    return guarded("mist", run)


HANG_UP_REASON = "hang-up (SIGHUP: the terminal or SSH connection closed)"


class HangUp(KeyboardInterrupt):
    """SIGHUP arrived: the terminal or SSH connection that started the run went away. Handled like Ctrl-C."""


def _raise_hang_up(signum: int, frame: Any) -> None:
    raise HangUp()


@contextlib.contextmanager
def sighup_handler(handler: Callable[[int, Any], Any] | int) -> Iterator[None]:
    """Handle SIGHUP with `handler` for the duration, then restore the previous handling. Does nothing where SIGHUP
    is ignored on entry (`nohup mist ...` asked for that), off the main thread, or on systems without SIGHUP."""
    hup = getattr(signal, "SIGHUP", None)
    if hup is None or threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.getsignal(hup)
    if previous == signal.SIG_IGN:
        yield
        return
    signal.signal(hup, handler)
    try:
        yield
    finally:
        signal.signal(hup, signal.SIG_DFL if previous is None else previous)


def guarded(program: str, action: Callable[[], int]) -> int:
    """Run a command: an invalid option or input ends it with one line and exit code 2, Ctrl-C with code 130, a
    hang-up (SIGHUP, where the caller turned it into `HangUp`) with code 129; never a traceback for these."""
    try:
        return action()
    except (ValueError, FileNotFoundError) as exc:
        say(f"{program}: error: {exc}", error=True)
        return EXIT_USAGE
    except HangUp:
        say(f"{program}: stopped by a {HANG_UP_REASON}", error=True)
        return EXIT_HANG_UP
    except KeyboardInterrupt:
        say(f"{program}: interrupted", error=True)
        return EXIT_INTERRUPTED


def say(line: str, error: bool = False) -> None:
    """Print a line; where the terminal is gone (an SSH hang-up), drop it and the rest of the output instead of
    failing, so the run can still finish its work (and its --then command)."""
    name = "stderr" if error else "stdout"
    try:
        print(line, file=getattr(sys, name), flush=True)
    except OSError:
        setattr(sys, name, open(os.devnull, "w", encoding="utf-8"))  # noqa: SIM115 (lives until the process ends)


def interrupt_on_hang_up() -> contextlib.AbstractContextManager[None]:
    """While active, SIGHUP stops the run like Ctrl-C does (raising `HangUp`), unless SIGHUP is ignored (nohup)."""
    return sighup_handler(_raise_hang_up)


def protect_command(args: argparse.Namespace) -> int:
    code = EXIT_FAILED_IMAGES  # what --then sees if the run ends in an unexpected error
    with interrupt_on_hang_up():
        try:
            code = guarded("mist", lambda: _protect(args))
        finally:  # however the run ended: --then-always runs the command also after an error before the batch
            if args.then:
                code = run_then(args.then, args.then_always, code)
    return code


def _protect(args: argparse.Namespace) -> int:
    """Check every option first (nothing heavy is imported before that), then collect the files and run the batch."""
    config = config_from_args(args)
    check_device_option(args)
    if args.batch_size < 1:
        raise ValueError(f"--batch-size: must be at least 1, got {args.batch_size}")
    from mist.runner.inputs import collect_jobs

    jobs = collect_jobs(args.paths, args.output, args.recursive, on_skip=print_skipped)
    if not jobs:
        raise ValueError(f"no images found in {', '.join(map(str, args.paths))}")
    return run_protect(jobs, config, args.model, args.device, args.overwrite, args.quiet, args.low_memory,
                       args.batch_size, args.metadata, ray=args.ray, ray_resource=args.ray_resource,
                       compile=args.compile)


def run_then(command: str, always: bool, code: int) -> int:
    """Run the user's --then command (shell syntax, as typed) after a clean run, or after any end with `always`;
    returns the exit code of mist: `code`, or EXIT_THEN_FAILED when the run was clean but the command failed.

    The command runs with SIGHUP ignored (it inherits that), so a shutdown command that drops the SSH session is not
    cut short by the hang-up it causes.
    """
    if code != 0 and not always:
        say(f"mist: not running --then ({command!r}): the batch did not finish cleanly (--then-always runs it anyway)",
            error=True)
        return code
    say(f"running: {command}")
    with sighup_handler(signal.SIG_IGN):
        try:
            status = subprocess.run(command, shell=True, check=False).returncode
        except OSError as exc:
            say(f"mist: error: the --then command could not be started ({exc}): {command}", error=True)
            return code or EXIT_THEN_FAILED
    if status != 0:
        how = f"was killed by signal {-status}" if status < 0 else f"failed with exit code {status}"
        say(f"mist: error: the --then command {how}: {command}", error=True)
        return code or EXIT_THEN_FAILED
    return code


def print_skipped(path: Path, reason: str) -> None:
    """One line for an entry found while scanning a folder that is not an image file."""
    print(f"skipped {path}: {reason}", file=sys.stderr)


def evaluate_command(args: argparse.Namespace) -> int:
    """Check every option and find the model before anything heavy, then evaluate with a progress bar and write the
    report."""
    settings = evaluation_settings_from_args(args)
    check_device_option(args)
    from mist.runner.entrance import open_models
    from mist.runner.evaluation.job import EvaluationJob, run_evaluation
    from mist.faces.reporting import EvaluationConsole, warn_if_the_gpu_is_unused

    with fields_as_flags(RUN_FLAGS):  # before any image is read
        models = open_models(args.model, args.device)
    from mist.runner.preflight import output_folder_problem

    if problem := output_folder_problem(args.output):  # a file there, no permission: said now, before the model loads
        raise ValueError(problem)
    warn_if_the_gpu_is_unused(models.device())
    console = EvaluationConsole(args.quiet)
    try:
        evaluation, index = run_evaluation(EvaluationJob(args.originals, args.protected, settings, args.output), models,
                                           progress=console.progress, on_load=console.model_loading)
    finally:
        console.close()
    console.finish(evaluation, index)
    return 0


def download_command(args: argparse.Namespace) -> int:
    from mist.common.download import DownloadError, choose_remote, download
    from mist.runner.model_identity import remember_checksum
    from mist.models.locate import default_model_path

    remote = choose_remote(args.version, args.url, args.sha256)
    destination = args.to or default_model_path(remote.suffix)
    try:
        path = download(remote, destination, progress=not args.quiet)
    except DownloadError as exc:
        print(f"mist: download failed: {exc}", file=sys.stderr)
        return EXIT_FAILED_IMAGES
    remember_checksum(path, remote.sha256)
    print(f"{path}: {remote.label} ready (SHA-256 verified)")
    return 0


def doctor_command(args: argparse.Namespace) -> int:
    check_device_option(args)
    from mist.faces.doctor import report
    from mist.models import quiet_model_libraries

    quiet_model_libraries()

    lines = report(args.output, args.model, args.device)
    width = max(len(line.label) for line in lines)
    for line in lines:
        print(f"{line.label:>{width}}: {line.value}" + ("   <-- problem" if line.problem else ""))
    return EXIT_FAILED_IMAGES if any(line.problem for line in lines) else 0


def webui_command(args: argparse.Namespace) -> int:
    """`mist webui`: the runner is opened as for `mist protect` (a device this machine lacks, a missing model: one
    line now, before the page is served), then the page is served."""
    from mist.runner.entrance import open_models
    from mist.faces.webui.app import login
    from mist.faces.webui.app import main as webui_main

    auth = login(args)
    check_device_option(args)
    with fields_as_flags(RUN_FLAGS):
        models = open_models(args.model, args.device, args.low_memory, text_encoders=args.text_encoders)
    from mist.faces.reporting import warn_if_the_gpu_is_unused

    warn_if_the_gpu_is_unused(models.device())
    from mist.models import quiet_model_libraries

    quiet_model_libraries()

    return webui_main(args, models, auth)


def serve_command(args: argparse.Namespace) -> int:
    from mist.faces.service.options import run_serve

    return run_serve(args)


def configure_logging(verbose: bool) -> None:
    """INFO with --verbose, else WARNING; the model libraries' own chatter is tamed by
    `mist.models.quiet_model_libraries`."""
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")


if __name__ == "__main__":
    sys.exit(main())
