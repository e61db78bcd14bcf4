"""The fine-tuning trainer (mist.engine.finetune): it lowers SD's training loss on tiny weights, leaves the caller's
model as it was, is reproducible from its seed, saves what it trained, and refuses bad options naming them."""

from __future__ import annotations

import pytest
import torch

from mist.engine import objectives
from mist.engine.finetune import FinetuneOptions, Surrogate, train_lora


def _images(seed: int = 0, count: int = 2, size: int = 32) -> torch.Tensor:
    return torch.rand(count, 3, size, size, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def _fixed_loss(model, x, text, draws: int = 6) -> float:
    """The denoising loss averaged over `draws` fixed draws of (posterior sample, t, n) per image: the same numbers
    before and after training, so the comparison is not noise."""
    with torch.no_grad():
        total = 0.0
        for seed in range(draws):
            generators = [torch.Generator().manual_seed(100 + seed)] * x.shape[0]
            latent = objectives.encode(model, x, generators, "fp32")
            total += objectives.denoising_loss(model, latent, text, generators, "fp32").mean().item()
    return total / draws


def _snapshot(model):
    unet = model.unet
    return ({name: value.clone() for name, value in unet.state_dict().items()},
            [name for name, _ in unet.named_modules()], {name: p.requires_grad for name, p in unet.named_parameters()})


def _assert_unchanged(model, snapshot):
    weights, modules, flags = snapshot
    state = model.unet.state_dict()
    assert state.keys() == weights.keys()
    assert all(torch.equal(state[name], value) for name, value in weights.items())
    assert [name for name, _ in model.unet.named_modules()] == modules
    assert {name: p.requires_grad for name, p in model.unet.named_parameters()} == flags
    assert all(p.grad is None for p in model.unet.parameters())


@pytest.mark.parametrize("kind", ["lora", "full"])
def test_training_lowers_its_loss_and_leaves_the_model_unchanged(tiny_model, kind):
    """Ten optimiser steps on the same draws (the generator re-seeded before each one-step call): the loss on those
    draws must fall, which it only does if the update follows its gradient; the caller's UNet must not change."""
    x, text = _images(), tiny_model.text_embedding("a painting")
    snapshot = _snapshot(tiny_model)
    options = FinetuneOptions(kind=kind, learning_rate=1e-2 if kind == "lora" else 1e-3, batch_size=2)
    surrogate = Surrogate(tiny_model, options, torch.Generator().manual_seed(0))
    base = _fixed_loss(tiny_model, x, text, 1)
    assert _fixed_loss(surrogate.model, x, text, 1) == pytest.approx(base, rel=1e-6)  # LoRA's B starts at zero
    losses = [surrogate.train(x, text, steps=1, generator=torch.Generator().manual_seed(7))[0] for _ in range(10)]
    assert losses[-1] < 0.85 * losses[0], losses
    assert _fixed_loss(surrogate.model, x, text, 1) != base
    _assert_unchanged(tiny_model, snapshot)
    assert _fixed_loss(tiny_model, x, text, 1) == base


def test_lora_trains_only_the_adapters_on_the_attention_projections(tiny_model):
    surrogate = Surrogate(tiny_model, FinetuneOptions(rank=2))
    state = surrogate.trainable_state()
    assert state and all(".lora_A." in name or ".lora_B." in name for name in state)
    assert {name.split(".lora_")[0].rsplit(".", 1)[-1] for name in state} <= {"to_q", "to_k", "to_v", "0"}
    assert all(value.shape[0] == 2 for name, value in state.items() if ".lora_A." in name)
    assert all(torch.count_nonzero(value) == 0 for name, value in state.items() if ".lora_B." in name)
    # The base weights are the caller's own tensors: no copy is made.
    base = {p.data_ptr() for p in tiny_model.unet.parameters()}
    assert all(p.data_ptr() in base for name, p in surrogate.unet.named_parameters() if "lora_" not in name)


def test_same_seed_same_adapters_and_another_seed_others(tiny_model):
    x, text = _images(1), tiny_model.text_embedding("a painting")
    first = train_lora(tiny_model, x, text, FinetuneOptions(steps=3, seed=5))
    again = train_lora(tiny_model, x, text, FinetuneOptions(steps=3, seed=5))
    other = train_lora(tiny_model, x, text, FinetuneOptions(steps=3, seed=6))
    assert first.losses == again.losses
    assert all(torch.equal(first.state[name], again.state[name]) for name in first.state)
    assert first.losses != other.losses
    assert not all(torch.equal(first.state[name], other.state[name]) for name in first.state)


def test_saved_adapters_load_back_into_a_surrogate(tiny_model, tmp_path):
    from safetensors import safe_open
    from safetensors.torch import load_file

    x, text = _images(2), tiny_model.text_embedding("a painting")
    result = train_lora(tiny_model, x, text, FinetuneOptions(steps=2, learning_rate=1e-2))
    result.save(tmp_path / "lora.safetensors")
    with safe_open(str(tmp_path / "lora.safetensors"), "pt") as handle:
        assert handle.metadata()["rank"] == "4" and handle.metadata()["mist:finetune"] == "lora"
    loaded = {name.removeprefix("unet."): value for name, value in load_file(tmp_path / "lora.safetensors").items()}
    assert loaded.keys() == result.state.keys()
    fresh = Surrogate(tiny_model, FinetuneOptions(), torch.Generator().manual_seed(99))
    fresh.load_trainable_state(loaded)
    trained = Surrogate(tiny_model, FinetuneOptions(), torch.Generator().manual_seed(98))
    trained.load_trainable_state(result.state)
    assert _fixed_loss(fresh.model, x, text, 1) == _fixed_loss(trained.model, x, text, 1)
    assert _fixed_loss(fresh.model, x, text, 1) != _fixed_loss(tiny_model, x, text, 1)


@pytest.mark.parametrize(("options", "named"), [
    ({"kind": "dora"}, "kind"), ({"steps": -1}, "steps"), ({"rank": 0}, "rank"), ({"rank": 2.5}, "rank"),
    ({"learning_rate": 0}, "learning_rate"), ({"learning_rate": float("nan")}, "learning_rate"),
    ({"alpha": -1.0}, "alpha"), ({"batch_size": 0}, "batch_size"), ({"max_grad_norm": float("inf")}, "max_grad_norm"),
    ({"seed": True}, "seed")])
def test_bad_options_are_refused_naming_them(options, named):
    with pytest.raises(ValueError, match=f"^{named}: "):
        FinetuneOptions(**options)


def test_bad_images_and_a_model_without_unet_are_refused(tiny_model):
    text = tiny_model.text_embedding("a painting")
    with pytest.raises(ValueError, match="^batch_size: 3 is more than the 2 images"):
        train_lora(tiny_model, _images(), text, FinetuneOptions(steps=1, batch_size=3))
    with pytest.raises(ValueError, match=r"^images: expected a batch \(N, 3, H, W\)"):
        train_lora(tiny_model, _images()[0], text, FinetuneOptions(steps=1))
    from dataclasses import replace

    with pytest.raises(ValueError, match="without its UNet"):
        Surrogate(replace(tiny_model, unet=None))


def test_diffusers_reads_the_saved_adapters(tiny_model, tmp_path):
    """The safetensors file is in the layout diffusers loads LoRA from: the same UNet outputs as the surrogate's."""
    import copy

    x, text = _images(3, count=1), tiny_model.text_embedding("a painting")
    result = train_lora(tiny_model, x, text, FinetuneOptions(steps=2, learning_rate=1e-2))
    result.save(tmp_path / "lora.safetensors")
    unet = copy.deepcopy(tiny_model.unet)
    unet.load_lora_adapter(str(tmp_path / "lora.safetensors"), prefix="unet", adapter_name="mimic")
    surrogate = Surrogate(tiny_model)
    surrogate.load_trainable_state(result.state)
    z, t = torch.randn(1, 4, 4, 4, generator=torch.Generator().manual_seed(1)), torch.tensor([500])
    with torch.no_grad():
        theirs = unet(z, t, encoder_hidden_states=text).sample
        ours = surrogate.unet(z, t, encoder_hidden_states=text).sample
        base = tiny_model.unet(z, t, encoder_hidden_states=text).sample
    assert torch.allclose(theirs, ours, atol=1e-6) and not torch.allclose(theirs, base, atol=1e-3)
