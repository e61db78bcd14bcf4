"""The options of `mist evaluate` and `mist compare`, made from the table of evaluation settings
(`mist.runner.evaluation.settings.EVALUATION_OPTIONS`). Light: parsing imports no model library."""

from __future__ import annotations

import argparse


def add_evaluate_options(parser: argparse.ArgumentParser) -> None:
    """The settings of `mist evaluate`, from their table (`mist.runner.evaluation.settings.EVALUATION_OPTIONS`); their
    defaults are EvaluationSettings'. Values are typed when the settings are made, as for every face."""
    from mist.runner.evaluation.purify import KINDS
    from mist.runner.evaluation.settings import EVALUATION_OPTIONS, EvaluationSettings

    kinds = ", ".join(f"{name}" + (f":{kind.default:g}" if kind.default is not None else "")
                      for name, kind in KINDS.items() if name != "none")
    defaults = EvaluationSettings()
    g = parser.add_argument_group("evaluation")
    for name, option in EVALUATION_OPTIONS.items():
        default = getattr(defaults, name)
        shown = ",".join(map(str, default)) if isinstance(default, tuple) else default
        help = option.help.format(kinds=kinds)
        if option.kind == "bool":
            g.add_argument(option.flag, dest=name, action="store_true", default=None, help=help)
            continue
        if shown is not None:
            help += f" (default: {shown})".replace("%", "%%")
        g.add_argument(option.flag, dest=name, default=None, metavar="LIST" if option.kind == "list" else None,
                       help=help)


def evaluation_settings_from_args(args: argparse.Namespace):
    """The `EvaluationSettings` `mist evaluate` was given; ValueError naming the flag when one is invalid."""
    from mist.runner.evaluation.settings import EVALUATION_OPTIONS, evaluation_settings

    return evaluation_settings({name: getattr(args, name) for name in EVALUATION_OPTIONS
                                if getattr(args, name) is not None})
