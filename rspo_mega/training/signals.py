"""Preemption: turn SIGTERM / SIGUSR1 (and Ctrl-C) into a stop that every rank takes at the same
step.

SLURM sends ``SIGUSR1`` ahead of a time limit or preemption (``--signal=B:USR1@300``) and
``SIGTERM`` when it cancels or requeues a job; torchrun forwards ``SIGTERM`` to its workers. The
handler only sets a flag; the training loop calls :meth:`PreemptionHandler.should_stop` once per
step, which all-reduces the flag (MAX) so that a signal seen by any rank stops all of them after
the same step, where they save a checkpoint and exit.

A *stop file* is the launcher-independent variant: SLURM's ``--signal=B:USR1@300`` reaches only
the batch shell, and torchrun's agent does not forward ``SIGUSR1``, so the sbatch script traps it
and creates the file named by ``$RSPO_STOP_FILE`` on the shared filesystem; every rank checks
for it in :meth:`PreemptionHandler.should_stop` (one ``stat`` per step).

Ctrl-C (``SIGINT``, in :data:`INTERRUPT_SIGNALS`, which the trainer installs) stops a run the
same way, after rank 0 says so on stderr; a second Ctrl-C ends the process at once
(exit code 130), without saving. Under torchrun, Ctrl-C reaches torchrun, which
forwards it once to each worker (they run in their own sessions); its second Ctrl-C ends them.

The exit code of a stopped run (:func:`preemption_exit_code`): 143 (128 + SIGTERM) by itself; 0
where the launcher named a *preempted file* (``$RSPO_PREEMPTED_FILE``, set by the sbatch script),
into which rank 0 writes ``preempted at step N``. The script requeues on that file, whatever
exit code the launcher passes on, and a planned stop is a clean exit for srun and torchrun.

    with PreemptionHandler() as preempt:
        for step in range(start, cfg.train_steps):
            train_step()
            if preempt.should_stop():
                manager.save(step + 1, ...)
                break
"""

from __future__ import annotations

import logging
import os
import signal
import threading
from types import FrameType
from typing import Any, Iterable, Optional

import torch
import torch.distributed as dist

from rspo_mega.console import INTERRUPT_EXIT_CODE
from rspo_mega.parallel.ranks import launch_rank

log = logging.getLogger(__name__)

DEFAULT_SIGNALS: tuple[int, ...] = (signal.SIGTERM, signal.SIGUSR1)
# A run also stops on Ctrl-C the same way; a second Ctrl-C exits at once, without saving.
INTERRUPT_SIGNALS: tuple[int, ...] = DEFAULT_SIGNALS + (signal.SIGINT,)
PREEMPTION_EXIT_CODE = 143  # 128 + SIGTERM: stopped on request after saving; a rerun resumes
STOP_FILE_ENV = "RSPO_STOP_FILE"
PREEMPTED_FILE_ENV = "RSPO_PREEMPTED_FILE"


class PreemptionHandler:
    """Context manager installing flag-setting handlers for ``signals``.

    Args:
        signals: signal numbers to catch (default SIGTERM and SIGUSR1).
        group: process group over which :meth:`should_stop` agrees (default: world).
        stop_file: a path whose existence also requests a stop (default: ``$RSPO_STOP_FILE``).
    """

    def __init__(
        self,
        signals: Iterable[int] = DEFAULT_SIGNALS,
        group: Any = None,
        stop_file: Optional[str] = None,
    ) -> None:
        self.signals = tuple(signals)
        self.group = group
        self.stop_file = stop_file if stop_file is not None else os.environ.get(STOP_FILE_ENV)
        self._received: Optional[int] = None
        self._previous: dict[int, Any] = {}

    # -- installation ----------------------------------------------------------------------
    def _handle(self, signum: int, frame: Optional[FrameType]) -> None:
        """Signal handler: records the signal and returns (no collectives). Ctrl-C says what
        happens next; a second Ctrl-C ends the process at once."""
        if signum == signal.SIGINT:
            rank0 = launch_rank() == 0
            if self._received == signal.SIGINT:
                if rank0:
                    os.write(2, b"\ninterrupted again: exiting without saving\n")
                os._exit(INTERRUPT_EXIT_CODE)
            if rank0:
                os.write(2, b"\ninterrupt: saving a checkpoint after this step "
                            b"(Ctrl-C again exits at once, without saving)\n")
        if self._received is None:
            self._received = signum

    def install(self) -> "PreemptionHandler":
        """Install the handlers (main thread only), remembering the previous ones."""
        if threading.current_thread() is not threading.main_thread():
            raise RuntimeError("PreemptionHandler must be installed from the main thread")
        for sig in self.signals:
            self._previous[sig] = signal.getsignal(sig)
            signal.signal(sig, self._handle)
        return self

    def restore(self) -> None:
        """Put the previous handlers back."""
        for sig, previous in self._previous.items():
            signal.signal(sig, previous if previous is not None else signal.SIG_DFL)
        self._previous.clear()

    def __enter__(self) -> "PreemptionHandler":
        return self.install()

    def __exit__(self, *exc: Any) -> None:
        self.restore()

    # -- queries ---------------------------------------------------------------------------
    @property
    def received(self) -> bool:
        """Whether *this* rank got a signal or sees the stop file (no communication)."""
        if self._received is None and self.stop_file and os.path.exists(self.stop_file):
            self._received = 0  # 0: requested through the stop file
        return self._received is not None

    @property
    def signal_name(self) -> Optional[str]:
        """``"SIGTERM"``, ``"SIGUSR1"``, ``"stop file"``, or ``None`` before any request."""
        if self._received is None:
            return None
        return "stop file" if self._received == 0 else signal.Signals(self._received).name

    @property
    def interrupted(self) -> bool:
        """Whether this rank's stop request is a Ctrl-C (SIGINT)."""
        return self._received == signal.SIGINT

    def should_stop(self) -> bool:
        """Collective: ``True`` on every rank if any rank of ``group`` received a signal."""
        flag = 1 if self.received else 0
        if dist.is_available() and dist.is_initialized() and dist.get_world_size(self.group) > 1:
            from rspo_mega.parallel import current_device

            t = torch.tensor([flag], dtype=torch.int32, device=current_device())
            dist.all_reduce(t, op=dist.ReduceOp.MAX, group=self.group)
            flag = int(t.item())
        if flag and self.received and os.environ.get("RANK", "0") == "0":
            log.warning("preemption: %s received, stopping after this step", self.signal_name)
        return bool(flag)


def preemption_exit_code(step: int, rank: int) -> int:
    """The exit code of a run that stopped on request after saving ``step``.

    With ``$RSPO_PREEMPTED_FILE`` set, rank 0 writes ``preempted at step N`` into that file
    (atomically, by rename) and every rank returns 0; without it, 143. A marker that cannot be
    written is logged and rank 0 returns 143, so the launcher sees a failure instead.
    """
    path = os.environ.get(PREEMPTED_FILE_ENV)
    if not path:
        return PREEMPTION_EXIT_CODE
    if rank == 0:
        tmp = f"{path}.tmp-{os.getpid()}"
        try:
            with open(tmp, "w") as f:
                f.write(f"preempted at step {step}\n")
            os.replace(tmp, path)
        except OSError as exc:
            log.error("preemption: cannot write %s=%s: %s", PREEMPTED_FILE_ENV, path, exc)
            return PREEMPTION_EXIT_CODE
    return 0
