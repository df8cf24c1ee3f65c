"""diffu-GRPO (d1, arXiv 2504.12216): one-step log-probs, token-level clipped ratio, k3 KL.

Requires ``likelihood.mask_scheme = 'one_step'`` (completion fully masked, prompt partly masked).
For every scored token t of MC sample k of completion i::

    rho   = exp(logp_theta - logp_old)
    k3    = exp(logp_ref - logp_theta) - (logp_ref - logp_theta) - 1
    ell_t = - [ min(rho A_i, clip(rho, 1 - eps, 1 + eps) A_i) - beta * k3 ]

The loss is the mean of ``ell_t`` over every scored token of the global batch (all MC samples).
d1's trainer takes this token mean over a device's batch; here it is global, so that it does not
depend on the layout.
With ``likelihood.count_positions=generated`` every completion has the same scored length and
this equals the mean over completions of their token means. d1 uses ``eps = 0.5``,
``beta = 0.04``, mu = 12, one mask draw per inner update (``likelihood.fresh_masks_per_update``).
"""

from __future__ import annotations

import torch

from rspo_mega.algorithms.base import LossInputs, PolicyLoss
from rspo_mega.algorithms.ppo import clipped_surrogate, with_k3
from rspo_mega.algorithms.diagnostics import (
    Metrics,
    add_elbo_diagnostics,
    add_relative_score_diagnostics,
)
from rspo_mega.config.schema import AlgorithmConfig
from rspo_mega.likelihood.elbo import estimate_elbo, token_sum
from rspo_mega.parallel.reductions import global_mean


class DiffuGRPOLoss(PolicyLoss):
    """Token-level clipped policy gradient on one-step log-probs with a per-token k3 penalty."""

    name = "diffu_grpo"
    normalizer = "tokens"
    needs_old_policy = True
    mask_schemes = ("one_step",)

    @classmethod
    def needs_reference(cls, algorithm: AlgorithmConfig) -> bool:
        """Only with a KL penalty (``algorithm.kl_beta > 0``)."""
        return algorithm.kl_beta > 0

    def terms(self, inputs: LossInputs, metrics: Metrics) -> torch.Tensor:
        eps, beta = float(self.algorithm.clip_eps), float(self.algorithm.kl_beta)
        masked = inputs.masked
        score = masked.score_mask
        lp = inputs.logp
        adv = inputs.advantages.to(lp.dtype)[masked.completion_index].unsqueeze(1)  # [N, 1]
        per_token = clipped_surrogate(lp - inputs.old().detach(), adv, score, eps, metrics,
                                      "diffu_grpo")
        est = estimate_elbo(lp, masked)
        add_elbo_diagnostics(metrics, "policy", est)
        per_token = with_k3(per_token, lp, inputs.ref_logp, score, beta, metrics)
        if inputs.ref_logp is not None:
            ref = estimate_elbo(inputs.ref_logp.detach(), masked)
            d = (est.elbo - ref.elbo) / est.lengths.to(est.elbo.dtype)
            dhat = d - global_mean(d.detach(), group=self.group)
            add_relative_score_diagnostics(metrics, d, dhat, inputs.advantages.to(lp.dtype))
        return token_sum(per_token, masked)
