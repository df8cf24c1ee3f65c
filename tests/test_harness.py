"""The multi-rank test harness itself: results, failures, hangs, deaths, no leaked processes.

Since the harness fails a test that leaves any process behind in a rank's session, every test
here that passes also shows that nothing outlived its ranks.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

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


def _leave_a_sleeper(rank: int, world_size: int, pid_file: str) -> None:
    if rank == 0:  # an exec'd child the rank neither waits for nor binds: it outlives the rank
        Path(pid_file).write_text(str(subprocess.Popen(["sleep", "300"]).pid))
    dist.barrier()


def _sleep_forever() -> None:
    while True:
        time.sleep(1)


def _die_with_forked_helpers(rank: int, world_size: int, pid_dir: str) -> None:
    """Rank 1 forks a helper, which forks one more, then the rank is SIGKILLed."""
    import multiprocessing as mp

    if rank == 1:
        helper = mp.get_context("fork").Process(target=_fork_twice, args=(pid_dir,))
        helper.start()
        while len(list(Path(pid_dir).iterdir())) < 2:
            time.sleep(0.05)
        os.kill(os.getpid(), signal.SIGKILL)
    dist.barrier()


def _fork_twice(pid_dir: str) -> None:
    import multiprocessing as mp

    grandchild = mp.get_context("fork").Process(target=_sleep_forever)
    grandchild.start()
    for pid in (os.getpid(), grandchild.pid):
        (Path(pid_dir) / str(pid)).write_text("")
    _sleep_forever()


def _gone(pid: int) -> bool:
    from tests.processes import _read

    return _read(pid) is None


def test_results_come_back_per_rank():
    results = run_distributed(_sum_ranks, 4, timeout=120)
    assert [r[0] for r in results] == [0, 1, 2, 3]
    assert all(r[1] == 6.0 for r in results)
    assert len({r[2] for r in results}) == 1


def test_failing_rank_fails_the_test_with_its_traceback():
    start = time.monotonic()
    with pytest.raises(DistributedTestError) as err:
        run_distributed(_fail_on_rank_one, 3, timeout=60)
    assert "rank 1 of 3 failed" in str(err.value)
    assert "deliberate failure on rank one" in str(err.value)
    assert time.monotonic() - start < 30  # reported at once, not after the timeout
    assert not getattr(err.value, "__notes__", None)  # nothing was left behind


def test_hanging_rank_times_out_with_its_stack():
    with pytest.raises(DistributedTestError) as err:
        run_distributed(_hang_on_rank_zero, 2, timeout=8)
    message = str(err.value)
    assert "ranks [0] of 2 did not finish within 8 s" in message
    assert "_hang_on_rank_zero" in message  # the hung rank's Python stack
    assert not getattr(err.value, "__notes__", None)


def test_a_process_left_behind_fails_the_test(tmp_path):
    pid_file = tmp_path / "sleeper.pid"
    with pytest.raises(DistributedTestError) as err:
        run_distributed(_leave_a_sleeper, 2, args=(str(pid_file),), timeout=60)
    message = str(err.value)
    pid = int(pid_file.read_text())
    assert "1 processes" in message and "left behind by the 2 ranks of _leave_a_sleeper" in message
    assert f"pid {pid} " in message and "sleep 300" in message
    assert _gone(pid)  # and the harness killed it


def test_helpers_of_a_killed_rank_die_with_it(tmp_path):
    """kill -9 of a rank: its forked helper and that helper's own child end too (the parent-death
    signal of rspo_mega.parallel.children), so the harness finds nothing left behind."""
    with pytest.raises(DistributedTestError) as err:
        run_distributed(_die_with_forked_helpers, 2, args=(str(tmp_path),), timeout=60)
    assert str(err.value).startswith("rank 1 of 2 died with exit code -9"), str(err.value)
    assert not getattr(err.value, "__notes__", None), err.value.__notes__
    pids = [int(p.name) for p in tmp_path.iterdir()]
    assert len(pids) == 2 and all(_gone(pid) for pid in pids)
