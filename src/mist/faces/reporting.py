"""Console progress for batches: a bar over images, a bar over each image's PGD steps (both with ETA), one line per
finished, skipped or failed image, and a summary."""

from __future__ import annotations

import sys
import time

from tqdm import tqdm

from mist.runner.jobs import NO_PROTECTION_WARNING, BatchSummary, Job
from mist.models import TINY_RANDOM, quiet_model_libraries
from mist.engine.pipeline import Progress, ProtectedImage


class ConsoleReporter:
    def __init__(self, quiet: bool = False) -> None:
        self.quiet = quiet
        self.images: tqdm | None = None
        self.steps: tqdm | None = None
        self.random_weights = False
        self.to_do = self.done = 0

    def _say(self, line: str, error: bool = False) -> None:
        if error or not self.quiet:
            tqdm.write(line, file=sys.stderr if error else sys.stdout)

    def batch_started(self, jobs: list[Job], to_do: int) -> None:
        self.to_do, self.done = to_do, 0
        self._say(f"{len(jobs)} image(s) found, {to_do} to protect")
        if to_do > 1 and not self.quiet:
            self.images = tqdm(total=to_do, unit="img", desc="images", position=0, dynamic_ncols=True)

    def model_loading(self, where, device) -> None:
        self._say(f"loading model {where} onto {device} ...")
        quiet_model_libraries()
        if where == TINY_RANDOM:
            self._say(f"WARNING: {where} has random weights: its outputs have NO protection", error=True)

    def images_started(self, jobs: list[Job], first: int, to_do: int) -> None:
        if not self.quiet:
            label = jobs[0].source.name[:40] + (f" +{len(jobs) - 1}" if len(jobs) > 1 else "")
            self.steps = tqdm(unit="step", desc=label, leave=False, position=1 if self.images else 0,
                              dynamic_ncols=True)

    def step(self, jobs: list[Job], progress: Progress) -> None:
        if self.steps is None:
            return
        if self.steps.total != progress.total:
            self.steps.reset(total=progress.total)
            self.steps.update(progress.step - 1)
        self.steps.update(1)
        self.steps.set_postfix({name: f"{value:.4g}" for name, value in progress.terms.items()}, refresh=False)

    def _close_steps(self) -> None:
        if self.steps is not None:
            self.steps.close()
            self.steps = None

    def image_done(self, job: Job, result: ProtectedImage) -> None:
        self._close_steps()
        self.random_weights |= result.random_weights
        if self.images is not None:
            self.images.update(1)
        compiling = f", {result.compile_seconds:.0f} s of it compiling" if result.compile_seconds >= 0.5 else ""
        self._say(f"protected {job.source} -> {job.output} ({result.seconds:.1f} s{compiling})")
        self.done += 1
        if self.done == 1 and self.to_do > 1:  # compiling is done once per image size: the estimate leaves it out
            remaining = (self.to_do - 1) * (result.seconds - result.compile_seconds)
            finish = time.strftime("%H:%M", time.localtime(time.time() + remaining))
            self._say(f"estimated time for the other {self.to_do - 1} image(s): {_duration(remaining)} "
                      f"(done about {finish})")

    def image_skipped(self, job: Job, reason: str) -> None:
        self._say(f"skipped {job.source}: {reason}")

    def image_failed(self, job: Job, message: str, stage: str) -> None:
        self._close_steps()
        self._say(f"error: {message}", error=True)

    def interrupted(self) -> None:
        """The batch was stopped: close the progress bars (quietly where the terminal is already gone, as after an SSH
        hang-up); the caller says why."""
        try:
            self._close_steps()
            if self.images is not None:
                self.images.close()
        except OSError:
            pass

    def finish(self, summary: BatchSummary, seconds: float) -> None:
        self._close_steps()
        if self.images is not None:
            self.images.close()
        per_image = ""
        if summary.seconds_per_image:
            per_image = f", {sum(summary.seconds_per_image) / len(summary.seconds_per_image):.1f} s per image"
        print(f"done: {len(summary.done)} protected, {len(summary.skipped)} skipped, {len(summary.failed)} failed "
              f"in {seconds:.1f} s{per_image}")
        if self.random_weights:
            print(f"WARNING: {NO_PROTECTION_WARNING}", file=sys.stderr)


def _duration(seconds: float) -> str:
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 5400:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


class EvaluationConsole:
    """Console progress for `mist evaluate`: a bar over its units of work (tqdm shows the ETA), the model loading
    line, and the verdicts at the end."""

    def __init__(self, quiet: bool = False) -> None:
        self.quiet = quiet
        self.bar: tqdm | None = None

    def model_loading(self, where, device) -> None:
        if not self.quiet:
            tqdm.write(f"loading model {where} (with its VAE decoder) onto {device} ...")
        quiet_model_libraries()

    def progress(self, progress) -> None:
        """One `mist.runner.evaluation.run.EvaluationProgress`."""
        if self.quiet:
            return
        if self.bar is None:
            self.bar = tqdm(total=progress.total, unit="run", desc="evaluating", dynamic_ncols=True)
        self.bar.set_postfix_str(progress.doing[:50], refresh=False)
        self.bar.update(progress.done - self.bar.n)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None

    def finish(self, evaluation, index) -> None:
        """The verdict of each image, the set's answer per mimicry, and where the report is."""
        from mist.runner.evaluation.report import RANDOM_WEIGHTS_WARNING, headline_lines

        for line in evaluation.skipped + evaluation.unmatched:
            print(line, file=sys.stderr)
        for result in evaluation.images:
            print(f"{result.pair.protected}: {result.verdict}")
        for line in headline_lines(evaluation):
            print(line)
        reused = evaluation.finished.reused if evaluation.finished is not None else 0
        print(f"report: {index} ({evaluation.seconds:.0f} s"
              + (f"; {reused} unit(s) finished by an interrupted run were reused" if reused else "") + ")")
        if evaluation.random_weights:
            print(f"WARNING: {RANDOM_WEIGHTS_WARNING}", file=sys.stderr)


def warn_if_the_gpu_is_unused(device) -> None:
    """Say loudly (stderr) when this machine has an NVIDIA GPU that PyTorch cannot use, and why, unless the run is on
    CUDA anyway: on a rented GPU server that is the difference between minutes and hours."""
    from mist.models.device import cuda_problem

    if device.type != "cuda" and (problem := cuda_problem()):
        print(f"WARNING: {problem}. This run uses the {device.type}, many times slower.", file=sys.stderr)
