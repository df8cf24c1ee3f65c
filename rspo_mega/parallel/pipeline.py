"""Micro-batches through megatron-core's schedules: one home for the rollout and the ELBO.

megatron-core's ``get_forward_backward_func`` runs ``num_microbatches`` forwards (and backwards)
over the model chunks of this rank, passing activations between pipeline stages. Its pipeline
schedules need every micro-batch of one shape, so a short last micro-batch is padded with copies
of one of its rows (:func:`microbatch_rows`); the copies' outputs are dropped and they carry no
loss. :func:`forward_only_outputs` is the forward-only schedule that returns the last stage's
outputs (the rollout's logits, the ELBO's log-probs); :func:`run_schedule` the general call.

Shapes: ``B`` rows in all, ``b`` rows per micro-batch.
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple, Sequence

import torch
from torch import nn

# (data_iterator, model chunk) -> (output, loss function of the output): megatron's forward step
ForwardStep = Callable[[Any, nn.Module], tuple[torch.Tensor, Callable[..., Any]]]


class MicroBatchRows(NamedTuple):
    """One micro-batch: ``index [b]`` (long) into the ``B`` rows, the first ``real`` of them real."""

    index: torch.Tensor
    real: int


def microbatch_rows(rows: int, size: int, pad: bool,
                    device: torch.device | str = "cpu") -> list[MicroBatchRows]:
    """The ``rows`` rows cut into micro-batches of ``size``; with ``pad`` (pipeline schedules)
    the last one is filled up to ``size`` with copies of its first row."""
    if rows < 1 or size < 1:
        raise ValueError(f"microbatch_rows: rows={rows} and size={size} must be >= 1")
    out = []
    for start in range(0, rows, size):
        index = torch.arange(start, min(start + size, rows), device=device)
        real = index.numel()
        if pad and real < size:
            index = torch.cat([index, index[:1].expand(size - real)])
        out.append(MicroBatchRows(index, real))
    return out


def check_interleaved_p2p(chunks: Sequence[nn.Module]) -> None:
    """Megatron-LM #750/#1450: an interleaved pipeline of 2 stages with batched p2p silently
    corrupts the tensors it sends; refuse it."""
    from megatron.core import parallel_state as ps
    from megatron.core.utils import get_model_config

    if len(chunks) < 2 or not ps.model_parallel_is_initialized():
        return
    config = get_model_config(chunks[0])
    if (ps.get_pipeline_model_parallel_world_size() == 2 and config.batch_p2p_comm
            and not config.overlap_p2p_comm):
        raise ValueError("interleaved pipeline with PP=2 needs batch_p2p_comm=False (or "
                         "overlap_p2p_comm=True) in the model's TransformerConfig")


def run_schedule(chunks: Sequence[nn.Module], microbatches: Sequence[Any], step: ForwardStep, *,
                 seq_length: int, micro_batch_size: int, forward_only: bool,
                 collect_non_loss_data: bool = False) -> list:
    """megatron-core's schedule of ``step`` over ``microbatches`` (each chunk reads them in
    order); returns what the schedule collects on the last stage (``[]`` elsewhere)."""
    from megatron.core.pipeline_parallel import get_forward_backward_func

    chunks = list(chunks)
    check_interleaved_p2p(chunks)
    return get_forward_backward_func()(
        forward_step_func=step,
        data_iterator=[iter(microbatches) for _ in chunks],
        model=chunks,
        num_microbatches=len(microbatches),
        seq_length=seq_length,
        micro_batch_size=micro_batch_size,
        decoder_seq_length=seq_length,
        forward_only=forward_only,
        collect_non_loss_data=collect_non_loss_data,
    )


def forward_only_outputs(chunks: Sequence[nn.Module], microbatches: Sequence[Any],
                         forward: Callable[[nn.Module, Any], torch.Tensor], *, seq_length: int,
                         micro_batch_size: int) -> list[torch.Tensor]:
    """``forward(chunk, microbatch)`` of every micro-batch through the forward-only schedule:
    the outputs in order on the last pipeline stage, ``[]`` on the others."""

    def step(data_iterator: Any, chunk: nn.Module) -> tuple[torch.Tensor, Callable[..., Any]]:
        return forward(chunk, next(data_iterator)), lambda output, non_loss_data=False: output

    return run_schedule(chunks, microbatches, step, seq_length=seq_length,
                        micro_batch_size=micro_batch_size, forward_only=True,
                        collect_non_loss_data=True)
