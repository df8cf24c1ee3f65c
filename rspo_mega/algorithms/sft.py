"""Masked-diffusion SFT: maximise the per-token ELBO of reference completions from the data.

The same masks, estimators and parallel runner as the RL losses, with labels from data instead of
rollouts: ``ell_i = -ELBO(y_i | x_i) / L_i``, normalised by the global number of completions.
It warm-starts a model before RL (LLaDA's SFT objective, per-token rather than per-sequence).
"""

from __future__ import annotations

import torch

from rspo_mega.algorithms.base import LossInputs, PolicyLoss
from rspo_mega.algorithms.diagnostics import Metrics, add_elbo_diagnostics
from rspo_mega.config.schema import ElboMaskScheme, choices
from rspo_mega.likelihood.elbo import estimate_elbo


class SFTLoss(PolicyLoss):
    """Negative per-token ELBO of the data completions; needs no reference, advantages ignored."""

    name = "sft"
    normalizer = "completions"
    is_rl = False
    mask_schemes = choices(ElboMaskScheme)
    mask_schemes_why = "it maximises the ELBO itself"

    def terms(self, inputs: LossInputs, metrics: Metrics) -> torch.Tensor:
        est = estimate_elbo(inputs.logp, inputs.masked)
        add_elbo_diagnostics(metrics, "policy", est)
        return -est.score
