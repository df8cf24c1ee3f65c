"""Batches that flow into and out of the mask sampler.

``CompletionBatch`` is this data-parallel rank's shard of a rollout: B sequences laid out as
``[prompt | completion | padding]`` (left- or right-padded prompts both work, positions are given
by masks, not offsets). ``MaskedBatch`` is what the likelihood code runs through the model: for
every completion, ``K`` Monte-Carlo samples of ``U`` masked sequences each (``U = 2`` for the
coupled scheme, else 1), in completion-major order ``n = (b * K + k) * U + u``.
``TrajectoryBatch`` is the masked batch of the trajectory estimator
(:mod:`rspo_mega.likelihood.trajectory_estimator`): K sampled denoising steps per completion.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Optional

import torch


@dataclass
class CompletionBatch:
    """This rank's completions.

    Shapes: ``input_ids [B, S]`` long; ``attention_mask [B, S]`` bool (True = real token);
    ``completion_mask [B, S]`` bool (True = generated position, EOS padding included);
    ``uids [B]`` long, a *global* sample id that is unique within an iteration and independent of
    the parallel layout (masks are keyed by it); ``group_ids [B]`` long, the global id of the
    prompt group in ``[0, num_groups)``.

    The rollout's trajectory record, when it was kept (all ``[B, S]``, aligned with
    ``input_ids``): ``commit_step`` long, the row's denoising step that committed each generated
    position (-1 on prompt columns: always visible); ``commit_logp`` and ``commit_entropy``
    float32, the committed token's log-prob under the rollout policy at that step and that
    distribution's entropy (0 on prompt columns). See :mod:`rspo_mega.rollout.trajectory_record`.
    """

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    completion_mask: torch.Tensor
    uids: torch.Tensor
    group_ids: torch.Tensor
    commit_step: Optional[torch.Tensor] = None
    commit_logp: Optional[torch.Tensor] = None
    commit_entropy: Optional[torch.Tensor] = None

    def __post_init__(self) -> None:
        b, s = self.input_ids.shape
        for name in ("attention_mask", "completion_mask"):
            t = getattr(self, name)
            if t.shape != (b, s) or t.dtype != torch.bool:
                raise ValueError(f"CompletionBatch.{name} must be bool [{b}, {s}], got "
                                 f"{t.dtype} {tuple(t.shape)}")
        for name in ("uids", "group_ids"):
            if getattr(self, name).shape != (b,):
                raise ValueError(f"CompletionBatch.{name} must have shape [{b}]")
        for name in ("commit_step", "commit_logp", "commit_entropy"):
            t = getattr(self, name)
            if t is not None and t.shape != (b, s):
                raise ValueError(f"CompletionBatch.{name} must have shape [{b}, {s}], got "
                                 f"{tuple(t.shape)}")

    @property
    def size(self) -> int:
        return int(self.input_ids.shape[0])

    def to(self, device: torch.device | str) -> "CompletionBatch":
        return CompletionBatch(**{f.name: None if getattr(self, f.name) is None
                                  else getattr(self, f.name).to(device) for f in fields(self)})

    def select(self, index: torch.Tensor) -> "CompletionBatch":
        """Rows ``index`` (e.g. this rank's shard of a global batch)."""
        return CompletionBatch(**{f.name: None if getattr(self, f.name) is None
                                  else getattr(self, f.name)[index] for f in fields(self)})


@dataclass
class MaskedBatch:
    """K x U masked sequences per completion, completion-major (``n = (b*K + k)*U + u``).

    Shapes (N = B*K*U): ``input_ids [N, S]`` long, the masked inputs; ``attention_mask [N, S]``
    bool; ``labels [N, S]`` long, the clean tokens (targets); ``weights [N, S]`` fp32, the
    estimator weight of each scored position (0 elsewhere; the 1/2 of a coupled pair included,
    the 1/K average over MC samples *not* included); ``score_mask [N, S]`` bool, positions whose
    log-prob enters the estimate; ``completion_index [N]`` and ``mc_index [N]`` long.
    Per completion: ``lengths [B]`` long, the number L of counted positions; ``count_mask [B, S]``.
    """

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    labels: torch.Tensor
    weights: torch.Tensor
    score_mask: torch.Tensor
    completion_index: torch.Tensor
    mc_index: torch.Tensor
    lengths: torch.Tensor
    count_mask: torch.Tensor
    num_mc: int
    units_per_sample: int

    @property
    def num_sequences(self) -> int:
        return int(self.input_ids.shape[0])

    @property
    def num_completions(self) -> int:
        return int(self.lengths.shape[0])

    @property
    def seq_length(self) -> int:
        return int(self.input_ids.shape[1])

    def to(self, device: torch.device | str) -> "MaskedBatch":
        moved = {
            f.name: (v.to(device) if isinstance(v, torch.Tensor) else v)
            for f in fields(self)
            for v in [getattr(self, f.name)]
        }
        return type(self)(**moved)


@dataclass
class TrajectoryBatch(MaskedBatch):
    """The states before K sampled denoising steps of every completion (``U = 1``).

    Row ``n = b * K + k`` holds completion ``b``'s prompt and the tokens committed before its
    sampled step ``sampled_steps[b, k]`` (mask tokens elsewhere); ``score_mask`` marks the tokens
    that step committed and ``weights`` carries the step's unbiasing weight ``1 / q_b(t)`` there
    (float64 here: the weights of a non-uniform step distribution are not round numbers).
    Extra shapes: ``rollout_logp [N, S]`` fp32, the recorded rollout log-probs at the scored
    positions (0 elsewhere); ``steps [B]`` long, the completion's counted steps ``T_b`` (also in
    ``lengths``); ``sampled_steps [B, K]`` long.
    """

    rollout_logp: torch.Tensor
    steps: torch.Tensor
    sampled_steps: torch.Tensor
