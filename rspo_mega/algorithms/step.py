"""One policy-gradient step of an ELBO-based loss over megatron's schedules.

:func:`loss_backward` is what the trainer calls once per optimizer step (per inner update):

1. policy log-probs of every masked sequence (micro-batched, PP/TP aware): with the runner's one
   pass, forwards that keep their autograd graphs; otherwise a ``no_grad`` pass 1;
2. on the last pipeline stage, the loss on the *whole local batch* of log-probs, its global value
   and ``coeff = dloss/dlogp`` (exact, as the loss only sees log-probs);
3. the backward of ``sum coeff * logp``: through the kept graphs (one pass), or as a pass 2 of
   forward + backward per micro-batch; either accumulates into the parameters' gradients exactly
   the gradient of this rank's loss share.

Reference and old-policy log-probs are computed beforehand on the same :class:`MaskedBatch`
(``ReferenceModel.logprobs`` / ``ElboRunner.logprobs``); the returned pass-1 log-probs of the first
inner update *are* the old-policy log-probs for the following ones. Metrics are global and, with
pipeline parallelism, broadcast from the last stage so that every rank returns the same numbers.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.distributed as dist

from rspo_mega.algorithms.base import LossInputs, LossOutput, PolicyLoss
from rspo_mega.likelihood.batch_types import MaskedBatch
from rspo_mega.likelihood.parallel_elbo import Chunks, ElboRunner
from rspo_mega.parallel.reductions import global_sum


@dataclass
class StepResult:
    """``loss``: global loss value; ``metrics``: global diagnostics (same on every rank);
    ``logp``: pass-1 policy log-probs ``[N, S]`` on the last stage (``None`` elsewhere)."""

    loss: float
    metrics: dict[str, float]
    logp: Optional[torch.Tensor]


def loss_coefficients(loss_fn: PolicyLoss, inputs: LossInputs) -> tuple[LossOutput, torch.Tensor]:
    """Evaluate the loss on fixed log-probs; return it with ``coeff = dloss/dlogp [N, S]``."""
    logp = inputs.logp.detach().clone().requires_grad_(True)
    inputs = LossInputs(**{**inputs.__dict__, "logp": logp})
    out = loss_fn(inputs)
    (coeff,) = torch.autograd.grad(out.loss, logp, allow_unused=False)
    return out, coeff


def _broadcast_from_last_stage(payload: Optional[dict]) -> dict:
    from megatron.core import parallel_state as ps

    if not ps.model_parallel_is_initialized() or ps.get_pipeline_model_parallel_world_size() == 1:
        return payload  # type: ignore[return-value]
    box = [payload]
    dist.broadcast_object_list(box, src=ps.get_pipeline_model_parallel_last_rank(),
                               group=ps.get_pipeline_model_parallel_group())
    return box[0]


def loss_backward(
    loss_fn: PolicyLoss,
    runner: ElboRunner,
    policy: Chunks,
    masked: MaskedBatch,
    advantages: torch.Tensor,
    group_ids: torch.Tensor,
    num_groups: int,
    ref_logp: Optional[torch.Tensor] = None,
    old_logp: Optional[torch.Tensor] = None,
) -> StepResult:
    """Accumulate the gradient of the global loss into ``policy`` and return its value + metrics.

    Shapes: ``advantages``, ``group_ids`` ``[B]`` (this rank's completions); ``ref_logp``,
    ``old_logp`` ``[N, S]`` on the last stage (ignored elsewhere). Gradients are *sums* over
    micro-batches; the data-parallel reduction is the caller's (see ``ElboRunner``).
    """
    graphed = runner.forward_with_graph(policy, masked) if runner.uses_one_pass(policy) else None
    logp = runner.logprobs(policy, masked) if graphed is None else graphed.logp
    coeff = None
    payload = None
    if logp is not None:
        inputs = LossInputs(masked=masked, logp=logp, advantages=advantages, group_ids=group_ids,
                            num_groups=num_groups, ref_logp=ref_logp, old_logp=old_logp)
        out, coeff = loss_coefficients(loss_fn, inputs)
        metrics = out.metrics.reduce(loss_fn.group)
        metrics["loss"] = float(global_sum(out.loss, loss_fn.group))
        payload = metrics
    if graphed is None:
        runner.backward(policy, masked, coeff)
    else:
        runner.backward_graph(graphed, coeff)
    metrics = _broadcast_from_last_stage(payload)
    return StepResult(loss=metrics["loss"], metrics=metrics, logp=logp)
