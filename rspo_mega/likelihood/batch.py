"""Batches that flow into and out of the mask sampler.

``CompletionBatch`` is this data-parallel rank's shard of a rollout: B sequences laid out as
``[prompt | completion | padding]`` (left- or right-padded prompts both work, positions are given
by masks, not offsets). ``MaskedBatch`` is what the likelihood code runs through the model: for
every completion, ``K`` Monte-Carlo samples of ``U`` masked sequences each (``U = 2`` for the
coupled scheme, else 1), in completion-major order ``n = (b * K + k) * U + u``.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import torch


@dataclass
class CompletionBatch:
    """This rank's completions.

    Shapes: ``input_ids [B, S]`` long; ``attention_mask [B, S]`` bool (True = real token);
    ``completion_mask [B, S]`` bool (True = generated position, EOS padding included);
    ``uids [B]`` long, a *global* sample id that is unique within an iteration and independent of
    the parallel layout (masks are keyed by it); ``group_ids [B]`` long, the global id of the
    prompt group in ``[0, num_groups)``.
    """

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    completion_mask: torch.Tensor
    uids: torch.Tensor
    group_ids: torch.Tensor

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

    @property
    def size(self) -> int:
        return int(self.input_ids.shape[0])

    def select(self, index: torch.Tensor) -> "CompletionBatch":
        """Rows ``index`` (e.g. this rank's shard of a global batch)."""
        return CompletionBatch(**{f.name: getattr(self, f.name)[index] for f in fields(self)})


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
        return MaskedBatch(**moved)
