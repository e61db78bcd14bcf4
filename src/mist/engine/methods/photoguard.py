"""PhotoGuard's encoder attack (Salman et al., "Raising the Cost of Malicious AI-Powered Image Editing", ICML 2023;
code: MadryLab/photoguard): the VAE encoder alone, driven to map the image where it maps a target image.

objective (minimised by PGD): ||mu(x') - mu(y)||_2 per image, mu the mean of the encoder's posterior (unscaled, no
sample drawn), y the target image: by default a flat grey image, as the paper's demo uses (a grey-uniformity test
card, resized to 512 x 512); with `zero_target` and no target image given, ||mu(x')||_2, the zero latent as target, as
the img2img notebook minimises `model(X_adv).latent_dist.mean.norm()` (no image is encoded for it).

The L2 norm (not its square) is what the public code minimises (`(mean - targets).norm()`). No random numbers are drawn.
The paper's demos run 200 steps of 0.01 within 0.12 ([-1, 1] units: about 1.3 and 15 levels) for inpainting and 1000
steps of 0.02 within 0.06 for img2img; here budget and steps are the run's settings (Mist's defaults: 16 levels, 100
steps of 1 level), and `--preset paper` gives the img2img notebook's (PAPER_PRESET below).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from mist.engine.methods import register_method
from mist.engine.methods.base import Loss, LossTerms, Method, MethodParams, TileInputs, param
from mist.engine.methods.common import target_or, target_param

GREY = (128, 128, 128)  # the flat grey target (8-bit RGB)

# PhotoGuard's img2img attack as MadryLab/photoguard (commit 686bea7) runs it, in
# notebooks/demo_simple_attack_img2img.ipynb (line numbers of the notebook's JSON): eps=0.06, step_size=0.02,
# iters=1000 on the [-1, 1] scale (l. 202-204; 0.06 x 127.5 = 7.65 levels, 0.02 x 127.5 = 2.55); a uniform random
# start in [-eps, eps] (l. 142); the step decayed linearly to step_size / 100 (l. 145); the loss
# model(X_adv).latent_dist.mean.norm(), the zero latent as target (l. 149). 1000 encoder passes forward and backward
# per image: ten times the default's 100.
PAPER_PRESET = {"epsilon": 7.65, "step_size": 2.55, "steps": 1000, "start": "random", "step_schedule": "linear",
                "zero_target": True}


def grey_image():
    """The default target: a flat grey 512 x 512 image."""
    from PIL import Image

    return Image.new("RGB", (512, 512), GREY)


@dataclass(frozen=True)
class PhotoGuardParams(MethodParams):
    target: Path | None = target_param("image whose encoding the image's is driven to (default: flat grey)")
    zero_target: bool = param(False, "without a target image: drive the encoding to the zero latent, as PhotoGuard's "
                                     "img2img notebook does, instead of flat grey's", advanced=True,
                              label="Zero latent as target")


@register_method
class PhotoGuard(Method):
    name = "photoguard"
    title = "PhotoGuard (encoder attack)"
    summary = "drives the VAE encoder's output to that of a flat grey (or given) image, or to zero; no UNet, cheap"
    paper = "Salman et al., ICML 2023"
    Params = PhotoGuardParams
    parts = frozenset({"encoder"})
    paper_preset = PAPER_PRESET

    def target_image(self):
        return None if self.aims_at_zero() else target_or(self.params.target, grey_image)

    def aims_at_zero(self) -> bool:
        """Whether the target is the zero latent: `zero_target` with no target image given."""
        return self.params.zero_target and self.params.target is None

    def prepare(self, tiles: Sequence[TileInputs]) -> Loss:
        import torch

        from mist.engine import objectives

        model, precision = self.model, self.precision
        targets = 0.0  # the zero latent
        if not self.aims_at_zero():
            with torch.no_grad():
                targets = torch.cat([objectives.posterior(model, tile.target, precision)[0] for tile in tiles])

        def loss(x, generators) -> LossTerms:
            mean, _ = objectives.posterior(model, x, precision)
            distance = (mean - targets).flatten(1).norm(dim=1)
            return LossTerms(distance, {"distance": distance})

        return loss
