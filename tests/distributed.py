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
fails it with the stack of every rank still running.

No process outlives the call, and the harness proves it: every rank starts its own process session
(``setsid``), which its descendants inherit even when they are re-parented to init, and asks to
die with the forkserver. Ranks that finished are given time to exit; the others are killed with
SIGKILL, as a crash would. Any process still in a rank's session a few seconds later fails the
test (and is killed), listed with its pid, parent, resident memory and command line. Processes
exec'd by tests (``rspo-train``) are accounted for by the environment marker of
:func:`marked_env` instead, read back from ``/proc/<pid>/environ``.
"""

from __future__ import annotations

import faulthandler
import multiprocessing as mp
import os
import pickle
import queue
import shutil
import tempfile
import time
import traceback
from typing import Any, Callable, Sequence

from rspo_mega.parallel.runtime import free_port
from tests import processes

_PRELOAD = ["torch", "torch.distributed", "megatron.core.parallel_state", "rspo_mega.parallel"]
_CTX: Any = None
EXIT_GRACE_S = 30.0  # how long a rank that sent its result may take to exit before it is killed


class DistributedTestError(AssertionError):
    """A rank failed, hung, or died, or a process outlived the ranks; the message says which."""


def _context() -> Any:
    global _CTX
    if _CTX is None:
        processes.session_owner()  # before the forkserver starts: every rank inherits the marker
        _CTX = mp.get_context("forkserver")
        _CTX.set_forkserver_preload(_PRELOAD)
    return _CTX


def stop_forkserver() -> list[int]:
    """End this process's forkserver (the next launch restarts it); returns the pids of the
    helpers of this process that stay until it exits: its multiprocessing resource tracker, which
    ends once no process holds its pipe (this one, after the forkserver is gone)."""
    from multiprocessing import forkserver, resource_tracker

    forkserver._forkserver._stop()
    tracker = resource_tracker._resource_tracker._pid
    return [tracker] if tracker is not None else []


def _rank_main(
    fn: Callable, rank: int, world_size: int, port: int, args: tuple, kwargs: dict,
    results: Any, stack_path: str, stack_after: float,
) -> None:
    os.setsid()  # the rank's session: every descendant of the rank stays findable in it
    from rspo_mega.parallel import die_with_parent

    die_with_parent()  # the forkserver ends with pytest, so the ranks do too
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


def _death(rank: int, proc: Any, world_size: int) -> str:
    return f"rank {rank} of {world_size} died with exit code {proc.exitcode}"


def _raise_failures(outcomes: dict, results: Any, procs: list) -> None:
    """Collect the other ranks' failures for a moment, then raise with the root cause first:
    a rank that died, else a rank's own error, else an error caused by a lost peer."""
    world_size = len(procs)
    deadline = time.monotonic() + 3.0
    while len(outcomes) < world_size and time.monotonic() < deadline:
        try:
            rank, ok, value = results.get(timeout=0.2)
            outcomes[rank] = (ok, pickle.loads(value) if ok else value)
        except queue.Empty:
            pass
    dead = [r for r, p in enumerate(procs) if r not in outcomes and p.exitcode not in (0, None)]
    failed = sorted(r for r, (ok, _) in outcomes.items() if not ok)
    primary = [r for r in failed if not any(m in outcomes[r][1] for m in _PEER_LOSS)]
    if dead:
        head = _death(dead[0], procs[dead[0]], world_size)
        also = dead[1:] + failed
    else:
        first = (primary or failed)[0]
        head = f"rank {first} of {world_size} failed:\n{outcomes[first][1]}"
        also = [r for r in failed if r != first]
    detail = "".join(f"\n--- rank {r} ---\n{outcomes[r][1]}" for r in failed if dead)
    tail = f"\n(also failed, as a consequence: ranks {also})" if also else ""
    raise DistributedTestError(head + tail + detail)


def _collect(procs: list, results: Any, stack_paths: list[str], timeout: float) -> list[Any]:
    """Every rank's result in rank order; raises on the first failure, death or timeout."""
    world_size = len(procs)
    outcomes: dict[int, tuple[bool, Any]] = {}
    deadline = time.monotonic() + timeout
    while len(outcomes) < world_size:
        try:
            rank, ok, value = results.get(timeout=0.2)
            outcomes[rank] = (ok, pickle.loads(value) if ok else value)
            if not ok:
                _raise_failures(outcomes, results, procs)
            continue
        except queue.Empty:
            pass
        for r, p in enumerate(procs):
            if r not in outcomes and not p.is_alive() and p.exitcode not in (0, None):
                time.sleep(0.5)  # its last message may still be in flight
                _raise_failures(outcomes, results, procs)
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
    return [outcomes[r][1] for r in range(world_size)]


def _stop_ranks(procs: list, finished: bool) -> None:
    """Let ranks that ``finished`` exit on their own (up to EXIT_GRACE_S); SIGKILL the rest."""
    if finished:
        deadline = time.monotonic() + EXIT_GRACE_S
        for p in procs:
            p.join(timeout=max(0.0, deadline - time.monotonic()))
    for p in procs:
        if p.is_alive():
            p.kill()
    for p in procs:
        p.join(timeout=10)


def run_distributed(
    fn: Callable[..., Any],
    world_size: int,
    args: Sequence[Any] = (),
    kwargs: dict | None = None,
    timeout: float = 180.0,
) -> list[Any]:
    """Run ``fn(rank, world_size, *args, **kwargs)`` on ``world_size`` gloo ranks; per-rank results.

    Raises :class:`DistributedTestError` naming the failing rank with its traceback, or, past
    ``timeout`` seconds, naming the ranks still running with their Python stacks, or listing the
    processes that outlived the ranks.
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
            daemon=False,  # we end the ranks ourselves, and a daemon could not fork helpers
        )
        for r in range(world_size)
    ]
    for p in procs:
        p.start()
    sessions = {p.pid for p in procs}
    error: BaseException | None = None
    try:
        return _collect(procs, results, stack_paths, timeout)
    except BaseException as exc:
        error = exc
        raise
    finally:
        _stop_ranks(procs, finished=error is None)
        results.close()
        shutil.rmtree(stack_dir, ignore_errors=True)
        try:
            processes.assert_none_left(lambda: processes.in_sessions(sessions),
                                       f"the {world_size} ranks of {fn.__name__}")
        except AssertionError as leak:
            if error is None:
                raise DistributedTestError(str(leak)) from None
            error.add_note(str(leak))
