"""benchmarks/attention.py, checked cheaply: it finds the SD v1 UNet's attention calls from the architecture, and its
ways of computing attention agree with each other (so their timings compare the same work)."""

from __future__ import annotations

import pytest

from support.benchmarks import benchmark


@pytest.fixture(scope="module")
def attention():
    return benchmark("attention")


def test_the_unets_attention_calls_at_512(attention):
    """SD v1 at 512 px: 64 x 64 latents; self- and cross-attention (77 prompt tokens) at 64, 32 and 16 latent pixels
    (2 down and 3 up transformer layers each) and once in the middle block at 8; 8 heads of 40, 80, 160, 160 wide."""
    shapes = attention.attention_shapes(512)
    expected = {}
    for side, head, count in ((64, 40, 5), (32, 80, 5), (16, 160, 5), (8, 160, 1)):
        expected[(8, side * side, side * side, head)] = count
        expected[(8, side * side, 77, head)] = count
    assert dict(shapes) == expected


@pytest.mark.parametrize("method", ["math", "padded-64"])
def test_every_method_computes_the_same_attention(attention, method):
    import torch

    generator = torch.Generator().manual_seed(0)
    query, key, value = (torch.randn(1, 2, 48, 40, generator=generator, dtype=torch.float64).requires_grad_(True)
                         for _ in range(3))
    grads = []
    for name in ("flash", method):
        out = attention.run_method(name, query, key, value)
        assert out.shape == query.shape
        grads.append((out.detach(), *torch.autograd.grad(out.square().sum(), (query, key, value))))
    for reference, other in zip(*grads, strict=True):
        torch.testing.assert_close(other, reference)
