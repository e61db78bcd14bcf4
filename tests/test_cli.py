"""The `mist` command and the Mist v1.2 compatible `mist_v3.py` command line, end to end on the tiny random model."""

from __future__ import annotations

import hashlib
import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageOps

import mist
import mist.faces.cli
import mist.faces.legacy
from mist.runner.jobs import Job
from mist.engine.config import ProtectConfig
from support.cli import run_cli

REPO = Path(__file__).resolve().parents[1]
FAST = ["--model", "tiny-random", "--steps", "2", "--input-size", "64"]
PROCESSED = (64, 64)


# --------------------------------------------------------------------------
# Helpers


def make_image(path: Path, size: tuple[int, int] = (80, 60), seed: int = 0, mode: str = "RGB", **save) -> Path:
    """Write a random-noise image of `size` (width, height) in `mode`; the format follows the suffix."""
    rng = np.random.default_rng(seed)
    width, height = size
    if mode == "I;16":
        img = Image.fromarray(rng.integers(0, 65536, (height, width), dtype=np.uint16))
    else:
        img = Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8), "RGB")
        if mode == "P":
            img = img.quantize(64)
        elif mode != "RGB":
            img = img.convert(mode)
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path, **save)
    return path


def protect(capsys, *args: object) -> tuple[int, str, str]:
    return run_cli(capsys, "protect", *args, *FAST)


def lines(text: str) -> list[str]:
    """Non-empty lines, also split at carriage returns (progress bars redraw with them)."""
    return [line for line in re.split(r"[\r\n]+", text) if line.strip()]


def lines_with(text: str, needle: object) -> list[str]:
    return [line for line in lines(text) if str(needle) in line]


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def pixels(img_or_path) -> np.ndarray:
    img = Image.open(img_or_path) if isinstance(img_or_path, Path) else img_or_path
    return np.asarray(img.convert("RGB"), dtype=np.int16)


def resized(path: Path, size: tuple[int, int] = PROCESSED) -> np.ndarray:
    """The input as Mist processes it: upright, RGB, bicubic-resized."""
    img = ImageOps.exif_transpose(Image.open(path)).convert("RGB")
    return pixels(img.resize(size, resample=Image.Resampling.BICUBIC))


def png_text(path: Path) -> dict[str, str]:
    with Image.open(path) as img:
        img.load()
        return dict(img.text)


def settings(path: Path) -> dict:
    return json.loads(png_text(path)["mist:settings"])


def mtimes(folder: Path) -> dict[Path, int]:
    return {p: p.stat().st_mtime_ns for p in folder.rglob("*") if p.is_file()}


def files_under(folder: Path) -> set[str]:
    return {p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file()}


@pytest.fixture(autouse=True)
def _no_model_from_environment(monkeypatch):
    monkeypatch.delenv("MIST_MODEL", raising=False)


@pytest.fixture
def two_images(tmp_path) -> list[Path]:
    return [make_image(tmp_path / "in" / "a.png", seed=1), make_image(tmp_path / "in" / "b.jpg", seed=2)]


# --------------------------------------------------------------------------
# 1. End to end


def test_protect_writes_pngs_within_epsilon_with_metadata(capsys, tmp_path, two_images):
    before = {p: sha(p) for p in two_images}
    out_dir = tmp_path / "out"

    code, out, err = protect(capsys, *two_images, "-o", out_dir, "--epsilon", 4)

    assert code == 0, err
    assert "2 protected" in out
    assert files_under(out_dir) == {"a.png", "b.png"}
    for source in two_images:
        output = out_dir / (source.stem + ".png")
        with Image.open(output) as img:
            assert img.format == "PNG" and img.mode == "RGB" and img.size == PROCESSED
        difference = np.abs(pixels(output) - resized(source))
        assert difference.max() <= 4
        assert difference.max() > 0
        text = png_text(output)
        assert text["mist:version"] == mist.__version__
        assert text["mist:model"] == "tiny-random"
        assert "NO protection" in text["mist:warning"]
        assert text["mist:source"] == source.name
        recorded = settings(output)
        assert recorded["epsilon"] == 4 and recorded["steps"] == 2 and recorded["input_size"] == 64
        assert recorded["mode"] == "fused" and recorded["seed"] == 23
        for value in text.values():
            assert str(tmp_path) not in value and tmp_path.name not in value
    assert {p: sha(p) for p in two_images} == before


# --------------------------------------------------------------------------
# 2. Reproducibility


def test_same_seed_gives_identical_bytes_other_seed_other_pixels(capsys, tmp_path, two_images):
    source = two_images[0]
    assert protect(capsys, source, "-o", tmp_path / "one")[0] == 0
    assert protect(capsys, source, "-o", tmp_path / "two")[0] == 0
    assert protect(capsys, source, "-o", tmp_path / "other", "--seed", 24)[0] == 0

    assert (tmp_path / "one" / "a.png").read_bytes() == (tmp_path / "two" / "a.png").read_bytes()
    assert not np.array_equal(pixels(tmp_path / "one" / "a.png"), pixels(tmp_path / "other" / "a.png"))


