"""`mist compare`: methods and budgets side by side on the user's own images (`mist.runner.compare`). Light: parsing
imports no model library."""

from __future__ import annotations

import argparse
from pathlib import Path

from mist.common.model_names import TEST_MODEL_STEPS, TINY_RANDOM, default_steps, names_test_model
from mist.engine.config import DEFAULT_PRESET, PRESETS
from mist.faces.evaluate_options import add_evaluate_options, evaluation_settings_from_args
from mist.runner.runner_options import add_runner_options, check_device_option

DEFAULT_METHODS = "mist,pid,sds"
DEFAULT_BUDGETS = "4,8,16"


def add_compare_parser(commands: argparse._SubParsersAction) -> None:
    compare = commands.add_parser(
        "compare", help="protect with several methods and budgets, evaluate each, compare them",
        description="Protect ORIGINALS with each method at each budget (OUTDIR/protected/METHOD-eBUDGET), evaluate "
                    "each protected set as mist evaluate does (OUTDIR/reports/METHOD-eBUDGET), and write "
                    "OUTDIR/index.html, comparison.json and comparison.csv: the protection's effect after the "
                    "strongest purifier against how visible it is. Run the same command again to resume.")
    compare.add_argument("originals", type=Path, metavar="ORIGINALS", help="the original image file or folder")
    compare.add_argument("-o", "--output", type=Path, required=True, metavar="OUTDIR", help="folder for everything")
    compare.add_argument("--methods", default=DEFAULT_METHODS, metavar="LIST",
                         help="comma list of methods, each with its default parameters (default: %(default)s)")
    compare.add_argument("--budgets", default=DEFAULT_BUDGETS, metavar="LIST",
                         help="comma list of strengths (largest pixel change, 0..255 levels) (default: %(default)s)")
    compare.add_argument("--protect-steps", type=int, default=None, metavar="N",
                         help=f"PGD steps of every protection (default: 100, or each method's paper's with --preset "
                              f"paper; {TEST_MODEL_STEPS} with --model {TINY_RANDOM})")
    compare.add_argument("--preset", choices=PRESETS, default=DEFAULT_PRESET,
                         help="paper: each method's settings as its paper's code runs them (step size, start, "
                              "schedule, parameters, steps), but for --budgets and a given --protect-steps "
                              "(default: %(default)s)")
    add_evaluate_options(compare)
    add_runner_options(compare)
    compare.add_argument("-q", "--quiet", action="store_true", help="no progress bars")


def compare_command(args: argparse.Namespace) -> int:
    """Check every option, open the runner, then protect, evaluate and compare; prints where the page is."""
    from mist.engine.config import ProtectConfig
    from mist.runner.compare import arms

    chosen = arms(args.methods, args.budgets)
    settings = evaluation_settings_from_args(args)
    steps = default_steps(args.model, ProtectConfig.steps) if args.protect_steps is None else args.protect_steps
    if steps < 1:
        raise ValueError(f"--protect-steps: must be at least 1, got {steps}")
    base = ProtectConfig(steps=steps)
    # the steps a preset does not replace: given, or the test model's
    given = ("steps",) if args.protect_steps is not None or names_test_model(args.model) else ()
    check_device_option(args)
    from mist.faces.reporting import ConsoleReporter, EvaluationConsole, warn_if_the_gpu_is_unused
    from mist.runner.compare import compare
    from mist.runner.entrance import open_models
    from mist.runner.evaluation.comparison import write_comparison
    from mist.runner.flags import RUN_FLAGS, fields_as_flags
    from mist.runner.preflight import output_folder_problem

    with fields_as_flags(RUN_FLAGS):
        models = open_models(args.model, args.device)
    if problem := output_folder_problem(args.output):
        raise ValueError(problem)
    warn_if_the_gpu_is_unused(models.device())
    console = EvaluationConsole(args.quiet)
    try:
        comparison = compare(args.originals, args.output, chosen, base, settings, models, ConsoleReporter(args.quiet),
                             progress=lambda arm, news: console.progress(news), preset=args.preset, given=given)
    finally:
        console.close()
    index = write_comparison(comparison, args.output)
    for result in comparison.results:
        for headline in result.headlines:
            print(f"{result.arm.name}: {headline['mimicry']}: {headline['decision']} (effect "
                  f"{headline['effect']:+.3f})")
    print(f"comparison: {index}")
    return 0
