"""Options that change speed and memory but not the algorithm: precision, checkpointing, batching, devices."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from PIL import Image

from mist.models import device as devices
from mist.engine.config import ProtectConfig
from mist.models.loading import build_random
from mist.engine.pipeline import Protector


def _pictures(count=3):
    return [Image.fromarray(np.random.default_rng(i).integers(0, 256, (70, 50, 3), dtype=np.uint8))
            for i in range(count)]


def test_checkpointing_changes_nothing_but_memory(tiny_model):
    config = ProtectConfig(steps=3, input_size=64, precision="fp32")
    plain = Protector(tiny_model, config, low_memory=False).protect(_pictures(1)[0]).image.tobytes()
    checkpointed = Protector(tiny_model, config, low_memory=True)
    model = checkpointed.model
    assert model.unet.is_gradient_checkpointing and model.encoder.encoder.gradient_checkpointing
    saved = checkpointed.protect(_pictures(1)[0]).image.tobytes()
    assert plain == saved


def test_batched_tiles_and_images_draw_the_same_random_numbers(tiny_model):
    """With no steps the result is the image plus its random start: batching must not change a single byte."""
    config = ProtectConfig(steps=0, input_size=64, block_num=2, precision="fp32")
    alone = [Protector(tiny_model, config).protect(p).image.tobytes() for p in _pictures()]
    together = Protector(tiny_model, config, batch_size=8).protect_many(_pictures())
    assert [r.image.tobytes() for r in together] == alone


@pytest.mark.parametrize("mode", ["textural", "semantic", "fused"])
def test_batched_results_stay_close_to_one_at_a_time(tiny_model, mode):
    """Batched kernels may round differently in the last bits, which can flip a rare sign step; nothing more."""
    config = ProtectConfig.of(steps=3, input_size=64, block_num=2, precision="fp32", mode=mode)
    alone = [np.asarray(Protector(tiny_model, config).protect(p).image, dtype=int) for p in _pictures()]
    together = Protector(tiny_model, config, batch_size=8).protect_many(_pictures())
    differing = np.mean([np.mean(a != np.asarray(r.image, dtype=int)) for a, r in zip(alone, together, strict=True)])
    assert differing < 0.01


def test_bf16_weights_and_autocast_keep_the_budget_and_agree_with_fp32(tiny_model):
    from mist.common import images
    from mist.engine.methods import TileInputs
    from mist.engine.methods.common import mist_target

    picture = _pictures(1)[0]
    runs = {p: Protector(tiny_model, ProtectConfig(steps=3, input_size=64, precision=p, epsilon=8))
            for p in ("bf16", "fp32")}
    assert runs["bf16"].model.dtype == torch.bfloat16
    results = {p: protector.protect(picture) for p, protector in runs.items()}
    out = np.asarray(results["bf16"].image, dtype=int)
    original = np.asarray(picture.resize((64, 64), Image.Resampling.BICUBIC), dtype=int)
    assert np.abs(out - original).max() <= 8
    for name in ("textural", "semantic"):
        assert results["bf16"].start[name] == pytest.approx(results["fp32"].start[name], rel=0.02), name
        assert results["bf16"].end[name] == pytest.approx(results["fp32"].end[name], rel=0.02), name
    # The signs PGD steps by, at the same point with the same random draws.
    x = images.image_to_tensor(picture, (64, 64))
    y = images.image_to_tensor(mist_target(), (64, 64))
    signs = {}
    for precision, protector in runs.items():
        objective = protector.method.prepare([TileInputs(clean=x, target=y, seed=lambda stream: 2)])
        pixels = x.clone().requires_grad_(True)
        terms = objective(pixels, [torch.Generator().manual_seed(1)])
        signs[precision] = torch.autograd.grad(terms.objective.sum(), pixels)[0].sign()
    assert (signs["bf16"] == signs["fp32"]).float().mean() > 0.95


def test_auto_precision_follows_the_device(monkeypatch):
    cpu = torch.device("cpu")
    monkeypatch.setattr(devices, "cpu_has_fast_bf16", lambda: True)
    assert devices.resolve_precision("auto", cpu) == "bf16"
    monkeypatch.setattr(devices, "cpu_has_fast_bf16", lambda: False)
    assert devices.resolve_precision("auto", cpu) == "fp32"
    assert devices.resolve_precision("auto", torch.device("mps")) == "fp32"
    assert devices.resolve_precision("fp32", cpu) == "fp32"


@pytest.mark.parametrize(("capability", "onednn", "capped"), [
    ("AVX512", None, False), ("AVX512", "avx512_core_amx", False), ("AVX512", "DEFAULT", False),
    ("AVX2", None, True), ("AVX512", "AVX2", True), ("AVX512", "avx512_core", True), ("DEFAULT", None, True),
])
def test_bf16_is_not_native_where_the_process_is_held_below_it(monkeypatch, capability, onednn, capped):
    """ATEN_CPU_CAPABILITY (read by PyTorch at start) and ONEDNN_MAX_CPU_ISA can hold a process below bf16 arithmetic,
    as when an AVX2-only CPU's kernels are measured on a newer CPU: `auto` must not choose bf16 there."""
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: capability)
    monkeypatch.delenv("DNNL_MAX_CPU_ISA", raising=False)
    if onednn is None:
        monkeypatch.delenv("ONEDNN_MAX_CPU_ISA", raising=False)
    else:
        monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", onednn)
    assert devices.bf16_capped() is capped


