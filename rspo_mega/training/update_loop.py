"""The updates of one step on a :class:`StepBatch`: masks, reference log-probs, ``mu`` updates.

K shared masks per completion (keyed by seed, step, uid, k) and the reference's log-probs on
them once; then ``mu`` optimizer updates of the configured loss (old log-probs from the first
one). With ``likelihood.fresh_masks_per_update``, inner update ``j`` draws its own masks (keyed
by seed, step, j, uid, k) and the reference re-scores them; for the ratio losses (ESPO,
diffu-GRPO: ``PolicyLoss.needs_old_policy``) the rollout ("old") policy scores the masks of
every update ``j >= 1`` before the first update changes the weights, one extra no-grad forward
per update, as the ESPO and d1 trainers do (``mask_seeds[this_itr_idx]``). Update 0 needs no
extra pass: its own pass-1 log-probs are the old policy's. SFT is one update with zero
advantages and no reference.
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
from rspo_mega.training.batch_sources import StepBatch


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
        old_draws = self._old_policy_draws(batch, step, timers)
        ref_logp, old_logp = self._reference_logprobs(reference, masked, timers), None
        for inner in range(self.updates_per_step):
            if inner and self.fresh_masks:  # this update's masks, reference re-scored
                if old_draws:
                    masked, old_logp = old_draws[inner - 1]
                else:
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

    def _old_policy_draws(self, batch: StepBatch, step: int,
                          timers: Timers) -> list[tuple[MaskedBatch, Optional[torch.Tensor]]]:
        """For a ratio loss with fresh masks: the masks of inner updates ``1 .. mu-1`` and the
        rollout policy's log-probs ``[N, S]`` on each (last stage; ``None`` elsewhere), scored
        before any update; otherwise empty."""
        if not (self.fresh_masks and self.loss.needs_old_policy):
            return []
        draws = []
        with timers("likelihood"):
            for inner in range(1, self.updates_per_step):
                masked = self.masks.sample(batch.completions, iteration=step, update=inner)
                draws.append((masked, self.runner.logprobs(self.policy.model, masked)))
        return draws

    def _reference_logprobs(self, reference: Optional[ReferenceModel], masked: MaskedBatch,
                            timers: Timers) -> Optional[torch.Tensor]:
        """The reference's log-probs on ``masked`` (None without a reference)."""
        if reference is None:
            return None
        with timers("likelihood"):
            return reference.logprobs(self.runner, masked)
