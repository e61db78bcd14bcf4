"""ProtectConfig: defaults of Mist v1.2, unit conversions, and one clear message per invalid setting."""

from __future__ import annotations

import json

import pytest

from mist.engine.config import ProtectConfig
from mist.engine.methods.mist import MODE_CODES


def test_defaults_are_mist_v12s():
    c = ProtectConfig()
    assert c.method == "mist"
    assert (c.params.mode, c.epsilon, c.steps, c.step_size, c.input_size, c.params.fused_weight, c.block_num,
            c.seed) == ("fused", 16, 100, 1, 512, 1, 1, 23)
    assert c.params.prompt == "a painting" and ProtectConfig.of(object_prompt=True).params.prompt == "a photo"


def test_units_are_converted_once():
    c = ProtectConfig.of(epsilon=16, step_size=1, fused_weight=1)
    assert c.radius == pytest.approx(16 / 255 * 2)
    assert c.step == pytest.approx(2 / 255)
    assert c.params.semantic_weight == pytest.approx(10_000)
    assert ProtectConfig.of(fused_weight=2).params.semantic_weight == pytest.approx(100_000)


def test_mode_codes_follow_the_original_code_not_its_readme():
    assert MODE_CODES == {0: "semantic", 1: "textural", 2: "fused"}


@pytest.mark.parametrize("settings, option", [
    ({"epsilon": 256}, "epsilon"), ({"epsilon": -1}, "epsilon"), ({"steps": -1}, "steps"),
    ({"steps": 1.5}, "steps"), ({"step_size": 0}, "step_size"), ({"input_size": 100}, "input_size"),
    ({"input_size": 64, "block_num": 3}, "input_size"), ({"block_num": 0}, "block_num"),
    ({"mode": "loud"}, "mode"), ({"precision": "int8"}, "precision"), ({"fused_weight": float("nan")}, "fused_weight"),
    ({"mask": "no/such/mask.png"}, "mask"), ({"target": "no/such/target.png"}, "target"),
    ({"method": "nothing"}, "method"), ({"loudness": 3}, "loudness"), ({"fast": 1}, "fast"),
])
def test_invalid_settings_name_the_option(settings, option):
    with pytest.raises(ValueError) as error:
        ProtectConfig.of(**settings)
    assert str(error.value).startswith(option + ":") and "\n" not in str(error.value)


def test_no_resize_accepts_any_size_divisible_later():
    assert ProtectConfig(input_size=100, keep_aspect=True).input_size == 100


def test_settings_json_is_canonical(tmp_path):
    mask = tmp_path / "m.png"
    mask.write_bytes(b"")
    settings = json.loads(ProtectConfig(mask=mask).to_json())
    assert settings["mask"] == str(mask) and settings["epsilon"] == 16
    assert ProtectConfig().to_json() == ProtectConfig().to_json()
    assert settings["method"] == "mist" and settings["mode"] == "fused"  # the method's parameters beside the run's


def test_settings_change_by_keyword_whatever_their_kind():
    c = ProtectConfig.of(steps=5, mode="textural")
    changed = c.but(epsilon=8, fused_weight=2)
    assert (changed.steps, changed.epsilon, changed.params.mode, changed.params.fused_weight) == (5, 8, "textural", 2)
    assert c.params.fused_weight == 1  # the original is untouched
    assert ProtectConfig(params={"mode": "semantic"}) == ProtectConfig.of(mode="semantic")


def test_original_size_protects_with_the_aspect_kept():
    c = ProtectConfig(original_size=True, input_size=100)  # no square, so no divisibility by 8 is asked
    assert c.aspect_kept and c.processed_size(300, 200) == (144, 96)  # 150 x 100, floored to multiples of 8
    assert ProtectConfig().processed_size(300, 200) == (512, 512)
    assert json.loads(c.to_json())["original_size"] is True
    assert json.loads(ProtectConfig().to_json())["original_size"] is False


def test_the_original_size_flag_reaches_the_config():
    from mist.faces.cli import build_parser, config_from_args

    parse = build_parser().parse_args
    assert config_from_args(parse(["protect", "a.png", "-o", "out", "--original-size"])).original_size
    assert not config_from_args(parse(["protect", "a.png", "-o", "out"])).original_size
