"""Distributed runtime: torchrun environment -> process group -> megatron-core parallel state.

The one place where processes, devices and parallel groups are set up:

* :func:`initialize_distributed` reads the ``torchrun`` environment (RANK, WORLD_SIZE, LOCAL_RANK,
  MASTER_ADDR, MASTER_PORT), picks NCCL on GPUs and gloo on CPUs (applying the CPU compatibility
  layer there), binds helper processes to the rank (:mod:`rspo_mega.parallel.children`), and
  creates the default process group.
* :func:`initialize_model_parallel` builds megatron-core's tensor/pipeline/context/data-parallel
  groups (order ``tp-cp-ep-dp-pp``, megatron's default) and seeds every rank the Megatron way.
* :func:`destroy_parallel` tears both down (tests re-initialise several layouts in one launch).
"""

from __future__ import annotations

import datetime
import logging
import os
import random
import socket
from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch
import torch.distributed as dist

from rspo_mega.parallel.children import bind_children_to_owner
from rspo_mega.parallel.cpu_compat import apply_cpu_compat

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class DistEnv:
    """What torchrun tells a process about itself."""

    rank: int
    world_size: int
    local_rank: int
    master_addr: str
    master_port: int


def read_torchrun_env() -> DistEnv:
    """Parse the torchrun variables; a single process without them is rank 0 of 1."""

    def get_int(name: str, default: int) -> int:
        raw = os.environ.get(name)
        if raw is None or raw == "":
            return default
        try:
            return int(raw)
        except ValueError:
            raise ValueError(f"environment variable {name}={raw!r} is not an integer") from None

    env = DistEnv(
        rank=get_int("RANK", 0),
        world_size=get_int("WORLD_SIZE", 1),
        local_rank=get_int("LOCAL_RANK", 0),
        master_addr=os.environ.get("MASTER_ADDR", "127.0.0.1"),
        master_port=get_int("MASTER_PORT", 29500),
    )
    if env.world_size < 1 or not 0 <= env.rank < env.world_size:
        raise ValueError(f"invalid torchrun environment: RANK={env.rank} WORLD_SIZE={env.world_size}")
    return env


def current_device() -> torch.device:
    """The device this rank computes on."""
    if torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def initialize_distributed(
    backend: Optional[str] = None, timeout_minutes: float = 30.0
) -> DistEnv:
    """Create the default process group from the torchrun environment (idempotent).

    ``backend`` defaults to ``nccl`` with CUDA and ``gloo`` without; on CPU the megatron-core
    compatibility patches are applied first. Helper processes the rank starts later (checkpoint
    writers, data workers) end with it, also after SIGKILL (:func:`bind_children_to_owner`).
    ``timeout_minutes`` bounds every collective, so a hung peer fails with a timeout instead of
    blocking forever.
    """
    env = read_torchrun_env()
    bind_children_to_owner()
    if torch.cuda.is_available():
        torch.cuda.set_device(env.local_rank % torch.cuda.device_count())
    else:
        apply_cpu_compat()
    if dist.is_initialized():
        return env
    backend = backend or ("nccl" if torch.cuda.is_available() else "gloo")
    port = env.master_port
    if env.world_size == 1 and "MASTER_PORT" not in os.environ:
        port = free_port()  # a standalone run must not collide with another one on 29500
    if backend == "nccl" and not torch.cuda.is_available():
        raise RuntimeError("backend 'nccl' requested but CUDA is unavailable; use 'gloo'")
    dist.init_process_group(
        backend=backend,
        init_method=f"tcp://{env.master_addr}:{port}",
        rank=env.rank,
        world_size=env.world_size,
        timeout=datetime.timedelta(minutes=timeout_minutes),
    )
    log.info("rank %d/%d: process group up (%s)", env.rank, env.world_size, backend)
    return env


def initialize_model_parallel(
    tp: int = 1,
    pp: int = 1,
    cp: int = 1,
    vpp: Optional[int] = None,
    seed: int = 1234,
    timeout_minutes: float = 30.0,
) -> None:
    """Build megatron-core's parallel groups for a TP x CP x DP x PP layout and seed the ranks.

    Requires the default process group (see :func:`initialize_distributed`); its world size must
    be divisible by ``tp * pp * cp``. Data-parallel size is what remains.
    """
    from megatron.core import parallel_state as ps

    if not dist.is_initialized():
        raise RuntimeError("initialize_model_parallel: call initialize_distributed() first")
    world = dist.get_world_size()
    if world % (tp * pp * cp):
        raise ValueError(
            f"world size {world} is not divisible by tp*pp*cp = {tp}*{pp}*{cp} = {tp * pp * cp}"
        )
    if ps.model_parallel_is_initialized():
        ps.destroy_model_parallel()
    ps.initialize_model_parallel(
        tensor_model_parallel_size=tp,
        pipeline_model_parallel_size=pp,
        virtual_pipeline_model_parallel_size=vpp,
        context_parallel_size=cp,
        distributed_timeout_minutes=int(max(1, timeout_minutes)),
    )
    set_random_seed(seed)


def set_random_seed(seed: int) -> None:
    """Seed the Megatron way: one base seed per pipeline stage, TP-aware tracker for TP regions.

    Python, NumPy and torch get ``seed + 100 * pp_rank`` (identical across TP and DP ranks of a
    stage, so weights initialised on CPU are the same at any TP size); megatron's RNG tracker gets
    the TP-rank-dependent stream for dropout inside tensor-parallel regions.
    """
    from megatron.core import parallel_state as ps
    from megatron.core import tensor_parallel

    stage_seed = seed + 100 * ps.get_pipeline_model_parallel_rank()
    random.seed(stage_seed)
    np.random.seed(stage_seed % (2**32))
    torch.manual_seed(stage_seed)
    tensor_parallel.model_parallel_cuda_manual_seed(stage_seed)


def destroy_parallel() -> None:
    """Tear down megatron-core groups and the default process group (safe to call twice)."""
    from megatron.core import parallel_state as ps

    if ps.model_parallel_is_initialized():
        ps.destroy_model_parallel()
    if dist.is_initialized():
        dist.destroy_process_group()
