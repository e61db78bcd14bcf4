"""Mist v1.2's losses (the `mist` method) against an independent re-computation of its formulas on the same tiny
weights."""

from __future__ import annotations

import torch
from diffusers import DDPMScheduler

from mist.engine.methods import TileInputs
from mist.engine.methods.mist import Mist, MistParams
from mist.models.components import scaled_linear_alphas_cumprod
from mist.engine.objectives import target_latent
from support.grad_spy import unet_grad_modes


def test_schedule_is_sd_v1_scaled_linear():
    reference = DDPMScheduler(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012,
                              beta_schedule="scaled_linear").alphas_cumprod
    assert torch.allclose(scaled_linear_alphas_cumprod(), reference.float(), rtol=1e-6, atol=0)


def _images(seed: int = 0, count: int = 1, size: int = 32) -> torch.Tensor:
    return torch.rand(count, 3, size, size, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def mist_loss(model, mode: str, target: torch.Tensor | None = None, *, target_seed: int = 0, count: int = 1,
              fast: bool = False, object_prompt: bool = False, precision: str = "fp32"):
    """The `mist` method's loss for `count` tiles whose target image is `target`; the target's posterior sample is
    drawn from a generator seeded with `target_seed` (as `target_latent(model, target, [seed])` draws it)."""
    method = Mist(MistParams(mode=mode, fast=fast, object_prompt=object_prompt), model, precision)
    tile = TileInputs(clean=torch.zeros(1, 3, 8, 8), target=target, seed=lambda stream: target_seed)
    return method.prepare([tile] * count)


def _reference_terms(model, x, target_z, text, seed):
    """Mist v1.2's losses written out from the formulas, drawing random numbers in the engine's documented order:
    the posterior sample, then t, then the noise n."""
    g = torch.Generator().manual_seed(seed)
    moments = model.encoder.quant_conv(model.encoder.encoder(x))
    mean, logvar = moments.chunk(2, dim=1)
    z = (mean + torch.exp(0.5 * logvar.clamp(-30, 20)) * torch.randn(mean.shape, generator=g)) * 0.18215
    textural = torch.nn.functional.mse_loss(z, target_z, reduction="sum")
    t = torch.randint(0, 1000, (1,), generator=g)
    n = torch.randn(z.shape, generator=g)
    a = scaled_linear_alphas_cumprod()[t]
    eps = model.unet(a.sqrt() * z + (1 - a).sqrt() * n, t, encoder_hidden_states=text).sample
    semantic = torch.nn.functional.mse_loss(eps, n)
    return textural, semantic


def test_losses_and_fused_objective_match_the_formulas(tiny_model):
    x, y = _images(1), _images(2)
    text = tiny_model.text_embedding("a painting")
    target_z = target_latent(tiny_model, y, [torch.Generator().manual_seed(5)])
    textural, semantic = _reference_terms(tiny_model, x, target_z, text, seed=7)
    for mode, expected in (("textural", textural), ("semantic", -semantic), ("fused", textural - 1e4 * semantic)):
        terms = mist_loss(tiny_model, mode, y, target_seed=5)(x, [torch.Generator().manual_seed(7)])
        assert torch.allclose(terms.objective, expected.reshape(1), rtol=1e-5), mode
    fused = mist_loss(tiny_model, "fused", y, target_seed=5)(x, [torch.Generator().manual_seed(7)])
    assert torch.allclose(fused.terms["textural"], textural.reshape(1), rtol=1e-5)
    assert torch.allclose(fused.terms["semantic"], semantic.reshape(1), rtol=1e-5)


def test_textural_mode_skips_the_unet(tiny_model, monkeypatch):
    def forbidden(*args, **kwargs):
        raise AssertionError("the UNet ran in textural mode")

    monkeypatch.setattr(tiny_model, "denoise", forbidden)
    target_z = target_latent(tiny_model, _images(2), [torch.Generator().manual_seed(0)])
    terms = mist_loss(tiny_model, "textural", _images(2))(_images(1), [torch.Generator().manual_seed(0)])
    textural, _ = _reference_terms(tiny_model, _images(1), target_z, tiny_model.text_embedding("a painting"), seed=0)
    assert list(terms.terms) == ["textural"] and torch.allclose(terms.terms["textural"], textural.reshape(1), rtol=1e-5)


def test_one_encoder_pass_per_evaluation(tiny_model, monkeypatch):
    calls = []
    original = tiny_model.encode
    monkeypatch.setattr(tiny_model, "encode", lambda *a, **k: calls.append(1) or original(*a, **k))
    objective = mist_loss(tiny_model, "fused", _images(2))
    calls.clear()
    objective(_images(1), [torch.Generator().manual_seed(0)])
    assert len(calls) == 1


def test_semantic_and_fused_gradients_reach_the_image(tiny_model):
    for mode in ("semantic", "fused"):
        x = _images(1).requires_grad_(True)
        terms = mist_loss(tiny_model, mode, _images(2))(x, [torch.Generator().manual_seed(0)])
        (grad,) = torch.autograd.grad(terms.objective.sum(), x)
        assert grad.abs().sum() > 0 and torch.isfinite(grad).all(), mode
    # The fused gradient carries the semantic part, not only the textural one.
    x = _images(1).requires_grad_(True)
    fused = mist_loss(tiny_model, "fused", _images(2))(x, [torch.Generator().manual_seed(0)])
    (g_fused,) = torch.autograd.grad(fused.objective.sum(), x)
    x = _images(1).requires_grad_(True)
    tex = mist_loss(tiny_model, "textural", _images(2))(x, [torch.Generator().manual_seed(0)])
    (g_tex,) = torch.autograd.grad(tex.objective.sum(), x)
    assert not torch.allclose(g_fused, g_tex)


def test_no_weight_gradients_are_computed(tiny_model):
    x = _images(1).requires_grad_(True)
    terms = mist_loss(tiny_model, "fused", _images(2))(x, [torch.Generator().manual_seed(0)])
    terms.objective.sum().backward()
    modules = (tiny_model.unet, tiny_model.encoder)
    assert all(p.grad is None and not p.requires_grad for m in modules for p in m.parameters())


def test_batched_losses_are_per_image(tiny_model):
    """Each image's losses and gradient depend only on itself and its generator: a batch gives what one-by-one gives."""
    objective = mist_loss(tiny_model, "fused", _images(2), count=2)
    x = _images(1, count=2).requires_grad_(True)
    together = objective(x, [torch.Generator().manual_seed(3), torch.Generator().manual_seed(4)])
    (gradient,) = torch.autograd.grad(together.objective.sum(), x)
    for i, seed in enumerate((3, 4)):
        alone_x = x[i : i + 1].detach().clone().requires_grad_(True)
        alone = mist_loss(tiny_model, "fused", _images(2))(alone_x, [torch.Generator().manual_seed(seed)])
        (alone_gradient,) = torch.autograd.grad(alone.objective.sum(), alone_x)
        for name in ("textural", "semantic"):
            assert torch.allclose(together.terms[name][i], alone.terms[name][0], rtol=1e-5, atol=0), (i, name)
        assert torch.allclose(together.objective[i], alone.objective[0], rtol=1e-5, atol=0), i
        assert torch.allclose(gradient[i], alone_gradient[0], rtol=1e-4, atol=1e-4 * alone_gradient.abs().max())
    assert not torch.allclose(together.objective[0], together.objective[1])


def test_fast_mode_gradient_is_score_distillation(tiny_model, monkeypatch):
    """Fast mode keeps the semantic loss value and replaces its latent gradient by (2/N) sqrt(a_t) (eps - n)."""
    text = tiny_model.text_embedding("a painting")
    x = _images(1).requires_grad_(True)
    exact = mist_loss(tiny_model, "semantic")(x, [torch.Generator().manual_seed(4)])
    latent = None

    def capture(original):
        def encode(images, generators):
            nonlocal latent
            latent = original(images, generators)
            latent.retain_grad()
            return latent
        return encode

    monkeypatch.setattr(tiny_model, "encode", capture(tiny_model.encode))
    fast = mist_loss(tiny_model, "semantic", fast=True)(x, [torch.Generator().manual_seed(4)])
    assert torch.allclose(fast.terms["semantic"], exact.terms["semantic"], rtol=1e-5)
    fast.terms["semantic"].sum().backward()
    g = torch.Generator().manual_seed(4)
    torch.randn(latent.shape, generator=g)  # the posterior sample's draw
    t = torch.randint(0, 1000, (1,), generator=g)
    n = torch.randn(latent.shape, generator=g)
    a = scaled_linear_alphas_cumprod()[t]
    with torch.no_grad():
        eps = tiny_model.unet(a.sqrt() * latent + (1 - a).sqrt() * n, t, encoder_hidden_states=text).sample
    expected = 2 / latent.numel() * a.sqrt() * (eps - n)
    assert torch.allclose(latent.grad, expected, rtol=1e-4, atol=1e-9)


def test_fast_mode_runs_the_unet_without_a_graph(tiny_model, monkeypatch):
    seen = unet_grad_modes(tiny_model, monkeypatch)
    x = _images(1).requires_grad_(True)
    terms = mist_loss(tiny_model, "fused", _images(2), fast=True, object_prompt=True)(x, [torch.Generator()])
    terms.objective.sum().backward()
    assert seen == [False] and x.grad.abs().sum() > 0


def test_fp32_gradient_is_as_exact_as_float64_allows(tiny_model):
    """A float32 run keeps Mist v1.2's arithmetic: its gradient is close to the same computation in float64, also where
    activations sit far from zero (there a GroupNorm kernel that sums carelessly loses precision; PyTorch's CPU kernel
    for channels-last float32 input did)."""
    import copy

    from mist.engine.config import ProtectConfig
    from mist.engine.pipeline import Protector

    shifted = copy.deepcopy(tiny_model)
    with torch.no_grad():  # every GroupNorm after these layers sees a mean about 50 times its standard deviation
        shifted.encoder.encoder.conv_in.bias += 30.0
        shifted.unet.conv_in.bias += 30.0
    reference = copy.deepcopy(shifted)
    reference.encoder.double()
    reference.unet.double()
    model = Protector(shifted, ProtectConfig(precision="fp32")).model
    text = model.text_embedding("a painting")
    target_z = target_latent(model, _images(2, size=64), [torch.Generator().manual_seed(5)])

    x = _images(1, size=64).requires_grad_(True)
    loss = mist_loss(model, "fused", _images(2, size=64), target_seed=5)
    objective = loss(x, [torch.Generator().manual_seed(7)]).objective
    (gradient,) = torch.autograd.grad(objective.sum(), x)
    x64 = _images(1, size=64).double().requires_grad_(True)
    textural, semantic = _reference_terms(reference, x64, target_z.double(), text.double(), seed=7)
    (expected,) = torch.autograd.grad(textural - 1e4 * semantic, x64)
    error = ((gradient.double() - expected).norm() / expected.norm()).item()
    assert error < 5e-5  # 1e-5 with contiguous float32 kernels, 8e-3 with the channels-last GroupNorm