# --------------------------------------------------------------------------
# 3. Resuming and overwriting


@pytest.fixture
def finished(capsys, tmp_path, two_images) -> Path:
    out_dir = tmp_path / "out"
    assert protect(capsys, *two_images, "-o", out_dir)[0] == 0
    return out_dir


def test_rerun_skips_finished_outputs_without_loading_the_model(capsys, tmp_path, two_images, finished):
    before = mtimes(finished)

    code, out, err = protect(capsys, *two_images, "-o", finished)

    assert code == 0, err
    assert len(lines_with(out, "skipped")) >= 2
    assert "0 protected, 2 skipped, 0 failed" in out
    assert "loading model" not in out
    assert mtimes(finished) == before


def test_rerun_redoes_only_a_deleted_output(capsys, tmp_path, two_images, finished):
    a, b = two_images
    kept = mtimes(finished)[finished / "a.png"]
    (finished / "b.png").unlink()

    code, out, err = protect(capsys, *two_images, "-o", finished)

    assert code == 0, err
    assert "1 protected, 1 skipped" in out
    assert lines_with(out, f"protected {b}") and not lines_with(out, f"protected {a}")
    assert (finished / "b.png").is_file()
    assert (finished / "a.png").stat().st_mtime_ns == kept


def test_changed_settings_refuse_outputs_unless_overwrite(capsys, tmp_path, two_images, finished):
    outputs = [finished / "a.png", finished / "b.png"]
    before = {p: sha(p) for p in outputs}

    code, out, err = protect(capsys, *two_images, "-o", finished, "--epsilon", 3)

    assert code == 1
    for output in outputs:
        assert len(lines_with(err, output)) == 1
        assert "--overwrite" in lines_with(err, output)[0]
    assert {p: sha(p) for p in outputs} == before

    code, out, err = protect(capsys, *two_images, "-o", finished, "--epsilon", 3, "--overwrite")

    assert code == 0, err
    for output in outputs:
        assert sha(output) != before[output]
        assert settings(output)["epsilon"] == 3


@pytest.mark.parametrize("foreign", [b"my own notes, not an image", None], ids=["text-file", "plain-png"])
def test_a_non_mist_file_at_the_output_path_is_kept_unless_overwrite(capsys, tmp_path, two_images, foreign):
    out_dir = tmp_path / "out"
    output = out_dir / "a.png"
    if foreign is None:
        make_image(output, seed=9)
    else:
        output.parent.mkdir()
        output.write_bytes(foreign)
    before = sha(output)

    code, out, err = protect(capsys, two_images[0], "-o", out_dir)

    assert code == 1
    assert len(lines_with(err, output)) == 1
    assert "--overwrite" in lines_with(err, output)[0]
    assert sha(output) == before

    code, out, err = protect(capsys, two_images[0], "-o", out_dir, "--overwrite")

    assert code == 0, err
    assert png_text(output)["mist:source"] == "a.png"


# --------------------------------------------------------------------------
# 4. Folders and file names


@pytest.fixture
def folder(tmp_path) -> Path:
    art = tmp_path / "art"
    make_image(art / "a.png", seed=1)
    make_image(art / "b.jpg", seed=2)
    make_image(art / ".hidden.png", seed=3)
    make_image(art / "sub" / "c.png", seed=4)
    (art / "notes.txt").write_text("not an image")
    return art


def test_folder_protects_its_images_only(capsys, tmp_path, folder):
    code, out, err = protect(capsys, folder, "-o", tmp_path / "out")

    assert code == 0, err
    assert files_under(tmp_path / "out") == {"a.png", "b.png"}


def test_recursive_folder_mirrors_sub_folders(capsys, tmp_path, folder):
    code, out, err = protect(capsys, folder, "-o", tmp_path / "out", "-r")

    assert code == 0, err
    assert files_under(tmp_path / "out") == {"a.png", "b.png", "sub/c.png"}
    assert png_text(tmp_path / "out" / "sub" / "c.png")["mist:source"] == "c.png"


def test_clashing_names_get_distinct_outputs(capsys, tmp_path):
    art = tmp_path / "art"
    make_image(art / "a.png", seed=1)
    make_image(art / "a.jpg", seed=2)

    code, out, err = protect(capsys, art, "-o", tmp_path / "out")

    assert code == 0, err
    assert files_under(tmp_path / "out") == {"a_png.png", "a_jpg.png"}
    assert png_text(tmp_path / "out" / "a_png.png")["mist:source"] == "a.png"
    assert png_text(tmp_path / "out" / "a_jpg.png")["mist:source"] == "a.jpg"


