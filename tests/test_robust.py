"""Robust protection: the random transforms, the expectation-over-transformation loss wrapper, the BlurGuard-style
shaping, their settings and flags, and a run end to end on the tiny model."""

from __future__ import annotations

import io
import json
import re

import numpy as np
import pytest
import torch
from PIL import Image

from mist.common import images
from mist.faces.cli import build_parser, config_from_args, main
from mist.engine.config import ProtectConfig
from mist.engine.methods import LossTerms
from mist.engine.pipeline import Protector
from mist.engine.robust import (DEFAULT_TRANSFORMS, TRANSFORMS, UPSCALE_NOISE_STD, _APPLY, jpeg_approx, robust_loss,
                                transform_functions)
from mist.engine.shaping import CELL, SIGMAS, shape_blur, shaped_perturbation
from mist.models import DEFAULT_PARTS
from mist.models.loading import build_random
from mist.runner.jobs import ModelCache

RANDOM_TRANSFORMS = [name for name in TRANSFORMS if name != "vae"]  # the VAE round trip draws nothing


@pytest.fixture(scope="module")
def vae_model():
    """The tiny random model with its VAE decoder, which the `vae` transform runs through."""
    return build_random(parts=DEFAULT_PARTS | {"decoder"})


def _image(painting, size: int = 64) -> torch.Tensor:
    """The painting at size x size with some fine texture added (the stand-in painting, when ../shared is missing,
    is a smooth ramp that a blur hardly changes)."""
    x = images.image_to_tensor(painting.resize((size, size), Image.Resampling.BICUBIC), (size, size))
    texture = torch.rand(x.shape, generator=torch.Generator().manual_seed(size)) - 0.5
    return (x * 0.8 + texture * 0.3).clamp(-1, 1)


# --------------------------------------------------------------------------- transforms


@pytest.mark.parametrize("name", TRANSFORMS)
def test_a_transform_is_differentiable_keeps_shape_and_range_and_changes_the_image(name, painting, vae_model):
    x = _image(painting).requires_grad_(True)
    y = transform_functions(vae_model)[name](x, torch.Generator().manual_seed(3))
    (gradient,) = torch.autograd.grad((y * torch.linspace(-1, 1, y.numel()).view_as(y)).sum(), x)
    assert y.shape == x.shape and y.dtype == x.dtype
    assert -1 <= y.min().item() and y.max().item() <= 1
    assert torch.isfinite(gradient).all() and gradient.abs().sum() > 0
    assert (y - x).abs().mean() > 1e-3  # it does transform


@pytest.mark.parametrize("name", RANDOM_TRANSFORMS)
def test_a_transform_is_reproducible_from_its_generator(name, painting):
    x = _image(painting)
    first = _APPLY[name](x, torch.Generator().manual_seed(5))
    again = _APPLY[name](x, torch.Generator().manual_seed(5))
    other = _APPLY[name](x, torch.Generator().manual_seed(6))
    assert torch.equal(first, again)
    assert not torch.equal(first, other)


def test_the_vae_transform_is_the_models_round_trip_of_the_posterior_mean_and_draws_nothing(painting, vae_model):
    x = _image(painting)
    generator = torch.Generator().manual_seed(4)
    state = generator.get_state()
    y = transform_functions(vae_model)["vae"](x, generator)
    with torch.no_grad():
        mean, _ = vae_model.posterior(x)
        expected = vae_model.decode(mean * vae_model.arch.latent_scale).clamp(-1, 1)
    assert torch.equal(y, expected)
    assert torch.equal(generator.get_state(), state)
    assert torch.equal(transform_functions(vae_model)["vae"](x, torch.Generator().manual_seed(9)), y)


def test_the_vae_transform_is_offered_only_with_a_decoder(tiny_model, vae_model):
    assert "vae" not in transform_functions(None) and "vae" not in transform_functions(tiny_model)
    assert set(transform_functions(vae_model)) == set(TRANSFORMS)
    with pytest.raises(ValueError, match=r"^robust: vae needs the model's VAE decoder, which this model was loaded "):
        robust_loss(_toy_loss, ("jpeg", "vae"), 1, [torch.Generator()], tiny_model)


