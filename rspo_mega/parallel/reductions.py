"""Global reductions: the one place where per-rank partial results become global quantities.

Every normaliser of a loss (number of completions, tokens, MC samples, centring means, group
statistics) is computed here over the whole global batch, so that a loss value and its gradient do
not depend on the tensor/pipeline/data-parallel layout or on the micro-batch split.

All helpers are no-ops when ``torch.distributed`` is not initialised (single process), and all of
them operate on *detached* values: reductions feed stop-gradient statistics or normalisers, never
the autograd graph. Gradients are summed by the data-parallel gradient all-reduce instead.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist

ProcessGroup = Optional["dist.ProcessGroup"]


def data_parallel_group() -> ProcessGroup:
    """The data-parallel group (with context parallel folded in) if megatron-core is initialised."""
    from megatron.core import parallel_state as ps

    if dist.is_available() and dist.is_initialized() and ps.model_parallel_is_initialized():
        return ps.get_data_parallel_group(with_context_parallel=True)
    return None


def group_size(group: ProcessGroup = None) -> int:
    """World size of ``group`` (1 when not distributed)."""
    if not (dist.is_available() and dist.is_initialized()):
        return 1
    return dist.get_world_size(group=group)


def all_reduce(
    tensor: torch.Tensor, op: str = "sum", group: ProcessGroup = None
) -> torch.Tensor:
    """Detached all-reduce of ``tensor`` over ``group``; returns a new tensor.

    ``op`` is one of ``sum``, ``max``, ``min``. With no process group this returns a detached
    clone, so callers never branch on the layout.
    """
    ops = {"sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX, "min": dist.ReduceOp.MIN}
    if op not in ops:
        raise ValueError(f"all_reduce: unknown op {op!r}; expected one of {sorted(ops)}")
    out = tensor.detach().clone()
    if group_size(group) > 1:
        dist.all_reduce(out, op=ops[op], group=group)
    return out


def global_sum(tensor: torch.Tensor, group: ProcessGroup = None) -> torch.Tensor:
    """Sum of all elements of ``tensor`` over every rank of ``group``: a 0-d detached tensor."""
    return all_reduce(tensor.detach().sum(), "sum", group)


def global_count(local_count: int | torch.Tensor, group: ProcessGroup = None) -> int:
    """Total of a per-rank count over ``group`` (for example completions or tokens)."""
    t = torch.as_tensor(local_count, dtype=torch.float64)
    return int(all_reduce(t, "sum", group).item())


def global_mean(
    values: torch.Tensor, weights: Optional[torch.Tensor] = None, group: ProcessGroup = None
) -> torch.Tensor:
    """Weighted mean of ``values`` over every rank: ``sum(w*v) / sum(w)`` computed globally.

    Raises if the global weight is zero (an empty global batch has no mean).
    """
    v = values.detach().to(torch.float64)
    w = torch.ones_like(v) if weights is None else weights.detach().to(torch.float64)
    stacked = torch.stack([(v * w).sum(), w.sum()])
    num, den = all_reduce(stacked, "sum", group).unbind()
    if den.item() == 0:
        raise ValueError("global_mean: the global batch is empty (total weight 0)")
    return (num / den).to(values.dtype)


def segment_sums(
    values: torch.Tensor, segment_ids: torch.Tensor, num_segments: int, group: ProcessGroup = None
) -> torch.Tensor:
    """Per-segment sums of ``values`` [N] over all ranks, segment ids [N] global in [0, num_segments).

    Used for statistics of prompt groups whose G completions may live on different ranks: each
    rank scatters its partial sums into a dense [num_segments] vector, then one all-reduce.
    """
    if values.shape != segment_ids.shape:
        raise ValueError(
            f"segment_sums: values {tuple(values.shape)} and segment_ids "
            f"{tuple(segment_ids.shape)} must have the same shape"
        )
    if segment_ids.numel() and (segment_ids.min() < 0 or segment_ids.max() >= num_segments):
        raise ValueError(f"segment_sums: segment ids must lie in [0, {num_segments})")
    out = torch.zeros(num_segments, dtype=torch.float64, device=values.device)
    out.index_add_(0, segment_ids.long(), values.detach().to(torch.float64))
    return all_reduce(out, "sum", group)


def global_sums(values: torch.Tensor, group: ProcessGroup = None) -> torch.Tensor:
    """Element-wise sum of a small 1-d vector of per-rank partial sums, fp64, one all-reduce.

    Used to reduce many scalar statistics (sums and counts of diagnostics) in a single collective.
    """
    return all_reduce(values.detach().to(torch.float64), "sum", group)
