"""Global step diagnostics: every number is a ratio of global sums (one all-reduce per step).

A :class:`Metrics` accumulator collects local ``(sum, count)`` pairs; :meth:`Metrics.reduce` sums
all of them over the data-parallel group in one collective and returns ``sum / count`` per name
(NaN for a metric with global count 0, e.g. a clip fraction when nothing can clip). Standard
deviations are derived from the global first and second moments.
"""

from __future__ import annotations

from typing import Optional

import torch

from rspo_mega.likelihood.elbo import ElboEstimate
from rspo_mega.parallel.reductions import ProcessGroup, global_sums


class Metrics:
    """Accumulates local partial sums of named means; reduces them globally in one all-reduce."""

    def __init__(self) -> None:
        self._sums: dict[str, list[torch.Tensor]] = {}
        self._stds: list[str] = []

    def add_mean(self, name: str, values: torch.Tensor,
                 weights: Optional[torch.Tensor] = None) -> None:
        """Register the (weighted) global mean of ``values``."""
        v = values.detach().to(torch.float64).flatten()
        w = torch.ones_like(v) if weights is None else weights.detach().to(torch.float64).flatten()
        self._sums[name] = [(v * w).sum(), w.sum()]

    def add_fraction(self, name: str, flags: torch.Tensor, valid: torch.Tensor) -> None:
        """Global fraction of ``flags`` among the ``valid`` entries."""
        self.add_mean(name, flags.to(torch.float64), valid.to(torch.float64))

    def add_std(self, name: str, values: torch.Tensor) -> None:
        """Register the global (population) standard deviation of ``values``."""
        v = values.detach().to(torch.float64).flatten()
        n = torch.tensor(float(v.numel()), dtype=torch.float64)
        self._sums[f"{name}/m1"] = [v.sum(), n]
        self._sums[f"{name}/m2"] = [(v * v).sum(), n]
        self._stds.append(name)

    def reduce(self, group: ProcessGroup = None) -> dict[str, float]:
        names = sorted(self._sums)
        if not names:
            return {}
        flat = torch.stack([t.to(torch.float64).reshape(()) for n in names for t in self._sums[n]])
        tot = global_sums(flat, group).view(len(names), 2)
        out = {}
        for i, n in enumerate(names):
            num, den = tot[i].tolist()
            out[n] = num / den if den > 0 else float("nan")
        for name in self._stds:
            m1, m2 = out.pop(f"{name}/m1"), out.pop(f"{name}/m2")
            out[name] = max(m2 - m1 * m1, 0.0) ** 0.5
        return out


def add_elbo_diagnostics(metrics: Metrics, prefix: str, est: ElboEstimate) -> None:
    """ELBO per token and its spread across MC samples (per-token units, mean over completions)."""
    metrics.add_mean(f"{prefix}/elbo_per_token", est.score)
    if est.per_sample.shape[1] > 1:
        metrics.add_mean(f"{prefix}/elbo_mc_spread_per_token", est.spread / est.lengths)


def add_relative_score_diagnostics(
    metrics: Metrics, d: torch.Tensor, dhat: torch.Tensor, advantages: torch.Tensor
) -> None:
    """Relative score ``d = (ELBO_theta - ELBO_ref)/L``: mean and spread; the fraction of
    completions (with ``A != 0``) whose centred score ``dhat`` has the opposite sign of ``A``."""
    metrics.add_mean("relative_score/mean", d)
    metrics.add_std("relative_score/std", d)
    metrics.add_std("relative_score/centered_std", dhat)
    valid = advantages != 0
    against = torch.sign(dhat.detach()) != torch.sign(advantages.detach())
    metrics.add_fraction("relative_score/against_advantage_frac", against & valid, valid)
    metrics.add_mean("advantage/mean", advantages)
    metrics.add_std("advantage/std", advantages)