def test_the_upscale_stand_in_adds_noise_in_its_range_then_smooths_it_away_in_the_documented_order(painting):
    x = _image(painting)
    got = _APPLY["upscale"](x, torch.Generator().manual_seed(7))
    generator = torch.Generator().manual_seed(7)
    std = UPSCALE_NOISE_STD[0] + (UPSCALE_NOISE_STD[1] - UPSCALE_NOISE_STD[0]) * torch.rand((), generator=generator)
    noisy = (x + std * torch.randn(tuple(x.shape), generator=generator)).clamp(-1, 1)
    small = torch.nn.functional.interpolate(noisy, size=(32, 32), mode="bicubic", antialias=True, align_corners=False)
    expected = torch.nn.functional.interpolate(small, size=(64, 64), mode="bicubic", align_corners=False).clamp(-1, 1)
    assert torch.allclose(got, expected, atol=1e-6)
    assert 0.1 <= std <= 0.2  # 0.05 to 0.1 of the 0..1 range
    # the smoothing removes most of the noise: the result is nearer the smoothed clean image than the noisy one is
    smooth = torch.nn.functional.interpolate(
        torch.nn.functional.interpolate(x, size=(32, 32), mode="bicubic", antialias=True, align_corners=False),
        size=(64, 64), mode="bicubic", align_corners=False).clamp(-1, 1)
    assert (got - smooth).abs().mean() < 0.5 * (noisy - x).abs().mean()


@pytest.mark.parametrize("quality", [50, 75, 95])
def test_the_jpeg_approximation_is_close_to_pillows_jpeg(painting, quality):
    picture = images.tensor_to_image(_image(painting))
    buffer = io.BytesIO()
    picture.save(buffer, "JPEG", quality=quality)
    real = images.image_to_tensor(Image.open(buffer).convert("RGB"), picture.size)
    x = images.image_to_tensor(picture, picture.size)
    approx = jpeg_approx(x, quality)
    # far closer to the real codec's output than to the input (on this project's machine about 5x at q75)
    assert (approx - real).abs().mean() < 0.4 * (real - x).abs().mean()


def test_the_jpeg_approximation_is_nearly_the_identity_at_quality_100_on_grey():
    x = images.image_to_tensor(Image.effect_noise((48, 40), 40).convert("RGB"), (48, 40))  # odd size: padded
    assert (jpeg_approx(x, 100) - x).abs().max() < 2 / 127.5  # under 2 levels
    assert (jpeg_approx(x, 50) - x).abs().mean() > 4 * (jpeg_approx(x, 100) - x).abs().mean()


# --------------------------------------------------------------------------- the wrapper


def _toy_loss(x: torch.Tensor, generators) -> LossTerms:
    """A loss that also draws from the caller's generators, as a method's loss does."""
    shift = torch.cat([torch.rand(1, generator=g) for g in generators]).to(x)
    mean = x.flatten(1).mean(1)
    return LossTerms(mean + shift, {"mean": mean, "square": (x**2).flatten(1).mean(1)})


def test_the_wrapper_averages_the_objective_and_every_term_over_its_draws(painting):
    x = torch.cat([_image(painting), -_image(painting).flip(-1)])
    transforms, samples = ("jpeg", "noise", "crop"), 3
    wrapped = robust_loss(_toy_loss, transforms, samples, [torch.Generator().manual_seed(s) for s in (1, 2)])
    got = wrapped(x, [torch.Generator().manual_seed(s) for s in (10, 20)])

    streams = [torch.Generator().manual_seed(s) for s in (1, 2)]
    generators = [torch.Generator().manual_seed(s) for s in (10, 20)]
    draws = []
    for _ in range(samples):  # the documented order: per sample, per image: the transform, then its parameters
        rows = []
        for row, stream in enumerate(streams):
            name = transforms[int(torch.randint(len(transforms), (), generator=stream))]
            rows.append(_APPLY[name](x[row : row + 1], stream))
        draws.append(_toy_loss(torch.cat(rows), generators))
    assert torch.allclose(got.objective, sum(d.objective for d in draws) / samples, rtol=1e-6, atol=0)
    for name in ("mean", "square"):
        assert torch.allclose(got.terms[name], sum(d.terms[name] for d in draws) / samples, rtol=1e-6, atol=0)
    assert not torch.allclose(got.terms["mean"], _toy_loss(x, generators).terms["mean"])


