"""rspo_mega.parallel.children: each patch is still needed, a save starts no server, the queue
refuses to leave its process.

The probes fail when a megatron-core upgrade removed the cause of a patch: delete the patch then.
"""

from __future__ import annotations

import os
import pickle

import psutil
import pytest
import torch

from rspo_mega.parallel import children
from tests.distributed import run_distributed


@pytest.mark.parametrize("patch", children.PATCHES, ids=[p.covers for p in children.PATCHES])
def test_patch_is_not_stale(patch):
    assert patch.still_needed(), f"stale patch, megatron-core no longer needs: {patch.covers}"


def _descendants() -> list[str]:
    return [" ".join(p.cmdline()) for p in psutil.Process().children(recursive=True)]


def _save_then_probe_upstream(rank: int, world_size: int, root: str) -> dict:
    from megatron.core.dist_checkpointing import ShardedTensor
    from megatron.core.dist_checkpointing.strategies import filesystem_async as fs_async

    from tests.training.checkpoint_parts import save

    shard = ShardedTensor.from_rank_offsets(
        "w", torch.full((4, 3), float(rank)), (0, rank, world_size), replica_id=0)
    save(root, 1, {"w": shard})
    out = {"queue": type(fs_async._results_queue).__name__, "after_save": _descendants()}
    # Upstream's own path, once: does _get_write_results_queue still start a server process?
    ours, fs_async._results_queue = fs_async._results_queue, None
    proxy = fs_async._get_write_results_queue()
    out["upstream"] = _descendants()
    proxy._manager.shutdown()
    fs_async._results_queue = ours
    return out


def test_a_save_starts_no_manager_server_and_upstream_still_would(tmp_path):
    for res in run_distributed(_save_then_probe_upstream, 2, args=(str(tmp_path),), timeout=120):
        assert res["queue"] == "InProcessQueue"
        assert res["after_save"] == []  # the forked shard writers were joined, nothing else runs
        # if this fails, upstream stopped starting a Manager here: the queue patch can go
        assert any("spawn_main" in cmd for cmd in res["upstream"]), res["upstream"]


def test_in_process_queue_stays_in_its_process():
    q = children.InProcessQueue()
    q.put(1)
    assert q.get_nowait() == 1
    with pytest.raises(RuntimeError, match="async_sharded_save"):
        pickle.dumps(q)
    q.owner_pid = os.getpid() + 1  # as seen from a forked child
    with pytest.raises(RuntimeError, match="in-process"):
        q.put(2)


def test_die_with_parent_sets_the_parent_death_signal():
    """In a forked child: PR_GET_PDEATHSIG (2) reads back SIGKILL."""
    import ctypes
    import signal

    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # child: report the signal number, then leave without cleanup
        children.die_with_parent(expected_parent=os.getppid())
        sig = ctypes.c_int(0)
        ctypes.CDLL(None).prctl(2, ctypes.byref(sig), 0, 0, 0)
        os.write(write, str(sig.value).encode())
        os._exit(0)
    os.close(write)
    got = os.read(read, 16).decode()
    os.waitpid(pid, 0)
    os.close(read)
    assert got == str(int(signal.SIGKILL))