def test_same_name_in_two_folders_gets_distinct_outputs(capsys, tmp_path):
    make_image(tmp_path / "d1" / "a.png", seed=1)
    make_image(tmp_path / "d2" / "a.png", seed=2)

    code, out, err = protect(capsys, tmp_path / "d1", tmp_path / "d2", "-o", tmp_path / "out")

    assert code == 0, err
    assert len(files_under(tmp_path / "out")) == 2


def test_recursive_rerun_with_outdir_inside_the_folder_skips_everything(capsys, tmp_path):
    art = tmp_path / "art"
    make_image(art / "a.png")
    assert protect(capsys, art, "-o", art / "protected", "-r")[0] == 0

    code, out, err = protect(capsys, art, "-o", art / "protected", "-r")

    assert code == 0, err
    assert "0 protected" in out
    assert files_under(art) == {"a.png", "protected/a.png"}


def test_unicode_and_spaces_in_file_names(capsys, tmp_path):
    source = make_image(tmp_path / "in" / "été peinture 01.png")

    code, out, err = protect(capsys, source, "-o", tmp_path / "out")

    assert code == 0, err
    output = tmp_path / "out" / "été peinture 01.png"
    assert png_text(output)["mist:source"] == "été peinture 01.png"
    assert Image.open(output).size == PROCESSED


# --------------------------------------------------------------------------
# 5. Bad files in a batch


def _write_truncated_png(path: Path) -> Path:
    make_image(path, size=(120, 90), seed=5)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    return path


def _write_rotated_jpeg(path: Path) -> Path:
    """A 40 x 20 (stored) JPEG whose EXIF orientation 6 shows it as 20 x 40."""
    exif = Image.Exif()
    exif[0x0112] = 6
    return make_image(path, size=(40, 20), seed=6, exif=exif, quality=95)


def test_batch_keeps_going_past_bad_files(capsys, tmp_path):
    art = tmp_path / "art"
    good = [
        make_image(art / "good.png", seed=1),
        make_image(art / "gray.png", seed=2, mode="L"),
        make_image(art / "rgba.png", seed=3, mode="RGBA"),
        make_image(art / "palette.png", seed=4, mode="P"),
        make_image(art / "deep.png", seed=5, mode="I;16"),
        make_image(art / "cmyk.jpg", seed=6, mode="CMYK"),
        _write_rotated_jpeg(art / "rotated.jpg"),
        make_image(art / "tiny.png", size=(4, 4)),  # upscaled, as v1.2 did
    ]
    assert Image.open(art / "deep.png").mode.startswith("I;16")
    (art / "text.png").write_text("this is not a PNG")
    bad = [
        art / "text.png",
        _write_truncated_png(art / "truncated.png"),
        art / "empty.jpg",
        tmp_path / "missing.png",
    ]
    (art / "empty.jpg").write_bytes(b"")

    code, out, err = protect(capsys, art, tmp_path / "missing.png", "-o", tmp_path / "out")

    assert code == 1
    assert files_under(tmp_path / "out") == {p.stem + ".png" for p in good}
    for path in good:
        assert Image.open(tmp_path / "out" / (path.stem + ".png")).size == PROCESSED
    for path in bad:
        assert len(lines_with(err, path)) == 1, (path, err)
    assert f"{len(good)} protected, 0 skipped, {len(bad)} failed" in out


def test_exif_rotation_is_applied_with_no_resize(capsys, tmp_path):
    source = _write_rotated_jpeg(tmp_path / "rotated.jpg")

    code, out, err = protect(capsys, source, "-o", tmp_path / "out", "--no-resize", "--epsilon", 4)

    assert code == 0, err
    output = tmp_path / "out" / "rotated.png"
    assert Image.open(output).size == (64, 128)
    assert np.abs(pixels(output) - resized(source, (64, 128))).max() <= 4


# --------------------------------------------------------------------------
# 6. Invalid options


def _boom(*args, **kwargs):
    raise AssertionError("a model was loaded")


@pytest.fixture
def no_model_load(monkeypatch):
    # cli.run_protect imports `load_path` from mist.models and `build_random` from mist.models.loading at call time.
    for target in ("mist.models.loading.build_random", "mist.models.loading.load_path",
                   "mist.models.build_random", "mist.models.load_path"):
        monkeypatch.setattr(target, _boom)


def test_model_load_guard_is_effective(capsys, tmp_path, no_model_load):
    source = make_image(tmp_path / "a.png")
    with pytest.raises(AssertionError, match="a model was loaded"):
        protect(capsys, source, "-o", tmp_path / "out")