def test_the_wrapper_passes_gradients_to_the_image(painting, vae_model):
    x = _image(painting).requires_grad_(True)
    wrapped = robust_loss(_toy_loss, TRANSFORMS, 4, [torch.Generator().manual_seed(0)], vae_model)
    (gradient,) = torch.autograd.grad(wrapped(x, [torch.Generator()]).terms["square"].sum(), x)
    assert torch.isfinite(gradient).all() and gradient.abs().sum() > 0


# --------------------------------------------------------------------------- shaping


def test_shaping_keeps_the_budget_the_mask_and_the_range(painting):
    clean = _image(painting, 128)
    radius = 16 / 127.5
    delta = (torch.rand(clean.shape, generator=torch.Generator().manual_seed(0)) * 2 - 1) * radius
    mask = torch.zeros(1, 1, 128, 128)
    mask[..., 20:100, 30:90] = 1
    out = shape_blur(clean, (clean + delta).clamp(-1, 1), radius, mask)
    change = out - clean
    assert change.abs().max() <= radius + 1e-6
    assert change[(mask == 0).expand_as(change)].abs().max() == 0
    assert change[(mask == 1).expand_as(change)].abs().max() > radius / 2  # the amplitude is kept, not blurred away
    assert -1 <= out.min() and out.max() <= 1


def test_shaping_blurs_flat_regions_more_than_textured_ones():
    textured = torch.rand(1, 3, CELL, CELL, generator=torch.Generator().manual_seed(1)) * 1.6 - 0.8
    ramp = torch.linspace(-0.5, 0.5, CELL).view(1, 1, 1, CELL).expand(1, 3, CELL, CELL)
    clean = torch.cat([textured, ramp], dim=-1)  # left cell textured, right cell smooth
    delta = torch.sign(torch.randn(clean.shape, generator=torch.Generator().manual_seed(2))) * 16 / 127.5
    _, sigmas = shaped_perturbation(clean, delta, 16 / 127.5)
    assert sigmas.shape == (1, 1, 2)
    assert sigmas[0, 0, 0] == SIGMAS[0] and sigmas[0, 0, 1] > SIGMAS[0]


def test_a_protector_with_shape_blur_keeps_epsilon_and_the_mask(tiny_model, painting, tmp_path):
    mask = Image.new("RGB", (96, 96), "black")
    mask.paste((255, 255, 255), (0, 0, 48, 96))
    mask.save(tmp_path / "mask.png")
    config = ProtectConfig.of(steps=2, input_size=64, precision="fp32", epsilon=8, shape="blur",
                              mask=tmp_path / "mask.png")
    plain = Protector(tiny_model, config.but(shape=None)).protect(painting).image
    shaped = Protector(tiny_model, config).protect(painting).image
    clean = np.asarray(painting.resize((64, 64), Image.Resampling.BICUBIC)).astype(int)
    change = np.asarray(shaped).astype(int) - clean
    assert np.abs(change).max() <= 8
    assert np.abs(change[:, 32:]).max() == 0
    assert shaped.tobytes() != plain.tobytes()


# --------------------------------------------------------------------------- settings, flags, pipeline


def test_robust_settings_are_validated_with_the_setting_named():
    with pytest.raises(ValueError, match=r"^robust: unknown transform 'gzip' \(choose from jpeg, resize, blur, crop, "
                                         r"noise, upscale, vae\)$"):
        ProtectConfig(robust=("jpeg", "gzip"))
    with pytest.raises(ValueError, match=r"^robust: a transform is named twice"):
        ProtectConfig(robust="jpeg,jpeg")
    with pytest.raises(ValueError, match=r"^eot_samples: must be a whole number >= 1"):
        ProtectConfig(robust="jpeg", eot_samples=0)
    with pytest.raises(ValueError, match=r"^eot_samples: needs robust transforms to average over \(e\.g\. "):
        ProtectConfig(eot_samples=2)
    with pytest.raises(ValueError, match=r"^shape: must be one of blur"):
        ProtectConfig(shape="sharpen")
    assert ProtectConfig(robust="jpeg, resize").robust == ("jpeg", "resize")


