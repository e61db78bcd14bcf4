"""The faces side by side on the same bad settings: the command line, `mist_v3.py`, the HTTP service's form and the
web UI's controls type a value the same way (`mist.runner.flags.typed_value`) and refuse it with the same problem, each
naming the setting as its user typed it; a good value is recorded alike whatever face it came from."""

from __future__ import annotations

import json
import re

import pytest

import mist.faces.cli
import mist.faces.legacy
from mist.engine.config import RUN_SETTINGS, ProtectConfig
from mist.faces.webui.pages import Settings

pytest.importorskip("fastapi")
from mist.faces.service.submit import SubmitError, parse_settings  # noqa: E402


def command_line(capsys, flag: str, value: str) -> str:
    with pytest.raises(SystemExit):
        mist.faces.cli.build_parser().parse_args(["protect", "a.png", "-o", "out", flag, value])
    return capsys.readouterr().err.strip().splitlines()[-1]


def legacy(capsys, flag: str, value: str) -> str:
    with pytest.raises(SystemExit):
        mist.faces.legacy.build_parser().parse_args([flag, value])
    return capsys.readouterr().err.strip().splitlines()[-1]


def http(field: str, value: str) -> str:
    with pytest.raises(SubmitError) as refused:
        parse_settings({field: value})
    return str(refused.value)


def page(control: str, value: object) -> str:
    with pytest.raises(ValueError) as refused:
        Settings(**{control: value}).config()
    return str(refused.value)


@pytest.mark.parametrize("value, problem", [
    ("16.5", "must be a whole number, got '16.5'"),
    ("strong", "must be a whole number, got 'strong'"),
    ("nan", "must be a whole number, got 'nan'"),
])
def test_a_bad_strength_is_refused_alike_by_every_face(capsys, value, problem):
    assert command_line(capsys, "--epsilon", value) == f"mist protect: error: argument -e/--epsilon: {problem}"
    assert legacy(capsys, "--epsilon", value) == f"mist_v3.py: error: argument -e/--epsilon: {problem}"
    assert http("epsilon", value) == f"epsilon: {problem}"
    assert page("epsilon", value) == f"--epsilon: {problem}"


def test_a_value_out_of_range_is_refused_alike_by_every_face(capsys):
    problem = "must be between 0 and 255 (pixel levels), got 300"
    with pytest.raises(ValueError, match="^" + re.escape(f"--epsilon: {problem}")):
        mist.faces.cli.config_from_args(
            mist.faces.cli.build_parser().parse_args(["protect", "a.png", "-o", "o", "-e", "300"]))
    with pytest.raises(ValueError, match="^" + re.escape(f"--epsilon: {problem}")):
        mist.faces.legacy.plan(mist.faces.legacy.build_parser().parse_args(["-e", "300"]))
    assert http("epsilon", "300") == f"epsilon: {problem}"
    assert page("epsilon", 300) == f"--epsilon: {problem}"


def test_a_setting_is_recorded_alike_whatever_face_it_came_from():
    """A form's "16" and a slider's 16.0 are the command line's 16; a float parameter given as 1 is 1.0 everywhere
    (before, the service recorded epsilon 16.0 and mist_v3.py fused_weight 1, so the PNGs' settings differed)."""
    cli = mist.faces.cli.config_from_args(mist.faces.cli.build_parser().parse_args(
        ["protect", "a.png", "-o", "o", "-e", "16", "--fused-weight", "1", "--step-size", "1"]))
    legacy_config, _ = mist.faces.legacy.plan(mist.faces.legacy.build_parser().parse_args(["-e", "16", "--rate", "1",
                                                                               "--steps", "100"]))
    served, _ = parse_settings({"epsilon": "16", "fused_weight": "1", "step_size": "1"})
    shown = Settings(epsilon=16.0, steps=100.0, params={"fused_weight": 1}, original_size=False).config()
    texts = {config.but(step_size=1.0).to_json() for config in
             (cli, legacy_config, ProtectConfig.of(**served), shown)}
    assert len(texts) == 1, texts
    assert '"epsilon": 16,' in texts.pop()


def test_every_run_setting_is_declared_once_and_every_face_takes_it_from_there(capsys):
    """The table of run settings covers ProtectConfig's fields; the command line has its flag, the HTTP form takes
    the flag's name, and a bad whole number is refused by both with the same problem, named as each user typed it."""
    from dataclasses import fields

    from mist.engine.config import RUN_SETTINGS
    from mist.engine.methods import RESERVED

    assert set(RUN_SETTINGS) == {item.name for item in fields(ProtectConfig)} - {"params"} | {"preset"}
    assert set(RUN_SETTINGS) <= RESERVED  # no method may take a run setting's name
    help_text = mist.faces.cli.build_parser()._subparsers._group_actions[0].choices["protect"].format_help()
    for name, setting in RUN_SETTINGS.items():
        assert setting.flag in help_text, name
        if setting.kind != "int":
            continue
        field = setting.flag.removeprefix("--")
        assert command_line(capsys, setting.flag, "1.5").endswith(f"{setting.flag}: must be a whole number, got '1.5'")
        assert http(field, "1.5") == f"{field}: must be a whole number, got '1.5'"


def test_settings_that_name_paths_on_the_server_are_refused_from_http_clients(tmp_path):
    """`--against` and `--text-encoders` load models by path: only the server's own user may name them, as with
    --model."""
    local = [name for name, setting in RUN_SETTINGS.items() if setting.local]
    assert local == ["against", "text_encoders"]
    assert http("against", str(tmp_path)) == "against: a path on the server, set by whoever runs it, not by a request"
    assert http("text_encoders", str(tmp_path)).startswith("text_encoders: a path on the server")
    assert http("settings", json.dumps({"against": "x"})).startswith("against: a path on the server")
