"""Why a checkpoint save failed, in words, agreed on by every rank.

A save fails for reasons outside the program: the disk fills, a quota is hit, a file system
goes read-only, a rank dies. The :class:`~.manager.CheckpointManager` turns the exception into
a :class:`Failure` (cause, file, rank), gathers the failures of all ranks at points every rank
reaches, and raises one message on every rank, for example::

    no space left on device while writing iter_0000012 (extra/rank_00001.pt on rank 1);
    iter_0000011 is still the newest complete checkpoint

The cause is found through the exception's chain and, for errors that crossed a process
boundary as text (megatron-core's shard writers report ``[Errno 28] ...`` in a ``RuntimeError``
inside torch's ``CheckpointException``), in its message.
"""

from __future__ import annotations

import errno
import logging
import os
import re
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Optional

import torch.distributed as dist
from torch.distributed.checkpoint.api import CheckpointException

from rspo_mega.parallel.ranks import world_size

log = logging.getLogger(__name__)

_ERRNO_RE = re.compile(r"\[Errno (\d+)\]")


@dataclass(frozen=True)
class Failure:
    """One rank's part in a failed save: what went wrong, where, on which rank."""

    cause: str  # e.g. "no space left on device"
    where: str  # e.g. "extra/rank_00001.pt", "dist-checkpoint shards"
    rank: int
    diagnosed: bool = True  # the cause is known (an errno), not just an exception's text
    detail: str = ""  # what the cause was inferred from, when it is not an errno


def _chain(exc: BaseException) -> Iterator[BaseException]:
    """``exc``, its causes and contexts, and the exceptions inside a ``CheckpointException``."""
    seen: set[int] = set()
    todo = [exc]
    while todo:
        e = todo.pop(0)
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        yield e
        todo += [e.__cause__, e.__context__]
        if isinstance(e, CheckpointException):
            todo += [wrapped[0] for wrapped in e.failures.values()]


def _errno_of(exc: BaseException) -> Optional[int]:
    """The errno of an ``OSError`` (or of ``[Errno N]`` text) in ``exc``'s chain, if any."""
    for e in _chain(exc):
        if isinstance(e, OSError) and e.errno:
            return e.errno
        found = _ERRNO_RE.search(str(e))
        if found:
            return int(found.group(1))
    return None


def _first_line(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {lines[0][:160] if lines else 'no message'}"


def cause_of(exc: BaseException) -> str:
    """``"no space left on device"`` for an errno in ``exc``'s chain; otherwise the exception's
    type and first line."""
    code = _errno_of(exc)
    return os.strerror(code).lower() if code is not None else _first_line(exc)


def _failure(exc: BaseException, where: str, rank: int, root: Optional[str]) -> Failure:
    """``exc`` as a :class:`Failure`. An error without errno (torch's C++ writer says only "file
    write failed" or "unexpected pos") counts as "no space left on device" when the file system
    of ``root`` has under 1 MiB free."""
    if _errno_of(exc) is not None:
        return Failure(cause_of(exc), where, rank)
    free = _free_bytes(root)
    if free is None or free >= 2**20:
        return Failure(_first_line(exc), where, rank, diagnosed=False)
    return Failure(os.strerror(errno.ENOSPC).lower(), where, rank,
                   detail=f"{free} bytes free; {_first_line(exc)}")


def _free_bytes(root: Optional[str]) -> Optional[int]:
    """Bytes available to us on the file system of ``root`` (``None`` if unknown)."""
    if root is None:
        return None
    try:
        st = os.statvfs(root if os.path.isdir(root) else os.path.dirname(root))
    except OSError:
        return None
    return st.f_bavail * st.f_frsize


def _file_of(exc: BaseException, root: Optional[str]) -> Optional[str]:
    for e in _chain(exc):
        name = getattr(e, "filename", None) if isinstance(e, OSError) else None
        if name:
            name = os.fspath(name)
            return os.path.relpath(name, root) if root and name.startswith(root) else name
    return None


def describe(exc: BaseException, where: str, rank: int, root: Optional[str] = None) -> list[Failure]:
    """The failures ``exc`` stands for; ``where`` unless it names a file (relative to ``root``).

    A ``CheckpointException`` carries the failures of several ranks (dist-checkpoint shards);
    one with none (a non-coordinator rank learning that another failed) stands for nothing.
    """
    if isinstance(exc, CheckpointException):
        return [_failure(wrapped[0], where, r, root) for r, wrapped in exc.failures.items()]
    return [_failure(exc, _file_of(exc, root) or where, rank, root)]


def attempt(fn: Callable[[], Any], where: str, rank: int, root: Any = None) -> list[Failure]:
    """Run ``fn``; the failures it raised (none if it succeeded), files relative to ``root``."""
    try:
        fn()
    except Exception as exc:  # noqa: BLE001 - every rank must learn of any failure
        log.error("checkpoint: writing %s failed on rank %d: %r", where, rank, exc)
        return describe(exc, where, rank, str(root) if root is not None else None)
    return []


def all_gather(failures: list[Failure]) -> list[Failure]:
    """Every rank's failures, the same sorted list on every rank (collective)."""
    if world_size() == 1:
        return sorted(set(failures), key=lambda f: (f.rank, f.where))
    parts: list[Any] = [None] * world_size()
    dist.all_gather_object(parts, failures)
    return sorted({f for part in parts for f in part}, key=lambda f: (f.rank, f.where))


def failure_message(name: str, failures: list[Failure]) -> str:
    """``"<cause> while writing <name> (<where> on rank <r>; ...)"``, led by the first known
    cause; other causes and inferred ones are spelled out with their place."""
    lead = next((f for f in failures if f.diagnosed), failures[0]).cause
    groups: dict[tuple[str, str, str], list[int]] = {}
    for f in failures:
        groups.setdefault((f.cause, f.where, f.detail), []).append(f.rank)
    parts = []
    for (cause, where, detail), ranks in groups.items():
        on = f"rank {ranks[0]}" if len(ranks) == 1 else f"ranks {', '.join(map(str, ranks))}"
        why = ", ".join(x for x in (cause if cause != lead else "", detail) if x)
        parts.append(f"{where} on {on}: {why}" if why else f"{where} on {on}")
    return f"{lead} while writing {name} ({'; '.join(parts)})"
