"""ELBO estimators: per-token log-probs of masked sequences -> per-completion ELBO estimates.

Input is ``logp [N, S]`` (log p(label | masked input) at every position, from the model) and the
:class:`MaskedBatch` that produced the inputs. Every function is differentiable in ``logp``; the
losses take gradients through them. Units: nats. Unscored positions are ignored even if their
log-prob is not finite.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from rspo_mega.likelihood.batch_types import MaskedBatch


@dataclass
class ElboEstimate:
    """Per-completion Monte-Carlo ELBO.

    ``per_sample [B, K]``: the estimate of each MC sample (a coupled pair counts as one sample);
    ``elbo [B]``: their mean; ``lengths [B]``: L; ``score [B]``: ELBO / L (nats per token);
    ``spread [B]``: standard deviation across the K samples (Bessel-corrected, 0 when K = 1).
    """

    per_sample: torch.Tensor
    elbo: torch.Tensor
    lengths: torch.Tensor
    score: torch.Tensor
    spread: torch.Tensor


def sequence_estimates(logp: torch.Tensor, masked: MaskedBatch) -> torch.Tensor:
    """Weighted sum of scored log-probs of every masked sequence: ``[N]``."""
    if logp.shape != masked.weights.shape:
        raise ValueError(f"logp {tuple(logp.shape)} does not match the masked batch "
                         f"{tuple(masked.weights.shape)}")
    scored = torch.where(masked.score_mask, logp, torch.zeros_like(logp))
    return (scored * masked.weights.to(logp.dtype)).sum(dim=-1)


def estimate_elbo(logp: torch.Tensor, masked: MaskedBatch) -> ElboEstimate:
    """ELBO per completion: mean over MC samples of the (pair-summed) sequence estimates."""
    b, k, u = masked.num_completions, masked.num_mc, masked.units_per_sample
    per_sample = sequence_estimates(logp, masked).view(b, k, u).sum(dim=-1)
    elbo = per_sample.mean(dim=1)
    lengths = masked.lengths.to(logp.device)
    spread = per_sample.std(dim=1) if k > 1 else torch.zeros_like(elbo)
    return ElboEstimate(
        per_sample=per_sample,
        elbo=elbo,
        lengths=lengths,
        score=elbo / lengths.to(elbo.dtype),
        spread=spread,
    )


def token_sum(values: torch.Tensor, masked: MaskedBatch) -> torch.Tensor:
    """Per completion, the sum of a per-token quantity ``[N, S]`` over the scored positions of
    all its masked sequences: ``[B]`` (with the global count of scored tokens as the normaliser,
    a token mean over the batch, as diffu-GRPO's)."""
    scored = torch.where(masked.score_mask, values, torch.zeros_like(values)).sum(dim=-1)
    return scored.view(masked.num_completions, -1).sum(dim=1)
