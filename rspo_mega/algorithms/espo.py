"""ESPO (arXiv 2512.03759): sequence-level clipped ratio of ELBOs plus a k2 penalty.

Per completion i (same masks for policy, old policy and reference)::

    rho_i = exp((ELBO_theta - ELBO_old) / L_i)
    ell_i = - min(rho_i A_i, clip(rho_i, 1 - eps, 1 + eps) A_i)
            + beta * 1/2 (ELBO_theta - ELBO_ref)^2 / L_i                 (k2, scaled by 1/L as in
                                                                          the ESPO code)

with ``eps = algorithm.clip_eps`` and ``beta = algorithm.kl_beta``; the mean over the global batch.
The advantage is whatever ``algorithm.advantage`` gives (ESPO uses ``mean``). Without old
log-probs (first inner update) ``rho = 1``. The reference is needed only when ``beta > 0``.
"""

from __future__ import annotations

import torch

from rspo_mega.algorithms.base import LossInputs, PolicyLoss
from rspo_mega.algorithms.diagnostics import (
    Metrics,
    add_elbo_diagnostics,
    add_relative_score_diagnostics,
)
from rspo_mega.config.schema import AlgorithmConfig
from rspo_mega.likelihood.elbo import estimate_elbo
from rspo_mega.parallel.reductions import global_mean


class ESPOLoss(PolicyLoss):
    """Sequence-level ELBO-ratio PPO with a k2 reference penalty."""

    name = "espo"
    needs_old_policy = True

    @classmethod
    def needs_reference(cls, algorithm: AlgorithmConfig) -> bool:
        """Only with a KL penalty (``algorithm.kl_beta > 0``)."""
        return algorithm.kl_beta > 0

    def terms(self, inputs: LossInputs, metrics: Metrics) -> torch.Tensor:
        eps, beta = float(self.algorithm.clip_eps), float(self.algorithm.kl_beta)
        est = estimate_elbo(inputs.logp, inputs.masked)
        old = estimate_elbo(inputs.old().detach(), inputs.masked)
        length = est.lengths.to(est.elbo.dtype)
        adv = inputs.advantages.to(est.elbo.dtype)
        ratio = torch.exp((est.elbo - old.elbo) / length)
        surrogate = torch.minimum(ratio * adv, ratio.clamp(1.0 - eps, 1.0 + eps) * adv)
        terms = -surrogate
        clipped = ((ratio > 1.0 + eps) & (adv > 0)) | ((ratio < 1.0 - eps) & (adv < 0))
        metrics.add_fraction("espo/clip_frac", clipped, torch.ones_like(clipped))
        metrics.add_mean("espo/ratio_mean", ratio)
        add_elbo_diagnostics(metrics, "policy", est)
        if inputs.ref_logp is not None:
            ref = estimate_elbo(inputs.ref_logp.detach(), inputs.masked)
            delta = est.elbo - ref.elbo
            k2 = 0.5 * delta * delta / length
            if beta > 0:
                terms = terms + beta * k2
            d = delta / length
            dhat = d - global_mean(d.detach(), group=self.group)
            metrics.add_mean("kl/k2_per_token", k2)
            add_elbo_diagnostics(metrics, "reference", ref)
            add_relative_score_diagnostics(metrics, d, dhat, adv)
        return terms
