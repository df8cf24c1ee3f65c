"""Sampling primitives on vocab-parallel logits: no rank ever holds the full vocabulary.

Under tensor parallelism each rank holds logits ``[n, size]`` for the real ids of its contiguous
vocab shard, starting at ``rank * V_pad/tp`` (``size`` is ``V_pad/tp`` but at the end of the
vocabulary, and may be 0 on a rank that holds padding only). Gumbel-max sampling, argmax and the softmax probability of
the chosen token are computed with small collectives over ``[n]`` vectors instead of gathering
``[n, V]``. With ``tp == 1`` (or no group) the same code runs without communication, so every
layout shares one implementation and agrees with the full-vocabulary reference.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.distributed as dist

from rspo_mega.models.llada.logits import local_row_max, true_vocab_columns


@dataclass(frozen=True)
class VocabShard:
    """This rank's slice of the (padded) vocabulary and the group that holds the other slices."""

    start: int  # first global token id of the shard
    size: int  # local logit columns: the real ids of the shard
    true_vocab: int  # real vocabulary
    group: Optional["dist.ProcessGroup"] = None
    world: int = 1

    @classmethod
    def from_parallel_state(cls, padded_shard: int, true_vocab: int) -> "VocabShard":
        """The shard of the current tensor-parallel rank; ``padded_shard`` = padded vocab / tp."""
        from megatron.core import parallel_state as ps


        if not ps.model_parallel_is_initialized():
            return cls(0, true_vocab_columns(true_vocab, padded_shard, 0), true_vocab)
        rank, world = ps.get_tensor_model_parallel_rank(), ps.get_tensor_model_parallel_world_size()
        group = ps.get_tensor_model_parallel_group() if world > 1 else None
        size = true_vocab_columns(true_vocab, padded_shard, rank)
        return cls(rank * padded_shard, size, true_vocab, group, world)

    @property
    def owned_true_ids(self) -> tuple[int, int]:
        """Global id range ``[lo, hi)`` of real (non-padding) tokens held here."""
        return self.start, max(self.start, min(self.start + self.size, self.true_vocab))

    def _all_reduce(self, t: torch.Tensor, op: "dist.ReduceOp") -> torch.Tensor:
        if self.world > 1:
            dist.all_reduce(t, op=op, group=self.group)
        return t

    def slice_noise(self, noise: torch.Tensor) -> torch.Tensor:
        """Local columns ``[n, size]`` of full-vocabulary noise ``[n, true_vocab]``."""
        lo, hi = self.owned_true_ids
        return noise[:, lo:hi]

    def argmax(self, scores: torch.Tensor) -> torch.Tensor:
        """Global argmax ids ``[n]`` of local scores ``[n, size]``; ties go to the lowest id."""
        return self.max_and_argmax(scores)[1]

    def max_and_argmax(self, scores: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Global row maxima ``[n]`` (``scores``' dtype) and their ids ``[n]`` (ties: lowest id)
        of local scores ``[n, size]``."""
        local_val, local_idx = local_row_max(scores)
        if self.world == 1:
            return local_val, local_idx + self.start
        vals = [torch.empty_like(local_val) for _ in range(self.world)]
        ids = [torch.empty_like(local_idx) for _ in range(self.world)]
        dist.all_gather(vals, local_val, group=self.group)
        dist.all_gather(ids, local_idx + self.start, group=self.group)
        best, winner = torch.stack(vals).max(dim=0)  # first maximum = lowest shard = lowest id
        return best, torch.stack(ids).gather(0, winner.unsqueeze(0)).squeeze(0)

    def chosen_prob(self, logits: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        """``softmax(logits)[ids]`` in float64 ``[n]``, from local logits ``[n, size]``.

        The row max is taken on the logits as they are (a cast to float64 is exact and keeps
        the order); the shifted logits are float64 by type promotion, so the logits are never
        copied to float64 on their own.
        """
        gmax = self._all_reduce(local_row_max(logits)[0].to(torch.float64), dist.ReduceOp.MAX)
        picked = self._all_reduce(self._local_picked(logits, ids).to(torch.float64),
                                  dist.ReduceOp.SUM)
        return torch.exp(picked - gmax) / self._sum_exp(logits, gmax)

    def top_prob(self, logits: torch.Tensor, top: torch.Tensor) -> torch.Tensor:
        """``softmax(logits)`` at each row's maximum ``top [n]`` (global, from
        :meth:`max_and_argmax`), float64 ``[n]``: :meth:`chosen_prob` of the argmax ids, whose
        picked logit is ``top`` itself, with no gather and no collective for it."""
        gmax = top.to(torch.float64)
        return 1.0 / self._sum_exp(logits, gmax)

    def _sum_exp(self, logits: torch.Tensor, gmax: torch.Tensor) -> torch.Tensor:
        """``sum(exp(logits - gmax))`` over the whole vocabulary, float64 ``[n]`` (one SUM)."""
        return self._all_reduce((logits - gmax.unsqueeze(-1)).exp_().sum(-1), dist.ReduceOp.SUM)

    def _local_picked(self, values: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        """``values[n, ids[n]]`` ``[n]`` where this shard holds the id, 0 elsewhere (a SUM over
        the TP group gives every rank the value)."""
        local = ids - self.start
        mine = (local >= 0) & (local < self.size)
        if not self.size:
            return torch.zeros(values.shape[0], dtype=values.dtype, device=values.device)
        picked = values.gather(-1, local.clamp(0, self.size - 1).unsqueeze(-1)).squeeze(-1)
        return torch.where(mine, picked, torch.zeros_like(picked))

    def log_prob_entropy(self, logits: torch.Tensor, ids: torch.Tensor,
                         temperature: float) -> tuple[torch.Tensor, torch.Tensor]:
        """``log softmax(logits / T)[ids]`` and the entropy of ``softmax(logits / T)``, float64 ``[n]``.

        From local logits ``[n, size]`` with two all-reduces (the row max, then the sum of exps,
        the first moment and the picked logit in one ``[3, n]`` tensor; no vocab gather);
        ``temperature == 0`` (argmax sampling) scores at ``T = 1``. Forbidden ids (``-inf``
        logits) have probability 0 and add nothing to the entropy.
        """
        lg = logits.to(torch.float64)
        if temperature > 0:
            lg = lg / temperature
        gmax = self._all_reduce(local_row_max(lg)[0], dist.ReduceOp.MAX)
        shifted = lg - gmax.unsqueeze(-1)
        weights = torch.exp(shifted)
        moments = torch.where(weights > 0, weights * shifted, 0.0).sum(-1)
        sums = torch.stack([weights.sum(-1), moments, self._local_picked(shifted, ids)])
        sumexp, moment, picked = self._all_reduce(sums, dist.ReduceOp.SUM).unbind(0)
        log_z = torch.log(sumexp)
        return picked - log_z, log_z - moment / sumexp

    def forbid(self, logits: torch.Tensor, token_id: int) -> torch.Tensor:
        """``logits`` with ``token_id`` set to -inf where this shard holds it (in place)."""
        local = token_id - self.start
        if 0 <= local < self.size:
            logits[..., local] = float("-inf")
        return logits


def gumbel_max(
    logits: torch.Tensor, noise: Optional[torch.Tensor], temperature: float, shard: VocabShard
) -> torch.Tensor:
    """Sample ids ``[n]`` from ``softmax(logits / T)`` by Gumbel-max in float64.

    ``noise`` holds uniforms ``[n, size]`` (the local columns). ``argmax(l - T log(-log u))``
    equals the reference's ``argmax(exp(l) / (-log u)^T)`` without overflowing ``exp``.
    ``temperature == 0`` is the plain argmax and needs no noise.
    """
    if temperature == 0:  # float64 would change no order: the argmax of the logits as they are
        return shard.argmax(logits)
    if noise is None:
        raise ValueError("gumbel_max: temperature > 0 needs noise")
    return shard.argmax(logits.to(torch.float64) - temperature * torch.log(-torch.log(noise)))