@pytest.mark.parametrize(("card", "capability", "expected"), [
    ("T4", (7, 5), "fp16"), ("V100", (7, 0), "fp16"), ("RTX 2080 Ti", (7, 5), "fp16"),
    ("A100", (8, 0), "bf16"), ("RTX 4090", (8, 9), "bf16"), ("H100", (9, 0), "bf16"),
])
def test_auto_precision_on_cuda_needs_native_bf16(monkeypatch, card, capability, expected):
    """Older GPUs report bf16 as supported because PyTorch emulates it (is_bf16_supported's default): that must not
    count. The capability asked for is the chosen device's, not the first GPU's."""
    asked = []
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: asked.append(device) or capability)
    assert devices.resolve_precision("auto", torch.device("cuda", 1)) == expected, card
    assert asked == [torch.device("cuda", 1)]


def loss_scale(precision: str, mode: str) -> float:
    from mist.engine.methods.mist import Mist, MistParams

    method = Mist.__new__(Mist)  # loss_scale reads only the parameters and the precision
    method.params, method.precision = MistParams(mode=mode), precision
    return method.loss_scale()


def test_fp16_scales_only_the_semantic_objective():
    from mist.engine.objectives import FP16_DENOISING_LOSS_SCALE

    assert loss_scale("fp16", "semantic") == FP16_DENOISING_LOSS_SCALE == 1e4
    assert {loss_scale(p, m) for p in ("fp32", "bf16", "fp16") for m in ("textural", "fused")} == {1.0}
    assert loss_scale("bf16", "semantic") == loss_scale("fp32", "semantic") == 1.0


def test_fp16_semantic_gradients_keep_their_signs_with_the_loss_scale(tiny_model):
    """On the tiny model in fp16 (the CPU standing in for an older GPU), semantic mode's unscaled gradient loses
    pixels to underflow; the scale keeps nearly all of them, with signs as float32 has them."""
    from mist.engine.methods import TileInputs
    from mist.engine.methods.mist import Mist, MistParams

    half = copy.deepcopy(tiny_model)
    half.encoder.half()
    half.unet.half()
    x = torch.rand(1, 3, 128, 128, generator=torch.Generator().manual_seed(0)) * 2 - 1

    def gradient(model, precision, scale):
        pixels = x.clone().requires_grad_(True)
        loss = Mist(MistParams(mode="semantic"), model, precision).prepare([TileInputs(x, None, lambda stream: 0)])
        terms = loss(pixels, [torch.Generator().manual_seed(2)])
        return torch.autograd.grad(terms.objective.sum() * scale, pixels)[0]

    exact = gradient(tiny_model, "fp32", 1.0).sign()
    unscaled = gradient(half, "fp16", 1.0)
    scaled = gradient(half, "fp16", loss_scale("fp16", "semantic"))
    assert (scaled == 0).float().mean() * 10 < (unscaled == 0).float().mean()
    assert (scaled.sign() == exact).float().mean() > 0.99


def test_the_protector_passes_the_loss_scale_to_the_attack(tiny_model, monkeypatch):
    from mist.engine import pipeline

    seen = []
    attack = pipeline.masked_linf_pgd
    monkeypatch.setattr(pipeline, "masked_linf_pgd", lambda *a, **k: seen.append(k["loss_scale"]) or attack(*a, **k))
    monkeypatch.setattr(pipeline, "resolve_precision", lambda precision, device: precision)  # fp16 on the CPU
    for precision in ("fp32", "fp16"):
        Protector(tiny_model, ProtectConfig.of(steps=1, input_size=32, precision=precision, mode="semantic")).protect(
            _pictures(1)[0])
    assert seen == [1.0, 1e4]


