"""Frozen-weight convolutions that keep no input for the backward pass (mist.models.frozen_conv)."""

import pytest
import torch
from torch import nn

from mist.models.frozen_conv import InputGradConv2d, keep_no_convolution_inputs

GEOMETRIES = [  # (in, out, kernel, stride, padding, dilation, groups, side): SD's shapes, odd sides and the rest
    (4, 6, 3, 1, 1, 1, 1, 9),
    (4, 4, 3, 2, 0, 1, 1, 9),  # the VAE's downsampler (after its own asymmetric pad)
    (4, 4, 3, 2, 1, 1, 1, 8),  # the UNet's downsampler
    (4, 4, 3, 2, 1, 1, 1, 7),
    (6, 4, 1, 1, 0, 1, 1, 5),  # 1x1 shortcut and quant_conv
    (4, 4, 3, 1, 2, 2, 2, 10),
]


def pair(geometry, dtype, memory_format):
    c_in, c_out, kernel, stride, padding, dilation, groups, side = geometry
    torch.manual_seed(0)
    plain = nn.Conv2d(c_in, c_out, kernel, stride, padding, dilation, groups).to(dtype, memory_format=memory_format)
    plain.requires_grad_(False)
    frozen = nn.Conv2d(c_in, c_out, kernel, stride, padding, dilation, groups).to(dtype, memory_format=memory_format)
    frozen.load_state_dict(plain.state_dict())
    frozen.requires_grad_(False)
    keep_no_convolution_inputs(frozen)
    x = torch.randn(2, c_in, side, side + 1, dtype=dtype).contiguous(memory_format=memory_format)
    return plain, frozen, x


@pytest.mark.parametrize("geometry", GEOMETRIES)
@pytest.mark.parametrize("memory_format", [torch.contiguous_format, torch.channels_last])
def test_gradient_to_the_input_is_pytorchs_own(geometry, memory_format):
    plain, frozen, x = pair(geometry, torch.float64, memory_format)
    assert type(frozen) is InputGradConv2d
    outputs, gradients = [], []
    for conv in (plain, frozen):
        pixels = x.clone().requires_grad_(True)
        y = conv(pixels)
        outputs.append(y)
        gradients.append(torch.autograd.grad((y * torch.linspace(-1, 1, y.numel(), dtype=y.dtype).view_as(y)).sum(),
                                             pixels)[0])
    assert torch.equal(outputs[0], outputs[1])
    assert gradients[1].shape == x.shape
    torch.testing.assert_close(gradients[1], gradients[0], rtol=1e-12, atol=1e-12)


def test_the_input_is_not_kept_for_the_backward_pass():
    plain, frozen, x = pair(GEOMETRIES[0], torch.float32, torch.contiguous_format)
    pixels = x.clone().requires_grad_(True)
    hidden = torch.nn.functional.silu(pixels)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        frozen(hidden)
    assert not any(t.data_ptr() == hidden.data_ptr() for t in saved)
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        plain(hidden)
    assert any(t.data_ptr() == hidden.data_ptr() for t in saved)  # what nn.Conv2d keeps, for contrast


def test_trainable_weights_still_get_their_gradients():
    _, frozen, x = pair(GEOMETRIES[1], torch.float32, torch.contiguous_format)
    frozen.requires_grad_(True)
    frozen(x.requires_grad_(True)).sum().backward()
    assert frozen.weight.grad is not None and frozen.bias.grad is not None and x.grad is not None
