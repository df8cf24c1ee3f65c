"""The output head of LLaDA: logits of the positions a consumer reads, over real vocab ids only.

Under tensor parallelism rank ``r`` owns the vocab shard starting at ``r * V_pad/tp``. The
output weight keeps megatron's padded shape (checkpoints are unchanged), but only its rows for
real ids are multiplied: a rank's logits have :func:`true_vocab_columns` columns, which is
``V_pad/tp`` except on the rank holding the end of the vocabulary (fewer) and on ranks holding
padding only (zero). No padded id can ever be sampled or weighed, and no pass over the logits
is spent masking them.

:func:`vocab_parallel_log_probs` is the per-token log-probability of labels from such shards: a
fused autograd function (one ``[n, v]`` buffer that holds the softmax for the backward, three
collectives of ``[n]`` vectors), valid for unequal shard widths.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist


def true_vocab_columns(true_vocab: int, shard_size: int, tp_rank: int) -> int:
    """Real vocab ids in the shard ``[tp_rank * shard_size, (tp_rank + 1) * shard_size)``."""
    return max(0, min(shard_size, true_vocab - tp_rank * shard_size))


def local_row_max(scores: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Row maxima and their local column of ``[n, v]`` shards; ``(-inf, 0)`` where ``v == 0``."""
    if scores.shape[-1]:
        return scores.max(dim=-1)
    rows = scores.shape[:-1]
    return (scores.new_full(rows, float("-inf")),
            torch.zeros(rows, dtype=torch.long, device=scores.device))


def _all_reduce(t: torch.Tensor, op: "dist.ReduceOp", group: Optional["dist.ProcessGroup"]) -> torch.Tensor:
    if group is not None and dist.get_world_size(group) > 1:
        dist.all_reduce(t, op=op, group=group)
    return t


class _VocabParallelLogProb(torch.autograd.Function):
    """``log softmax(logits)[label]`` over vocab shards; backward ``g * (onehot - softmax)``."""

    @staticmethod
    def forward(ctx, logits: torch.Tensor, labels: torch.Tensor, start: int,
                group: Optional["dist.ProcessGroup"]) -> torch.Tensor:  # type: ignore[override]
        width = logits.shape[-1]
        gmax = _all_reduce(local_row_max(logits)[0], dist.ReduceOp.MAX, group)
        shifted = logits - gmax.unsqueeze(-1)  # the one [n, v] buffer
        local = labels - start
        mine = (local >= 0) & (local < width)
        index = local.clamp(0, max(width - 1, 0)).unsqueeze(-1)
        if width:
            picked = torch.where(mine, shifted.gather(-1, index).squeeze(-1), 0.0)
        else:
            picked = torch.zeros_like(gmax)
        picked = _all_reduce(picked, dist.ReduceOp.SUM, group)
        probs = shifted.exp_()
        sumexp = _all_reduce(probs.sum(dim=-1), dist.ReduceOp.SUM, group)
        probs.div_(sumexp.unsqueeze(-1))
        ctx.save_for_backward(probs, index, mine)
        return picked - sumexp.log()

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # type: ignore[override]
        probs, index, mine = ctx.saved_tensors
        grad_logits = probs.mul_(-grad.unsqueeze(-1))  # the saved buffer is used once
        if grad_logits.shape[-1]:
            grad_logits.scatter_add_(-1, index, (grad * mine).unsqueeze(-1).to(grad_logits.dtype))
        return grad_logits, None, None, None


def vocab_parallel_log_probs(logits: torch.Tensor, labels: torch.Tensor, vocab_start: int = 0,
                             group: Optional["dist.ProcessGroup"] = None) -> torch.Tensor:
    """Per-token log-probabilities ``[...]`` (float32) of ``labels [...]`` from logits ``[..., v]``.

    ``logits`` are this TP rank's columns for global ids ``[vocab_start, vocab_start + v)`` (as
    :func:`llada_forward` returns them; ``LLaDAModel.vocab_start``); ``group`` holds the other
    shards (None: the whole vocabulary is here). The vocabulary is never gathered and the
    caller's logits are left unchanged.
    """
    return _VocabParallelLogProb.apply(logits.float(), labels, vocab_start, group)
