"""Run the K x B masked sequences of a :class:`MaskedBatch` through megatron-core's schedules.

The model is reached only through a *forward function* with the signature of ``llada_forward``::

    forward_fn(model_chunk, input_ids [b, s], attention_mask [b, s] bool | None, labels [b, s])
        -> last pipeline stage: per-token log-probs [b, s] fp32 (vocab-parallel, identical on TP ranks)
        -> other stages: the hidden states the schedule sends on

Two passes, both with micro-batches of ``micro_batch_size`` masked sequences, so activation
memory is that of one micro-batch whatever K is:

* :meth:`ElboRunner.logprobs` (``forward_only``, under ``no_grad``): log-probs of every sequence.
* :meth:`ElboRunner.backward`: forward + backward of the linear surrogate
  ``sum_{n,t} coeff[n, t] * logp[n, t]``, where ``coeff = dLoss/dlogp`` was computed from the first
  pass. Because the model is deterministic (no dropout), this gives exactly the gradient of the
  loss, even though the loss is a non-linear function of sums over many micro-batches (centering
  means, ratios, clipping): the loss needs each completion's full ELBO before any gradient flows.

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

from rspo_mega.likelihood.batch import MaskedBatch
from rspo_mega.parallel import current_device

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
    attention_mask: torch.Tensor
    labels: torch.Tensor
    score_mask: torch.Tensor
    coeff: Optional[torch.Tensor]
    rows: int  # real (unpadded) rows


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


class ElboRunner:
    """Evaluates masked-sequence log-probs and back-propagates loss coefficients, micro-batched.

    ``micro_batch_size`` is in masked sequences. With pipeline parallelism every micro-batch must
    have the same shape, so the last one is padded with copies of a real row (coefficient 0).
    """

    def __init__(
        self, forward_fn: ForwardFn, micro_batch_size: int, *, ddp_averages_gradients: bool = True
    ):
        if micro_batch_size < 1:
            raise ValueError(f"likelihood.micro_batch_size={micro_batch_size} must be >= 1")
        self.forward_fn = forward_fn
        self.micro_batch_size = int(micro_batch_size)
        self.ddp_averages_gradients = ddp_averages_gradients

    # --- micro-batching -------------------------------------------------------------------------

    def num_microbatches(self, masked: MaskedBatch) -> int:
        return -(-masked.num_sequences // self.micro_batch_size)

    def _split(self, masked: MaskedBatch, coeff: Optional[torch.Tensor], pad: bool) -> list[_MicroBatch]:
        """Micro-batches on the compute device (the masks may be drawn on the CPU)."""
        device = current_device()
        out = []
        mbs = self.micro_batch_size
        for start in range(0, masked.num_sequences, mbs):
            idx = torch.arange(start, min(start + mbs, masked.num_sequences),
                               device=masked.input_ids.device)
            rows = idx.numel()
            if pad and rows < mbs:
                idx = torch.cat([idx, idx[:1].expand(mbs - rows)])
            c = None
            if coeff is not None:
                c = coeff[idx].clone()
                c[rows:] = 0.0
            out.append(_MicroBatch(
                masked.input_ids[idx].to(device), masked.attention_mask[idx].to(device),
                masked.labels[idx].to(device), masked.score_mask[idx].to(device),
                None if c is None else c.to(device), rows,
            ))
        return out

    def _run(self, model: Chunks, mbs: list[_MicroBatch], loss_fn, forward_only: bool) -> None:
        from megatron.core.pipeline_parallel import get_forward_backward_func

        from megatron.core.utils import get_model_config

        chunks = list(model) if isinstance(model, (list, tuple)) else [model]
        pp, cp, _, _ = _parallel_sizes()
        if cp != 1:
            raise ValueError("parallel.cp > 1 is not supported by the ELBO runner (masks span the "
                             "whole sequence)")
        config = get_model_config(chunks[0])
        if len(chunks) > 1 and pp == 2 and config.batch_p2p_comm and not config.overlap_p2p_comm:
            # Megatron-LM #750/#1450: interleaved PP=2 with batched p2p silently corrupts tensors.
            raise ValueError("interleaved pipeline with PP=2 needs batch_p2p_comm=False (or "
                             "overlap_p2p_comm=True) in the model's TransformerConfig")

        def step(data_iterator, chunk):
            mb = next(data_iterator)
            out = self.forward_fn(chunk, mb.input_ids, mb.attention_mask, mb.labels)
            return out, (lambda output: loss_fn(mb, output))

        seq_len = mbs[0].input_ids.shape[1]
        get_forward_backward_func()(
            forward_step_func=step,
            data_iterator=[iter(mbs) for _ in chunks],
            model=chunks,
            num_microbatches=len(mbs),
            seq_length=seq_len,
            micro_batch_size=mbs[0].input_ids.shape[0],
            decoder_seq_length=seq_len,
            forward_only=forward_only,
        )

    # --- the two passes ---------------------------------------------------------------------------

    def logprobs(self, model: Chunks, masked: MaskedBatch) -> Optional[torch.Tensor]:
        """Per-token log-probs ``[N, S]`` fp32 (no grad) on the last stage; ``None`` elsewhere.

        They come back on the device of ``masked`` (the loss math stays where the masks live).
        """
        pp, _, _, last = _parallel_sizes()
        mbs = self._split(masked, None, pad=pp > 1)
        outputs: list[torch.Tensor] = []

        def collect(mb: _MicroBatch, output: torch.Tensor):
            outputs.append(output.detach().float()[: mb.rows])
            return output.detach().sum() * 0.0, {}

        with torch.no_grad():
            self._run(model, mbs, collect, forward_only=True)
        if not last:
            return None
        return torch.cat(outputs, dim=0).to(masked.input_ids.device)

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

        def surrogate(mb: _MicroBatch, output: torch.Tensor):
            logp = torch.where(mb.score_mask, output.float(), torch.zeros_like(output, dtype=torch.float32))
            return (logp * mb.coeff).sum() * scale, {}

        self._run(model, mbs, surrogate, forward_only=False)
