"""Failure guards: a rank-agreed NaN/Inf check and a watchdog that dumps stacks of a hung block.

:func:`check_finite` looks for non-finite values in named tensors (the loss, or the gradients of
named parameters), all-reduces one flag so that every rank takes the same decision, and, only
when something is wrong, gathers which rank saw which tensor so the diagnostic names them all.

:func:`watchdog` complements the process-group timeout (``parallel.timeout_minutes``), which
kills a hung collective only after many minutes and says little about *where* the peers were:
if the guarded block runs longer than ``seconds``, the stack of every thread is written to
stderr with a message naming the block, while the block keeps running.
"""

from __future__ import annotations

import contextlib
import faulthandler
import logging
import sys
import threading
import time
from dataclasses import dataclass, field
from typing import IO, Any, Iterator, Mapping, Optional

import torch
import torch.distributed as dist

log = logging.getLogger(__name__)

POLICIES = ("skip", "abort")


class NonFiniteError(FloatingPointError):
    """Non-finite values were found under the ``abort`` policy; the message names them."""


@dataclass
class FiniteCheck:
    """Outcome of :func:`check_finite`; truthy when every tensor on every rank was finite.

    ``offenders`` lists ``(rank, tensor name, nan count, inf count)`` over all ranks.
    """

    ok: bool
    step: int
    offenders: list[tuple[int, str, int, int]] = field(default_factory=list)

    def __bool__(self) -> bool:
        return self.ok

    @property
    def message(self) -> str:
        if self.ok:
            return f"step {self.step}: all values finite"
        ranks = sorted({r for r, *_ in self.offenders})
        lines = [
            f"  rank {r}: {name} ({nan} NaN, {inf} Inf)" for r, name, nan, inf in self.offenders
        ]
        return (
            f"step {self.step}: non-finite values on rank(s) {ranks}:\n" + "\n".join(lines)
        )


def grad_tensors(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Parameter name -> gradient (megatron's ``main_grad`` when present, else ``.grad``)."""
    out: dict[str, torch.Tensor] = {}
    for name, p in model.named_parameters():
        g = getattr(p, "main_grad", None)
        if g is None:
            g = p.grad
        if g is not None:
            out[name] = g
    return out


def _local_offenders(named: Mapping[str, torch.Tensor]) -> list[tuple[str, int, int]]:
    items = [(n, t) for n, t in named.items() if t is not None and t.numel()]
    if not items:
        return []
    # One device->host transfer for the common all-finite case.
    bad = torch.stack([~torch.isfinite(t.detach()).all() for _, t in items]).cpu()
    found = []
    for (name, t), is_bad in zip(items, bad.tolist()):
        if is_bad:
            t = t.detach()
            found.append((name, int(torch.isnan(t).sum()), int(torch.isinf(t).sum())))
    return found


def check_finite(
    named_tensors: Mapping[str, torch.Tensor],
    step: int,
    policy: str = "skip",
    group: Any = None,
) -> FiniteCheck:
    """Collective NaN/Inf check of ``named_tensors`` over ``group`` (default: world).

    Returns a :class:`FiniteCheck` that is falsy when any rank found a non-finite value (the
    trainer then skips the step: ``if not check_finite(grads, step): continue``). With
    ``policy="abort"`` raises :class:`NonFiniteError` instead, on every rank.
    """
    if policy not in POLICIES:
        raise ValueError(f"check_finite: policy must be one of {POLICIES}, got {policy!r}")
    local = _local_offenders(named_tensors)
    distributed = dist.is_available() and dist.is_initialized() and dist.get_world_size(group) > 1
    flag = 1 if local else 0
    if distributed:
        from rspo_mega.parallel import current_device

        t = torch.tensor([flag], dtype=torch.int32, device=current_device())
        dist.all_reduce(t, op=dist.ReduceOp.MAX, group=group)
        flag = int(t.item())
    if not flag:
        return FiniteCheck(ok=True, step=step)
    rank = dist.get_rank() if distributed else 0
    if distributed:  # rare path: collect every rank's findings for one complete diagnostic
        gathered: list[Any] = [None] * dist.get_world_size(group)
        dist.all_gather_object(gathered, (rank, local), group=group)
    else:
        gathered = [(rank, local)]
    offenders = [(r, n, nan, inf) for r, found in gathered for n, nan, inf in found]
    result = FiniteCheck(ok=False, step=step, offenders=offenders)
    if policy == "abort":
        raise NonFiniteError(result.message)
    if rank == 0:
        log.warning("%s; skipping the step", result.message)
    return result


def _writable_stream(stream: Optional[IO]) -> IO:
    """A stream with a real file descriptor (faulthandler writes to the fd)."""
    for candidate in (stream, sys.stderr, sys.__stderr__):
        if candidate is None:
            continue
        try:
            candidate.fileno()
            return candidate
        except (AttributeError, OSError, ValueError):
            continue
    raise RuntimeError("watchdog: no stream with a file descriptor to write stacks to")


@contextlib.contextmanager
def watchdog(seconds: float, what: str, file: Optional[IO] = None) -> Iterator[None]:
    """If the block takes longer than ``seconds`` (wall clock), write a message naming ``what``
    and the Python stack of every thread to ``file`` (default stderr); the block is not stopped.

    Uses its own timer thread, so it does not disturb ``faulthandler.dump_traceback_later``.
    """
    if seconds <= 0:
        raise ValueError(f"watchdog: seconds must be > 0, got {seconds}")
    stream = _writable_stream(file)
    start = time.monotonic()
    rank = dist.get_rank() if dist.is_available() and dist.is_initialized() else 0

    def fire() -> None:
        stream.write(
            f"\n[watchdog] rank {rank}: '{what}' still running after "
            f"{time.monotonic() - start:.1f} s (limit {seconds:.1f} s); stacks of all threads:\n"
        )
        stream.flush()
        faulthandler.dump_traceback(file=stream, all_threads=True)
        stream.flush()

    timer = threading.Timer(seconds, fire)
    timer.daemon = True
    timer.name = f"watchdog[{what}]"
    timer.start()
    try:
        yield
    finally:
        timer.cancel()
