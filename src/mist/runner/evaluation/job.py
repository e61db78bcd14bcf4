"""An evaluation as a job: the one sequence every face runs (`mist evaluate`, `mist.evaluate`, the web UI's Evaluate,
the HTTP service's evaluation jobs). Its finished units of work are kept while it runs, so a cancelled, interrupted or
killed evaluation started again goes on where it stopped; the report is written; the kept units are then deleted.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable

from mist.runner.evaluation.resume import UNFINISHED

if TYPE_CHECKING:
    import torch

    from mist.runner.jobs import ModelCache
    from mist.runner.evaluation.run import Evaluation, EvaluationProgress
    from mist.runner.evaluation.settings import EvaluationSettings


@dataclass(frozen=True)
class EvaluationJob:
    """What to evaluate and where its results go. report: the folder for index.html, results.json, results.csv
    and the pictures (None: no report, the caller shows the `Evaluation`); keep: where finished units are kept until
    the end (default: the report's `.unfinished` folder; None without a report: nothing is kept); shown_from: files
    are named in the report relative to this folder (a server's job folder), else as given."""

    originals: Path
    protected: Path
    settings: EvaluationSettings
    report: Path | None = None
    keep: Path | None = None
    shown_from: Path | None = None

    @property
    def units_folder(self) -> Path | None:
        if self.keep is not None:
            return self.keep
        return self.report / UNFINISHED if self.report is not None else None


def run_evaluation(job: EvaluationJob, models: ModelCache, *,
                   progress: Callable[[EvaluationProgress], None] | None = None,
                   on_load: Callable[[str | Path, torch.device], None] | None = None,
                   cancel: threading.Event | None = None) -> tuple[Evaluation, Path | None]:
    """Run `job` on `models`; returns the evaluation and the report's index.html (None without a report).

    progress: told after each unit of work, with the time left; on_load: told before the model loads; cancel: once
    set, `mist.engine.attack.Cancelled` is raised at the next DDIM step or unit (its finished units stay kept). Raises
    ValueError naming the file or setting, and ModelNotFoundError, before any compute."""
    from mist.runner.evaluation.report import write_report
    from mist.runner.evaluation.run import evaluate_folders

    evaluation = evaluate_folders(job.originals, job.protected, job.settings, models, progress, on_load,
                                  resume=job.units_folder, cancel=cancel)
    index = write_report(evaluation, job.report, shown_from=job.shown_from) if job.report is not None else None
    if evaluation.finished is not None:
        evaluation.finished.clear()  # the report, or the caller, has it all
    return evaluation, index
