"""Parallel runtime: process groups, megatron-core parallel state, CPU compatibility, reductions."""

from rspo_mega.parallel.cpu_compat import apply_cpu_compat
from rspo_mega.parallel.runtime import (
    DistEnv,
    current_device,
    destroy_parallel,
    initialize_distributed,
    initialize_model_parallel,
    read_torchrun_env,
    set_random_seed,
)

__all__ = [
    "DistEnv",
    "apply_cpu_compat",
    "current_device",
    "destroy_parallel",
    "initialize_distributed",
    "initialize_model_parallel",
    "read_torchrun_env",
    "set_random_seed",
]
