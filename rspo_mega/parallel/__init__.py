"""Parallel runtime: process groups, megatron-core parallel state, CPU compatibility, reductions,
helper processes bound to their rank."""

from rspo_mega.parallel.children import bind_children_to_owner, die_with_parent
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
    "bind_children_to_owner",
    "current_device",
    "destroy_parallel",
    "die_with_parent",
    "initialize_distributed",
    "initialize_model_parallel",
    "read_torchrun_env",
    "set_random_seed",
]
