"""The updates of one step on a :class:`StepBatch`: masks, reference log-probs, ``mu`` updates.

K shared masks per completion (keyed by seed, step, uid, k) and the reference's log-probs on
them once; then ``mu`` optimizer updates of the configured loss (old log-probs from the first
one; with ``likelihood.fresh_masks_per_update``, new masks and reference log-probs for each).
SFT is one update with zero advantages and no reference.
"""

from __future__ import annotations

import functools
from typing import Optional

import torch

from rspo_mega.algorithms import build_loss, loss_backward
from rspo_mega.config import TrainConfig
from rspo_mega.likelihood import ElboRunner, ForwardFn, MaskedBatch, ReferenceModel
from rspo_mega.likelihood.masks import KeyedDrawSampler
from rspo_mega.training.metrics import Timers
from rspo_mega.training.policy import Policy
from rspo_mega.training.step_batches import StepBatch


class UpdateLoop:
    """The inner-update loop of a step.

    Args:
        policy: the trained policy (its ``update`` runs one optimizer step).
        cfg: the run config (algorithm, likelihood, micro_batch_size).
        masks: the mask sampler, or AGRPO's step sampler (its state is checkpointed by the trainer).
        forward: the runner's model forward (``llada_forward``; AGRPO: the tempered one).
        updates_per_step: optimizer updates per step (``algorithm.inner_updates``; 1 for SFT).
    """

    def __init__(self, policy: Policy, cfg: TrainConfig, masks: KeyedDrawSampler,
                 forward: ForwardFn, updates_per_step: int) -> None:
        self.policy, self.masks, self.updates_per_step = policy, masks, updates_per_step
        self.fresh_masks = cfg.likelihood.fresh_masks_per_update
        self.loss = build_loss(cfg.algorithm, cfg.likelihood)
        self.runner = ElboRunner(forward, cfg.likelihood.micro_batch_size,
                                 ddp_averages_gradients=True, one_pass=cfg.likelihood.one_pass)

    def run(self, batch: StepBatch, step: int, timers: Timers,
            reference: Optional[ReferenceModel] = None) -> dict[str, float]:
        """All updates of ``step`` on ``batch``; the metrics of the last one (loss terms,
        ``grad_norm``, ``update_applied``, ``lr``)."""
        masked = self.masks.sample(batch.completions, iteration=step)
        ref_logp, old_logp = self._reference_logprobs(reference, masked, timers), None
        for inner in range(self.updates_per_step):
            if inner and self.fresh_masks:  # new masks, reference re-scored
                masked = self.masks.sample(batch.completions, iteration=step, update=inner)
                ref_logp = self._reference_logprobs(reference, masked, timers)
            backward = functools.partial(loss_backward, self.loss, self.runner, self.policy.model,
                                         masked, batch.advantages, batch.completions.group_ids,
                                         batch.num_groups, ref_logp=ref_logp, old_logp=old_logp)
            result, applied, grad_norm = self.policy.update(backward, step, timers)
            if inner == 0 and not self.fresh_masks:
                old_logp = result.logp
        return {**result.metrics, "grad_norm": grad_norm, "update_applied": float(applied),
                "lr": self.policy.lr}

    def _reference_logprobs(self, reference: Optional[ReferenceModel], masked: MaskedBatch,
                            timers: Timers) -> Optional[torch.Tensor]:
        """The reference's log-probs on ``masked`` (None without a reference)."""
        if reference is None:
            return None
        with timers("likelihood"):
            return reference.logprobs(self.runner, masked)
