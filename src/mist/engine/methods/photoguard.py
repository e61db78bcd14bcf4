"""PhotoGuard's encoder attack (Salman et al., "Raising the Cost of Malicious AI-Powered Image Editing", ICML 2023;
code: MadryLab/photoguard): the VAE encoder alone, driven to map the image where it maps a target image.

objective (minimised by PGD): ||mu(x') - mu(y)||_2 per image, mu the mean of the encoder's posterior (unscaled, no
sample drawn), y the target image: by default a flat grey image, as the paper's demo uses (a grey-uniformity test
card, resized to 512 x 512).

The L2 norm (not its square) is what the public code minimises (`(mean - targets).norm()`). No random numbers are drawn.
The paper's demos run 200 steps of 0.01 within 0.12 ([-1, 1] units: about 1.3 and 15 levels) for inpainting and 1000
steps of 0.02 within 0.06 for img2img; here budget and steps are the run's settings (Mist's defaults: 16 levels, 100
steps of 1 level).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from mist.engine.methods import register_method
from mist.engine.methods.base import Loss, LossTerms, Method, MethodParams, TileInputs
from mist.engine.methods.common import target_or, target_param

GREY = (128, 128, 128)  # the flat grey target (8-bit RGB)


def grey_image():
    """The default target: a flat grey 512 x 512 image."""
    from PIL import Image

    return Image.new("RGB", (512, 512), GREY)


@dataclass(frozen=True)
class PhotoGuardParams(MethodParams):
    target: Path | None = target_param("image whose encoding the image's is driven to (default: flat grey)")


@register_method
class PhotoGuard(Method):
    name = "photoguard"
    title = "PhotoGuard (encoder attack)"
    summary = "drives the VAE encoder's output to that of a flat grey (or given) image; no UNet, cheap"
    paper = "Salman et al., ICML 2023"
    Params = PhotoGuardParams
    parts = frozenset({"encoder"})

    def target_image(self):
        return target_or(self.params.target, grey_image)

    def prepare(self, tiles: Sequence[TileInputs]) -> Loss:
        import torch

        from mist.engine import objectives

        model, precision = self.model, self.precision
        with torch.no_grad():
            targets = torch.cat([objectives.posterior(model, tile.target, precision)[0] for tile in tiles])

        def loss(x, generators) -> LossTerms:
            mean, _ = objectives.posterior(model, x, precision)
            distance = (mean - targets).flatten(1).norm(dim=1)
            return LossTerms(distance, {"distance": distance})

        return loss
