"""Failure guard: a rank-agreed NaN/Inf check.

:func:`check_finite` looks for non-finite values in named tensors (the loss, or the gradients of
named parameters), all-reduces one flag so that every rank takes the same decision, and, only
when something is wrong, gathers which rank saw which tensor so the diagnostic names them all.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any, Mapping

import torch
import torch.distributed as dist

from rspo_mega.config.schema import NonFinitePolicy, choices
from rspo_mega.parallel.ranks import rank as global_rank

log = logging.getLogger(__name__)


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
    if policy not in choices(NonFinitePolicy):
        raise ValueError(f"non_finite_policy={policy!r}: expected one of {choices(NonFinitePolicy)}")
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
    rank = global_rank()
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
