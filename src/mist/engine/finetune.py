"""Fine-tuning a Stable Diffusion UNet on a few images: the mimic's tool, which Mist both imitates (the surrogate of
`aspl` and `mist2-lora`) and measures against (fine-tuning mimicry in `mist evaluate`). One trainer for every use.

The loss is SD's own training loss, the denoising loss of `mist.engine.objectives.denoising_loss`: for an image x with
posterior sample z = E(x), t ~ U{0..999} and n ~ N(0, I), mean((eps_theta(z_t, t, c) - n) ** 2) (epsilon
prediction; v for a v-prediction model), averaged over the batch and minimised with AdamW.

Two kinds of surrogate, both built beside the caller's model and never inside it:
- "lora" (default): LoRA adapters (Hu et al., ICLR 2022) made with `peft` on the attention projections of a copy of the
  UNet's module tree that *shares* every base weight with the caller's UNet (no memory beyond the adapters: 0.8M
  parameters at rank 4 on SD v1). Only the adapters train; the base weights are frozen and never written, so the
  caller's model is unchanged and other users of it see nothing. Dropping the Surrogate drops the adapters.
- "full": every UNet weight trains, on a float32 copy of the UNet. Memory on SD v1 (860M parameters): 3.4 GB for the
  copy, 3.4 GB for its gradients and 6.9 GB for AdamW's two moments, so about 14 GB beyond the model itself, plus
  activations; Anti-DreamBooth's full ASPL holds two such copies (the surrogate and its clone), about 17 GB.

Defaults (`FinetuneOptions`) are those of diffusers' LoRA training examples (examples/text_to_image/
train_text_to_image_lora.py and examples/dreambooth/train_dreambooth_lora.py): rank 4, alpha = rank,
Gaussian-initialised A and zero B on the attention projections those scripts adapt for the model's family
(`lora_targets`), learning rate 1e-4 (the text-to-image
script's; the DreamBooth script's is 5e-4), AdamW with betas (0.9, 0.999), weight decay 1e-2, eps 1e-8, gradient norm
clipped to 1, batch size 1, constant learning rate, and 500 steps (the DreamBooth LoRA example's run). Mist-v2's LoRA
surrogate uses the same rank, learning rate and optimiser (psyker-team/mist-v2, attacks/mist.py).

The text encoder is not trained: a loaded `StableDiffusion` keeps only the embeddings of its prompts, not the encoder.
The conditioning is what the caller gives: `model.conditioning("a painting")` (SDXL's carries its pooled embedding
too), or for SD 1.x / 2.x a bare embedding (1, 77, D).

Random numbers come from the caller's `torch.Generator` (or `FinetuneOptions.seed`): adapter initialisation, which
images each step takes, and each image's posterior sample, t and n, in that order. Same seed, same result on a CPU.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Iterator

import torch
from torch import nn

from mist.engine import objectives
from mist.models.conditioning import Conditioning

if TYPE_CHECKING:
    from mist.models import StableDiffusion

# What diffusers' LoRA training examples adapt by default, per family. UNets (SD 1.x, 2.x, SDXL): the query, key,
# value and output projections of every self- and cross-attention. SD 3.x's joint attention
# (train_dreambooth_lora_sd3.py): the image stream's projections and the text stream's (`add_*_proj`, `to_add_out`).
# Flux (train_dreambooth_lora_flux.py): those, and both streams' feed-forward layers.
UNET_LORA_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")
JOINT_LORA_TARGETS = UNET_LORA_TARGETS + ("add_q_proj", "add_k_proj", "add_v_proj", "to_add_out")
LORA_TARGETS = {"sd3": JOINT_LORA_TARGETS,
                "flux": JOINT_LORA_TARGETS + ("ff.net.0.proj", "ff.net.2", "ff_context.net.0.proj", "ff_context.net.2")}
KINDS = ("lora", "full")


@dataclass(frozen=True)
class FinetuneOptions:
    """How to fine-tune (see the module's docstring for where the defaults come from).

    kind: "lora" (adapters on a weight-sharing copy) or "full" (a float32 copy of the whole UNet). steps: optimiser
    steps. rank: LoRA rank. alpha: LoRA alpha (None: the rank, so the adapters' scale alpha / rank is 1).
    learning_rate: AdamW's. batch_size: images per step (at most the number of images). seed: of the generator
    `train_lora` makes. weight_decay, max_grad_norm: AdamW's decoupled weight decay and the gradient-norm clip.
    """

    kind: str = "lora"
    steps: int = 500
    rank: int = 4
    alpha: float | None = None
    learning_rate: float = 1e-4
    batch_size: int = 1
    seed: int = 0
    weight_decay: float = 1e-2
    max_grad_norm: float = 1.0

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"kind: must be one of {', '.join(KINDS)}, got {self.kind!r}")
        check_whole_numbers(self, {"steps": 0, "seed": 0, "rank": 1, "batch_size": 1})
        alpha = ("alpha",) if self.alpha is not None else ()
        check_numbers(self, ("learning_rate", *alpha, "max_grad_norm"), zero_allowed=("weight_decay",))


def lora_targets(family: str) -> tuple[str, ...]:
    """The module names (suffixes, as peft matches them) a LoRA adapts in a denoiser of `family` (see LORA_TARGETS)."""
    return LORA_TARGETS.get(family, UNET_LORA_TARGETS)


def check_whole_numbers(options: object, lowest: dict[str, int]) -> None:
    """ValueError naming the first of `options`' fields in `lowest` that is not a whole number of at least its
    value there."""
    for name, low in lowest.items():
        value = getattr(options, name)
        if not isinstance(value, int) or isinstance(value, bool) or value < low:
            raise ValueError(f"{name}: must be a whole number of at least {low}, got {value!r}")


def check_numbers(options: object, positive: tuple[str, ...], zero_allowed: tuple[str, ...] = ()) -> None:
    """ValueError naming the first of `options`' fields that is not a finite number above zero (`positive`) or at
    least zero (`zero_allowed`)."""
    for name in (*positive, *zero_allowed):
        value = getattr(options, name)
        number = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
        if not number or value < 0 or (value == 0 and name not in zero_allowed):
            kind = "non-negative" if name in zero_allowed else "positive"
            raise ValueError(f"{name}: must be a {kind} finite number, got {value!r}")


@dataclass(frozen=True)
class FinetuneResult:
    """What `train_lora` returns: the trained weights (`Surrogate.trainable_state`: the adapters' for LoRA) and the
    training loss of each step (the batch mean, before that step's update)."""

    state: dict[str, torch.Tensor]
    losses: list[float]
    options: FinetuneOptions
    targets: tuple[str, ...]

    def save(self, path: str | Path) -> None:
        """Write the weights as safetensors (see `save_state`)."""
        save_state(self.state, path, self.options, self.targets)


class Surrogate:
    """A trainable UNet built beside `model` (see the module's docstring), and `self.model`, a StableDiffusion that
    runs through it (same encoder, embeddings and schedule): pass it wherever a model is expected.

    `model` itself is never changed: its UNet's module tree, weights and gradient flags stay as they were."""

    def __init__(self, model: StableDiffusion, options: FinetuneOptions = FinetuneOptions(),
                 generator: torch.Generator | None = None, precision: str = "fp32") -> None:
        if model.unet is None:
            raise ValueError("this model was loaded without its UNet, which fine-tuning trains")
        self.options = options
        self.precision = precision
        self.targets = lora_targets(model.arch.family)
        if options.kind == "lora":
            unet = sharing_copy(model.unet)
            _add_lora(unet, options, generator, self.targets)
        else:
            unet = copy.deepcopy(model.unet).float().requires_grad_(True)
        self.unet = unet
        self.model = replace(model, unet=unet)
        self._trainable = [p for p in unet.parameters() if p.requires_grad]

    def clone(self) -> Surrogate:
        """An independent Surrogate with the same trained weights, trained apart from this one from now on (LoRA: new
        adapters on the same shared base weights; full: another float32 copy of the UNet)."""
        shared = {} if self.options.kind == "full" else {
            id(tensor): tensor for name, tensor in (*self.unet.named_parameters(), *self.unet.named_buffers())
            if "lora_" not in name}
        twin = copy.copy(self)
        twin.unet = copy.deepcopy(self.unet, shared)
        twin.model = replace(self.model, unet=twin.unet)
        twin._trainable = [p for p in twin.unet.parameters() if p.requires_grad]
        return twin

    def trainable_state(self) -> dict[str, torch.Tensor]:
        """The trained weights by name, copied to the CPU: the adapters' (peft's names, e.g.
        `down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.lora_A.weight`) or the whole UNet's."""
        if self.options.kind == "lora":
            get_peft_model_state_dict = _peft().get_peft_model_state_dict

            state = get_peft_model_state_dict(self.unet)
        else:
            state = self.unet.state_dict()
        return {name: value.detach().to("cpu", copy=True) for name, value in state.items()}

    def load_trainable_state(self, state: dict[str, torch.Tensor]) -> None:
        """Set the trained weights from `trainable_state()` of a Surrogate of the same kind and model."""
        if self.options.kind == "lora":
            result = _peft().set_peft_model_state_dict(self.unet, state)
            if result.unexpected_keys:
                raise ValueError(f"adapter state: unexpected keys such as {result.unexpected_keys[0]}")
        else:
            self.unet.load_state_dict(state)

    def train(self, images: torch.Tensor, text: Conditioning | torch.Tensor, steps: int | None = None,
              generator: torch.Generator | None = None,
              callback: Callable[[int, float], None] | None = None) -> list[float]:
        """Fine-tune on `images` (N, 3, H, W) in [-1, 1] conditioned on `text` (one row) for `steps` (default: the
        options') optimiser steps with a fresh AdamW (as Anti-DreamBooth and Mist-v2 start one per training round);
        returns each step's loss. Each step takes `batch_size` images, going through them in a random order drawn
        from `generator` (default: seeded with the options' seed), and draws each image's posterior sample, t and n
        from it. `callback(step, loss)` after each step (1-based)."""
        o = self.options
        steps = o.steps if steps is None else steps
        check_images(images)
        if o.batch_size > images.shape[0]:
            raise ValueError(f"batch_size: {o.batch_size} is more than the {images.shape[0]} images")
        generator = generator or torch.Generator().manual_seed(o.seed)
        optimizer = torch.optim.AdamW(self._trainable, lr=o.learning_rate, betas=(0.9, 0.999),
                                      weight_decay=o.weight_decay, eps=1e-8)
        images = images.detach().to(self.model.device)
        indices = shuffled_indices(images.shape[0], generator)
        losses = []
        for step in range(steps):
            chosen = [next(indices) for _ in range(o.batch_size)]
            generators = [generator] * len(chosen)
            with torch.no_grad():
                latent = objectives.encode(self.model, images[chosen], generators, self.precision)
            loss = objectives.denoising_loss(self.model, latent, text, generators, self.precision).mean()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(self._trainable, o.max_grad_norm)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            losses.append(loss.item())
            if callback is not None:
                callback(step + 1, losses[-1])
        return losses


def train_lora(model: StableDiffusion, images: torch.Tensor, text: Conditioning | torch.Tensor,
               options: FinetuneOptions = FinetuneOptions(), precision: str = "fp32",
               callback: Callable[[int, float], None] | None = None) -> FinetuneResult:
    """Fine-tune a surrogate of `model` (LoRA by default; `options.kind`) on `images` (N, 3, H, W) in [-1, 1] with the
    conditioning `text` (one row), seeded with `options.seed`; `model` is left unchanged. To sample from the result,
    make a `Surrogate` and `load_trainable_state(result.state)`."""
    generator = torch.Generator().manual_seed(options.seed)
    surrogate = Surrogate(model, options, generator, precision)
    losses = surrogate.train(images, text, generator=generator, callback=callback)
    return FinetuneResult(surrogate.trainable_state(), losses, options, surrogate.targets)


def save_state(state: dict[str, torch.Tensor], path: str | Path, options: FinetuneOptions,
               targets: tuple[str, ...]) -> None:
    """Write trained weights as a safetensors file, the UNet's names prefixed with `unet.` (the layout diffusers'
    `load_lora_weights` reads for peft adapters), the options in its metadata."""
    from safetensors.torch import save_file

    metadata = {"mist:finetune": options.kind, "rank": str(options.rank),
                "alpha": str(options.alpha if options.alpha is not None else options.rank),
                "target_modules": ",".join(targets) if options.kind == "lora" else "all"}
    save_file({f"unet.{name}": value.contiguous() for name, value in state.items()}, str(path), metadata=metadata)


def check_images(images: torch.Tensor) -> None:
    """ValueError unless `images` is a batch (N, 3, H, W) of at least one image."""
    if images.dim() != 4 or images.shape[1] != 3 or images.shape[0] < 1:
        raise ValueError(f"images: expected a batch (N, 3, H, W), got shape {tuple(images.shape)}")


def shuffled_indices(count: int, generator: torch.Generator) -> Iterator[int]:
    """Indices 0..count-1 without end, one random permutation (drawn from `generator` when the last one is used up)
    after another: every image is seen once before any is seen again."""
    while True:
        yield from torch.randperm(count, generator=generator).tolist()


def sharing_copy(module: nn.Module) -> nn.Module:
    """A copy of `module`'s tree of modules whose parameters and buffers are the original's own tensors: adapters can
    be added to the copy without touching the original's structure, at no memory cost."""
    memo: dict[int, object] = {id(tensor): tensor for tensor in (*module.parameters(), *module.buffers())}
    return copy.deepcopy(module, memo)


def _add_lora(unet: nn.Module, options: FinetuneOptions, generator: torch.Generator | None,
              targets: tuple[str, ...]) -> None:
    """Inject trainable float32 LoRA adapters on the `targets` modules of `unet` (frozen base weights); A drawn from
    `generator`'s stream through a forked global generator, so the caller's global random state is untouched."""
    peft = _peft()
    config = peft.LoraConfig(r=options.rank, lora_alpha=options.alpha if options.alpha is not None else options.rank,
                        init_lora_weights="gaussian", target_modules=list(targets))
    seed = int(torch.randint(0, 2**62, (1,), generator=generator)) if generator is not None else options.seed
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        peft.inject_adapter_in_model(config, unet)
    for name, parameter in unet.named_parameters():
        if "lora_" in name:
            parameter.data = parameter.data.float()
            parameter.requires_grad_(True)


def _peft():
    """The peft package, or one line saying how to install it."""
    try:
        import peft
    except ModuleNotFoundError:
        raise ModuleNotFoundError("LoRA fine-tuning needs the peft package: pip install 'mist-protect[finetune]' "
                                  "(or use the full-UNet kind)") from None
    return peft
