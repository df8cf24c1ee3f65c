"""The multi-rank test harness itself: results, failures, hangs, no leaked processes."""

from __future__ import annotations

import os
import time

import psutil
import pytest
import torch
import torch.distributed as dist

from tests.distributed import DistributedTestError, run_distributed


def _sum_ranks(rank: int, world_size: int) -> tuple[int, float, str]:
    t = torch.tensor([float(rank)])
    dist.all_reduce(t)
    return rank, t.item(), os.environ["MASTER_PORT"]


def _fail_on_rank_one(rank: int, world_size: int) -> None:
    if rank == 1:
        raise RuntimeError("deliberate failure on rank one")
    dist.barrier()  # the other ranks wait for rank 1, which never arrives


def _hang_on_rank_zero(rank: int, world_size: int) -> None:
    if rank == 0:
        while True:
            time.sleep(0.05)


def _children() -> set[int]:
    return {p.pid for p in psutil.Process().children(recursive=True) if "forkserver" not in " ".join(p.cmdline())}


def test_results_come_back_per_rank():
    results = run_distributed(_sum_ranks, 4, timeout=120)
    assert [r[0] for r in results] == [0, 1, 2, 3]
    assert all(r[1] == 6.0 for r in results)
    assert len({r[2] for r in results}) == 1


def test_failing_rank_fails_the_test_with_its_traceback():
    before = _children()
    start = time.monotonic()
    with pytest.raises(DistributedTestError) as err:
        run_distributed(_fail_on_rank_one, 3, timeout=60)
    assert "rank 1 of 3 failed" in str(err.value)
    assert "deliberate failure on rank one" in str(err.value)
    assert time.monotonic() - start < 30  # reported at once, not after the timeout
    time.sleep(0.5)
    assert _children() - before == set()


def test_hanging_rank_times_out_with_its_stack():
    before = _children()
    with pytest.raises(DistributedTestError) as err:
        run_distributed(_hang_on_rank_zero, 2, timeout=8)
    message = str(err.value)
    assert "ranks [0] of 2 did not finish within 8 s" in message
    assert "_hang_on_rank_zero" in message  # the hung rank's Python stack
    time.sleep(0.5)
    assert _children() - before == set()
