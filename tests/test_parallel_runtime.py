"""Process groups and megatron-core parallel state: layouts, seeds, environment parsing."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from rspo_mega.parallel import initialize_model_parallel, read_torchrun_env
from tests.distributed import run_distributed


def _groups(layout: dict) -> dict:
    from megatron.core import parallel_state as ps

    initialize_model_parallel(**layout)
    return {
        "tp": dist.get_process_group_ranks(ps.get_tensor_model_parallel_group()),
        "pp": dist.get_process_group_ranks(ps.get_pipeline_model_parallel_group()),
        "dp": dist.get_process_group_ranks(ps.get_data_parallel_group()),
        "tp_rank": ps.get_tensor_model_parallel_rank(),
        "pp_rank": ps.get_pipeline_model_parallel_rank(),
        "dp_rank": ps.get_data_parallel_rank(),
    }


def _seed_streams() -> dict:
    """After seeding: default stream per stage, TP-region stream per TP rank."""
    from megatron.core import tensor_parallel

    initialize_model_parallel(tp=2, pp=2, seed=77)
    default = torch.rand(4)
    with tensor_parallel.get_cuda_rng_tracker().fork():
        tp_region = torch.rand(4)
    after = torch.rand(4)
    return {"default": default, "tp_region": tp_region, "after": after}


def _layouts_body(rank: int, world_size: int, layouts: list[dict]) -> list:
    out = [_groups(layout) for layout in layouts]
    if world_size == 4:
        out.append(_seed_streams())
    return out


def _blocks(world: int, size: int) -> list[list[int]]:
    return [list(range(s, s + size)) for s in range(0, world, size)]


def _owner(groups: list[list[int]], rank: int) -> list[int]:
    return next(g for g in groups if rank in g)


EXPECTED_4 = [
    # (layout, tp groups, pp groups, dp groups) for megatron's order tp-cp-ep-dp-pp
    (dict(tp=2), _blocks(4, 2), [[0], [1], [2], [3]], [[0, 2], [1, 3]]),
    (dict(pp=2), [[0], [1], [2], [3]], [[0, 2], [1, 3]], [[0, 1], [2, 3]]),
    (dict(tp=1), [[0], [1], [2], [3]], [[0], [1], [2], [3]], [[0, 1, 2, 3]]),
    (dict(tp=2, pp=2), _blocks(4, 2), [[0, 2], [1, 3]], [[0], [1], [2], [3]]),
]
EXPECTED_8 = [
    (dict(tp=2, pp=2), _blocks(8, 2), [[0, 4], [1, 5], [2, 6], [3, 7]], [[0, 2], [1, 3], [4, 6], [5, 7]]),
    (dict(tp=4, pp=2), _blocks(8, 4), [[0, 4], [1, 5], [2, 6], [3, 7]], [[0], [1], [2], [3], [4], [5], [6], [7]]),
]


@pytest.mark.parametrize("world, expected", [(4, EXPECTED_4), (8, EXPECTED_8)])
def test_group_layouts_and_seeds(world, expected):
    layouts = [e[0] for e in expected]
    per_rank = run_distributed(_layouts_body, world, args=(layouts,), timeout=240)
    for rank, results in enumerate(per_rank):
        for (layout, tp, pp, dp), got in zip(expected, results):
            assert got["tp"] == _owner(tp, rank), (layout, rank, got)
            assert got["pp"] == _owner(pp, rank), (layout, rank, got)
            assert got["dp"] == _owner(dp, rank), (layout, rank, got)
            assert got["tp_rank"] == got["tp"].index(rank)
            assert got["pp_rank"] == got["pp"].index(rank)
    if world == 4:  # TP2 x PP2: ranks (0,1) stage 0, (2,3) stage 1
        s = [r[-1] for r in per_rank]
        assert torch.equal(s[0]["default"], s[1]["default"])  # same stage, any TP rank
        assert not torch.equal(s[0]["default"], s[2]["default"])  # stages differ
        assert not torch.equal(s[0]["tp_region"], s[1]["tp_region"])  # TP ranks differ
        assert torch.equal(s[0]["after"], s[1]["after"])  # fork restores the default stream


def test_torchrun_env_parsing(monkeypatch):
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(k, raising=False)
    env = read_torchrun_env()
    assert (env.rank, env.world_size, env.local_rank) == (0, 1, 0)
    monkeypatch.setenv("RANK", "3")
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setenv("MASTER_PORT", "1234")
    env = read_torchrun_env()
    assert (env.rank, env.world_size, env.local_rank, env.master_port) == (3, 4, 1, 1234)
    monkeypatch.setenv("RANK", "4")
    with pytest.raises(ValueError, match="RANK=4 WORLD_SIZE=4"):
        read_torchrun_env()
    monkeypatch.setenv("WORLD_SIZE", "four")
    with pytest.raises(ValueError, match="WORLD_SIZE='four' is not an integer"):
        read_torchrun_env()


def _phases(rank: int, world: int) -> tuple:
    """Every rank reaches "final evaluation"; rank 2 never reaches "final save", where the
    others give up after 1 s and the lowest of them prints the one line."""
    import contextlib
    import io
    import time

    from rspo_mega.console import run_entry_point
    from rspo_mega.parallel.bounded_barrier import wait_for_ranks

    start = time.monotonic()
    wait_for_ranks("final evaluation", 30.0)
    together = time.monotonic() - start
    if rank == 2:
        time.sleep(4.0)
        return together, None, ""
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        code = run_entry_point("rspo-train", lambda: wait_for_ranks(
            "final save", 1.0, bound="parallel.end_of_run_timeout_minutes"))
    return together, code, err.getvalue()


def test_a_phase_names_the_ranks_that_did_not_arrive():
    results = run_distributed(_phases, world_size=3, timeout=60)
    assert all(together < 10 for together, _, _ in results)
    assert [code for _, code, _ in results] == [1, 1, None]
    assert results[0][2] == ("rspo-train: final save: rank 2 did not arrive within 1 s "
                             "(parallel.end_of_run_timeout_minutes)\n")
    assert results[1][2] == ""  # one line, from the lowest rank that arrived
