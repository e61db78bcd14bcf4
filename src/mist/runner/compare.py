"""Methods and budgets side by side on the user's own images: each method protects the images at each budget (the
job runner, as `mist protect`), each protected set is evaluated (as `mist evaluate`), and one table and plot set the
protection's effect after the strongest purifier against how visible it is (`mist compare`).

Every step is resumable: protected images already complete are not redone, nor are finished evaluation units, nor a
finished arm's report (its results.json is read back), so the same command after an interruption goes on where it
stopped.
"""

from __future__ import annotations

import json
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Sequence

from mist.engine.config import DEFAULT_PRESET, ProtectConfig
from mist.engine.methods import get_method

if TYPE_CHECKING:
    from mist.runner.evaluation.run import EvaluationProgress
    from mist.runner.evaluation.settings import EvaluationSettings
    from mist.runner.jobs import ModelCache, Reporter


@dataclass(frozen=True)
class Arm:
    """One method at one budget (epsilon, 0..255 levels)."""

    method: str
    epsilon: float

    @property
    def name(self) -> str:
        return f"{self.method}-e{self.epsilon:g}"


def arms(methods: str, budgets: str) -> list[Arm]:
    """Every method of the comma list `methods` at every budget of `budgets`; ValueError("methods: ...") or
    ("budgets: ...") naming the bad item."""
    names = [name.strip() for name in methods.split(",") if name.strip()]
    if not names:
        raise ValueError("methods: name at least one method")
    for name in names:
        get_method(name)
    try:
        levels = [float(part) for part in budgets.split(",") if part.strip()]
    except ValueError:
        raise ValueError(f"budgets: not a comma list of numbers: {budgets!r}") from None
    if not levels or not all(0 < level <= 255 for level in levels):
        raise ValueError(f"budgets: each must be above 0 and at most 255 (pixel levels), got {budgets!r}")
    return [Arm(name, level) for name in dict.fromkeys(names) for level in dict.fromkeys(levels)]


@dataclass
class ArmResult:
    """What one arm gave: the mean invisibility of its protected images and its headline per mimicry (as in its
    report's results.json), and where its report is."""

    arm: Arm
    invisibility: dict[str, float]
    headlines: list[dict[str, Any]]
    report: Path
    protected_failed: int = 0
    random_weights: bool = False  # made with the random-weight test model: its numbers mean nothing


@dataclass
class Comparison:
    settings: dict[str, Any]
    results: list[ArmResult] = field(default_factory=list)


def compare(originals: Path, folder: Path, chosen: Sequence[Arm], base: ProtectConfig, settings: EvaluationSettings,
            models: ModelCache, reporter: Reporter, *,
            progress: Callable[[Arm, EvaluationProgress], None] | None = None,
            cancel: threading.Event | None = None, preset: str = DEFAULT_PRESET,
            given: Sequence[str] = ()) -> Comparison:
    """Protect `originals` (a file or folder) with each arm into folder/protected/<arm>, evaluate each into
    folder/reports/<arm>, and return the comparison (written by `mist.runner.evaluation.comparison`). `base`: the
    run settings every arm shares (its method and epsilon are the arm's; the method's parameters its defaults);
    with `preset` "paper", each arm takes its method's paper preset but for its epsilon and for the settings of base
    named in `given` (those the user gave).
    ValueError in one line, before anything runs, when a package of the `evaluate` extra is missing."""
    from mist.runner.evaluation.job import EvaluationJob, run_evaluation
    from mist.runner.evaluation.settings import settings_record
    from mist.runner.inputs import collect_jobs
    from mist.runner.jobs import run_jobs
    from mist.runner.evaluation.run import require_extras

    require_extras()  # before any protection runs: an arm would be protected only to fail at its evaluation

    comparison = Comparison({"base": json.loads(base.to_json()), "evaluation": settings_record(settings)})
    if preset != DEFAULT_PRESET:  # the arms' own settings are those their outputs record
        comparison.settings["preset"] = preset
    for arm in chosen:
        config = base.but(method=arm.method, epsilon=arm.epsilon, preset=preset,
                          **{name: getattr(base, name) for name in given})
        protected = folder / "protected" / arm.name
        summary = run_jobs(collect_jobs([originals], protected), config, models, reporter, cancel=cancel)
        if summary.cancelled:
            from mist.engine.attack import Cancelled

            raise Cancelled
        report = folder / "reports" / arm.name
        record = report / "results.json"
        if not _finished(record):
            told = None if progress is None else (lambda news, arm=arm: progress(arm, news))
            run_evaluation(EvaluationJob(originals, protected, settings, report), models, progress=told,
                           cancel=cancel)
        comparison.results.append(_arm_result(arm, record, len(summary.failed)))
    return comparison


def _finished(record: Path) -> bool:
    """Whether an arm's report was written by an earlier run (its results.json reads back)."""
    try:
        return isinstance(json.loads(record.read_text(encoding="utf-8")), dict)
    except (OSError, ValueError):
        return False


def _arm_result(arm: Arm, record: Path, failed: int) -> ArmResult:
    data = json.loads(record.read_text(encoding="utf-8"))
    keys = sorted({key for image in data["images"] for key in image["invisibility"]})
    invisibility = {}
    for key in keys:
        values = [image["invisibility"][key] for image in data["images"] if image["invisibility"].get(key) is not None]
        if values:
            invisibility[key] = sum(values) / len(values)
    return ArmResult(arm, invisibility, data.get("headline", []), record.parent, failed,
                     bool(data.get("random_weights")))
