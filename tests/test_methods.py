"""The methods besides Mist v1.2 (advdm, advdm-, photoguard, sds, mist2, pid): each loss against an independent
re-computation of its paper's formula on the same tiny weights, its gradients, its batching, its parameter checks, and
one protection each through the command line."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

import mist.faces.cli
from mist.engine.methods import TileInputs, get_method, list_methods
from mist.models.components import scaled_linear_alphas_cumprod
from mist.engine.objectives import FP16_DENOISING_LOSS_SCALE, target_latent
from support.grad_spy import unet_grad_modes

NEW = ("advdm", "advdm-", "photoguard", "sds", "mist2", "pid")
# Every method with the parameters that exercise all of its terms.
VARIANTS = [("advdm", {}), ("advdm-", {}), ("photoguard", {}), ("sds", {}), ("sds", {"textural": True, "sign": "+"}),
            ("mist2", {}), ("mist2", {"fused": True}), ("pid", {}), ("pid", {"pid_loss": "add"})]


def _images(seed: int = 0, count: int = 1, size: int = 32) -> torch.Tensor:
    return torch.rand(count, 3, size, size, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def method_loss(model, name: str, params: dict | None = None, *, clean=None, target=None, target_seed: int = 0,
                count: int = 1, precision: str = "fp32"):
    """Method `name`'s loss for `count` tiles whose clean images are `clean` (N, 3, h, w; default: random) and target
    `target` (default: the method's own target image, as the pipeline tiles it at 32 x 32)."""
    from mist.common import images

    cls = get_method(name)
    method = cls(cls.Params(**(params or {})), model, precision)
    if target is None and method.target_image() is not None:
        target = images.image_to_tensor(method.target_image(), (32, 32))
    clean = _images(9, count) if clean is None else clean
    tiles = [TileInputs(clean=clean[i : i + 1], target=target, seed=lambda stream: target_seed) for i in range(count)]
    return method.prepare(tiles)


# --------------------------------------------------------------------------
# The formulas, written out independently of mist.engine.objectives


def _moments(model, x):
    """The encoder posterior's mean and log-variance (clamped as LDM does), unscaled."""
    mean, logvar = model.encoder.quant_conv(model.encoder.encoder(x)).chunk(2, dim=1)
    return mean, logvar.clamp(-30, 20)


def _noise_prediction(model, z, g, text):
    """t ~ U{0..999}, then n ~ N(0, I) from g; returns (eps_theta(z_t, t, c), n)."""
    t = torch.randint(0, 1000, (1,), generator=g)
    n = torch.randn(z.shape, generator=g)
    a = scaled_linear_alphas_cumprod()[t]
    return model.unet(a.sqrt() * z + (1 - a).sqrt() * n, t, encoder_hidden_states=text).sample, n


def _sampled_latent(model, x, g):
    mean, logvar = _moments(model, x)
    return (mean + torch.exp(0.5 * logvar) * torch.randn(mean.shape, generator=g)) * 0.18215


def _denoising_loss(model, x, text, seed):
    """AdvDM's L_sem: the posterior sample, t and n drawn in that order from one generator."""
    g = torch.Generator().manual_seed(seed)
    eps, n = _noise_prediction(model, _sampled_latent(model, x, g), g, text)
    return torch.nn.functional.mse_loss(eps, n)


def test_advdm_raises_and_advdm_minus_lowers_the_denoising_loss(tiny_model):
    x = _images(1)
    semantic = _denoising_loss(tiny_model, x, tiny_model.text_embedding("a painting"), seed=7)
    for name, sign in (("advdm", -1), ("advdm-", 1)):
        terms = method_loss(tiny_model, name)(x, [torch.Generator().manual_seed(7)])
        assert torch.allclose(terms.terms["semantic"], semantic.reshape(1), rtol=1e-5)
        assert torch.allclose(terms.objective, sign * semantic.reshape(1), rtol=1e-5), name
    photo = _denoising_loss(tiny_model, x, tiny_model.text_embedding("a photo"), seed=7)
    terms = method_loss(tiny_model, "advdm", {"object_prompt": True})(x, [torch.Generator().manual_seed(7)])
    assert torch.allclose(terms.objective, -photo.reshape(1), rtol=1e-5)


def test_photoguard_is_the_l2_distance_between_posterior_means_to_flat_grey(tiny_model, tmp_path):
    x = _images(1)
    grey = torch.full((1, 3, 32, 32), 128 / 127.5 - 1)
    expected = (_moments(tiny_model, x)[0] - _moments(tiny_model, grey)[0]).flatten().norm()
    terms = method_loss(tiny_model, "photoguard")(x, [torch.Generator().manual_seed(0)])
    assert torch.allclose(terms.objective, expected.reshape(1), rtol=1e-5)
    assert torch.allclose(terms.terms["distance"], expected.reshape(1), rtol=1e-5)
    # A given target image replaces the grey one.
    Image.new("RGB", (8, 8), (10, 200, 30)).save(tmp_path / "green.png")
    cls = get_method("photoguard")
    chosen = cls(cls.Params(target=tmp_path / "green.png"), tiny_model, "fp32").target_image()
    assert chosen.getpixel((3, 3)) == (10, 200, 30)
    assert cls(cls.Params(), tiny_model, "fp32").target_image().getcolors() == [(512 * 512, (128, 128, 128))]


@pytest.mark.parametrize("pid_loss", ["add-log", "add", "mean", "var"])
def test_pid_pushes_the_posterior_away_from_the_clean_images(tiny_model, pid_loss):
    x, clean = _images(1), _images(2)
    mean, logvar = _moments(tiny_model, x)
    clean_mean, clean_logvar = _moments(tiny_model, clean)
    mse = torch.nn.functional.mse_loss
    parts = {"mean": mse(mean, clean_mean),
             "log_variance": mse(torch.exp(logvar).log(), torch.exp(clean_logvar).log()),  # the code's var.log()
             "std": mse(torch.exp(0.5 * logvar), torch.exp(0.5 * clean_logvar))}
    chosen = {"add-log": ("mean", "log_variance"), "add": ("mean", "std"), "mean": ("mean",), "var": ("std",)}[pid_loss]
    terms = method_loss(tiny_model, "pid", {"pid_loss": pid_loss}, clean=clean)(x, [torch.Generator()])
    assert set(terms.terms) == set(chosen)
    for name in chosen:
        assert torch.allclose(terms.terms[name], parts[name].reshape(1), rtol=1e-4), name
    assert torch.allclose(terms.objective, -sum(parts[n] for n in chosen).reshape(1), rtol=1e-4)


def test_pid_is_zero_on_the_clean_image(tiny_model):
    clean = _images(2)
    terms = method_loss(tiny_model, "pid", clean=clean)(clean, [torch.Generator()])
    assert terms.objective.abs().item() == 0


@pytest.mark.parametrize("sign", ["+", "-"])
@pytest.mark.parametrize("textural", [False, True])
def test_sds_value_and_latent_gradient_are_diff_protects(tiny_model, monkeypatch, sign, textural):
    """SDS's value is the denoising loss; its latent gradient is (eps - n) itself, signed, plus SDST's textural one."""
    text = tiny_model.text_embedding("a painting")
    y = _images(3)
    target_z = target_latent(tiny_model, y, [torch.Generator().manual_seed(5)])
    semantic = _denoising_loss(tiny_model, _images(1), text, seed=4)
    latent = None
    original = tiny_model.encode

    def capture(images, generators):  # keeps the perturbed image's latent (the target's is made without a graph)
        nonlocal latent
        encoded = original(images, generators)
        if encoded.requires_grad:
            latent = encoded
            latent.retain_grad()
        return encoded

    monkeypatch.setattr(tiny_model, "encode", capture)
    x = _images(1).requires_grad_(True)
    loss = method_loss(tiny_model, "sds", {"sign": sign, "textural": textural}, target=y, target_seed=5)
    terms = loss(x, [torch.Generator().manual_seed(4)])
    direction = 1 if sign == "+" else -1
    assert torch.allclose(terms.terms["sds"], semantic.reshape(1), rtol=1e-5)
    textural_value = ((latent - target_z) ** 2).sum() if textural else 0
    weight = 5 if textural else 1
    assert torch.allclose(terms.objective, (textural_value - direction * weight * semantic).reshape(1), rtol=1e-5)
    terms.objective.sum().backward()
    g = torch.Generator().manual_seed(4)
    torch.randn(latent.shape, generator=g)  # the posterior sample's draw
    with torch.no_grad():
        eps, n = _noise_prediction(tiny_model, latent, g, text)
    expected = -direction * weight * (eps - n) + (2 * (latent - target_z) if textural else 0)
    assert torch.allclose(latent.grad, expected, rtol=1e-4, atol=1e-6)


def test_sds_runs_the_unet_without_a_graph(tiny_model, monkeypatch):
    seen = unet_grad_modes(tiny_model, monkeypatch)
    x = _images(1).requires_grad_(True)
    method_loss(tiny_model, "sds")(x, [torch.Generator()]).objective.sum().backward()
    assert seen == [False] and x.grad.abs().sum() > 0


@pytest.mark.parametrize("fused", [False, True])
def test_mist2_target_unet_loss_and_fused_mode_match_mist_v2(tiny_model, fused):
    """The posterior mean (no sample) is diffused with t then n; the prediction is pulled toward E(y), or, fused,
    sum(eps * n) - 100 * mean((z - E(y))^2) as Mist-v2's code computes it."""
    x, y = _images(1), _images(3)
    text = tiny_model.text_embedding("a painting")
    target_z = target_latent(tiny_model, y, [torch.Generator().manual_seed(5)])
    z = _moments(tiny_model, x)[0] * 0.18215
    eps, n = _noise_prediction(tiny_model, z, torch.Generator().manual_seed(6), text)
    terms = method_loss(tiny_model, "mist2", {"fused": fused}, target=y, target_seed=5)(
        x, [torch.Generator().manual_seed(6)])
    if fused:
        alignment = (eps * n).sum()
        distance = torch.nn.functional.mse_loss(z, target_z)
        assert torch.allclose(terms.terms["noise_alignment"], alignment.reshape(1), rtol=1e-4)
        assert torch.allclose(terms.terms["latent_distance"], distance.reshape(1), rtol=1e-5)
        assert torch.allclose(terms.objective, (alignment - 100 * distance).reshape(1), rtol=1e-4)
    else:
        expected = torch.nn.functional.mse_loss(eps, target_z)
        assert torch.allclose(terms.objective, expected.reshape(1), rtol=1e-5)
        assert torch.allclose(terms.terms["target_unet"], expected.reshape(1), rtol=1e-5)


@pytest.mark.parametrize("name", ["photoguard", "pid"])
def test_encoder_methods_run_no_unet_and_load_no_other_part(tiny_model, monkeypatch, name):
    def forbidden(*args, **kwargs):
        raise AssertionError("the UNet ran")

    monkeypatch.setattr(tiny_model, "denoise", forbidden)
    x = _images(1).requires_grad_(True)
    method_loss(tiny_model, name)(x, [torch.Generator()]).objective.sum().backward()
    assert x.grad.abs().sum() > 0
    assert get_method(name).parts == {"encoder"}


# --------------------------------------------------------------------------
# What every method must do


@pytest.mark.parametrize(("name", "params"), VARIANTS)
def test_gradients_reach_the_image_and_no_weight(tiny_model, name, params):
    x = _images(1).requires_grad_(True)
    terms = method_loss(tiny_model, name, params)(x, [torch.Generator().manual_seed(0)])
    assert terms.objective.shape == (1,) and all(v.shape == (1,) for v in terms.terms.values())
    terms.objective.sum().backward()
    assert x.grad.abs().sum() > 0 and torch.isfinite(x.grad).all()
    modules = (tiny_model.unet, tiny_model.encoder)
    assert all(p.grad is None and not p.requires_grad for m in modules for p in m.parameters())


@pytest.mark.parametrize(("name", "params"), VARIANTS)
def test_batched_losses_are_per_image(tiny_model, name, params):
    """Each tile's loss and gradient depend only on itself, its clean image and its generator."""
    clean = _images(9, count=2)
    x = _images(1, count=2).requires_grad_(True)
    together = method_loss(tiny_model, name, params, clean=clean, count=2)(
        x, [torch.Generator().manual_seed(3), torch.Generator().manual_seed(4)])
    (gradient,) = torch.autograd.grad(together.objective.sum(), x)
    for i, seed in enumerate((3, 4)):
        alone_x = x[i : i + 1].detach().clone().requires_grad_(True)
        alone = method_loss(tiny_model, name, params, clean=clean[i : i + 1])(
            alone_x, [torch.Generator().manual_seed(seed)])
        (alone_gradient,) = torch.autograd.grad(alone.objective.sum(), alone_x)
        for term in alone.terms:
            assert torch.allclose(together.terms[term][i], alone.terms[term][0], rtol=1e-5, atol=1e-7), (i, term)
        # The objective can be a difference of much larger terms (SDST, Mist-v2 fused): compare at their scale.
        scale = 100 * sum(value.abs() for value in alone.terms.values())[0].item()
        assert torch.allclose(together.objective[i], alone.objective[0], rtol=1e-5, atol=1e-6 * scale), i
        assert torch.allclose(gradient[i], alone_gradient[0], rtol=1e-4, atol=1e-4 * alone_gradient.abs().max())
    assert not torch.allclose(together.objective[0], together.objective[1])


def test_fp16_scales_only_objectives_that_are_a_mean_over_the_latent(tiny_model):
    expected = {("advdm", False): FP16_DENOISING_LOSS_SCALE, ("advdm-", False): FP16_DENOISING_LOSS_SCALE,
                ("photoguard", False): 1.0, ("sds", False): 1.0, ("mist2", False): FP16_DENOISING_LOSS_SCALE,
                ("mist2", True): 1.0, ("pid", False): FP16_DENOISING_LOSS_SCALE}
    for (name, fused), scale in expected.items():
        cls = get_method(name)
        params = cls.Params(fused=True) if fused else cls.Params()
        assert cls(params, tiny_model, "fp16").loss_scale() == scale, name
        assert cls(params, tiny_model, "bf16").loss_scale() == 1.0, name


def test_mist2_and_sdst_default_to_mist_v2s_target_and_take_a_given_one(tiny_model, tmp_path):
    from mist.engine.methods.common import mist_v2_target
    from mist.engine.methods.common import mist_target

    ours = mist_v2_target()
    assert ours.size == (1440, 1440) and ours.resize((64, 64)).tobytes() != mist_target().resize((64, 64)).tobytes()
    Image.new("RGB", (8, 8), (10, 200, 30)).save(tmp_path / "green.png")
    for name, params in (("mist2", {}), ("sds", {"textural": True})):
        cls = get_method(name)
        assert cls(cls.Params(**params), tiny_model, "fp32").target_image().tobytes() == ours.tobytes(), name
        given = cls(cls.Params(**params, target=tmp_path / "green.png"), tiny_model, "fp32").target_image()
        assert given.getpixel((0, 0)) == (10, 200, 30), name
    assert get_method("sds")(get_method("sds").Params(), tiny_model, "fp32").target_image() is None


def test_outputs_record_which_variant_made_them(tiny_model):
    def algorithm(name, **params):
        cls = get_method(name)
        return cls(cls.Params(**params), tiny_model, "fp32").algorithm()

    assert algorithm("sds").startswith("SDS(-) ") and algorithm("sds", sign="+", textural=True).startswith("SDS(+)T ")
    assert "target-UNet" in algorithm("mist2") and "fused" in algorithm("mist2", fused=True)
    assert algorithm("advdm").startswith("AdvDM (") and algorithm("advdm-").startswith("AdvDM(-) (")


@pytest.mark.parametrize(("name", "params", "named"), [
    ("sds", {"sign": "x"}, "sign"), ("sds", {"sds_weight": -1.0}, "sds_weight"),
    ("sds", {"target": "/no/such/file.png"}, "target"), ("pid", {"pid_loss": "kl"}, "pid_loss"),
    ("mist2", {"latent_weight": float("nan")}, "latent_weight"), ("mist2", {"fused": "yes"}, "fused"),
    ("photoguard", {"target": "/no/such/file.png"}, "target"), ("advdm", {"object_prompt": 1}, "object_prompt")])
def test_bad_parameters_are_refused_naming_them(name, params, named):
    with pytest.raises(ValueError, match=f"^{named}: "):
        get_method(name).Params(**params)


def test_every_method_is_listed_in_order_with_true_parts():
    names = [m.name for m in list_methods()]
    assert names[: len(NEW) + 1] == ["mist", *NEW]
    for method in list_methods():
        if method.name in NEW:
            assert method.parts <= {"encoder", "unet", "text_encoder"} and "encoder" in method.parts


@pytest.mark.parametrize(("name", "flags"), [("advdm", []), ("advdm-", []), ("photoguard", []),
                                             ("sds", ["--textural", "--sign", "+"]), ("mist2", ["--fused"]),
                                             ("pid", ["--pid-loss", "mean"])])
def test_protect_with_each_method_records_it(capsys, tmp_path, name, flags):
    source = tmp_path / "in.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (40, 40, 3), dtype=np.uint8)).save(source)
    code = mist.faces.cli.main(["protect", str(source), "-o", str(tmp_path / "out"), "--method", name, *flags,
                          "--model", "tiny-random", "--steps", "2", "--input-size", "32", "--precision", "fp32"])
    assert code == 0, capsys.readouterr().err
    with Image.open(tmp_path / "out" / "in.png") as output:
        output.load()
        assert output.size == (32, 32)
        assert output.text["mist:method"] == name
        settings = json.loads(output.text["mist:settings"])
    assert settings["method"] == name
    changed = np.abs(np.asarray(output, dtype=np.int16) - np.asarray(
        Image.open(source).resize((32, 32), Image.Resampling.BICUBIC), dtype=np.int16))
    assert 0 < changed.max() <= 16
