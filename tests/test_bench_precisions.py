"""benchmarks/bench.py's choice of precisions: bf16 is measured only where the CPU computes it natively."""

from __future__ import annotations

import pytest

from mist.models import device as devices
from support.benchmarks import benchmark


@pytest.fixture(scope="module")
def bench():
    return benchmark("bench")


def test_bf16_is_skipped_in_one_line_on_a_cpu_without_it(bench, monkeypatch, capsys):
    monkeypatch.setattr(devices, "cpu_has_fast_bf16", lambda: False)
    assert bench.runnable_precisions(["fp32", "bf16"], "cpu") == ["fp32"]
    said = capsys.readouterr().out.splitlines()
    assert len(said) == 1 and said[0].startswith("bf16 skipped: this CPU has no native bf16")
    assert bench.runnable_precisions(["fp32"], "cpu") == ["fp32"]
    assert capsys.readouterr().out == ""


def test_bf16_is_kept_where_the_cpu_has_it(bench, monkeypatch, capsys):
    monkeypatch.setattr(devices, "cpu_has_fast_bf16", lambda: True)
    assert bench.runnable_precisions(["fp32", "bf16"], "cpu") == ["fp32", "bf16"]
    assert capsys.readouterr().out == ""
