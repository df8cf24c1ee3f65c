"""Run `latex_sympy.expressions_equal` in a long-lived child process with a per-call time limit.

sympy's simplify has no time bound of its own, so every symbolic comparison is sent to one
worker process (`python -m rspo_mega.tasks.symbolic_worker`) over its stdin/stdout as JSON
lines; if no reply arrives within `timeout_s` the worker is killed, the comparison counts as
"not equal", and a fresh worker is started on the next call. A plain subprocess (rather than
multiprocessing) shares no CUDA/NCCL state with the trainer and does not re-import the
trainer's `__main__`.
"""

from __future__ import annotations

import atexit
import json
import os
import select
import subprocess
import sys
import threading
from pathlib import Path

__all__ = ["SymbolicEqualityWorker", "symbolic_equal"]

_READY = "ready"
_PACKAGE_PARENT = str(Path(__file__).resolve().parents[2])  # makes rspo_mega importable in the child


class SymbolicEqualityWorker:
    """One child process answering equality queries; restarted after a timeout or crash."""

    def __init__(self, start_timeout_s: float = 120.0) -> None:
        self.start_timeout_s = start_timeout_s
        self.owner_pid = os.getpid()
        self._lock = threading.Lock()
        self._process: subprocess.Popen[str] | None = None

    def _readline(self, timeout_s: float) -> str | None:
        """One reply line, or None on timeout / end of stream."""
        stdout = self._process.stdout
        ready, _, _ = select.select([stdout], [], [], timeout_s)
        if not ready:
            return None
        line = stdout.readline()
        return line.strip() if line else None

    def _start(self) -> None:
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(p for p in (_PACKAGE_PARENT, env.get("PYTHONPATH")) if p)
        self._process = subprocess.Popen(
            [sys.executable, "-m", "rspo_mega.tasks.symbolic_worker"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            bufsize=1,
            env=env,
        )
        if self._readline(self.start_timeout_s) != _READY:
            self._stop()
            raise RuntimeError(f"math verifier worker did not start within {self.start_timeout_s} s")

    def _stop(self) -> None:
        if self._process is not None:
            self._process.kill()
            self._process.wait()
            for stream in (self._process.stdin, self._process.stdout):
                stream.close()
        self._process = None

    def equal(self, a: str, b: str, timeout_s: float) -> bool:
        """True if the worker decides a == b within `timeout_s` seconds (startup not counted)."""
        with self._lock:
            if self._process is None or self._process.poll() is not None:
                self._stop()
                self._start()
            try:
                self._process.stdin.write(json.dumps([a, b]) + "\n")
                self._process.stdin.flush()
                reply = self._readline(timeout_s)
            except (BrokenPipeError, OSError, ValueError):  # the worker died
                reply = None
            if reply in ("0", "1"):
                return reply == "1"
            self._stop()
            return False

    def close(self) -> None:
        """Stop the child; a no-op in a forked copy of the owning process."""
        if os.getpid() != self.owner_pid:
            return
        with self._lock:
            self._stop()


_worker: SymbolicEqualityWorker | None = None
_worker_lock = threading.Lock()


def symbolic_equal(a: str, b: str, *, timeout_s: float) -> bool:
    """Compare on the process-wide worker; a forked child gets its own worker."""
    global _worker
    with _worker_lock:
        if _worker is None or _worker.owner_pid != os.getpid():
            _worker = SymbolicEqualityWorker()
            atexit.register(_worker.close)
        worker = _worker
    return worker.equal(a, b, timeout_s)


def _serve() -> None:
    """Child loop: read [a, b] JSON lines from stdin, write "1"/"0"; any error means "0"."""
    from rspo_mega.tasks.latex_sympy import expressions_equal

    print(_READY, flush=True)
    for line in sys.stdin:
        try:
            a, b = json.loads(line)
            result = bool(expressions_equal(str(a), str(b)))
        except Exception:  # parse errors, sympy errors, RecursionError, MemoryError
            result = False
        print("1" if result else "0", flush=True)


if __name__ == "__main__":
    _serve()
