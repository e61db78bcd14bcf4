"""The one progress and time-left estimator (mist.runner.estimate) the web UI and the HTTP service share."""

from __future__ import annotations

import pytest

from mist.engine.config import ProtectConfig
from mist.runner.estimate import Estimate


def test_block_mode_counts_every_tile_from_the_start():
    assert ProtectConfig.of(steps=10, block_num=2).steps_per_image() == 40
    assert ProtectConfig.of(steps=10, block_num=2).steps_per_image(batch_size=3) == 20
    assert ProtectConfig.of(steps=7, robust="jpeg").steps_per_image() == 7  # EOT samples are within a step


def test_progress_only_grows_and_reaches_one_at_the_end():
    estimate = Estimate([40, 40])
    seen = []
    for image in range(2):
        for step in (*range(1, 41), 20):  # a late report of an earlier step does not move it back
            estimate.step(image, step, now=float(image * 100 + step))
            seen.append(estimate.fraction)
        estimate.finished(image)
    assert seen == sorted(seen) and seen[-1] == 1.0 and max(seen[:40]) == 0.5


def test_one_slow_step_moves_the_time_left_a_little_and_pauses_are_not_steps():
    estimate = Estimate([100])
    estimate.step(0, 1, now=0.0)  # the first step starts the clock
    for step in range(2, 51):
        estimate.step(0, step, now=float(step - 1))  # one second each
    assert estimate.seconds_per_step == pytest.approx(1.0)
    assert estimate.seconds_left() == pytest.approx(50.0)
    estimate.step(0, 51, now=59.0)  # one step of 10 s
    assert 1.5 < estimate.seconds_per_step < 2.0  # not 10
    estimate.pause()  # writing an output, loading the next image...
    estimate.step(0, 52, now=500.0)  # ... is not a step's time
    assert estimate.seconds_per_step < 2.0
