"""PID, prompt-independent data protection (Li, Mo, Li and Wang, "PID: Prompt-Independent Data Protection Against
Latent Diffusion Models", ICML 2024; code: PKU-ML/Diffusion-PID-Protection): the VAE encoder alone, pushed to give
the protected image a posterior whose mean and variance are far from the clean image's. No prompt and no UNet: with
PhotoGuard, the cheapest method here.

With mu, log sigma^2 the encoder's posterior mean and log-variance (unscaled) of x', and mu_c, log sigma_c^2 those of
the clean image x (computed once per tile):
    mean          L_mu  = mean((mu - mu_c)^2)
    log_variance  L_lv  = mean((log sigma^2 - log sigma_c^2)^2)
    std           L_sd  = mean((sigma - sigma_c)^2)
objective (minimised by PGD, so the terms are raised): `add-log` (the default, as PID.sh runs it) -(L_mu + L_lv);
`add` -(L_mu + L_sd); `mean` -L_mu; `var` -L_sd (the code's "var" compares standard deviations). Means are over the
latent elements, as the code's mse_loss(reduction="mean"). No random numbers are drawn.

The code's budget is 12.75/255 of the [0, 1] range (12.75 levels) with 1000 steps of 1 level; here budget and steps are
the run's settings (Mist's defaults: 16 levels, 100 steps of 1 level; the code's with `--preset paper`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

from mist.engine.methods import register_method
from mist.engine.methods.base import Loss, LossTerms, Method, MethodParams, TileInputs, param

LOSSES = ("add-log", "add", "mean", "var")
# The terms each choice raises.
TERMS = {"add-log": ("mean", "log_variance"), "add": ("mean", "std"), "mean": ("mean",), "var": ("std",)}

# PID as PKU-ML/Diffusion-PID-Protection (commit af7a928) runs it: PID.sh l. 27-30, 1000 steps, eps 12.75 and
# attack_type add-log; PID.py works on the [0, 1] scale (l. 194-195) with epsilon = eps / 255 (l. 183): 12.75 levels;
# a uniform random start in [-epsilon, epsilon] (l. 184) and constant steps of 1/255 (l. 258; its --step_size is not
# read): 1 level. 1000 encoder passes per image, ten times the default's 100.
PAPER_PRESET = {"epsilon": 12.75, "step_size": 1, "steps": 1000, "start": "random", "step_schedule": "constant",
                "pid_loss": "add-log"}


@dataclass(frozen=True)
class PIDParams(MethodParams):
    pid_loss: str = param("add-log", "what PID pushes away from the clean image's posterior: add-log, its mean and "
                                     "log-variance (the paper's choice); add, mean and standard deviation; mean; var, "
                                     "the standard deviation", choices=LOSSES, label="PID loss")


@register_method
class PID(Method):
    name = "pid"
    title = "PID (prompt-independent)"
    summary = ("pushes the VAE encoder's posterior mean and variance away from the clean image's; no prompt, no UNet: "
               "cheap, a good CPU method")
    paper = "Li et al., ICML 2024"
    Params = PIDParams
    paper_preset = PAPER_PRESET
    parts = frozenset({"encoder"})

    def prepare(self, tiles: Sequence[TileInputs]) -> Loss:
        import torch

        from mist.engine import objectives

        model, precision, chosen = self.model, self.precision, TERMS[self.params.pid_loss]
        with torch.no_grad():
            clean = [objectives.posterior(model, tile.clean, precision) for tile in tiles]
        clean_mean, clean_logvar = torch.cat([m for m, _ in clean]), torch.cat([v for _, v in clean])

        def mse(a, b):
            return (a - b).pow(2).flatten(1).mean(1)

        def loss(x, generators) -> LossTerms:
            mean, logvar = objectives.posterior(model, x, precision)
            terms = {}
            if "mean" in chosen:
                terms["mean"] = mse(mean, clean_mean)
            if "log_variance" in chosen:
                terms["log_variance"] = mse(logvar, clean_logvar)
            if "std" in chosen:
                terms["std"] = mse(torch.exp(0.5 * logvar), torch.exp(0.5 * clean_logvar))
            return LossTerms(-sum(terms.values()), terms)

        return loss

    def objective_is_a_mean(self) -> bool:
        return True  # each term is a mean over the N latent elements
