"""diffu-GRPO (d1, arXiv 2504.12216): one-step log-probs, token-level clipped ratio, k3 KL.

Requires ``likelihood.mask_scheme = 'one_step'`` (completion fully masked, prompt partly masked).
For every scored token t of MC sample k of completion i::

    rho   = exp(logp_theta - logp_old)
    k3    = exp(logp_ref - logp_theta) - (logp_ref - logp_theta) - 1
    ell_t = - [ min(rho A_i, clip(rho, 1 - eps, 1 + eps) A_i) - beta * k3 ]

``ell_i`` is the mean over the completion's scored tokens and MC samples (GRPO's per-sequence
token mean), then the mean over the global batch. d1 uses ``eps = 0.5``, ``beta = 0.04``, mu = 12.
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
from rspo_mega.likelihood.elbo import estimate_elbo, token_average
from rspo_mega.parallel.reductions import global_mean


class DiffuGRPOLoss(PolicyLoss):
    """Token-level clipped policy gradient on one-step log-probs with a per-token k3 penalty."""

    name = "diffu_grpo"
    needs_old_policy = True
    mask_schemes = ("one_step",)

    @property
    def needs_reference(self) -> bool:  # type: ignore[override]
        return self.algorithm.kl_beta > 0

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
        return token_average(per_token, masked)