@pytest.mark.parametrize("options, named", [
    (["--epsilon", "300"], r"^mist: error: --epsilon: "),
    (["--epsilon", "-1"], r"^mist: error: --epsilon: "),
    (["--steps", "-1"], r"^mist: error: --steps: "),
    (["--step-size", "0"], r"^mist: error: --step-size: "),
    (["--input-size", "100"], r"^mist: error: --input-size: 100 is not divisible by 8 x --block-num = 8"),
    (["--input-size", "64", "--block-num", "3"], r"^mist: error: --input-size: .* x --block-num = 24"),
    (["--fused-weight", "11"], r"^mist: error: --fused-weight: "),
    (["--mask", "{tmp}/missing.png"], r"^mist: error: --mask: .*missing\.png"),
    (["--target", "{tmp}/missing.png"], r"^mist: error: --target: .*missing\.png"),
    (["--device", "foo"], r"^mist: error: --device: 'foo' is not a device"),
    (["--device", "cuda:x"], r"^mist: error: --device: 'cuda:x' is not a device"),
    (["--batch-size", "0"], r"^mist: error: --batch-size: "),
], ids=["epsilon-300", "epsilon-negative", "steps-negative", "step-size-0", "input-size-100", "block-num-3",
        "fused-weight-11", "mask", "target", "device-foo", "device-cuda-x", "batch-size-0"])
def test_invalid_options_are_refused_by_their_flag_before_loading_a_model(capsys, tmp_path, no_model_load, options,
                                                                           named):
    source = make_image(tmp_path / "a.png")
    options = [o.format(tmp=tmp_path) for o in options]

    code, out, err = run_cli(capsys, "protect", source, "-o", tmp_path / "out",
                             "--model", "tiny-random", "--steps", "2", "--input-size", "64", *options)

    assert code == 2
    assert len(lines(err)) == 1, err
    assert re.search(named, err), err
    assert not re.search(r"\b(input_size|block_num|step_size|fused_weight)\b", err)
    assert not (tmp_path / "out").exists()


def test_a_field_name_inside_a_path_is_not_taken_for_a_flag(capsys, tmp_path, no_model_load):
    source = make_image(tmp_path / "a.png")
    missing = tmp_path / "block_num" / "input_size.png"

    code, out, err = run_cli(capsys, "protect", source, "-o", tmp_path / "out", *FAST, "--mask", missing)

    assert code == 2
    assert lines(err) == [f"mist: error: --mask: {missing}: no such file"]


@pytest.mark.parametrize("device, named", [("mps", "mps"), ("cuda", "cuda"), ("cuda:1", "cuda:1")])
def test_a_device_this_machine_lacks_is_refused_before_loading_a_model(capsys, tmp_path, monkeypatch, no_model_load,
                                                                       device, named):
    import torch

    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    if device == "cuda:1":  # one GPU present: its index is 0
        monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
        monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    else:
        monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    source = make_image(tmp_path / "a.png")

    code, out, err = protect(capsys, source, "-o", tmp_path / "out", "--device", device)

    assert code == 2
    assert len(lines(err)) == 1, err
    assert err.startswith(f"mist: error: --device: {named} ")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("argv", [
    ["--help"],
    ["protect", "--help"],
    ["protect", "a.png", "-o", "out", "--epsilon", "300"],
    ["protect", "a.png", "-o", "out", "--input-size", "100"],
    ["protect", "a.png", "-o", "out", "--device", "foo"],
    ["protect", "a.png", "-o", "out", "--mask", "missing.png"],
    ["legacy", "--input_size", "100"],
    ["legacy", "--mode", "3"],
], ids=["help", "protect-help", "epsilon", "input-size", "device", "mask", "legacy-input-size", "legacy-mode"])
def test_help_and_option_errors_import_no_heavy_module(tmp_path, argv):
    """Checked in a fresh interpreter: PyTorch and diffusers take seconds to import; an option error must not wait."""
    make_image(tmp_path / "a.png")
    face = "mist.faces.legacy" if argv[0] == "legacy" else "mist.faces.cli"
    script = (
        "import sys\n"
        f"from {face} import main\n"
        "try:\n    code = main(sys.argv[1:])\nexcept SystemExit as exc:\n    code = exc.code\n"
        "heavy = sorted({name.split('.')[0] for name in sys.modules} & {'torch', 'diffusers', 'transformers'})\n"
        "print('heavy:', ','.join(heavy), 'code:', code)\n"
    )
    result = subprocess.run([sys.executable, "-c", script, *argv[argv[0] == "legacy":]], cwd=tmp_path,
                            capture_output=True, text=True, timeout=300)

    assert lines(result.stdout)[-1] == f"heavy:  code: {0 if 'help' in argv[-1] else 2}", result.stderr


