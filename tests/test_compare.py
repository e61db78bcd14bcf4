"""`mist compare` on the tiny random model: every method at every budget protected and evaluated, one table, plot
and page; its options refused in one line; a second run redoes nothing."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
from PIL import Image

pytest.importorskip("torchmetrics")

from mist.faces import cli  # noqa: E402
from mist.runner.compare import Arm, arms  # noqa: E402

FAST = ["--protect-steps", "2", "--steps", "2", "--purify", "", "--strengths", "0.5", "--model", "tiny-random", "-q"]


@pytest.fixture
def originals(tmp_path):
    folder = tmp_path / "art"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for n in range(2):
        Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(folder / f"a{n}.png")
    return folder


def test_arms_are_every_method_at_every_budget_and_bad_lists_are_named():
    assert arms("mist, pid,mist", "8,4") == [Arm("mist", 8), Arm("mist", 4), Arm("pid", 8), Arm("pid", 4)]
    assert Arm("pid", 4.0).name == "pid-e4"
    for methods, budgets, message in (("mist,nope", "8", "method: unknown method 'nope'"),
                                      ("", "8", "methods: name at least one method"),
                                      ("mist", "8,x", "budgets: not a comma list of numbers"),
                                      ("mist", "0,300", "budgets: each must be above 0 and at most 255")):
        with pytest.raises(ValueError, match=message):
            arms(methods, budgets)


def test_compare_protects_evaluates_and_tabulates_every_arm_and_resumes(originals, tmp_path, capsys, monkeypatch):
    out = tmp_path / "cmp"
    code = cli.main(["compare", str(originals), "-o", str(out), "--methods", "mist,pid", "--budgets", "8", *FAST])
    printed = capsys.readouterr()
    assert code == 0, printed.err
    record = json.loads((out / "comparison.json").read_text())
    assert [(a["method"], a["epsilon"]) for a in record["arms"]] == [("mist", 8), ("pid", 8)]
    assert record["random_weights"] and record["settings"]["base"]["steps"] == 2
    for arm in record["arms"]:
        assert arm["headline"][0]["mimicry"] == "img2img:0.5"
        assert arm["invisibility"]["linf_levels"] <= arm["epsilon"] + 1e-3  # the budget, measured in float32
        assert (out / arm["report"]).is_file()
    rows = list(csv.DictReader((out / "comparison.csv").open()))
    assert len(rows) == 2 and {row["decision"] for row in rows} <= {"holds", "broken", "unclear"}
    page = (out / "index.html").read_text()
    assert "effect-img2img_0.5.png" in page and (out / "effect-img2img_0.5.png").is_file()
    assert "reports/pid-e8/index.html" in page and "meaningless" in page and "width=device-width" in page
    assert "comparison: " in printed.out and "pid-e8: img2img:0.5:" in printed.out
    chinese = (out / "index.zh.html").read_text()
    assert "各方法与强度对比" in chinese and "href='index.html'" in chinese and "href='index.zh.html'" in page
    assert "reports/pid-e8/index.zh.html" in chinese and "图生图 强度 0.5" in chinese and "此模型为随机权重" in chinese
    assert any(f">{word}<" in chinese for word in ("有效", "被破解", "不确定"))
    protected = sorted((out / "protected" / "mist-e8").iterdir())
    assert [path.name for path in protected] == ["a0.png", "a1.png"]
    # The same command again: every protection is complete and every report written, so nothing is run.
    import mist.runner.evaluation.job as evaluation_job

    monkeypatch.setattr(evaluation_job, "run_evaluation", lambda *a, **k: pytest.fail("evaluated again"))
    before = {path: path.stat().st_mtime_ns for path in (out / "protected").rglob("*.png")}
    assert cli.main(["compare", str(originals), "-o", str(out), "--methods", "mist,pid", "--budgets", "8",
                     *FAST]) == 0
    assert {path: path.stat().st_mtime_ns for path in (out / "protected").rglob("*.png")} == before


def test_compare_refuses_bad_options_before_anything_runs(originals, tmp_path, capsys):
    for extra, message in ((["--methods", "nope"], "method: unknown method"),
                           (["--budgets", "300"], "budgets: each must be above 0"),
                           (["--protect-steps", "0"], "--protect-steps: must be at least 1"),
                           (["--strengths", "2"], "--strengths: each must be above 0")):
        code = cli.main(["compare", str(originals), "-o", str(tmp_path / "x"), *FAST, *extra])
        assert code == cli.EXIT_USAGE and message in capsys.readouterr().err, extra
    assert not (tmp_path / "x").exists()


def test_compare_without_the_evaluation_extra_protects_nothing(originals, tmp_path, capsys, monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "matplotlib" else real(name, *a))
    code = cli.main(["compare", str(originals), "-o", str(tmp_path / "c"), *FAST])
    assert code == cli.EXIT_USAGE and "pip install 'mist-protect[evaluate]'" in capsys.readouterr().err
    assert not (tmp_path / "c" / "protected").exists()
