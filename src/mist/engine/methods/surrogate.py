"""What the surrogate-training methods (`aspl`, `mist2-lora`) share: the declarations of their fine-tuning parameters
(one per name, so a flag means the same for both) and the seeding of their surrogate. The training itself is
`mist.engine.finetune`'s, the one trainer `mist evaluate`'s fine-tuning mimicry uses too.

A surrogate lives for one attack batch (`Method.prepare` makes it): with the default batch size of 1 each image gets
its own, trained on that image alone; with `--batch-size N` the N images of a batch train one surrogate together, as
Anti-DreamBooth trains on an artist's set, and each image's result then depends on the others of its batch.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Sequence

from mist.engine.methods.base import TileInputs, param

if TYPE_CHECKING:
    import torch

    from mist.engine.finetune import FinetuneOptions


def round_steps_param(default: int, source: str) -> Any:
    """`round_steps`: PGD steps between two fine-tuning rounds of the surrogate."""
    return param(default, f"PGD steps per round, between two fine-tunings of the surrogate ({source}: {default})",
                 low=1, high=10000, advanced=True, label="Steps per round")


def surrogate_steps_param(default: int, source: str) -> Any:
    """`surrogate_steps`: optimiser steps of each fine-tuning round (0: the surrogate never trains)."""
    return param(default, f"fine-tuning steps of the surrogate per round; 0: it never trains ({source}: {default})",
                 low=0, high=10000, advanced=True, label="Surrogate steps")


def surrogate_lr_param(default: float, source: str) -> Any:
    """`surrogate_lr`: AdamW's learning rate for the surrogate."""
    return param(default, f"learning rate of the surrogate's fine-tuning ({source})", low=1e-10, high=1, advanced=True,
                 label="Surrogate learning rate")


def lora_rank_param() -> Any:
    """`lora_rank`: rank of the surrogate's LoRA adapters."""
    return param(4, "rank of the surrogate's LoRA adapters (Anti-DreamBooth's and Mist-v2's: 4)", low=1, high=1024,
                 advanced=True, label="LoRA rank")


def options(kind: str, rank: int, learning_rate: float) -> FinetuneOptions:
    """The trainer's options for a surrogate: one image per step (both papers' codes train on one instance image per
    step), AdamW as the trainer's defaults (both codes' too)."""
    from mist.engine.finetune import FinetuneOptions

    return FinetuneOptions(kind=kind, rank=rank, learning_rate=learning_rate, batch_size=1)


def generator(tiles: Sequence[TileInputs]) -> torch.Generator:
    """The surrogate's random stream (adapter initialisation, images and draws of its training), seeded from the
    tiles' "surrogate" streams."""
    import torch

    return torch.Generator().manual_seed(sum(tile.seed("surrogate") for tile in tiles) % 2**63)
