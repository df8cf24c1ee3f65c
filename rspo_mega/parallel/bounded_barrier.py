"""A barrier with a bound that names the ranks that did not arrive.

A collective waits for a missing peer until the process group's timeout (``parallel.
timeout_minutes``, 30 minutes by default) and then fails on every rank with backend tracebacks
that do not say who was missing. :func:`wait_for_ranks` runs no collective: each rank adds itself
to a counter and a per-rank key in the process group's key-value store (the c10d store that
torchrun or rank 0 serves), then polls the counter. When every rank has arrived it returns; past
``timeout_s`` it raises :class:`~rspo_mega.errors.PeerTimeoutError` naming the phase and the
absent ranks, on every rank that arrived.

Keys are unique per phase name and per launch (torchrun's restart count), so a name is used once
per run.
"""

from __future__ import annotations

import os
import time

import torch.distributed as dist

from rspo_mega.errors import PeerTimeoutError

POLL_S = (0.01, 0.5)  # first and longest pause between two reads of the counter (seconds)


def _store() -> dist.Store:
    return dist.distributed_c10d._get_default_store()


def wait_for_ranks(phase: str, timeout_s: float, bound: str = "") -> None:
    """Return once every rank of the default process group called this with ``phase``; raise
    :class:`PeerTimeoutError` after ``timeout_s`` seconds, naming the absent ranks (``bound``:
    the config key that sets the bound, for the message). A no-op without a process group of
    more than one rank."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return
    rank, world = dist.get_rank(), dist.get_world_size()
    key = f"rspo_mega/phase/{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}/{phase}"
    store = _store()
    store.set(f"{key}/rank{rank}", "1")
    arrived = store.add(f"{key}/count", 1)
    deadline = time.monotonic() + timeout_s
    pause = POLL_S[0]
    while arrived < world:
        if time.monotonic() > deadline:
            absent = [r for r in range(world) if not store.check([f"{key}/rank{r}"])]
            if not absent:  # every rank arrived during the last pause
                return
            present = [r for r in range(world) if r not in absent]
            raise PeerTimeoutError(phase, absent, timeout_s, min(present), bound)
        time.sleep(pause)
        pause = min(2 * pause, POLL_S[1])
        arrived = store.add(f"{key}/count", 0)
