"""Convolutions whose weights are frozen keep no copy of their input for the backward pass.

Mist differentiates to the image only: every weight is frozen. PyTorch's convolution still saves its input for a
weight gradient that is never asked for, and in SD's VAE encoder at 512 x 512 those inputs (SiLU outputs of 32 to
128 MB each in float32) are a large share of the activations held between the forward and the backward pass. Here the
gradient to the input is computed from the weight alone, as the transposed convolution of the output gradient, which
gives the same numbers as PyTorch's own convolution backward (tests/test_frozen_conv.py).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class _InputGradientOnly(torch.autograd.Function):
    """conv2d(x, weight, bias) whose backward gives the gradient to `x` only (weight and bias must not need one)."""

    @staticmethod
    def forward(ctx, x, weight, bias, stride, padding, dilation, groups):
        ctx.save_for_backward(weight)  # a parameter: saving it costs no memory
        ctx.geometry = (x.shape[2:], x.dtype, stride, padding, dilation, groups)
        return F.conv2d(x, weight, bias, stride, padding, dilation, groups)

    @staticmethod
    def backward(ctx, grad):
        (weight,) = ctx.saved_tensors
        size, dtype, stride, padding, dilation, groups = ctx.geometry
        # The transposed convolution's output is one of several sizes when stride > 1; output_padding picks the input's.
        reached = [(grad.shape[2 + i] - 1) * stride[i] - 2 * padding[i] + dilation[i] * (weight.shape[2 + i] - 1) + 1
                   for i in range(2)]
        output_padding = (size[0] - reached[0], size[1] - reached[1])
        grad_input = F.conv_transpose2d(grad, weight.to(grad.dtype), None, stride, padding, output_padding, groups,
                                        dilation)
        return grad_input.to(dtype), None, None, None, None, None, None


class InputGradConv2d(nn.Conv2d):
    """An nn.Conv2d that, while its weight and bias are frozen and its input needs a gradient, saves no input for
    the backward pass (see the module's docstring); otherwise it is nn.Conv2d."""

    def _conv_forward(self, input: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        frozen = not weight.requires_grad and (bias is None or not bias.requires_grad)
        if frozen and input.requires_grad and torch.is_grad_enabled() and self.padding_mode == "zeros":
            return _InputGradientOnly.apply(input, weight, bias, self.stride, self.padding, self.dilation, self.groups)
        return super()._conv_forward(input, weight, bias)


def keep_no_convolution_inputs(network: nn.Module) -> None:
    """Make every plain nn.Conv2d of `network` (integer padding, zero padding mode) an InputGradConv2d, in place."""
    for module in network.modules():
        if type(module) is nn.Conv2d and not isinstance(module.padding, str) and module.padding_mode == "zeros":
            module.__class__ = InputGradConv2d
