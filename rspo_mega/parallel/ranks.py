"""This process's place in the default process group: one home for "which rank am I". A single
process without ``torch.distributed`` is rank 0 of 1; before the group exists (signal handlers,
errors at start-up) the launcher's ``RANK`` says it."""

from __future__ import annotations

import os
from typing import Any

import torch.distributed as dist


def _grouped() -> bool:
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    """Global rank in the default process group (0 without one)."""
    return dist.get_rank() if _grouped() else 0


def world_size() -> int:
    """Ranks in the default process group (1 without one)."""
    return dist.get_world_size() if _grouped() else 1


def launch_rank() -> int:
    """The global rank the launcher gave this process (``RANK``; 0 when launched alone), readable
    before the process group exists and inside signal handlers (no collective, no lock)."""
    return int(os.environ.get("RANK", "0"))


def barrier() -> None:
    if world_size() > 1:
        dist.barrier()


def broadcast(obj: Any) -> Any:
    """Rank 0's ``obj`` on every rank."""
    if world_size() == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]
