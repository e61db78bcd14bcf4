"""benchmarks/bench.py's choice of precisions (bf16 only where the CPU computes it natively) and how it names the
machine its figures come from."""

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


def test_the_machine_line_names_the_instruction_sets_and_any_hold_below_them(bench, monkeypatch):
    for name in ("ATEN_CPU_CAPABILITY", "ONEDNN_MAX_CPU_ISA", "DNNL_MAX_CPU_ISA", "MKL_ENABLE_INSTRUCTIONS"):
        monkeypatch.delenv(name, raising=False)
    free = bench.machine()
    assert "(" in free.split(",")[0] and "held below" not in free
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "AVX2")
    assert "held below them: ONEDNN_MAX_CPU_ISA=AVX2," in bench.machine()
