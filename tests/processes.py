"""Account for every process a test started, also grandchildren re-parented to init.

Processes are found in ``/proc`` in two ways:

* **by session**: :func:`tests.distributed.run_distributed` starts every rank in its own process
  session (``setsid``); descendants inherit the session id, whoever their parent is now;
* **by environment marker**: ``tests/conftest.py`` sets ``RSPO_MEGA_TEST_OWNER=<id of this pytest
  session>`` before any process is started, so the forkserver, its ranks and every process they
  exec or spawn carry it in ``/proc/<pid>/environ``; :func:`marked_env` adds
  ``RSPO_MEGA_TEST_RUN=<id>`` for one launch of ``rspo-train`` (torchrun's workers start their own
  sessions, so only the environment follows them).

:func:`assert_none_left` waits a few seconds for such processes to end, kills (SIGKILL, by pid) the
ones that did not, and fails naming each with its pid, parent pid, resident memory and command.
"""

from __future__ import annotations

import os
import signal
import time
import uuid
from dataclasses import dataclass
from typing import Callable, Iterable, Optional

OWNER_ENV = "RSPO_MEGA_TEST_OWNER"
RUN_ENV = "RSPO_MEGA_TEST_RUN"
_MARKERS = (OWNER_ENV.encode() + b"=", RUN_ENV.encode() + b"=")


@dataclass(frozen=True)
class Proc:
    """One live (non-zombie) process as ``/proc`` shows it."""

    pid: int
    ppid: int
    sid: int
    rss_mb: float
    cmd: str
    markers: dict[str, str]  # OWNER_ENV / RUN_ENV values from its environment

    def __str__(self) -> str:
        return f"pid {self.pid} ppid {self.ppid} rss {self.rss_mb:.0f} MB: {self.cmd[:160]}"


def session_owner() -> str:
    """This pytest session's marker value (set in ``os.environ`` on first use)."""
    return os.environ.setdefault(OWNER_ENV, f"pytest-{uuid.uuid4().hex[:12]}")


def marked_env(env: Optional[dict] = None) -> tuple[dict, str]:
    """A copy of ``env`` (default ``os.environ``) marked with the session and a new run id."""
    out = dict(os.environ if env is None else env)
    out[OWNER_ENV] = session_owner()
    out[RUN_ENV] = uuid.uuid4().hex[:12]
    return out, out[RUN_ENV]


def _read(pid: int) -> Optional[Proc]:
    """``pid``'s entry, or ``None`` if it ended, is a zombie, or cannot be read."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        if fields[0] in ("Z", "X"):
            return None
        with open(f"/proc/{pid}/environ", "rb") as f:
            env = f.read().split(b"\0")
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            cmd = f.read().replace(b"\0", b" ").decode(errors="replace").strip()
        with open(f"/proc/{pid}/statm") as f:
            rss_pages = int(f.read().split()[1])
    except (OSError, IndexError, ValueError):
        return None
    markers = {}
    for item in env:
        if item.startswith(_MARKERS):
            key, _, value = item.decode(errors="replace").partition("=")
            markers[key] = value
    return Proc(pid, int(fields[1]), int(fields[3]), rss_pages * os.sysconf("SC_PAGE_SIZE") / 2**20,
                cmd, markers)


def processes() -> list[Proc]:
    """Every live process but this one."""
    me = os.getpid()
    found = (_read(int(d)) for d in os.listdir("/proc") if d.isdigit() and int(d) != me)
    return [p for p in found if p is not None]


def marked(key: str, value: str, exclude: Iterable[int] = ()) -> list[Proc]:
    """Live processes whose environment has ``key=value`` (minus the pids in ``exclude``)."""
    skip = set(exclude)
    return [p for p in processes() if p.markers.get(key) == value and p.pid not in skip]


def in_sessions(sids: Iterable[int]) -> list[Proc]:
    """Live processes in any of the process sessions ``sids``."""
    wanted = set(sids)
    return [p for p in processes() if p.sid in wanted]


def describe(procs: Iterable[Proc]) -> str:
    """One line per process: pid, parent, resident memory, command line."""
    return "\n".join(f"  {p}" for p in procs)


def reap(find: Callable[[], list[Proc]], grace_s: float = 5.0) -> list[Proc]:
    """Wait up to ``grace_s`` for ``find()`` to come back empty; kill the rest (and wait until
    they are gone) and return them."""
    deadline = time.monotonic() + grace_s
    left = find()
    while left and time.monotonic() < deadline:
        time.sleep(0.1)
        left = find()
    for p in left:
        try:
            os.kill(p.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    deadline = time.monotonic() + 5.0  # SIGKILL takes effect asynchronously
    while any(_read(p.pid) is not None for p in left) and time.monotonic() < deadline:
        time.sleep(0.05)
    return left


def assert_none_left(find: Callable[[], list[Proc]], what: str, grace_s: float = 5.0) -> None:
    """Fail (after killing them) if processes that ``find`` returns outlive ``grace_s``."""
    left = reap(find, grace_s)
    total = sum(p.rss_mb for p in left)
    assert not left, (
        f"{len(left)} processes ({total:.0f} MB resident) left behind by {what}, killed now:\n"
        f"{describe(left)}"
    )