def test_ctrl_c_while_starting_up_gives_one_line_and_exit_130(tmp_path):
    """Ctrl-C while the heavy modules are imported (seconds on a slow machine): the import raises KeyboardInterrupt."""
    source = make_image(tmp_path / "a.png")
    script = (
        "import sys\n"
        "class CtrlC:  # Ctrl-C arrives while PyTorch is being imported\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name == 'torch':\n"
        "            raise KeyboardInterrupt\n"
        "sys.meta_path.insert(0, CtrlC())\n"
        "from mist.faces.cli import main\n"
        "sys.exit(main(sys.argv[1:]))\n"
    )
    result = subprocess.run([sys.executable, "-c", script, "protect", str(source), "-o", str(tmp_path / "out"), *FAST],
                            capture_output=True, text=True, timeout=300)

    assert result.returncode == 130
    assert lines(result.stderr) == ["mist: interrupted"]
    assert not (tmp_path / "out").exists()


# --------------------------------------------------------------------------
# 7. Masks


def test_a_mask_of_any_size_is_resized_to_the_image(capsys, tmp_path):
    """As in Mist v1.2 and every other face: the mask is resized bicubic, then red == 255 protects."""
    from mist.common.images import read_mask

    source = make_image(tmp_path / "a.png")
    values = np.zeros((50, 50, 3), dtype=np.uint8)
    values[:, :25] = 255
    mask = tmp_path / "mask.png"
    Image.fromarray(values, "RGB").save(mask)

    code, out, err = protect(capsys, source, "-o", tmp_path / "out", "--mask", mask)

    assert code == 0, err
    protected = read_mask(mask, PROCESSED)[0, 0].numpy().astype(bool)
    output, expected = pixels(tmp_path / "out" / "a.png"), resized(source)
    assert np.array_equal(output[~protected], expected[~protected])
    assert not np.array_equal(output[protected], expected[protected])


def test_mask_limits_changes_to_its_white_region(capsys, tmp_path):
    source = make_image(tmp_path / "a.png", size=(80, 60))
    values = np.zeros((60, 80, 3), dtype=np.uint8)
    values[:, :40] = 255
    mask = tmp_path / "mask.png"
    Image.fromarray(values, "RGB").save(mask)

    code, out, err = protect(capsys, source, "-o", tmp_path / "out", "--mask", mask, "--epsilon", 4)

    assert code == 0, err
    output = pixels(tmp_path / "out" / "a.png")
    expected = resized(source)
    assert np.array_equal(output[:, 32:], expected[:, 32:])
    assert not np.array_equal(output[:, :31], expected[:, :31])
    assert np.abs(output - expected).max() <= 4
    recorded = settings(tmp_path / "out" / "a.png")["mask"]
    assert recorded == {"name": "mask.png", "sha256": sha(mask)}
    assert str(tmp_path) not in json.dumps(png_text(tmp_path / "out" / "a.png"), ensure_ascii=False)


# --------------------------------------------------------------------------
# 8. No model


def test_no_model_found_explains_where_to_get_one(capsys, tmp_path, monkeypatch):
    work = tmp_path / "work"
    make_image(work / "x.png")
    (tmp_path / "hf").mkdir()
    monkeypatch.chdir(work)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf"))

    code, out, err = run_cli(capsys, "protect", "x.png", "-o", "out")

    assert code == 2
    assert "models/ldm/stable-diffusion-v1/model.ckpt" in err
    assert "wget" in err and "huggingface.co" in err
    assert not (work / "out").exists()


# --------------------------------------------------------------------------
# 9. Mist v1.2 command line (mist_v3.py)


def legacy_plan(*argv: object) -> tuple[ProtectConfig, list[Job]]:
    return mist.faces.legacy.plan(mist.faces.legacy.build_parser().parse_args([str(a) for a in argv]))


def test_legacy_defaults_are_the_originals():
    args = mist.faces.legacy.build_parser().parse_args([])
    assert (args.epsilon, args.input_size, args.block_num, args.mode, args.rate) == (16, 512, 1, 2, 1)
    assert not args.mask and not args.non_resize and args.input_dir_path is None

    config, jobs = mist.faces.legacy.plan(args)

    assert config == ProtectConfig.of(mode="fused", epsilon=16, steps=100, input_size=512, block_num=1, fused_weight=1)
    assert config.seed == 23
    assert jobs == [Job(Path("test/sample.png"), Path("outputs/images/misted_sample_16_100_512_1_2_1_0_0.png"))]


def test_the_test_model_takes_ten_steps_unless_steps_are_given(monkeypatch):
    monkeypatch.delenv("MIST_MODEL", raising=False)
    config, jobs = legacy_plan("--model", "tiny-random")
    assert config.steps == 10 and jobs[0].output.name == "misted_sample_16_10_512_1_2_1_0_0.png"
    assert legacy_plan("--model", "tiny-random", "--steps", "100")[0].steps == 100
    parser = mist.faces.cli.build_parser()
    assert mist.faces.cli.config_from_args(parser.parse_args(["protect", "a.png", "-o", "out", "--model",
                                                        "tiny-random"])).steps == 10
    assert mist.faces.cli.config_from_args(parser.parse_args(["protect", "a.png", "-o", "out"])).steps == 100
    assert mist.faces.cli.config_from_args(parser.parse_args(["protect", "a.png", "-o", "out", "--model", "tiny-random",
                                                        "-s", "3"])).steps == 3
    monkeypatch.setenv("MIST_MODEL", "tiny-random")  # the model named by the environment counts too
    assert mist.faces.cli.config_from_args(parser.parse_args(["protect", "a.png", "-o", "out"])).steps == 10


