"""A protection method is one module: a toy method registered here, and nowhere else, reaches the command line (its
help, its flags, its checks), the web UI (the method choice and its parameter's control), the Python API and the
outputs' metadata."""

from __future__ import annotations

import json
from dataclasses import dataclass

import numpy as np
import pytest
from PIL import Image

import mist
import mist.engine.methods
from mist.faces.cli import main
from mist.engine.config import ProtectConfig
from mist.engine.methods import LossTerms, Method, MethodParams, param, register_method


@dataclass(frozen=True)
class ToyParams(MethodParams):
    pull: float = param(0.5, "how hard the image is pulled toward mid-grey (0..1)", low=0, high=1,
                        label="Pull")
    invert: bool = param(False, "push away from mid-grey instead", label="Invert")


class Toy(Method):
    """Pulls pixels toward mid-grey through the encoder's input: the simplest loss that still runs the pipeline."""

    name = "toy"
    title = "Toy method"
    summary = "pulls pixels toward grey (a test method)"
    paper = "none: a test fixture"
    Params = ToyParams
    parts = frozenset({"encoder"})

    def prepare(self, tiles):
        def loss(x, generators):
            distance = x.pow(2).flatten(1).sum(1) * self.params.pull
            return LossTerms(-distance if self.params.invert else distance, {"distance": distance})
        return loss


@pytest.fixture
def toy(monkeypatch):
    """The toy method, registered for one test (the registry is restored afterwards)."""
    mist.engine.methods.list_methods()  # the built-in methods first, as in any run
    monkeypatch.setattr(mist.engine.methods, "_registry", dict(mist.engine.methods._registry))
    return register_method(Toy)


def _image(path):
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (40, 48, 3), dtype=np.uint8)).save(path)
    return path


def test_the_command_line_lists_the_method_and_its_parameters(toy, capsys):
    with pytest.raises(SystemExit):
        main(["protect", "--help"])
    help_text = capsys.readouterr().out
    assert "toy" in help_text.split("--method")[1].split("\n")[0]  # among --method's choices
    assert "--pull N" in help_text and "how hard the image is pulled toward mid-grey" in help_text
    assert "toy: pulls pixels toward grey" in " ".join(help_text.split())


def test_a_run_with_the_method_records_it_and_its_parameters(toy, tmp_path, capsys):
    source = _image(tmp_path / "a.png")
    code = main(["protect", str(source), "-o", str(tmp_path / "out"), "--method", "toy", "--pull", "0.25",
                 "--model", "tiny-random", "--steps", "2", "--input-size", "32", "--quiet"])
    assert code == 0, capsys.readouterr().err
    with Image.open(tmp_path / "out" / "a.png") as output:
        text = dict(output.text)
    settings = json.loads(text["mist:settings"])
    assert text["mist:method"] == "toy" and text["mist:algorithm"].startswith("Toy method (none: a test fixture)")
    assert (settings["method"], settings["pull"], settings["invert"]) == ("toy", 0.25, False)
    assert "mode" not in settings  # Mist's parameters belong to Mist


@pytest.mark.parametrize("argv, message", [
    (["--method", "toy", "--fused-weight", "2"], "--fused-weight: not a parameter of --method toy (its parameters: "
                                                 "--pull, --invert)"),
    (["--method", "toy", "--pull", "2"], "--pull: must be from 0 to 1, got 2.0"),
    (["--pull", "0.5"], "--pull: not a parameter of --method mist"),
])
def test_parameters_are_checked_against_the_chosen_method(toy, tmp_path, capsys, argv, message):
    source = _image(tmp_path / "a.png")
    code = main(["protect", str(source), "-o", str(tmp_path / "out"), "--model", "tiny-random", *argv])
    assert code == 2 and message in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_the_python_api_takes_the_method_and_its_parameters_by_keyword(toy, tiny_model):
    picture = Image.new("RGB", (32, 32), (200, 30, 30))
    [result] = mist.protect(picture, method="toy", pull=1.0, steps=3, input_size=32, precision="fp32",
                            model=tiny_model)
    assert set(result.start) == {"objective", "distance"} and result.end["distance"] < result.start["distance"]
    with pytest.raises(ValueError, match="mode: not a parameter of method toy"):
        mist.protect(picture, method="toy", mode="textural", model=tiny_model)


