"""Residual blocks whose GroupNorm + SiLU pairs keep one tensor for the backward pass instead of two.

A residual block of SD's VAE encoder and UNet runs GroupNorm then SiLU twice. PyTorch's GroupNorm keeps its input for
the backward pass and SiLU keeps its own input, the GroupNorm's output: two tensors of the block's full size per
pair. With the convolutions keeping nothing (`frozen_conv`), those pairs are nearly all the activation memory of the
VAE encoder at 512 x 512 (about 2.4 of the 3.3 GB a float32 fused step holds). Here each pair keeps only the
GroupNorm's input and recomputes GroupNorm and SiLU in the backward pass (element-wise work, a few per cent of the
step), under the autocast state of the forward pass: the same operators on the same values give the same numbers, so
results are bit-identical (tests/test_lean_resnet.py). Only the frozen, plain blocks SD uses are changed, and only
while a gradient to their input is wanted and the code is not being compiled (`--compile`: torch.compile's partitioner
makes its own choice of what to keep and recompute); anything else runs diffusers' own code.
"""

from __future__ import annotations

from functools import lru_cache

import torch
import torch.nn.functional as F
from torch import nn


class _GroupNormSiLU(torch.autograd.Function):
    """silu(group_norm(x)) with frozen affine weights; keeps `x` alone and recomputes the rest for the gradient. The
    functional form is called, not the module: module hooks (PyTorch's flop counter installs some) must not see the
    recomputation."""

    @staticmethod
    def forward(ctx, x, norm: nn.GroupNorm):
        ctx.save_for_backward(x)
        ctx.norm = norm
        device = x.device.type
        ctx.autocast = (device, torch.is_autocast_enabled(device), torch.get_autocast_dtype(device))
        return F.silu(_group_norm(norm, x))

    @staticmethod
    def backward(ctx, grad):
        (x,) = ctx.saved_tensors
        device, enabled, dtype = ctx.autocast
        with torch.enable_grad(), torch.autocast(device, dtype=dtype, enabled=enabled):
            leaf = x.detach().requires_grad_(True)
            output = F.silu(_group_norm(ctx.norm, leaf))
        (grad_x,) = torch.autograd.grad(output, leaf, grad)
        return grad_x, None


def _group_norm(norm: nn.GroupNorm, x: torch.Tensor) -> torch.Tensor:
    """What `norm(x)` computes (nn.GroupNorm's forward), without the module call."""
    return F.group_norm(x, norm.num_groups, norm.weight, norm.bias, norm.eps)


def _norm_silu(norm: nn.GroupNorm, x: torch.Tensor) -> torch.Tensor:
    return _GroupNormSiLU.apply(x, norm)


def _plain(block: nn.Module) -> bool:
    """Whether `block` is a diffusers ResnetBlock2D of the shape SD's networks use: GroupNorms, SiLU, no resampling
    inside, the time embedding (if any) added before the second norm."""
    from diffusers.models.resnet import ResnetBlock2D

    return (type(block) is ResnetBlock2D and block.upsample is None and block.downsample is None
            and block.time_embedding_norm == "default" and isinstance(block.nonlinearity, nn.SiLU)
            and type(block.norm1) is nn.GroupNorm and type(block.norm2) is nn.GroupNorm)


def _frozen(module: nn.Module) -> bool:
    return not any(p.requires_grad for p in module.parameters())


class _LeanForward:
    """The forward of a diffusers ResnetBlock2D (mixed in before it, see `_lean_class`) whose GroupNorm +
    SiLU pairs keep only their input while a gradient flows to the block's input and its norms are frozen; otherwise
    diffusers' own forward."""

    def forward(self, input_tensor: torch.Tensor, temb: torch.Tensor | None = None, *args, **kwargs) -> torch.Tensor:
        lean = (torch.is_grad_enabled() and input_tensor.requires_grad and not args and not kwargs
                and _frozen(self.norm1) and _frozen(self.norm2)
                and not torch.compiler.is_compiling())  # compiled, the partitioner chooses what to recompute
        if not lean:
            return super().forward(input_tensor, temb, *args, **kwargs)
        hidden = self.conv1(_norm_silu(self.norm1, input_tensor))
        if self.time_emb_proj is not None:
            temb = self.time_emb_proj(temb if self.skip_time_act else self.nonlinearity(temb))[:, :, None, None]
        if temb is not None:
            hidden = hidden + temb
        hidden = self.conv2(self.dropout(_norm_silu(self.norm2, hidden)))
        shortcut = self.conv_shortcut(input_tensor) if self.conv_shortcut is not None else input_tensor
        return (shortcut + hidden) / self.output_scale_factor


@lru_cache(maxsize=1)
def _lean_class() -> type:
    """LeanResnetBlock2D: diffusers' ResnetBlock2D with `_LeanForward`'s forward (diffusers is imported only here)."""
    from diffusers.models.resnet import ResnetBlock2D

    return type("LeanResnetBlock2D", (_LeanForward, ResnetBlock2D), {})


def keep_one_tensor_per_norm(network: nn.Module) -> None:
    """Make every plain ResnetBlock2D of `network` a LeanResnetBlock2D, in place (weights and state untouched)."""
    for module in network.modules():
        if _plain(module):
            module.__class__ = _lean_class()