@pytest.mark.parametrize("flags", [
    ["-img", "{tmp}/x.png", "-e", "8", "-s", "5", "-in_size", "256", "-b", "2", "--mode", "1", "--rate", "2",
     "--non_resize", "--output_name", "mine"],
    ["--input_image_path", "{tmp}/x.png", "--epsilon", "8", "--steps", "5", "--input_size", "256", "--block_num", "2",
     "--mode", "1", "--rate", "2", "--non_resize", "--output_name", "mine"],
], ids=["short", "long"])
def test_legacy_flags_map_onto_the_config(tmp_path, flags):
    config, jobs = legacy_plan(*(f.format(tmp=tmp_path) for f in flags))

    assert config == ProtectConfig.of(mode="textural", epsilon=8, steps=5, input_size=256, block_num=2, fused_weight=2,
                                   keep_aspect=True)
    assert jobs == [Job(tmp_path / "x.png", Path("outputs/images/mine_8_5_256_2_1_2_0_1.png"))]


@pytest.mark.parametrize("code, mode", [(0, "semantic"), (1, "textural"), (2, "fused")])
def test_legacy_mode_codes(code, mode):
    assert legacy_plan("--mode", code)[0].params.mode == mode


def test_legacy_mode_3_is_refused(capsys):
    with pytest.raises(ValueError, match="--mode"):
        legacy_plan("--mode", 3)
    code, out, err = run_cli(capsys, "--mode", "3", main=mist.faces.legacy.main)
    assert code == 2 and "--mode" in err


def test_legacy_mask_applies_to_a_single_image(tmp_path):
    mask = make_image(tmp_path / "m.png")

    config, jobs = legacy_plan("-img", "x.png", "--mask", "--mask_path", mask)

    assert config.mask == mask
    assert jobs[0].output == Path("outputs/images/misted_sample_16_100_512_1_2_1_1_0.png")


def test_legacy_mask_is_ignored_for_a_folder_and_the_folder_name_says_so(capsys, tmp_path):
    make_image(tmp_path / "art" / "a.png")

    config, jobs = legacy_plan("-inp", tmp_path / "art", "--output_dir", "set", "--mask", "--mask_path", "nowhere.png")

    assert config.mask is None
    assert "Alert" in capsys.readouterr().err
    assert [j.output for j in jobs] == [Path("outputs/dirs/set_16_100_512_1_2_1_0_0/a.png")]  # _0_: no mask applied


def test_legacy_folder_reads_every_image_type_and_names_each_file_it_skips(capsys, tmp_path):
    art = tmp_path / "art"
    images = ("a.png", "b.jpg", "c.jpeg", "d.webp", "e.bmp", "f.tif", "g.tiff", "h.gif", "i.PNG")
    for name in images:
        make_image(art / name)
    skipped = {"notes.txt": "not an image type", ".hidden.png": "hidden", "sub": "a folder", "a.psd": "not an image"}
    (art / "notes.txt").write_text("x")
    make_image(art / ".hidden.png")
    make_image(art / "sub" / "c.png")
    (art / "a.psd").write_bytes(b"8BPS")
    capsys.readouterr()

    config, jobs = legacy_plan("--input_dir_path", art, "--output_dir", "set")

    folder = Path("outputs/dirs/set_16_100_512_1_2_1_0_0")
    assert [(j.source, j.output) for j in jobs] == [(art / n, folder / (Path(n).stem + ".png")) for n in images]
    err = capsys.readouterr().err
    assert len(lines(err)) == len(skipped), err
    for name, reason in skipped.items():
        [line] = lines_with(err, art / name)
        assert line.startswith(f"skipped {art / name}: ") and reason in line


