"""AGRPO (arXiv 2510.04019, "Simple Policy Gradients for Reasoning with Diffusion Language
Models"): the policy gradient of the denoising trajectory, amortized over sampled steps.

Needs ``likelihood.mask_scheme = 'trajectory'``: the masked batch holds, per completion i, K
sampled steps ``t_k`` of its rollout with unbiasing weights ``w_k = 1 / q_i(t_k)``
(:mod:`rspo_mega.likelihood.trajectory_estimator`) and the rollout's recorded log-probs of the tokens each
step committed. For every token j committed at a sampled step (``C_{t_k}``)::

    rho_j  = exp(logp_theta(y_j | x_{t_k}) - logp_rollout(y_j | x_{t_k}))
    k3_j   = exp(logp_ref - logp_theta) - (logp_ref - logp_theta) - 1
    ell_j  = - min(rho_j A_i, clip(rho_j, 1 - eps, 1 + eps) A_i) + beta * rho_j * k3_j

    ell_i  = (1 / T_i) * (1/K) sum_k w_k sum_{j in C_{t_k}} ell_j
    loss   = (1 / N) sum_i ell_i                       (N: completions of the global batch)

with ``eps = algorithm.clip_eps``, ``beta = algorithm.kl_beta``, ``T_i`` the completion's counted
steps (up to its last non-EOS commit) and ``A_i`` from ``algorithm.advantage`` (AGRPO uses
``mean``: ``r - mean_group(r)``). All log-probs are of the rollout policy's form
``softmax(logits / T)`` (``rollout.temperature``, ``forbid_eos`` applied).

**Normalisation and its source.** In expectation over the sampled steps ``ell_i`` is the *mean
over the completion's T_i steps* of the step's summed token losses: tokens are summed within a
step (no division by the tokens per step), steps are averaged, completions are averaged. This is
what the public AGRPO code (github.com/probablyabot/agrpo, ``agrpo_trainer.py``) computes: per MC
sample ``sum_tokens(loss * iw) / (mc_samples * num_generations)`` with importance weight
``iw = (1 / T_i) / q_i(t)`` for entropy sampling, per-device batch = num_generations = G (their
``train.yaml``), i.e. a mean over completions. Two differences from that code, both recorded
here: its uniform branch draws ``floor(u * last_step)``, i.e. steps ``0 .. last_step - 1``, while
its entropy branch (and this loss, in both modes) covers ``0 .. last_step``; and its
low-discrepancy draws are stratified over a rank's batch, here per completion (layout-free).
The paper's text could not be read here beyond its abstract. The k3 term is weighted by
``rho`` as in the public code (DeepSeek-V3.2's importance-sampling correction of the k3
estimate: the tokens come from the rollout policy, not the current one).

The ratio is against the *recorded* rollout log-probs (``TrajectoryBatch.rollout_logp``), not the
first inner update's: ``LossInputs.old_logp`` is ignored, so inner updates may draw fresh steps
(``likelihood.fresh_masks_per_update``). With ``rollout.remasking=low_confidence`` or threshold
decoding the positions a step commits depend on the model too; like the public code, the
gradient treats them as given (exact for ``remasking=random``).
"""

from __future__ import annotations

import torch

from rspo_mega.algorithms.base import LossInputs, PolicyLoss
from rspo_mega.algorithms.diagnostics import Metrics
from rspo_mega.algorithms.ppo import clipped_surrogate, with_k3
from rspo_mega.config.schema import AlgorithmConfig, LikelihoodConfig
from rspo_mega.likelihood.batch_types import TrajectoryBatch
from rspo_mega.likelihood.trajectory_estimator import trajectory_sum
from rspo_mega.parallel.reductions import ProcessGroup


class AGRPOLoss(PolicyLoss):
    """Token-level clipped ratio on sampled denoising steps, amortized over the trajectory."""

    name = "agrpo"
    needs_trajectory = True
    mask_schemes = ("trajectory",)  # sampled rollout steps, not an ELBO
    mask_schemes_why = "the other losses score ELBOs"

    def __init__(self, algorithm: AlgorithmConfig, likelihood: LikelihoodConfig,
                 group: ProcessGroup = None):
        super().__init__(algorithm, likelihood, group)
        if likelihood.mask_scheme not in self.mask_schemes:
            raise ValueError(f"algorithm.name='agrpo' needs likelihood.mask_scheme="
                             f"{self.mask_schemes[0]!r}, got {likelihood.mask_scheme!r}")

    @classmethod
    def needs_reference(cls, algorithm: AlgorithmConfig) -> bool:
        """Only with a KL penalty (``algorithm.kl_beta > 0``)."""
        return algorithm.kl_beta > 0

    def terms(self, inputs: LossInputs, metrics: Metrics) -> torch.Tensor:
        masked = inputs.masked
        if not isinstance(masked, TrajectoryBatch):
            raise ValueError("algorithm.name='agrpo' needs a TrajectoryBatch (sampled rollout "
                             f"steps), got {type(masked).__name__}")
        eps, beta = float(self.algorithm.clip_eps), float(self.algorithm.kl_beta)
        score, lp = masked.score_mask, inputs.logp
        zero = torch.zeros_like(lp)
        adv = inputs.advantages.to(lp.dtype)[masked.completion_index].unsqueeze(1)  # [N, 1]
        log_ratio = torch.where(score, lp - masked.rollout_logp.to(lp.dtype), zero)
        per_token = clipped_surrogate(log_ratio, adv, score, eps, metrics, "agrpo")
        steps = masked.steps.to(lp.dtype)
        metrics.add_mean("agrpo/steps", steps)
        metrics.add_mean("agrpo/tokens_per_sampled_step", score.sum(1).to(lp.dtype))
        metrics.add_mean("policy/logp_per_step", trajectory_sum(lp.detach(), masked) / steps)
        per_token = with_k3(per_token, lp, inputs.ref_logp, score, beta, metrics,
                            weight=torch.exp(log_ratio))
        return trajectory_sum(torch.where(score, per_token, zero), masked) / steps
