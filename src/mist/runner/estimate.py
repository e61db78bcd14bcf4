"""Progress and time left of a run whose images' step counts are known before it starts: one estimator for the faces
that show them (the web UI's status line, the HTTP service's job status).

Progress is steps done over steps in all, so it never goes back and reaches 1 only at the end (block mode's tiles and
every method's steps are counted from the settings, `ProtectConfig.steps_per_image`, not learnt on the way). The time
per step is an exponential moving average over the steps measured so far, so one slow step (the first, which warms
the kernels up; a pause while an output is written) moves the estimate a little, not all of it.
"""

from __future__ import annotations

import time
from typing import Sequence

SMOOTHING = 0.1  # weight of the newest step's time in the average


class Estimate:
    """`totals[i]`: the PGD steps image i takes."""

    def __init__(self, totals: Sequence[int], seconds_per_step: float | None = None) -> None:
        self.totals = [max(0, int(total)) for total in totals]
        self.done = [0] * len(self.totals)
        self.seconds_per_step = seconds_per_step
        self._last: float | None = None  # when the last step was counted; None after a pause

    @property
    def steps_done(self) -> int:
        return sum(self.done)

    @property
    def steps(self) -> int:
        return sum(self.totals)

    @property
    def fraction(self) -> float:
        return self.steps_done / self.steps if self.steps else 1.0

    def step(self, image: int, step: int, now: float | None = None) -> None:
        """Image `image` has done `step` of its steps (counted from 1)."""
        now = time.monotonic() if now is None else now
        before = self.done[image]
        self.done[image] = max(before, min(step, self.totals[image]))
        advanced = self.done[image] - before
        if self._last is not None and advanced > 0:
            sample = (now - self._last) / advanced
            self.seconds_per_step = sample if self.seconds_per_step is None else (
                self.seconds_per_step + SMOOTHING * (sample - self.seconds_per_step))
        self._last = now

    def finished(self, image: int) -> None:
        """Image `image` is done, failed or skipped: its steps count as done; the time until the next step (writing
        the output, reading the next image) is not a step's."""
        self.done[image] = self.totals[image]
        self._last = None

    def begin(self, now: float | None = None) -> None:
        """The first step starts now (what came before, loading a model say, is not its time)."""
        self._last = time.monotonic() if now is None else now

    def pause(self) -> None:
        """What comes before the next step (loading the model, preparing an image) is not a step's time."""
        self._last = None

    def seconds_left(self) -> float | None:
        if self.seconds_per_step is None:
            return None
        return (self.steps - self.steps_done) * self.seconds_per_step