@pytest.mark.parametrize("flags, named", [
    (["--input_size", "100"], r"^mist_v3\.py: error: --input_size: 100 is not divisible by 8 x --block_num = 8"),
    (["-in_size", "64", "-b", "3"], r"^mist_v3\.py: error: --input_size: .* x --block_num = 24"),
    (["--epsilon", "300"], r"^mist_v3\.py: error: --epsilon: "),
    (["--steps", "-1"], r"^mist_v3\.py: error: --steps: "),
    (["--rate", "20"], r"^mist_v3\.py: error: --rate: "),
    (["--block_num", "0"], r"^mist_v3\.py: error: --block_num: "),
    (["--mask", "--mask_path", "{tmp}/missing.png"], r"^mist_v3\.py: error: --mask_path: .*missing\.png"),
    (["--device", "foo"], r"^mist_v3\.py: error: --device: 'foo' is not a device"),
], ids=["input-size", "block-num-3", "epsilon", "steps", "rate", "block-num-0", "mask-path", "device"])
def test_legacy_option_errors_name_the_legacy_flags(capsys, tmp_path, no_model_load, flags, named):
    source = make_image(tmp_path / "x.png")

    code, out, err = run_cli(capsys, "-img", source, "--model", "tiny-random",
                             *(f.format(tmp=tmp_path) for f in flags), main=mist.faces.legacy.main)

    assert code == 2
    assert len(lines(err)) == 1, err
    assert re.search(named, err), err
    assert "fused_weight" not in err and "keep_aspect" not in err