def test_fp16_needs_a_gpu():
    with pytest.raises(ValueError, match="precision: fp16 needs a CUDA GPU"):
        devices.resolve_precision("fp16", torch.device("cpu"))


def test_checkpointing_is_on_by_default_only_where_memory_is_short(monkeypatch):
    from mist.models import device as protect

    cpu = torch.device("cpu")
    monkeypatch.setattr(protect, "available_ram_bytes", lambda: 6 * 1024**3)
    assert protect.default_low_memory(cpu)
    monkeypatch.setattr(protect, "available_ram_bytes", lambda: 20 * 1024**3)
    assert not protect.default_low_memory(cpu)
    assert protect.default_low_memory(torch.device("mps"))

    class Card:
        def __init__(self, gib):
            self.total_memory = gib * 1024**3

    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device: Card(8))
    assert protect.default_low_memory(torch.device("cuda"))
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device: Card(24))
    assert not protect.default_low_memory(torch.device("cuda"))


def test_fast_mode_is_recorded_as_a_different_method(tiny_model, tmp_path):
    from mist.runner.jobs import output_metadata

    protector = Protector(tiny_model, ProtectConfig.of(input_size=64, fast=True))
    text = output_metadata("{}", "tiny-random", protector, tmp_path / "a.png", "0" * 64)
    assert text["mist:method"] == "mist" and "not Mist's exact method" in text["mist:algorithm"]
    exact = Protector(tiny_model, ProtectConfig(input_size=64))
    assert "score-distillation" not in output_metadata("{}", "x", exact, tmp_path / "a.png", "0" * 64)["mist:algorithm"]


def _weights(model) -> dict[str, torch.Tensor]:
    return {f"{part}.{name}": tensor for part in ("encoder", "unet")
            for name, tensor in getattr(model, part).state_dict().items()}


def test_a_protector_never_changes_the_callers_model(tiny_model):
    """A bf16 run leaves the caller's float32 model as it was, so a later fp32 run gives fp32's exact result."""
    before = {name: tensor.clone() for name, tensor in _weights(tiny_model).items()}
    picture = _pictures(1)[0]
    fresh = build_random()  # the same seed: the same weights
    fp32 = ProtectConfig(steps=2, input_size=64, precision="fp32")
    expected = Protector(fresh, fp32).protect(picture).image.tobytes()
    bf16 = Protector(tiny_model, ProtectConfig(steps=2, input_size=64, precision="bf16"), low_memory=True)
    assert bf16.model.dtype == torch.bfloat16 and bf16.model.unet.is_gradient_checkpointing
    bf16.protect(picture)
    assert tiny_model.dtype == torch.float32 and not tiny_model.unet.is_gradient_checkpointing
    assert all(torch.equal(tensor, before[name]) for name, tensor in _weights(tiny_model).items())
    assert all(tensor.is_contiguous() for tensor in _weights(tiny_model).values())  # not turned channels-last
    assert Protector(tiny_model, fp32).protect(picture).image.tobytes() == expected


def test_weights_already_in_place_are_shared_not_copied(tiny_model):
    shared = Protector(tiny_model, ProtectConfig(input_size=64, precision="fp32")).model
    assert shared is not tiny_model
    assert all(a.data_ptr() == b.data_ptr() for a, b in zip(_weights(shared).values(), _weights(tiny_model).values(),
                                                              strict=True))
    cast = Protector(tiny_model, ProtectConfig(input_size=64, precision="bf16")).model
    assert all(a.data_ptr() != b.data_ptr() for a, b in zip(_weights(cast).values(), _weights(tiny_model).values(),
                                                            strict=True))


def test_a_handed_over_model_is_converted_in_place():
    model = build_random()
    protector = Protector(model, ProtectConfig(input_size=64, precision="bf16"), hand_over=True)
    assert protector.model is model and model.dtype == torch.bfloat16
    # every network, not only the encoder cast first (the UNet stayed float32: twice its memory)
    assert {p.dtype for p in _weights(model).values() if p.is_floating_point()} == {torch.bfloat16}
    with pytest.raises(ValueError, match="load it again"):  # rounded weights are not passed off as float32
        Protector(model, ProtectConfig(input_size=64, precision="fp32"))