def test_the_settings_record_robust_runs_and_stay_as_before_without_them():
    plain = json.loads(ProtectConfig().to_json())
    assert not {"robust", "eot_samples", "shape"} & set(plain)  # outputs written before these settings still resume
    robust = json.loads(ProtectConfig(robust="jpeg,blur", eot_samples=2).to_json())
    assert (robust["robust"], robust["eot_samples"], robust["shape"]) == (["jpeg", "blur"], 2, None)
    assert json.loads(ProtectConfig(shape="blur").to_json())["shape"] == "blur"


@pytest.mark.parametrize("flags, expected", [
    ([], ((), 1, None)),
    (["--robust"], (DEFAULT_TRANSFORMS, 1, None)),
    (["--robust", "noise,crop", "--eot-samples", "3"], (("noise", "crop"), 3, None)),
    (["--robust=jpeg", "--shape", "blur"], (("jpeg",), 1, "blur")),
], ids=["off", "bare", "list", "with-shape"])
def test_the_flags_reach_the_config(flags, expected):
    args = build_parser().parse_args(["protect", "a.png", "-o", "out", *flags])
    config = config_from_args(args)
    assert (config.robust, config.eot_samples, config.shape) == expected


@pytest.mark.parametrize("flags, message", [
    (["--robust", "jpeg,gzip"], r"^mist: error: --robust: unknown transform 'gzip' \(choose from jpeg, "),
    (["--robust", "--eot-samples", "0"], r"^mist: error: --eot-samples: must be a whole number >= 1"),
    (["--eot-samples", "2"], r"^mist: error: --eot-samples: needs robust transforms "),
], ids=["unknown", "zero-samples", "samples-without-robust"])
def test_bad_robust_flags_give_one_line_naming_the_flag(capsys, tmp_path, flags, message):
    Image.new("RGB", (8, 8)).save(tmp_path / "a.png")
    code = main(["protect", str(tmp_path / "a.png"), "-o", str(tmp_path / "out"), "--model", "tiny-random", *flags])
    err = capsys.readouterr().err
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    assert re.search(message, err), err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("path", ["a.png", "art/a.png"])
def test_a_path_taken_for_the_robust_list_is_named_with_the_fix(capsys, tmp_path, monkeypatch, path):
    """`--robust` takes an optional list, so the path after a bare one would be read as that list."""
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as stop:
        main(["protect", "--robust", path, "-o", "out", "--model", "tiny-random"])
    err = capsys.readouterr().err
    assert stop.value.code == 2
    assert f"argument --robust: '{path}' is a path, not a transform" in err
    assert f"--robust {','.join(DEFAULT_TRANSFORMS)}" in err and "the following arguments are required" not in err
    assert not (tmp_path / "out").exists()


def test_robust_changes_the_result_reproducibly_and_leaves_the_attacks_stream_alone(tiny_model, painting,
                                                                                     monkeypatch):
    config = ProtectConfig.of(steps=2, input_size=32, precision="fp32", robust="jpeg,resize", eot_samples=2)
    first = Protector(tiny_model, config).protect(painting).image.tobytes()
    assert Protector(tiny_model, config).protect(painting).image.tobytes() == first
    assert Protector(tiny_model, config.but(robust=(), eot_samples=1)).protect(painting).image.tobytes() != first

    # the transforms draw from a stream of their own: the attack's generators are left as a plain run leaves them
    import mist.engine.pipeline

    def generator_states(config: ProtectConfig) -> list[torch.Tensor]:
        states = []

        def one_evaluation(x, loss, *, generators, **_):
            loss(x, generators)
            states.extend(g.get_state() for g in generators)
            return x

        monkeypatch.setattr(mist.engine.pipeline, "masked_linf_pgd", one_evaluation)
        Protector(tiny_model, config).protect(painting)
        return states

    plain = generator_states(config.but(robust=(), eot_samples=1))
    robust = generator_states(config.but(eot_samples=1))
    assert len(plain) == 1 and torch.equal(plain[0], robust[0])