def test_mist_v3_script_writes_where_the_original_did(tmp_path):
    make_image(tmp_path / "in" / "a.jpg", seed=1)
    env = {**os.environ, "MIST_MODEL": "tiny-random"}

    result = subprocess.run(
        [sys.executable, str(REPO / "mist_v3.py"), "--input_dir_path", "in", "--output_dir", "set",
         "--steps", "1", "--input_size", "64"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120,
    )

    assert result.returncode == 0, result.stderr
    folder = tmp_path / "outputs" / "dirs" / "set_16_1_64_1_2_1_0_0"
    assert files_under(folder) == {"a.png"}
    assert Image.open(folder / "a.png").size == PROCESSED


# --------------------------------------------------------------------------
# 10. --then, and an SSH hang-up (SIGHUP) in the middle of a batch


def test_a_failing_then_command_makes_mist_fail_and_says_so(capsys, tmp_path, two_images, finished):
    code, out, err = protect(capsys, *two_images, "-o", finished, "--then", "exit 7")

    assert "0 protected, 2 skipped, 0 failed" in out and "running: exit 7" in out
    assert code == mist.faces.cli.EXIT_THEN_FAILED
    assert lines_with(err, "--then") == ["mist: error: the --then command failed with exit code 7: exit 7"]


def _unreadable_mask(tmp_path: Path) -> list[object]:
    (tmp_path / "mask.png").write_text("not an image")
    return ["--mask", tmp_path / "mask.png"]


@pytest.mark.parametrize("failure", [
    lambda tmp_path: ["--model", tmp_path / "nowhere.ckpt"],
    _unreadable_mask,
    lambda tmp_path: ["--no-images"],
], ids=["model-missing", "mask-unreadable", "no-images"])
@pytest.mark.parametrize("always", [True, False], ids=["then-always", "then"])
def test_then_always_runs_also_when_the_run_fails_before_the_batch(capsys, tmp_path, failure, always):
    source = make_image(tmp_path / "in" / "a.png")
    options = failure(tmp_path)
    if options == ["--no-images"]:
        source, options = tmp_path / "empty", []
        source.mkdir()
    marker = tmp_path / "then-ran"

    code, out, err = run_cli(capsys, "protect", source, "-o", tmp_path / "out", *FAST, *options,
                             "--then", f"touch '{marker}'", *(["--then-always"] if always else []))

    assert code == 2
    assert len(lines_with(err, "mist: error: ")) == 1, err
    assert marker.exists() == always
    assert bool(lines_with(err, "not running --then")) != always
    assert not (tmp_path / "out" / "a.png").exists()


# A `mist protect` run in a child process that waits, once b.png's first PGD step is done, until a signal stops it:
# the test hangs up while an image is being computed and another one is finished, without depending on timing.
WAIT_IN_B = """
import sys, time
import mist.faces.reporting
from mist.faces.cli import main

step = mist.faces.reporting.ConsoleReporter.step

def step_then_wait(self, jobs, progress):
    step(self, jobs, progress)
    if jobs[0].source.name == "b.png":
        print("b.png is being protected", flush=True)
        if "--continue-on-input" in sys.argv:  # the nohup test tells it to go on
            sys.stdin.readline()
            return
        while True:  # a loop of short waits: the signal handler runs between any two of them
            time.sleep(0.1)

mist.faces.reporting.ConsoleReporter.step = step_then_wait
sys.exit(main([arg for arg in sys.argv[1:] if arg != "--continue-on-input"]))
"""


def _start_batch(tmp_path: Path, *extra: object, **popen) -> subprocess.Popen:
    make_image(tmp_path / "a.png", seed=1)
    make_image(tmp_path / "b.png", seed=2)
    env = {key: value for key, value in os.environ.items() if key != "MIST_MODEL"}
    return subprocess.Popen(
        [sys.executable, "-c", WAIT_IN_B, "protect", "a.png", "b.png", "-o", "out", *FAST, *map(str, extra)],
        cwd=tmp_path, env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        **popen)


def _wait_for(stream, needle: str) -> str:
    """Lines of `stream` up to and including the first one holding `needle` (fails at end of output)."""
    seen = []
    for line in stream:
        seen.append(line)
        if needle in line:
            return "".join(seen)
    raise AssertionError(f"{needle!r} never came; output was: {''.join(seen)}")


def _assert_a_kept_b_not_started(out_dir: Path) -> None:
    assert files_under(out_dir) == {"a.png"}  # no b.png, no temporary file
    assert png_text(out_dir / "a.png")["mist:source"] == "a.png"


@pytest.mark.parametrize("always", [True, False], ids=["then-always", "then"])
def test_a_hang_up_stops_the_batch_like_ctrl_c_and_keeps_finished_outputs(tmp_path, always):
    marker = tmp_path / "then-ran"
    child = _start_batch(tmp_path, "--then", f"touch '{marker}'", *(["--then-always"] if always else []))
    _wait_for(child.stdout, "b.png is being protected")

    child.send_signal(signal.SIGHUP)
    out, err = child.communicate(timeout=300)

    assert child.returncode == mist.faces.cli.EXIT_HANG_UP == 129, err
    assert lines_with(err, "finished outputs are kept") == [
        "hang-up (SIGHUP: the terminal or SSH connection closed): finished outputs are kept; run the same command "
        "again to resume"]
    assert "Traceback" not in err
    _assert_a_kept_b_not_started(tmp_path / "out")
    assert marker.exists() == always
    assert bool(lines_with(err, "not running --then")) != always


def test_a_closed_terminal_stops_the_batch_and_still_runs_then_always(tmp_path):
    """The SSH case itself: the child's terminal goes away (its pty is closed), so the kernel sends SIGHUP and every
    later write to the terminal fails; the run must still stop cleanly, keep a.png and run --then."""
    import pty

    make_image(tmp_path / "a.png", seed=1)
    make_image(tmp_path / "b.png", seed=2)
    marker = tmp_path / "then-ran"
    argv = [sys.executable, "-c", WAIT_IN_B, "protect", "a.png", "b.png", "-o", "out", *FAST,
            "--then", f"touch '{marker}'", "--then-always"]
    pid, terminal = pty.fork()
    if pid == 0:  # the child: a new session whose controlling terminal is the pty
        os.chdir(tmp_path)
        os.environ.pop("MIST_MODEL", None)
        os.execv(sys.executable, argv)
    seen = b""
    while b"b.png is being protected" not in seen:
        chunk = os.read(terminal, 4096)
        assert chunk, seen
        seen += chunk

    os.close(terminal)  # hang up
    _, status = os.waitpid(pid, 0)

    assert os.waitstatus_to_exitcode(status) == 129
    _assert_a_kept_b_not_started(tmp_path / "out")
    assert marker.exists()


def test_under_nohup_a_hang_up_is_ignored(tmp_path):
    child = _start_batch(tmp_path, "--continue-on-input",
                         preexec_fn=lambda: signal.signal(signal.SIGHUP, signal.SIG_IGN))  # what nohup does
    _wait_for(child.stdout, "b.png is being protected")

    child.send_signal(signal.SIGHUP)
    out, err = child.communicate("go on\n", timeout=300)

    assert child.returncode == 0, err
    assert files_under(tmp_path / "out") == {"a.png", "b.png"}


def test_mist_protect_hung_up_during_a_long_image_exits_129(tmp_path):
    """The real command, untouched: hang up once its progress shows PGD steps running."""
    make_image(tmp_path / "a.png")
    env = {key: value for key, value in os.environ.items() if key != "MIST_MODEL"}
    child = subprocess.Popen(
        [sys.executable, "-m", "mist.faces.cli", "protect", "a.png", "-o", "out", "--model", "tiny-random",
         "--input-size", "64", "--steps", "100000"],
        cwd=tmp_path, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    progress = b""
    while b"/100000" not in progress:  # the step bar shows its total once the first step is done
        chunk = os.read(child.stderr.fileno(), 4096)
        assert chunk, progress
        progress += chunk

    child.send_signal(signal.SIGHUP)
    _, err = child.communicate(timeout=300)

    assert child.returncode == 129
    assert b"hang-up (SIGHUP" in err and b"Traceback" not in err
    assert not (tmp_path / "out" / "a.png").exists()


# --------------------------------------------------------------------------
# 11. Version and help


def test_version(capsys):
    code, out, err = run_cli(capsys, "--version")
    assert code == 0
    assert mist.__version__ in out


def test_protect_help_lists_the_options(capsys):
    code, out, err = run_cli(capsys, "protect", "--help")
    assert code == 0
    for option in ("--output", "--recursive", "--overwrite", "--mode", "--epsilon", "--steps", "--input-size",
                   "--block-num", "--mask", "--no-resize", "--target", "--seed", "--model", "--device"):
        assert option in out, option
