"""The trained policy: model chunks in megatron DDP, the optimizer with its LR schedule, and the
frozen RL reference; one optimizer update; their sharded checkpoint state.

The learning rate is set only by the scheduler (:func:`builder.build_scheduler`), which advances
once per applied update.
"""

from __future__ import annotations

from typing import Callable, Optional

import torch

from rspo_mega.algorithms import StepResult
from rspo_mega.config import TrainConfig
from rspo_mega.likelihood import BaseReference, ReferenceModel
from rspo_mega.models.llada import unwrap_model
from rspo_mega.models.llada.lora import is_adapter_name
from rspo_mega.training import distrib_optimizer_fixes
from rspo_mega.training.builder import (
    build_optimizer, build_reference_fn, build_scheduler, finish_grad_sync, optimizer_step,
    wrap_ddp, zero_grads,
)
from rspo_mega.training.guards import check_finite, grad_tensors
from rspo_mega.training.metrics import Timers


def model_key(index: int, num_chunks: int) -> str:
    """The checkpoint key of model chunk ``index``: ``model``, or ``model<i>`` with VPP."""
    return "model" if num_chunks == 1 else f"model{index}"


class PolicyWeights:
    """The policy's weights as a sharded checkpoint part (no optimizer, no reference): chunk
    ``i``'s tensors under :func:`model_key`; with LoRA only the adapters (the base is
    ``checkpoint.init_from``'s)."""

    def __init__(self, chunks: list[torch.nn.Module], lora: bool) -> None:
        self.chunks, self.lora = chunks, lora

    def sharded_state_dict(self, is_loading: bool = False) -> dict:
        n = len(self.chunks)
        return {model_key(i, n): self._chunk_state(c) for i, c in enumerate(self.chunks)}

    def _chunk_state(self, chunk: torch.nn.Module) -> dict:
        """A chunk's sharded tensors (no DDP ``module.``): with LoRA, its adapters'."""
        state = unwrap_model(chunk).sharded_state_dict()
        return {k: v for k, v in state.items() if is_adapter_name(k)} if self.lora else state

    def load_sharded_state_dict(self, state: dict) -> None:
        from rspo_mega.models.llada.checkpoint import trusted_te_extra_state

        with trusted_te_extra_state():  # FP8 delayed-scaling metadata of this run's checkpoint
            for i, chunk in enumerate(self.chunks):  # keys are the inner GPTModel's, not DDP's
                unwrap_model(chunk).load_state_dict(state[model_key(i, len(self.chunks))],
                                                    strict=not self.lora)


class Policy:
    """This rank's policy chunks (DDP), optimizer, LR scheduler and, once frozen, reference.

    Args:
        cfg: the run config (optimizer, likelihood.offload_reference, non_finite_policy).
        chunks: this rank's model chunks with their start weights.
        total_updates: optimizer updates of the run (the schedule's length).
    """

    def __init__(self, cfg: TrainConfig, chunks: list[torch.nn.Module], total_updates: int) -> None:
        self.cfg = cfg
        self.model = wrap_ddp(chunks, cfg)
        self.optimizer = build_optimizer(self.model, cfg)
        self.scheduler = build_scheduler(self.optimizer, cfg, total_updates)
        self.reference: Optional[ReferenceModel | BaseReference] = None
        self.weights = PolicyWeights(self.model, cfg.model.lora.enabled)

    def freeze_reference(self) -> None:
        """Copy the current weights into the frozen reference (same layout), once; with LoRA the
        reference is the policy's frozen base (adapters off), no copy."""
        if self.reference is None and self.cfg.model.lora.enabled:
            self.reference = BaseReference(self.model)
        elif self.reference is None:
            self.reference = ReferenceModel.from_policy(
                self.model, build_reference_fn(self.cfg),
                offload=self.cfg.likelihood.offload_reference)

    @property
    def lr(self) -> float:
        """The learning rate the scheduler set for the next update."""
        return self.optimizer.param_groups[0]["lr"]

    def update(self, backward: Callable[[], StepResult], step: int,
               timers: Timers) -> tuple[StepResult, bool, float]:
        """One optimizer update: ``backward()`` fills the gradients (forward and backward of the
        loss); then the DP reduction, the NaN/Inf guard and the step. Returns (loss result,
        applied, global grad norm)."""
        zero_grads(self.model, self.optimizer)
        with timers("likelihood"):
            result = backward()
        with timers("communication"):
            finish_grad_sync(self.model)
        grads = {f"chunk{i}.{k}": g for i, c in enumerate(self.model)
                 for k, g in grad_tensors(c).items()}
        finite = check_finite(grads, step, policy=self.cfg.non_finite_policy)
        with timers("optimizer"):
            applied, grad_norm = optimizer_step(self.optimizer, self.scheduler) if finite \
                else (False, float("nan"))
        return result, applied, grad_norm

    # -- checkpoint state ----------------------------------------------------------------------

    def sharded_state_dict(self, is_loading: bool = False) -> dict:
        """Model (+ reference) and optimizer state as sharded tensors. ``is_loading`` first
        creates the optimizer's state (torch Adam has none before its first step), else a
        resume would silently start from empty Adam moments."""
        state = self.weights.sharded_state_dict()
        if is_loading:
            distrib_optimizer_fixes.prepare_for_load(self.optimizer)
        state["optimizer"] = self.optimizer.sharded_state_dict(
            dict(state), is_loading=is_loading,
            metadata=distrib_optimizer_fixes.OPTIMIZER_CHECKPOINT_METADATA)
        if isinstance(self.reference, ReferenceModel):
            for i, chunk in enumerate(self.reference.chunks):
                state[f"reference{i}"] = chunk.sharded_state_dict(prefix=f"reference{i}.")
        return state

    def load_sharded_state_dict(self, state: dict) -> None:
        """Weights (policy and reference) and optimizer state from a loaded sharded state."""
        from rspo_mega.models.llada.checkpoint import trusted_te_extra_state

        if isinstance(self.reference, ReferenceModel):
            with trusted_te_extra_state():
                for i, chunk in enumerate(self.reference.chunks):
                    chunk.load_state_dict({k[len(f"reference{i}."):]: v for k, v in
                                           state[f"reference{i}"].items()})
        self.weights.load_sharded_state_dict(state)
        self.optimizer.load_state_dict(state["optimizer"])
        distrib_optimizer_fixes.finish_load(self.optimizer)
