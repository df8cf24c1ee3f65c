"""Build the trainable policy: parallel state, model chunks, megatron DDP, optimizer, LR schedule.

Everything after :func:`setup_parallel` uses the current megatron-core parallel state; nothing is
RL-specific. The policy is a list of model chunks (one per virtual pipeline stage) wrapped in
megatron's ``DistributedDataParallel``, whose gradient all-reduce *averages* over data-parallel
ranks (the ELBO runner compensates with ``ddp_averages_gradients=True``).
"""

from __future__ import annotations

import logging
from typing import Callable, Optional

import torch
from megatron.core import parallel_state as ps
from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
from megatron.core.optimizer import OptimizerConfig as MegatronOptimizerConfig
from megatron.core.optimizer import get_megatron_optimizer
from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

from rspo_mega.config.schema import TrainConfig
from rspo_mega.models.llada import build_llada_model, unwrap_model
from rspo_mega.parallel import initialize_distributed, initialize_model_parallel

log = logging.getLogger(__name__)


def setup_parallel(cfg: TrainConfig) -> None:
    """The process group and megatron-core's TP/PP/CP/DP groups of ``cfg.parallel``."""
    p = cfg.parallel
    initialize_distributed(backend=p.backend, timeout_minutes=p.timeout_minutes)
    initialize_model_parallel(tp=p.tp, pp=p.pp, vpp=p.vpp, seed=cfg.seed,
                              timeout_minutes=p.timeout_minutes)


def build_chunks(cfg: TrainConfig, init_weights: bool = True) -> list[torch.nn.Module]:
    """This rank's model chunks (one per virtual pipeline stage), on the compute device."""
    vpp = ps.get_virtual_pipeline_model_parallel_world_size()
    stages = [None] if vpp is None else list(range(vpp))
    chunks = [build_llada_model(cfg.model, vp_stage=v, init_weights=init_weights,
                                sequence_parallel=cfg.parallel.sequence_parallel, seed=cfg.seed)
              for v in stages]
    if torch.cuda.is_available():
        chunks = [c.cuda(torch.cuda.current_device()) for c in chunks]
    return chunks


def wrap_ddp(chunks: list[torch.nn.Module], cfg: TrainConfig) -> list[DistributedDataParallel]:
    """Megatron DDP around each chunk: fp32 gradient buffers, reduced after the backward pass."""
    ddp_config = DistributedDataParallelConfig(
        grad_reduce_in_fp32=True,
        overlap_grad_reduce=False,
        use_distributed_optimizer=cfg.optimizer.use_distributed_optimizer,
        check_for_nan_in_grad=False,  # guards.check_finite names the tensor instead
    )
    wrapped = []
    for i, chunk in enumerate(chunks):
        config = unwrap_model(chunk).config
        wrapped.append(
            DistributedDataParallel(config=config, ddp_config=ddp_config, module=chunk,
                                    disable_bucketing=i > 0)
        )
    return wrapped


def build_optimizer(chunks: list[torch.nn.Module], cfg: TrainConfig):
    """megatron-core Adam (distributed or not) with global-norm clipping, in fp32 or bf16."""
    o = cfg.optimizer
    bf16 = cfg.model.params_dtype == "bfloat16"
    mcfg = MegatronOptimizerConfig(
        optimizer="adam",
        lr=o.lr,
        min_lr=o.min_lr,
        weight_decay=o.weight_decay,
        adam_beta1=o.adam_beta1,
        adam_beta2=o.adam_beta2,
        adam_eps=o.adam_eps,
        clip_grad=o.clip_grad,
        bf16=bf16,
        params_dtype=torch.bfloat16 if bf16 else torch.float32,
        use_distributed_optimizer=o.use_distributed_optimizer,
    )
    return get_megatron_optimizer(mcfg, chunks)


def build_scheduler(optimizer, cfg: TrainConfig, total_updates: int) -> OptimizerParamScheduler:
    """Linear warm-up then constant / linear / cosine decay over ``total_updates`` updates."""
    o = cfg.optimizer
    decay_steps = max(total_updates, o.warmup_steps + 1)
    return OptimizerParamScheduler(
        optimizer,
        init_lr=0.0 if o.warmup_steps else o.lr,
        max_lr=o.lr,
        min_lr=o.min_lr,
        lr_warmup_steps=o.warmup_steps,
        lr_decay_steps=decay_steps,
        lr_decay_style=o.decay_style,
        start_wd=o.weight_decay,
        end_wd=o.weight_decay,
        wd_incr_steps=decay_steps,
        wd_incr_style="constant",
    )


def build_reference_fn(cfg: TrainConfig) -> Callable[[], list[torch.nn.Module]]:
    """A builder of unwrapped chunks with the policy's layout (for the frozen reference)."""
    return lambda: build_chunks(cfg, init_weights=False)


def zero_grads(chunks: list[DistributedDataParallel], optimizer) -> None:
    """Clear DDP gradient buffers and the optimizer's gradients before a new step."""
    for chunk in chunks:
        chunk.zero_grad_buffer()
    optimizer.zero_grad()


def finish_grad_sync(chunks: list[DistributedDataParallel]) -> None:
    """Run the data-parallel gradient reduction of every chunk (after the backward pass)."""
    for chunk in chunks:
        chunk.finish_grad_sync()


def optimizer_step(optimizer, scheduler: Optional[OptimizerParamScheduler]) -> tuple[bool, float]:
    """One update; returns (applied, global grad norm). The schedule advances when applied."""
    applied, grad_norm, _ = optimizer.step()
    if applied and scheduler is not None:
        scheduler.step(increment=1)
    return bool(applied), float(grad_norm) if grad_norm is not None else float("nan")
