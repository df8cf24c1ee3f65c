"""RSPO: Relative Score Policy Optimization (arXiv 2605.10218), the form of its Eq. 3.3.

Per completion i, with the *same* masks for policy and frozen reference::

    d_i    = (ELBO_theta(y_i|x) - ELBO_ref(y_i|x)) / L_i          relative score, nats per token
    dhat_i = d_i - stopgrad(mean_{j in C(i)} d_j)                   centred over scope C
    ell_i  = - stopgrad(A_i - lambda * dhat_i) * dhat_i

normalised by the global number of completions (``algorithm.push_clip`` optionally bounds the
stop-gradient factor: a Huber loss on the residual). Its gradient is
``lambda * grad(1/2 mean_i (dhat_i - A_i/lambda)^2)``: a regression of the centred relative
log-ratio onto the target ``A/lambda`` (``lambda = 0``: advantage-weighted ELBO gradient).

Centering scope ``algorithm.centering``: ``batch`` (default; the global batch, one all-reduce),
``group`` (the completions of one prompt, possibly on several ranks; a segment all-reduce) or
``microbatch`` (consecutive chunks of ``algorithm.microbatch_completions`` local completions, as in the
third-party port; this one depends on the batch split by construction) or ``none`` (no centering:
the log-partition is taken as 0, so a drift of every completion's relative score in the same
direction is pulled back too; batch centering cannot see such a common-mode drift).
"""

from __future__ import annotations

from typing import Optional

import torch

from rspo_mega.algorithms.base import LossInputs, PolicyLoss
from rspo_mega.algorithms.diagnostics import (
    Metrics,
    add_elbo_diagnostics,
    add_relative_score_diagnostics,
)
from rspo_mega.config.schema import AlgorithmConfig, Centering, LikelihoodConfig, choices
from rspo_mega.likelihood.elbo import estimate_elbo
from rspo_mega.parallel.reductions import ProcessGroup, global_mean, segment_sums


def centering_mean(
    d: torch.Tensor,
    scope: str,
    group_ids: torch.Tensor,
    num_groups: int,
    microbatch_completions: Optional[int],
    group: ProcessGroup,
) -> torch.Tensor:
    """The stop-gradient mean of ``d [B]`` over each completion's centering scope: ``[B]``."""
    d = d.detach()
    if scope == "none":
        return torch.zeros_like(d)
    if scope == "batch":
        return global_mean(d, group=group).expand_as(d)
    if scope == "group":
        ids = group_ids.long()
        stacked = torch.cat([d.to(torch.float64), torch.ones_like(d, dtype=torch.float64)])
        sums = segment_sums(stacked, torch.cat([ids, ids + num_groups]), 2 * num_groups, group)
        mean = sums[:num_groups] / sums[num_groups:].clamp(min=1.0)
        return mean[ids].to(d.dtype)
    if scope == "microbatch":
        if not microbatch_completions or microbatch_completions < 1:
            raise ValueError("algorithm.centering='microbatch' needs microbatch_completions >= 1")
        chunk = torch.arange(d.numel(), device=d.device) // microbatch_completions
        n_chunks = int(chunk.max()) + 1 if d.numel() else 0
        sums = torch.zeros(n_chunks, dtype=torch.float64, device=d.device).index_add_(
            0, chunk, d.to(torch.float64))
        counts = torch.bincount(chunk, minlength=n_chunks).to(torch.float64)
        return (sums / counts)[chunk].to(d.dtype)
    raise ValueError(f"algorithm.centering={scope!r}: expected one of {choices(Centering)}")


class RSPOLoss(PolicyLoss):
    """Relative-score regression onto the advantage-implied target (see module docstring)."""

    name = "rspo"

    @classmethod
    def needs_reference(cls, algorithm: AlgorithmConfig) -> bool:
        """Always: the target is relative to the reference policy."""
        return True

    def __init__(self, algorithm: AlgorithmConfig, likelihood: LikelihoodConfig,
                 group: ProcessGroup = None):
        super().__init__(algorithm, likelihood, group)

    def terms(self, inputs: LossInputs, metrics: Metrics) -> torch.Tensor:
        lam = float(self.algorithm.lambda_)
        est = estimate_elbo(inputs.logp, inputs.masked)
        ref = estimate_elbo(inputs.ref_logp.detach(), inputs.masked)
        d = (est.elbo - ref.elbo) / est.lengths.to(est.elbo.dtype)
        center = centering_mean(d, self.algorithm.centering, inputs.group_ids, inputs.num_groups,
                                self.algorithm.microbatch_completions, self.group)
        dhat = d - center
        adv = inputs.advantages.to(d.dtype)
        push = (adv - lam * dhat).detach()
        if self.algorithm.push_clip is not None:  # Huber: a bounded pull for large residuals
            bound = float(self.algorithm.push_clip)
            metrics.add_fraction("rspo/push_clip_frac", push.abs() > bound, torch.ones_like(push))
            push = push.clamp(-bound, bound)
        add_elbo_diagnostics(metrics, "policy", est)
        add_elbo_diagnostics(metrics, "reference", ref)
        add_relative_score_diagnostics(metrics, d, dhat, adv)
        metrics.add_mean("rspo/push_mean", push)
        metrics.add_std("rspo/push_std", push)
        return -push * dhat