def test_the_vae_decoder_is_a_needed_part_only_when_vae_is_asked_for(tiny_model):
    assert ProtectConfig(robust="jpeg,upscale").parts == {"encoder", "unet", "text_encoder"} == ProtectConfig().parts
    assert ProtectConfig(robust="jpeg,vae").parts == {"encoder", "unet", "text_encoder", "decoder"}
    assert ProtectConfig.of(method="photoguard", robust="vae").parts == {"encoder", "decoder"}
    cache = ModelCache("tiny-random", "cpu")
    assert cache.protector(ProtectConfig(robust="jpeg", precision="fp32")).model.decoder is None
    assert cache.protector(ProtectConfig(robust="vae", precision="fp32")).model.decoder is not None
    assert cache.loads == 2  # loaded again for the decoder, which the first run did not read
    with pytest.raises(ValueError, match=r"^robust: vae needs the model's VAE decoder, which this model was loaded "):
        Protector(tiny_model, ProtectConfig(robust="vae"))


def test_protect_end_to_end_with_the_vae_and_upscale_transforms(capsys, tmp_path, painting, monkeypatch):
    import mist.engine.robust

    round_trips = []
    real_vae = mist.engine.robust.vae

    def counted(x, model, precision):
        round_trips.append(model.decoder is not None)
        return real_vae(x, model, precision)

    monkeypatch.setattr(mist.engine.robust, "vae", counted)
    painting.save(tmp_path / "art.png")
    code = main(["protect", str(tmp_path / "art.png"), "-o", str(tmp_path / "out"), "--model", "tiny-random",
                 "--robust", "vae,upscale", "--eot-samples", "3", "--steps", "2", "--input-size", "32", "-q"])
    assert code == 0, capsys.readouterr().err
    with Image.open(tmp_path / "out" / "art.png") as output:
        assert json.loads(output.text["mist:settings"])["robust"] == ["vae", "upscale"]
        assert output.size == (32, 32)
    assert round_trips and all(round_trips)  # drawn, and run through the decoder the CLI loaded for it


def test_protect_end_to_end_with_robust(capsys, tmp_path, painting):
    painting.save(tmp_path / "art.png")
    code = main(["protect", str(tmp_path / "art.png"), "-o", str(tmp_path / "out"), "--model", "tiny-random",
                 "--robust", "jpeg,resize", "--eot-samples", "2", "--steps", "2", "--input-size", "32", "-q"])
    assert code == 0, capsys.readouterr().err
    with Image.open(tmp_path / "out" / "art.png") as output:
        settings = json.loads(output.text["mist:settings"])
        assert output.size == (32, 32)
    assert settings["robust"] == ["jpeg", "resize"] and settings["eot_samples"] == 2


def test_the_robustness_benchmark_marks_what_the_robust_set_trained_on_and_what_it_held_out():
    from mist.runner.evaluation.purify import parse_purifications
    from support.benchmarks import benchmark as load_benchmark

    benchmark = load_benchmark("robustness")
    purifications = parse_purifications("jpeg:75,jpeg:30,resize:0.5,blur:1,noise:8,crop:0.9,jpeg-resize:75,"
                                        "adverse:64,vae,vae:2,upscale,upscale:0.2")

    def marks(robust: str) -> dict[str, str]:
        return {p.name: benchmark.mark(p, tuple(robust.split(","))) for p in purifications}

    assert marks("jpeg,resize,blur") == {
        "jpeg:75": "trained on", "jpeg:30": "held out", "resize:0.5": "trained on", "blur:1": "trained on",
        "noise:8": "held out", "crop:0.9": "held out", "jpeg-resize:75": "parts trained on", "adverse:64": "held out",
        "vae:1": "held out", "vae:2": "held out", "upscale:0.05": "held out", "upscale:0.2": "held out"}
    with_more = marks("noise,crop,upscale,vae")
    assert with_more["vae:1"] == with_more["noise:8"] == with_more["crop:0.9"] == "trained on"
    assert with_more["upscale:0.05"] == "stand-in trained on" and with_more["vae:2"] == "held out"
    assert with_more["upscale:0.2"] == "held out"  # more noise than the stand-in draws
    assert with_more["jpeg:75"] == with_more["adverse:64"] == "held out"
