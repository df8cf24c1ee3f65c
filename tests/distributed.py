"""Run a test body on N gloo ranks on one machine.

Usage (the body must be a module-level function so it can be sent to the ranks)::

    def _body(rank: int, world_size: int, scale: float) -> float:
        initialize_model_parallel(tp=2)      # the default process group is already up
        ...
        return value                         # any picklable value

    def test_something():
        results = run_distributed(_body, world_size=4, args=(2.0,), timeout=120)

Ranks are forked from a *forkserver* that imported torch and megatron-core once per pytest
session, so a launch costs about a second instead of the 15-25 s of imports per rank. Still, many
checks should share one launch (re-initialise layouts inside the body): the layout tests do.

Every rank gets the torchrun variables (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT) on
a free port and goes through :func:`rspo_mega.parallel.initialize_distributed`, the production
path. A rank that raises fails the test with its traceback; a rank that hangs past ``timeout``
fails it with the stack of every rank still running; no process outlives the call.
"""

from __future__ import annotations

import faulthandler
import multiprocessing as mp
import os
import pickle
import queue
import tempfile
import time
import traceback
from typing import Any, Callable, Sequence

from rspo_mega.parallel.runtime import free_port

_PRELOAD = ["torch", "torch.distributed", "megatron.core.parallel_state", "rspo_mega.parallel"]
_CTX: Any = None


class DistributedTestError(AssertionError):
    """A rank failed, hung, or died; the message carries its traceback or stack."""


def _context() -> Any:
    global _CTX
    if _CTX is None:
        _CTX = mp.get_context("forkserver")
        _CTX.set_forkserver_preload(_PRELOAD)
    return _CTX


def _rank_main(
    fn: Callable, rank: int, world_size: int, port: int, args: tuple, kwargs: dict,
    results: Any, stack_path: str, stack_after: float,
) -> None:
    os.environ.update(
        RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank),
        LOCAL_WORLD_SIZE=str(world_size), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port),
    )
    stack_file = open(stack_path, "w")
    faulthandler.dump_traceback_later(stack_after, exit=False, file=stack_file)
    try:
        import torch

        torch.set_num_threads(max(1, (os.cpu_count() or 1) // world_size))
        from rspo_mega.parallel import destroy_parallel, initialize_distributed

        initialize_distributed(backend="gloo", timeout_minutes=max(1.0, stack_after / 60))
        try:
            value = fn(rank, world_size, *args, **kwargs)
        finally:
            destroy_parallel()
        # Plain pickle: tensors travel by value, not as shared-memory handles that die with us.
        results.put((rank, True, pickle.dumps(value)))
    except BaseException:  # noqa: BLE001 - every failure must reach the parent
        results.put((rank, False, traceback.format_exc()))
    finally:
        faulthandler.cancel_dump_traceback_later()
        stack_file.close()


# Errors a rank sees when a *peer* died first: reported after the failure that caused them.
_PEER_LOSS = ("Connection closed by peer", "remote worker", "Connection reset by peer", "gloo")


def _raise_failures(outcomes: dict, results: Any, world_size: int) -> None:
    """Collect the other ranks' failures for a moment, then raise with the root cause first."""
    deadline = time.monotonic() + 3.0
    while len(outcomes) < world_size and time.monotonic() < deadline:
        try:
            rank, ok, value = results.get(timeout=0.2)
            outcomes[rank] = (ok, pickle.loads(value) if ok else value)
        except queue.Empty:
            pass
    failed = sorted(r for r, (ok, _) in outcomes.items() if not ok)
    primary = [r for r in failed if not any(m in outcomes[r][1] for m in _PEER_LOSS)]
    first = (primary or failed)[0]
    others = [r for r in failed if r != first]
    also = f"\n(also failed, as a consequence: ranks {others})" if others else ""
    raise DistributedTestError(f"rank {first} of {world_size} failed:\n{outcomes[first][1]}{also}")


def run_distributed(
    fn: Callable[..., Any],
    world_size: int,
    args: Sequence[Any] = (),
    kwargs: dict | None = None,
    timeout: float = 180.0,
) -> list[Any]:
    """Run ``fn(rank, world_size, *args, **kwargs)`` on ``world_size`` gloo ranks; per-rank results.

    Raises :class:`DistributedTestError` naming the failing rank with its traceback, or, past
    ``timeout`` seconds, naming the ranks still running with their Python stacks.
    """
    ctx = _context()
    port = free_port()
    results = ctx.Queue()
    stack_dir = tempfile.mkdtemp(prefix="rspo_dist_")
    stack_paths = [os.path.join(stack_dir, f"rank{r}.txt") for r in range(world_size)]
    procs = [
        ctx.Process(
            target=_rank_main,
            args=(fn, r, world_size, port, tuple(args), dict(kwargs or {}), results,
                  stack_paths[r], max(1.0, timeout - 5.0)),
            daemon=False,  # dist-checkpointing starts a manager process; we kill ranks ourselves
        )
        for r in range(world_size)
    ]
    for p in procs:
        p.start()
    outcomes: dict[int, tuple[bool, Any]] = {}
    deadline = time.monotonic() + timeout
    try:
        while len(outcomes) < world_size:
            try:
                rank, ok, value = results.get(timeout=0.2)
                outcomes[rank] = (ok, pickle.loads(value) if ok else value)
                if not ok:
                    _raise_failures(outcomes, results, world_size)
                continue
            except queue.Empty:
                pass
            for r, p in enumerate(procs):
                if r not in outcomes and not p.is_alive() and p.exitcode not in (0, None):
                    time.sleep(0.5)  # its last message may still be in flight
                    if results.empty():
                        raise DistributedTestError(
                            f"rank {r} of {world_size} died with exit code {p.exitcode}"
                        )
            if time.monotonic() > deadline:
                hung = [r for r in range(world_size) if r not in outcomes]
                time.sleep(6.0)  # let faulthandler write the stacks
                stacks = "\n".join(
                    f"--- rank {r} ---\n{open(stack_paths[r]).read() or '(no stack written)'}"
                    for r in hung
                )
                raise DistributedTestError(
                    f"ranks {hung} of {world_size} did not finish within {timeout:.0f} s:\n{stacks}"
                )
    finally:
        for p in procs:
            if p.is_alive():
                p.kill()
        for p in procs:
            p.join(timeout=10)
        results.close()
    return [outcomes[r][1] for r in range(world_size)]
