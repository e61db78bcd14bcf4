"""Masked L-inf PGD against a step-by-step re-statement of Mist v1.2's (advertorch's) loop."""

from __future__ import annotations

import pytest
import torch

from mist.engine.attack import Cancelled, masked_linf_pgd
from mist.engine.methods import LossTerms


def _quadratic(goal: torch.Tensor):
    """A loss whose minimiser is known: squared distance to `goal`, per image."""
    def loss(x: torch.Tensor, generator: torch.Generator) -> LossTerms:
        value = (x - goal).pow(2).flatten(1).sum(1)
        return LossTerms(value, {"distance": value})
    return loss


def _reference_pgd(x, goal, radius, step, steps, seed, mask):
    """advertorch LinfPGDAttack(targeted=True) with Mist's mask: uniform start, sign steps down the loss."""
    g = torch.Generator().manual_seed(seed)
    delta = (torch.rand(x.shape, generator=g) * 2 - 1) * radius
    delta = (x + delta).clamp(-1, 1) - x
    for _ in range(steps):
        delta.requires_grad_(True)
        loss = (x + delta * mask - goal).pow(2).sum()
        (grad,) = torch.autograd.grad(loss, delta)
        delta = (delta.detach() - step * grad.sign()).clamp(-radius, radius)
        delta = (x + delta).clamp(-1, 1) - x
    return (x + delta * mask).clamp(-1, 1)


def _setup(seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(1, 3, 16, 16, generator=g) * 2 - 1
    x[..., :2, :] = 1.0  # pixels at the edge of the range exercise the [-1, 1] clip
    goal = torch.rand(1, 3, 16, 16, generator=g) * 2 - 1
    mask = (torch.rand(1, 1, 16, 16, generator=g) > 0.3).float()
    return x, goal, mask


def test_matches_the_reference_loop_exactly():
    x, goal, mask = _setup()
    radius, step = 16 / 255 * 2, 1 / 255 * 2
    ours = masked_linf_pgd(x, _quadratic(goal), radius=radius, step=step, steps=12,
                           generators=[torch.Generator().manual_seed(3)], mask=mask)
    reference = _reference_pgd(x, goal, radius, step, 12, 3, mask)
    assert torch.equal(ours, reference)


def test_budget_range_and_mask_hold():
    x, goal, mask = _setup(1)
    radius = 8 / 255 * 2
    out = masked_linf_pgd(x, _quadratic(goal), radius=radius, step=2 / 255 * 2, steps=30,
                          generators=[torch.Generator().manual_seed(0)], mask=mask)
    assert (out - x).abs().max() <= radius + 1e-6
    assert out.min() >= -1 and out.max() <= 1
    outside = mask.expand_as(x) == 0
    assert torch.equal(out[outside], x[outside])
    assert (out - x)[~outside].abs().max() > 0


def test_loss_falls_and_callback_sees_every_step():
    x, goal, _ = _setup(2)
    seen = []
    masked_linf_pgd(x, _quadratic(goal), radius=16 / 255 * 2, step=1 / 255 * 2, steps=20,
                    generators=[torch.Generator().manual_seed(0)], callback=seen.append)
    assert [s.step for s in seen] == list(range(1, 21)) and all(s.steps == 20 for s in seen)
    assert seen[-1].terms["distance"][0] < seen[0].terms["distance"][0]
    assert seen[-1].objective == seen[-1].terms["distance"]


def test_zero_steps_returns_the_clipped_random_start():
    x, goal, _ = _setup(3)
    out = masked_linf_pgd(x, _quadratic(goal), radius=0.1, step=0.01, steps=0, generators=[torch.Generator()])
    assert (out - x).abs().max() <= 0.1 + 1e-6


def test_a_callback_can_cancel():
    x, goal, _ = _setup(4)
    seen = []

    def stop_at_three(info):
        seen.append(info.step)
        if info.step == 3:
            raise Cancelled

    with pytest.raises(Cancelled):
        masked_linf_pgd(x, _quadratic(goal), radius=0.1, step=0.01, steps=50, generators=[torch.Generator()],
                        callback=stop_at_three)
    assert seen == [1, 2, 3]


def test_a_non_finite_gradient_stops_with_a_clear_error():
    x, _, _ = _setup(5)

    def broken(images, generators):
        value = (images * float("nan")).flatten(1).sum(1)
        return LossTerms(value, {"distance": value})

    with pytest.raises(FloatingPointError, match="precision fp32"):
        masked_linf_pgd(x, broken, radius=0.1, step=0.01, steps=3, generators=[torch.Generator()])


def _half_precision_quadratic(goal: torch.Tensor):
    """Squared distance to `goal` with the differences rounded through fp16 and shrunk, so that unscaled gradients
    (about 2e-8) fall below fp16's smallest number and become exactly zero in the backward pass."""
    def loss(x: torch.Tensor, generators) -> LossTerms:
        value = ((x - goal).half() * 1e-4).float().pow(2).flatten(1).sum(1)
        return LossTerms(value, {"distance": value})
    return loss


def test_underflowing_gradients_are_reported_and_a_loss_scale_avoids_them(caplog):
    x, goal, mask = _setup(6)
    settings = dict(radius=16 / 255 * 2, step=1 / 255 * 2, steps=3, mask=mask)
    with caplog.at_level("WARNING", logger="mist.engine.attack"):
        masked_linf_pgd(x, _half_precision_quadratic(goal), generators=[torch.Generator().manual_seed(3)], **settings)
    assert len(caplog.records) == 1 and "gradient is exactly zero" in caplog.text and "step 1" in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING", logger="mist.engine.attack"):
        scaled = masked_linf_pgd(x, _half_precision_quadratic(goal), generators=[torch.Generator().manual_seed(3)],
                                 loss_scale=1e4, **settings)
    assert not caplog.records
    assert torch.equal(scaled, _reference_pgd(x, goal, settings["radius"], settings["step"], 3, 3, mask))


def test_zero_gradients_outside_the_mask_are_not_reported(caplog):
    x, goal, _ = _setup(7)
    mask = torch.zeros(1, 1, 16, 16)
    mask[..., :8, :] = 1.0
    with caplog.at_level("WARNING", logger="mist.engine.attack"):
        masked_linf_pgd(x, _quadratic(goal), radius=0.1, step=0.01, steps=2, generators=[torch.Generator()], mask=mask)
    assert not caplog.records


def test_before_step_sees_each_step_the_images_the_loss_is_then_evaluated_on():
    """The hook of surrogate-training methods: called before every step, with x + delta * mask as it stands and no
    graph; the loss then runs on exactly those images, and the result is as without the hook."""
    x, goal, mask = _setup(3)
    seen, evaluated = [], []
    quadratic = _quadratic(goal)

    def loss(images, generators):
        evaluated.append(images.detach().clone())
        return quadratic(images, generators)

    def before_step(index, images):
        assert not images.requires_grad
        seen.append((index, images.clone()))

    out = masked_linf_pgd(x, loss, radius=0.1, step=0.02, steps=3, generators=[torch.Generator().manual_seed(5)],
                          mask=mask, before_step=before_step)
    assert [index for index, _ in seen] == [0, 1, 2]
    assert all(torch.equal(images, after) for (_, images), after in zip(seen, evaluated, strict=True))
    plain = masked_linf_pgd(x, quadratic, radius=0.1, step=0.02, steps=3,
                            generators=[torch.Generator().manual_seed(5)], mask=mask)
    assert torch.equal(out, plain)
