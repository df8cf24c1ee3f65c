"""The default process group as the checkpoint code uses it: rank, size, barrier, broadcast; a
single process without ``torch.distributed`` is rank 0 of 1."""

from __future__ import annotations

from typing import Any

import torch.distributed as dist


def _up() -> bool:
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    """This process's rank in the default group (0 without one)."""
    return dist.get_rank() if _up() else 0


def world_size() -> int:
    """Ranks in the default group (1 without one)."""
    return dist.get_world_size() if _up() else 1


def barrier() -> None:
    """Wait for every rank (nothing without a group)."""
    if _up():
        dist.barrier()


def broadcast(obj: Any) -> Any:
    """Rank 0's ``obj`` on every rank."""
    if world_size() == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]
