"""The frozen RL reference: a copy of the policy's initial weights in the same parallel layout
(:class:`ReferenceModel`) or, for a LoRA policy, the policy's own base weights with its adapters
switched off for the reference's forwards (:class:`BaseReference`: no second copy).

The copy is built by the caller's ``build_fn`` (the same builder, hence the same TP/PP/VPP
sharding, as the policy) and filled from the policy parameter by parameter, matching names after
stripping wrapper prefixes (``module.``); each rank copies only its own shard, so no
communication is needed. All parameters are frozen (``requires_grad=False``) and the modules are
in eval mode. It is evaluated on the same :class:`MaskedBatch` as the policy, under ``no_grad``.

``offload=True`` keeps the weights in CPU memory between uses and moves them to the compute device
only inside :meth:`ReferenceModel.on_device` (useful on GPUs; a no-op on a CPU-only machine).
"""

from __future__ import annotations

import contextlib
from typing import Callable, Iterator, Optional, Sequence

import torch
from torch import nn

from rspo_mega.likelihood.batch_types import MaskedBatch
from rspo_mega.likelihood.parallel_elbo import Chunks, ElboRunner


def _as_list(model: Chunks) -> list[nn.Module]:
    return list(model) if isinstance(model, (list, tuple)) else [model]


def _canonical(name: str) -> str:
    while name.startswith("module."):
        name = name[len("module."):]
    return name


def _state_tensors(module: nn.Module) -> dict[str, torch.Tensor]:
    out = {_canonical(n): p for n, p in module.named_parameters()}
    out.update({_canonical(n): b for n, b in module.named_buffers() if b is not None})
    return out


class ReferenceModel:
    """Frozen copy of the policy at construction time (same layout), optionally CPU-offloaded."""

    def __init__(self, chunks: Chunks, *, offload: bool = False,
                 device: Optional[torch.device] = None):
        self.chunks = _as_list(chunks)
        for chunk in self.chunks:
            chunk.eval()
            for p in chunk.parameters():
                p.requires_grad_(False)
        self.offload = bool(offload)
        self.device = device or next(self.chunks[0].parameters()).device
        if self.offload:
            self._move(torch.device("cpu"))

    @classmethod
    def from_policy(cls, policy: Chunks, build_fn: Callable[[], Chunks], *,
                    offload: bool = False) -> "ReferenceModel":
        """Build with ``build_fn`` (same layout as the policy) and copy the policy's weights."""
        src, dst = _as_list(policy), _as_list(build_fn())
        if len(src) != len(dst):
            raise ValueError(f"reference has {len(dst)} model chunks, policy {len(src)}")
        with torch.no_grad():
            for s_chunk, d_chunk in zip(src, dst):
                s_t, d_t = _state_tensors(s_chunk), _state_tensors(d_chunk)
                if s_t.keys() != d_t.keys():
                    diff = sorted(set(s_t) ^ set(d_t))[:5]
                    raise ValueError(f"reference and policy parameters differ, e.g. {diff}")
                for name, t in d_t.items():
                    if t.shape != s_t[name].shape:
                        raise ValueError(f"{name}: reference shape {tuple(t.shape)} != policy "
                                         f"{tuple(s_t[name].shape)} (different layout?)")
                    t.copy_(s_t[name])
        return cls(dst, offload=offload, device=next(src[0].parameters()).device)

    def _move(self, device: torch.device) -> None:
        for chunk in self.chunks:
            chunk.to(device)

    @contextlib.contextmanager
    def on_device(self) -> Iterator[list[nn.Module]]:
        """The chunks on the compute device for the duration of the block (offload afterwards)."""
        if self.offload and self.device.type != "cpu":
            self._move(self.device)
        try:
            yield self.chunks
        finally:
            if self.offload and self.device.type != "cpu":
                self._move(torch.device("cpu"))

    def logprobs(self, runner: ElboRunner, masked: MaskedBatch) -> Optional[torch.Tensor]:
        """Reference per-token log-probs ``[N, S]`` on the last stage (``None`` elsewhere)."""
        with self.on_device() as chunks, torch.no_grad():
            return runner.logprobs(chunks, masked)

    def parameters(self) -> Sequence[torch.Tensor]:
        return [p for c in self.chunks for p in c.parameters()]


class BaseReference:
    """The reference of a LoRA policy: its frozen base, i.e. the policy's chunks run with
    ``adapters=False`` (no weights of its own, nothing to checkpoint)."""

    def __init__(self, chunks: Chunks):
        self.chunks = _as_list(chunks)

    def logprobs(self, runner: ElboRunner, masked: MaskedBatch) -> Optional[torch.Tensor]:
        """The base model's per-token log-probs ``[N, S]`` on the last stage (``None`` elsewhere)."""
        with torch.no_grad():
            return runner.logprobs(self.chunks, masked, adapters=False)

    def parameters(self) -> Sequence[torch.Tensor]:
        return []
