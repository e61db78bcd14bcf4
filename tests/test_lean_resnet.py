"""Residual blocks whose GroupNorm + SiLU pairs keep one tensor for the backward pass (mist.models.lean_resnet)."""

import copy

import pytest
import torch
from diffusers.models.resnet import ResnetBlock2D

from mist.models.frozen_conv import keep_no_convolution_inputs
from mist.models.lean_resnet import keep_one_tensor_per_norm


def blocks(in_channels=8, out_channels=16, temb_channels=12, dtype=torch.float32):
    """A diffusers block and its lean copy (same weights, frozen, input-free convolutions in both)."""
    torch.manual_seed(0)
    plain = ResnetBlock2D(in_channels=in_channels, out_channels=out_channels, temb_channels=temb_channels, groups=4)
    with torch.no_grad():  # norms away from their initial 1 / 0, so a wrong affine would show
        for module in (plain.norm1, plain.norm2):
            module.weight.uniform_(0.5, 1.5)
            module.bias.uniform_(-0.5, 0.5)
    plain = plain.to(dtype).eval().requires_grad_(False)
    keep_no_convolution_inputs(plain)
    lean = copy.deepcopy(plain)
    keep_one_tensor_per_norm(lean)
    return plain, lean


def forward_and_gradient(block, x, temb, precision=None):
    pixels = x.clone().requires_grad_(True)
    autocast = torch.autocast("cpu", dtype=precision, enabled=precision is not None)
    with autocast:
        y = block(pixels, temb)
    weights = torch.linspace(-1, 1, y.numel()).view_as(y).to(y.dtype)
    (gradient,) = torch.autograd.grad((y * weights).float().sum(), pixels)
    return y, gradient


@pytest.mark.parametrize("with_time", [True, False])
@pytest.mark.parametrize("channels", [(8, 16), (8, 8)])  # with and without the 1x1 shortcut
def test_outputs_and_gradients_are_diffusers_own_bit_for_bit(with_time, channels):
    plain, lean = blocks(*channels, temb_channels=12 if with_time else None)
    assert type(lean).__name__ == "LeanResnetBlock2D" and type(plain) is ResnetBlock2D
    x = torch.randn(2, channels[0], 9, 10)
    temb = torch.randn(2, 12) if with_time else None
    y_plain, g_plain = forward_and_gradient(plain, x, temb)
    y_lean, g_lean = forward_and_gradient(lean, x, temb)
    assert torch.equal(y_plain, y_lean)
    assert torch.equal(g_plain, g_lean)


def test_under_bf16_autocast_the_recomputation_runs_as_the_forward_did():
    plain, lean = blocks(dtype=torch.bfloat16)
    x, temb = torch.randn(1, 8, 8, 8, dtype=torch.bfloat16), torch.randn(1, 12, dtype=torch.bfloat16)
    y_plain, g_plain = forward_and_gradient(plain, x, temb, torch.bfloat16)
    y_lean, g_lean = forward_and_gradient(lean, x, temb, torch.bfloat16)
    assert torch.equal(y_plain, y_lean)
    assert torch.equal(g_plain, g_lean)


def saved_bytes(block, x, temb):
    """Bytes of the distinct tensors (weights left out) the block's forward keeps for its backward pass."""
    weights = {p.untyped_storage().data_ptr() for p in block.parameters()}
    kept = {}

    def pack(tensor):
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in weights:
            kept[storage.data_ptr()] = storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        block(x.clone().requires_grad_(True), temb)
    return sum(kept.values())


def test_each_pair_keeps_one_tensor_instead_of_two():
    plain, lean = blocks(8, 8, temb_channels=None)
    x = torch.randn(1, 8, 32, 32)
    size = x.numel() * x.element_size()
    plain_bytes, lean_bytes = saved_bytes(plain, x, None), saved_bytes(lean, x, None)
    assert plain_bytes >= 4 * size  # each norm's input and each SiLU's input
    assert lean_bytes <= 2 * size + 1024  # each norm's input (and its small statistics at most)


def test_trainable_norms_or_no_gradient_run_diffusers_forward():
    _, lean = blocks(8, 8, temb_channels=None)
    x = torch.randn(1, 8, 16, 16)
    with torch.no_grad():
        assert torch.equal(lean(x, None), ResnetBlock2D.forward(lean, x, None))
    lean.norm1.requires_grad_(True)
    lean(x.clone().requires_grad_(True), None).sum().backward()
    assert lean.norm1.weight.grad is not None  # the lean path would give it none


def test_the_sd_models_blocks_are_lean(tiny_model):
    kinds = {type(m).__name__ for net in (tiny_model.encoder, tiny_model.unet) for m in net.modules()}
    assert "LeanResnetBlock2D" in kinds and "ResnetBlock2D" not in kinds


def test_the_flop_counter_sees_the_same_forward_and_can_run_the_backward():
    """PyTorch's flop counter hooks every module; the recomputation must not trip it (it once raised in backward)."""
    from torch.utils.flop_counter import FlopCounterMode

    counts = []
    for block in blocks():
        x = torch.randn(1, 8, 8, 8, requires_grad=True)
        with FlopCounterMode(display=False) as counter:
            block(x, torch.randn(1, 12)).sum().backward()
        assert x.grad is not None
        counts.append(counter.get_total_flops())
    assert counts[0] == counts[1] > 0
