"""Run the K x B masked sequences of a :class:`MaskedBatch` through megatron-core's schedules.

The model is reached only through a *forward function* with the signature of ``llada_forward``::

    forward_fn(model_chunk, input_ids [b, s], attention_mask [b, s] bool | None, labels [b, s],
               positions=positions [n])
        -> last pipeline stage: log-probs [n] fp32 of the labels at the scored positions (flat
           indices ``row * s + position``; vocab-parallel, identical on TP ranks)
        -> other stages: the hidden states the schedule sends on

The output layer thus runs on the scored (masked) positions only. The loss is a non-linear
function of sums over all micro-batches (centering means, ratios, clipping): it needs every
completion's full ELBO before any gradient flows. Its gradient is taken through the linear
surrogate ``sum_{n,t} coeff[n, t] * logp[n, t]`` with ``coeff = dLoss/dlogp`` computed from the
detached log-probs; the model is deterministic (no dropout), so this is exactly the loss's
gradient. Two ways to get there:

* **one pass** (``one_pass=True``, pipeline size 1): :meth:`ElboRunner.forward_with_graph` runs
  every local micro-batch with autograd on and keeps the graphs; after the loss,
  :meth:`ElboRunner.backward_graph` back-propagates the surrogate once. One forward per masked
  sequence; activation memory of all local micro-batches.
* **two passes** (``one_pass=False``, and always with pipeline parallelism, whose schedule
  interleaves forwards and backwards): :meth:`ElboRunner.logprobs` (``forward_only``,
  ``no_grad``) then :meth:`ElboRunner.backward` (forward + backward of the surrogate per
  micro-batch) through megatron's schedules. Two forwards per masked sequence; activation memory
  of one micro-batch whatever K is.

Gradient scaling (explicit): the surrogate of each micro-batch is multiplied by
``num_microbatches`` because megatron's ``forward_step`` divides a 2-tuple loss by it, and by the
data-parallel size when ``ddp_averages_gradients`` (megatron DDP averages gradients over DP by
default), so that the DP all-reduce yields the *sum* of per-rank gradients, i.e. the gradient of the
global loss (each rank's loss is already "local terms / global normaliser"). See
:func:`backward_loss_scale`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional, Sequence, Union

import torch
from torch import nn

from rspo_mega.likelihood.batch_types import MaskedBatch
from rspo_mega.parallel import current_device
from rspo_mega.parallel.pipeline import forward_only_outputs, microbatch_rows, run_schedule

ForwardFn = Callable[
    [nn.Module, torch.Tensor, Optional[torch.Tensor], Optional[torch.Tensor]], torch.Tensor
]
Chunks = Union[nn.Module, Sequence[nn.Module]]


def backward_loss_scale(dp_size: int, num_microbatches: int, ddp_averages_gradients: bool) -> float:
    """Factor applied to a micro-batch's loss before megatron's backward.

    Undoes megatron's ``loss / num_microbatches`` and, when the DDP wrapper averages gradients over
    ``dp_size`` ranks, its ``1 / dp_size``; the result is a plain sum over micro-batches and ranks.
    """
    return float(num_microbatches) * (float(dp_size) if ddp_averages_gradients else 1.0)


@dataclass
class _MicroBatch:
    input_ids: torch.Tensor
    attention_mask: Optional[torch.Tensor]  # None when every token is real
    labels: torch.Tensor
    positions: torch.Tensor  # [n] flat indices row * s + position of the scored positions
    coeff: Optional[torch.Tensor]  # [n] loss coefficients at ``positions``
    rows: int  # real (unpadded) rows


def _to_full(mb: _MicroBatch, logp: torch.Tensor) -> torch.Tensor:
    """Log-probs at ``mb.positions`` ``[n]`` -> ``[rows, s]`` (0 where not scored)."""
    b, s = mb.input_ids.shape
    full = torch.zeros(b * s, dtype=torch.float32, device=logp.device)
    return full.index_copy_(0, mb.positions, logp.float()).view(b, s)[: mb.rows]


def _parallel_sizes() -> tuple[int, int, int, bool]:
    """(pp, cp, dp, is_last_stage); a single process without megatron groups is (1, 1, 1, True)."""
    from megatron.core import parallel_state as ps

    if not ps.model_parallel_is_initialized():
        return 1, 1, 1, True
    return (
        ps.get_pipeline_model_parallel_world_size(),
        ps.get_context_parallel_world_size(),
        ps.get_data_parallel_world_size(with_context_parallel=True),
        ps.is_pipeline_last_stage(ignore_virtual=True),
    )


def _schedule_chunks(model: Chunks) -> list[nn.Module]:
    """The model chunks for megatron's schedules; the ELBO's masks span the whole sequence, so
    context parallelism is refused."""
    if _parallel_sizes()[1] != 1:
        raise ValueError("parallel.cp > 1 is not supported by the ELBO runner (masks span the "
                         "whole sequence)")
    return list(model) if isinstance(model, (list, tuple)) else [model]


class ElboRunner:
    """Evaluates masked-sequence log-probs and back-propagates loss coefficients, micro-batched.

    ``micro_batch_size`` is in masked sequences. With pipeline parallelism every micro-batch must
    have the same shape, so the last one is padded with copies of a real row (coefficient 0).
    ``one_pass``: use :meth:`forward_with_graph` / :meth:`backward_graph` where they apply
    (:meth:`uses_one_pass`).
    """

    def __init__(
        self, forward_fn: ForwardFn, micro_batch_size: int, *, ddp_averages_gradients: bool = True,
        one_pass: bool = False,
    ):
        if micro_batch_size < 1:
            raise ValueError(f"likelihood.micro_batch_size={micro_batch_size} must be >= 1")
        self.forward_fn = forward_fn
        self.micro_batch_size = int(micro_batch_size)
        self.ddp_averages_gradients = ddp_averages_gradients
        self.one_pass = one_pass

    # --- micro-batching -------------------------------------------------------------------------

    def num_microbatches(self, masked: MaskedBatch) -> int:
        return -(-masked.num_sequences // self.micro_batch_size)

    def _split(self, masked: MaskedBatch, coeff: Optional[torch.Tensor], pad: bool) -> list[_MicroBatch]:
        """Micro-batches on the compute device (the masks are drawn where ``masked`` lives, so the
        checks here need no device sync)."""
        device = current_device()
        out = []
        for idx, rows in microbatch_rows(masked.num_sequences, self.micro_batch_size, pad,
                                         masked.input_ids.device):
            scored = masked.score_mask[idx].clone()
            scored[rows:] = False  # pipeline padding rows carry no loss
            positions = scored.reshape(-1).nonzero().squeeze(1)
            c = None if coeff is None else coeff[idx].reshape(-1)[positions].to(device)
            attention = masked.attention_mask[idx]
            out.append(_MicroBatch(  # no padding in the micro-batch: no mask, fused attention
                masked.input_ids[idx].to(device),
                None if bool(attention.all()) else attention.to(device),
                masked.labels[idx].to(device), positions.to(device), c, rows,
            ))
        return out

    def _forward(self, chunk: nn.Module, mb: _MicroBatch, adapters: bool = True) -> torch.Tensor:
        """The forward function on one micro-batch (``adapters=False``: a LoRA model's base)."""
        switch = {} if adapters else {"adapters": False}
        return self.forward_fn(chunk, mb.input_ids, mb.attention_mask, mb.labels,
                               positions=mb.positions, **switch)

    # --- the two passes ---------------------------------------------------------------------------

    def logprobs(self, model: Chunks, masked: MaskedBatch,
                 adapters: bool = True) -> Optional[torch.Tensor]:
        """Per-token log-probs ``[N, S]`` fp32 (no grad; 0 off ``score_mask``) on the last stage;
        ``None`` elsewhere. ``adapters=False``: those of a LoRA model's base (the forward
        function is called with ``adapters=False``).

        They come back on the device of ``masked`` (the loss math stays where the masks live).
        """
        pp, _, _, last = _parallel_sizes()
        mbs = self._split(masked, None, pad=pp > 1)
        shape = mbs[0].input_ids.shape
        with torch.no_grad():
            outputs = forward_only_outputs(
                _schedule_chunks(model), mbs, lambda chunk, mb: self._forward(chunk, mb, adapters),
                seq_length=shape[1], micro_batch_size=shape[0])
        if not last:
            return None
        logp = [_to_full(mb, out.detach()) for mb, out in zip(mbs, outputs)]
        return torch.cat(logp, dim=0).to(masked.input_ids.device)

    def backward(self, model: Chunks, masked: MaskedBatch, coeff: Optional[torch.Tensor]) -> None:
        """Accumulate ``grad( sum coeff * logp )`` into the parameters' gradients.

        ``coeff [N, S]`` is required on the last pipeline stage and ignored elsewhere.
        """
        pp, _, dp, last = _parallel_sizes()
        if last and (coeff is None or coeff.shape != masked.weights.shape):
            raise ValueError("ElboRunner.backward: the last stage needs coeff of shape "
                             f"{tuple(masked.weights.shape)}")
        mbs = self._split(masked, coeff.detach() if last else None, pad=pp > 1)
        scale = backward_loss_scale(dp, len(mbs), self.ddp_averages_gradients)

        def step(data_iterator, chunk):
            mb = next(data_iterator)
            return self._forward(chunk, mb), lambda out: ((out.float() * mb.coeff).sum() * scale, {})

        shape = mbs[0].input_ids.shape
        run_schedule(_schedule_chunks(model), mbs, step, seq_length=shape[1],
                     micro_batch_size=shape[0], forward_only=False)

    # --- one pass ---------------------------------------------------------------------------------

    def uses_one_pass(self, model: Chunks) -> bool:
        """Whether :meth:`forward_with_graph` applies: one pass asked for, one stage, one chunk."""
        chunks = list(model) if isinstance(model, (list, tuple)) else [model]
        return self.one_pass and _parallel_sizes()[0] == 1 and len(chunks) == 1

    def forward_with_graph(self, model: Chunks, masked: MaskedBatch) -> "GraphedLogprobs":
        """Every local micro-batch forward with autograd on; the detached log-probs ``[N, S]``
        and the graphs for :meth:`backward_graph`."""
        if not self.uses_one_pass(model):
            raise ValueError("ElboRunner.forward_with_graph needs one_pass=True and one "
                             "pipeline stage (no virtual chunks)")
        chunk = model[0] if isinstance(model, (list, tuple)) else model
        mbs = self._split(masked, None, pad=False)
        outputs = [self._forward(chunk, mb) for mb in mbs]
        logp = torch.cat([_to_full(mb, out.detach()) for mb, out in zip(mbs, outputs)])
        return GraphedLogprobs(logp.to(masked.input_ids.device), mbs, outputs)

    def backward_graph(self, graphed: "GraphedLogprobs", coeff: torch.Tensor) -> None:
        """Accumulate ``grad( sum coeff * logp )`` through the kept graphs (one backward)."""
        if coeff.shape != graphed.logp.shape:
            raise ValueError(f"ElboRunner.backward_graph: coeff must have shape "
                             f"{tuple(graphed.logp.shape)}, got {tuple(coeff.shape)}")
        _, _, dp, _ = _parallel_sizes()
        scale = backward_loss_scale(dp, 1, self.ddp_averages_gradients)
        coeff = coeff.detach().to(graphed.outputs[0].device)
        total, start = 0.0, 0
        for mb, out in zip(graphed.micro_batches, graphed.outputs):
            c = coeff[start:start + mb.rows].reshape(-1)[mb.positions]
            total = total + (out.float() * c).sum()
            start += mb.rows
        (total * scale).backward()


@dataclass
class GraphedLogprobs:
    """Log-probs of a one-pass forward: ``logp [N, S]`` detached, plus what backward needs."""

    logp: torch.Tensor
    micro_batches: list
    outputs: list  # per micro-batch log-probs [n] with their autograd graphs
