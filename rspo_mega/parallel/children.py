"""Helper processes end with the process that started them, also when it is killed with SIGKILL.

A rank (or a single-process trainer, evaluator or converter) starts helper processes: megatron-core's
checkpoint writers, DataLoader workers. A clean exit stops them (multiprocessing finalizers), but
after ``kill -9``, an OOM kill or a harness timeout nothing runs in the dying process, so
helpers that do not notice their parent's death stay alive, re-parented to init. This module is
the one place where rspo_mega prevents that. :func:`bind_children_to_owner` applies each
:class:`~rspo_mega.parallel.cpu_compat.Patch` in :data:`PATCHES` once per process;
:func:`rspo_mega.parallel.initialize_distributed` calls it on every rank, on GPUs and CPUs.

1. **No ``Manager`` server for checkpoint writes.** megatron-core's ``FileSystemWriterAsync``
   returns its writer processes' results through a queue that ``_get_write_results_queue``
   (``megatron/core/dist_checkpointing/strategies/filesystem_async.py``, lines 48-56 in 0.16.1)
   creates as ``mp.get_context("spawn").Manager().Queue()``: a server process that re-imports
   ``__main__`` (about 270-335 MB resident) and shares the process's multiprocessing resource
   tracker, so both outlive a killed rank. rspo_mega saves synchronously
   (``dist_checkpointing.save`` without ``async_sharded_save``): ``write_preloaded_data_multiproc``
   puts the results in the rank's own process and ``retrieve_write_results`` reads them there,
   so the module global ``_results_queue`` is set beforehand to an :class:`InProcessQueue`, and
   no server is started. The queue refuses to be pickled or filled from another process (what an
   asynchronous save would do) with an error naming this module.
2. **Forked children die with their parent.** ``os.register_at_fork`` makes every child forked
   from here on request ``PR_SET_PDEATHSIG`` = SIGKILL (Linux ``prctl``): the kernel kills the
   child when the thread that forked it ends. This covers the shard writers, which
   ``write_preloaded_data_multiproc`` forks (``mp.get_context("fork")``) and which would
   otherwise keep writing into a checkpoint directory the next start deletes, and DataLoader or
   any other fork-context workers. Not covered: children that are exec'd (``subprocess``, spawn
   context). rspo_mega's only such child, the math verifier
   (:mod:`rspo_mega.tasks.symbolic_worker`), exits when its stdin closes; the resource tracker
   exits when the last process holding its pipe ends. A child forked by a thread that then ends
   is killed with that thread, so helpers must be started from long-lived threads.

Each patch has a ``still_needed`` probe on the installed megatron-core (``tests/test_children.py``
fails when one turns False, so the patch is removed once upstream fixed the cause).
"""

from __future__ import annotations

import ctypes
import logging
import os
import queue
import signal
import sys
from typing import Any, Optional

from rspo_mega.parallel.cpu_compat import Patch, _has

log = logging.getLogger(__name__)

PR_SET_PDEATHSIG = 1  # from <linux/prctl.h>
_FS_ASYNC = "megatron.core.dist_checkpointing.strategies.filesystem_async"
_APPLIED: list[str] = []
_state: dict[str, Any] = {"parent": None, "prctl": None}


class InProcessQueue(queue.Queue):
    """A ``queue.Queue`` for megatron-core's write results that stays inside its process."""

    def __init__(self) -> None:
        super().__init__()
        self.owner_pid = os.getpid()

    def _refuse(self) -> RuntimeError:
        return RuntimeError(
            f"rspo_mega.parallel.children replaced {_FS_ASYNC}._results_queue with an in-process "
            "queue (no Manager server); it cannot cross processes, so asynchronous "
            "dist-checkpoint saves (async_sharded_save=True) are not supported"
        )

    def put(self, item: Any, block: bool = True, timeout: Optional[float] = None) -> None:
        """Add ``item``; raises in any process other than the one that created the queue."""
        if os.getpid() != self.owner_pid:
            raise self._refuse()
        super().put(item, block, timeout)

    def __reduce__(self) -> Any:
        raise self._refuse()


def _libc_prctl() -> Optional[Any]:
    if not sys.platform.startswith("linux"):
        return None
    if _state["prctl"] is None:
        _state["prctl"] = ctypes.CDLL(None, use_errno=True).prctl
    return _state["prctl"]


def die_with_parent(expected_parent: Optional[int] = None) -> bool:
    """Have the kernel SIGKILL this process when its parent ends; ``False`` off Linux.

    ``expected_parent``: the pid the parent had; if it is no longer the parent (it ended before
    the request took effect), this process kills itself at once.
    """
    prctl = _libc_prctl()
    if prctl is None:
        return False
    if prctl(PR_SET_PDEATHSIG, int(signal.SIGKILL), 0, 0, 0) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"prctl(PR_SET_PDEATHSIG) failed: {os.strerror(err)}")
    if expected_parent is not None and os.getppid() != expected_parent:
        os.kill(os.getpid(), signal.SIGKILL)
    return True


def _remember_parent() -> None:
    _state["parent"] = os.getpid()


def _child_after_fork() -> None:
    die_with_parent(expected_parent=_state["parent"])


def _install_fork_hook() -> None:
    _libc_prctl()  # load libc in the parent, not in every child
    os.register_at_fork(before=_remember_parent, after_in_child=_child_after_fork)


def _install_in_process_queue() -> None:
    import importlib

    fs_async = importlib.import_module(_FS_ASYNC)
    current = fs_async._results_queue
    if current is None:
        fs_async._results_queue = InProcessQueue()
    elif not isinstance(current, InProcessQueue):
        log.warning("children: %s already has a Manager queue; its server stays until exit",
                    _FS_ASYNC)


PATCHES: tuple[Patch, ...] = (
    Patch(
        f"{_FS_ASYNC}:_get_write_results_queue",
        "starts a spawn-context Manager server per process, which outlives a killed rank",
        _install_in_process_queue,
        lambda: _has(_FS_ASYNC, "Manager().Queue()"),
    ),
    Patch(
        f"{_FS_ASYNC}:FileSystemWriterAsync.write_preloaded_data_multiproc",
        "forks shard writers that keep running when the rank is killed",
        _install_fork_hook,
        lambda: _has(_FS_ASYNC, 'mp.get_context("fork")'),
    ),
)


def bind_children_to_owner() -> list[str]:
    """Apply :data:`PATCHES` once in this process (idempotent); returns what they cover."""
    if not _APPLIED:
        for patch in PATCHES:
            patch.apply()
            _APPLIED.append(patch.covers)
    return list(_APPLIED)