def test_the_web_ui_offers_the_method_and_its_parameter(toy, tmp_path):
    pytest.importorskip("gradio")
    from mist.faces.webui import app as webui_app
    from mist.runner.jobs import ModelCache
    from mist.faces.webui.pages import Settings, WebUI

    demo = webui_app.build_app(WebUI(ModelCache("tiny-random"), tmp_path))
    by_id = {getattr(block, "elem_id", None): block for block in demo.blocks.values()}
    assert "toy" in [value for _, value in by_id["mist-method"].choices]
    pull = by_id["mist-pull"]
    assert (pull.minimum, pull.maximum, pull.value, pull.visible) == (0, 1, 0.5, False)  # mist is chosen first
    english, chinese = webui_app.method_labels()
    assert (english["method_toy"], english["param_pull"]) == ("Toy method", "Pull")
    assert (chinese["method_toy"], chinese["param_pull"]) == ("Toy method", "Pull")  # a plug-in's: its English texts
    assert (english["param_mode"], chinese["param_mode"]) == ("Mode", "模式")  # the built-ins': the web UI's table
    page = Settings(method="toy", params={"pull": 0.25, "mode": "textural"})  # other methods' controls are ignored
    assert page.config() == ProtectConfig(method="toy", params={"pull": 0.25}, original_size=True)


def test_the_registry_refuses_what_would_confuse_the_faces(toy):
    with pytest.raises(ValueError, match="registered already"):
        register_method(type("Other", (Toy,), {}))

    @dataclass(frozen=True)
    class Clashing(MethodParams):
        epsilon: float = param(1.0, "a second budget")

    with pytest.raises(ValueError, match="name of a run setting"):
        register_method(type("Clash", (Toy,), {"name": "clash", "Params": Clashing}))

    @dataclass(frozen=True)
    class OtherPull(MethodParams):
        pull: bool = param(False, "a switch called pull")

    with pytest.raises(ValueError, match="flag --pull of another method"):
        register_method(type("Puller", (Toy,), {"name": "puller", "Params": OtherPull}))
    with pytest.raises(ValueError, match="unknown model parts"):
        register_method(type("Parts", (Toy,), {"name": "parts", "parts": frozenset({"refiner"})}))


def test_the_model_cache_loads_only_the_parts_of_the_chosen_method(toy):
    """The toy method declares the encoder alone: its model has no UNet; Mist then needs one, so the model is read
    again with it, and a method whose parts are loaded is served from the cache."""
    from mist.runner.jobs import ModelCache

    models = ModelCache("tiny-random")
    toy_protector = models.protector(ProtectConfig(method="toy", precision="fp32"))
    assert toy_protector.model.unet is None and models.loads == 1
    assert models.protector(ProtectConfig(precision="fp32")).model.unet is not None and models.loads == 2
    assert models.protector(ProtectConfig(method="toy", precision="fp32")).model.unet is not None
    assert models.loads == 2


def test_a_protector_refuses_a_model_without_the_parts_its_method_needs(tiny_model):
    from mist.models.loading import build_random
    from mist.engine.pipeline import Protector

    encoder_only = build_random(parts=frozenset({"encoder"}))
    with pytest.raises(ValueError, match="method: mist needs the model's text_encoder, unet"):
        Protector(encoder_only, ProtectConfig(precision="fp32"))


def test_no_method_parameter_can_take_the_name_of_a_run_setting():
    from dataclasses import fields

    from mist.engine.methods import RESERVED

    assert {f.name for f in fields(ProtectConfig)} <= RESERVED
