"""The batch sources of a run: each step's completions, advantages and rollout metrics.

:class:`RLBatches`: this rank's prompts of the global step (``PromptBatchIterator``, sharded over
DP) -> G completions each with the masked-diffusion sampler (seeded per step and uid) ->
verifiable rewards -> group advantages reduced over the DP group. :class:`SFTBatches`: this
rank's examples with their reference answers (masked-diffusion SFT, no rollout). Both keep
their data position as ``state_dict`` / ``load_state_dict``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Mapping, Optional

import torch
from megatron.core import parallel_state as ps

from rspo_mega.algorithms import LOSSES, compute_advantages, is_rl
from rspo_mega.config import Layout, TrainConfig
from rspo_mega.data import Example, PromptBatchIterator
from rspo_mega.likelihood import CompletionBatch
from rspo_mega.parallel.reductions import data_parallel_group, global_mean, global_sum, global_sums
from rspo_mega.rng import hash64
from rspo_mega.rollout import RolloutEngine, completion_uid
from rspo_mega.rollout.guard import RolloutGuard
from rspo_mega.rollout.sampler import CacheCheck, Rollout
from rspo_mega.training import completion_batches
from rspo_mega.training.metrics import Timers
from rspo_mega.training.run_data import RunData

GUARD_KEY = "rollout_guard"  # the guard's settings in the batches' checkpoint state


@dataclass
class RolloutTexts:
    """An RL step's rows on this rank as text: each row's example, completion and reward."""

    examples: list[Example]
    completions: list[str]
    rewards: torch.Tensor  # [b] float32


@dataclass
class StepBatch:
    """One step's completions on this rank and what the loss needs besides them."""

    completions: CompletionBatch  # [b, P + G] sequences, uids and global group ids
    advantages: torch.Tensor  # [b] float32 (zeros for SFT)
    num_groups: int  # groups of the global step (prompts for RL, examples for SFT)
    metrics: dict[str, float] = field(default_factory=dict)  # global metrics of the rollout
    texts: Optional[RolloutTexts] = None  # RL: the rows as text (logged samples)


class _Batches:
    """This rank's examples of each global step, in a seeded order of the run's kind."""

    def __init__(self, cfg: TrainConfig, data: RunData, per_step: int, seed: int) -> None:
        self.cfg, self.data = cfg, data
        self.dp_rank = ps.get_data_parallel_rank()
        self.iterator = PromptBatchIterator([e.example for e in data.train], per_step,
                                            self.dp_rank, ps.get_data_parallel_world_size(),
                                            seed=seed)
        self.encoded = {e.example.uid: e for e in data.train}

    def state_dict(self) -> dict[str, Any]:
        """The data position (see ``PromptBatchIterator.state_dict``)."""
        return self.iterator.state_dict()

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.iterator.load_state_dict(state)


