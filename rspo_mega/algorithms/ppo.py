"""The PPO pieces shared by the ratio losses (diffu-GRPO, AGRPO): the clipped surrogate and k3.

Shapes: ``[N, L]`` per scored sequence and position, ``score [N, L]`` True where a token counts,
``adv [N, 1]`` the advantage of each sequence's completion.
"""

from __future__ import annotations

from typing import Optional

import torch

from rspo_mega.algorithms.diagnostics import Metrics


def clipped_surrogate(log_ratio: torch.Tensor, adv: torch.Tensor, score: torch.Tensor, eps: float,
                      metrics: Metrics, prefix: str) -> torch.Tensor:
    """Per-token ``-min(r A, clip(r, 1 - eps, 1 + eps) A)`` with ``r = exp(log_ratio)`` on scored
    tokens (1 elsewhere); logs ``<prefix>/clip_frac`` and ``<prefix>/ratio_mean``."""
    ratio = torch.exp(torch.where(score, log_ratio, torch.zeros_like(log_ratio)))
    per_token = -torch.minimum(ratio * adv, ratio.clamp(1.0 - eps, 1.0 + eps) * adv)
    clipped = ((ratio > 1.0 + eps) & (adv > 0)) | ((ratio < 1.0 - eps) & (adv < 0))
    metrics.add_fraction(f"{prefix}/clip_frac", clipped & score, score)
    metrics.add_mean(f"{prefix}/ratio_mean", ratio, score)
    return per_token


def with_k3(per_token: torch.Tensor, logp: torch.Tensor, ref_logp: Optional[torch.Tensor],
            score: torch.Tensor, beta: float, metrics: Metrics,
            weight: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``per_token + beta * weight * k3`` with ``k3 = exp(ref - logp) - (ref - logp) - 1`` per
    scored token (logged unweighted as ``kl/k3_per_token``; ``weight [N, L]`` default 1);
    ``per_token`` unchanged without a reference."""
    if ref_logp is None:
        return per_token
    log_r = torch.where(score, ref_logp.detach() - logp, torch.zeros_like(logp))
    k3 = torch.exp(log_r) - log_r - 1.0
    if beta > 0:
        per_token = per_token + beta * (k3 if weight is None else weight * k3)
    metrics.add_mean("kl/k3_per_token", k3, score)
    return per_token
