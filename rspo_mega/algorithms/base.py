"""The policy-loss interface: per-completion terms and one declared, globally reduced normaliser.

A loss sees this rank's masked batch and the per-token log-probs of the policy (differentiable),
of the frozen reference and of the old (rollout) policy, and returns per-completion loss terms
``ell_i``. The value it contributes on this rank is

    loss_rank = sum_{i on this rank} ell_i / N_global,

where ``N_global`` is the declared :attr:`PolicyLoss.normalizer` (``"completions"``: the number of
completions of the *global* batch; ``"tokens"``: its scored tokens over all masked sequences;
one all-reduce either way). Hence ``sum over DP ranks of loss_rank`` is the
exact global mean for any layout or micro-batch split, and so is its gradient, provided the DP
gradient reduction is a *sum* (see :func:`rspo_mega.likelihood.backward_loss_scale` for the
factors that undo megatron's averaging). Statistics that enter the terms (centering means, group
statistics) are likewise global and stop-gradient.

Terms are functions of whole-completion ELBOs, so they are evaluated once on the full local batch
of pass-1 log-probs; the gradient reaches the model through ``coeff = dloss/dlogp`` (see
:mod:`rspo_mega.algorithms.step`).
"""

from __future__ import annotations

import abc
from dataclasses import dataclass
from typing import ClassVar, Optional

import torch

from rspo_mega.algorithms.diagnostics import Metrics
from rspo_mega.config.schema import AlgorithmConfig, LikelihoodConfig, MaskedSequenceScheme, choices
from rspo_mega.likelihood.batch_types import MaskedBatch
from rspo_mega.parallel.reductions import ProcessGroup, data_parallel_group, global_count


@dataclass
class LossInputs:
    """What a loss sees on one rank (last pipeline stage).

    ``logp``, ``ref_logp``, ``old_logp``: ``[N, S]`` fp32 per-token log-probs of the masked
    sequences of ``masked`` under the policy, reference and old policy (same masks);
    ``advantages [B]``; ``group_ids [B]`` global prompt-group ids in ``[0, num_groups)``.
    ``old_logp=None`` means the old policy *is* the current one (first inner update).
    """

    masked: MaskedBatch
    logp: torch.Tensor
    advantages: torch.Tensor
    group_ids: torch.Tensor
    num_groups: int
    ref_logp: Optional[torch.Tensor] = None
    old_logp: Optional[torch.Tensor] = None

    def old(self) -> torch.Tensor:
        return self.logp.detach() if self.old_logp is None else self.old_logp


@dataclass
class LossOutput:
    """``loss``: this rank's share (0-d, differentiable in ``logp``); ``terms [B]``: per-completion
    loss terms; ``metrics``: local partial sums, reduced globally by the caller."""

    loss: torch.Tensor
    terms: torch.Tensor
    metrics: Metrics


class PolicyLoss(abc.ABC):
    """Base class: subclasses implement :meth:`terms` and declare what they need (the
    declarations are checked against a run's config by :func:`rspo_mega.setup.validate_run`)."""

    name: ClassVar[str]
    normalizer: ClassVar[str] = "completions"
    # an RL loss learns from scored rollouts; a supervised one (SFT) from the data's targets
    is_rl: ClassVar[bool] = True
    # Ratio losses compare with the rollout policy's log-probs on the *same* masks: from the
    # first inner update's pass, or, with fresh masks per update, scored on each update's masks
    # before the first update (see rspo_mega.training.update_loop).
    needs_old_policy: ClassVar[bool] = False
    # the likelihood.mask_scheme values whose estimate the loss is defined on
    mask_schemes: ClassVar[tuple[str, ...]] = choices(MaskedSequenceScheme)
    mask_schemes_why: ClassVar[str] = ""  # why only those, for the error naming them
    # Trajectory losses score sampled rollout steps: the rollout must keep its trajectory record.
    needs_trajectory: ClassVar[bool] = False

    def __init__(self, algorithm: AlgorithmConfig, likelihood: LikelihoodConfig,
                 group: ProcessGroup = None):
        self.algorithm = algorithm
        self.likelihood = likelihood
        self._group = group

    @classmethod
    def needs_reference(cls, algorithm: AlgorithmConfig) -> bool:
        """Whether the loss reads reference log-probs with the settings ``algorithm``."""
        return False

    @property
    def group(self) -> ProcessGroup:
        """The group over which the batch is sharded (default: data parallel)."""
        return self._group if self._group is not None else data_parallel_group()

    def global_normalizer(self, inputs: LossInputs) -> float:
        """``N_global``: completions, or scored tokens, in the global batch (one all-reduce)."""
        if self.normalizer == "tokens":
            n = global_count(int(inputs.masked.score_mask.sum()), self.group)
        else:
            n = global_count(inputs.masked.num_completions, self.group)
        if n <= 0:
            raise ValueError(f"the global batch has no {self.normalizer}")
        return float(n)

    @abc.abstractmethod
    def terms(self, inputs: LossInputs, metrics: Metrics) -> torch.Tensor:
        """Per-completion loss terms ``[B]`` (differentiable in ``inputs.logp``)."""

    def __call__(self, inputs: LossInputs) -> LossOutput:
        if self.needs_reference(self.algorithm) and inputs.ref_logp is None:
            raise ValueError(f"algorithm.name={self.name!r} needs reference log-probs (ref_logp)")
        metrics = Metrics()
        terms = self.terms(inputs, metrics)
        loss = terms.sum() / self.global_normalizer(inputs)
        return LossOutput(loss=loss, terms=terms, metrics=metrics)