class RLBatches(_Batches):
    """RL steps: ``layout.prompts_per_step`` prompts x ``rollout.group_size`` completions."""

    def __init__(self, cfg: TrainConfig, layout: Layout, data: RunData,
                 engine: RolloutEngine) -> None:
        super().__init__(cfg, data, layout.prompts_per_step, seed=cfg.data.seed)
        self.engine, self.num_groups = engine, layout.prompts_per_step
        self.trajectory = LOSSES[cfg.algorithm.name].needs_trajectory  # AGRPO's record
        self.guard = RolloutGuard.from_config(cfg.rollout)

    def state_dict(self) -> dict[str, Any]:
        """The data position and, with ``rollout.guard``, the guard's settings."""
        state = super().state_dict()
        if self.guard is not None:
            state[GUARD_KEY] = self.guard.state_dict()
        return state

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore both; a checkpoint saved without the guard starts it from the config."""
        state = dict(state)
        guard = state.pop(GUARD_KEY, None)
        super().load_state_dict(state)
        if self.guard is not None and guard is not None:
            self.guard.load_state_dict(guard)

    def next_batch(self, step: int, timers: Timers) -> StepBatch:
        """Rollouts of this rank's prompts of ``step``, their rewards and advantages."""
        cfg, G = self.cfg, self.cfg.rollout.group_size
        examples = next(self.iterator)
        rows = [(i, completion_uid(ex.uid, j)) for i, ex in enumerate(examples) for j in range(G)]
        prompts = [list(self.encoded[examples[i].uid].prompt_ids) for i, _ in rows]
        uids = [u for _, u in rows]
        guard = {} if self.guard is None else self.guard.overrides()
        with timers("rollout"):
            rollout = self.engine.generate(prompts, uids, seed=hash64(cfg.seed, step),
                                           trajectory=self.trajectory, **guard)
        texts = completion_batches.decode_completions(rollout, self.data.tokenizer, cfg.model.eos_token_id)
        row_examples = [examples[i] for i, _ in rows]
        rewards = completion_batches.score(self.data.task, texts, row_examples)
        base = self.dp_rank * len(examples)
        completions = completion_batches.completion_batch(rollout, uids, [base + i for i, _ in rows])
        advantages = compute_advantages(rewards, completions.group_ids, self.num_groups,
                                        cfg.algorithm)
        return StepBatch(completions, advantages, self.num_groups, self._metrics(rewards, rollout),
                         RolloutTexts(row_examples, texts, rewards))

    def _metrics(self, rewards: torch.Tensor, rollout: Rollout) -> dict[str, float]:
        """Global reward, accuracy (reward == 1), completion tokens, denoising steps and the
        cache check; steers the guard (whose settings of this step are logged)."""
        group = data_parallel_group()
        out = {
            "reward": float(global_mean(rewards, group=group)),
            "accuracy": float(global_mean((rewards >= 1.0).float(), group=group)),
            "completion_tokens": float(global_sum(rollout.completion_lengths.float(), group)),
            "rollout_steps": float(rollout.steps_used.float().mean()),
        }
        if self.cfg.rollout.cache_check_rate:
            check = CacheCheck.from_counts(
                global_sums(torch.tensor(rollout.cache_check.counts()), group).tolist())
            out.update(_cache_check_metrics(check))
            if self.guard is not None:
                out.update(self.guard.metrics())
                self.guard.update(check)
        return out


def _cache_check_metrics(check: CacheCheck) -> dict[str, float]:
    """Shares of the checked cached steps' commits the exact step samples differently (all, and
    those above the confidence threshold) and their mean confidence difference."""
    out = {}
    if check.committed:
        out.update(cache_token_mismatch=check.mismatched / check.committed,
                   cache_confidence_diff=check.confidence_diff / check.committed)
    if check.confident:
        out["cache_confident_mismatch"] = check.confident_mismatched / check.confident
    return out


class SFTBatches(_Batches):
    """SFT steps: ``global_batch_size`` examples with their reference answers as completions."""

    def __init__(self, cfg: TrainConfig, data: RunData) -> None:
        super().__init__(cfg, data, cfg.global_batch_size, seed=cfg.data.seed + 1)

    def next_batch(self, step: int, timers: Timers) -> StepBatch:
        """This rank's examples of ``step``, each its prompt and reference answer."""
        examples: list[Example] = next(self.iterator)
        targets = [self.data.sft_target(ex) for ex in examples]
        uids = [completion_uid(ex.uid, 0) for ex in examples]
        completions = completion_batches.sft_batch([self.encoded[ex.uid] for ex in examples], targets, uids,
                                        self.cfg.rollout.gen_length, self.cfg.model.eos_token_id,
                                        self.cfg.parallel.sequence_multiple)
        completions.group_ids += self.dp_rank * len(examples)
        return StepBatch(completions, torch.zeros(len(examples)), self.cfg.global_batch_size)


def build_batches(cfg: TrainConfig, layout: Layout, data: RunData,
                  engine: RolloutEngine) -> RLBatches | SFTBatches:
    """The run's batch source: rollouts for an RL loss, the data's targets for SFT."""
    if is_rl(cfg.algorithm):
        return RLBatches(cfg, layout, data, engine)
    return SFTBatches(cfg, data)
