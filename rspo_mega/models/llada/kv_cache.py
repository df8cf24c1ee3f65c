"""Block KV cache for masked-diffusion rollouts: K/V of every position, per layer of this rank.

A bidirectional model has no causal prefix whose K/V stay valid, but in semi-autoregressive
decoding most of the sequence changes little within a block: the prompt and finished blocks not
at all, the masked suffix hardly. The sampler therefore runs one full forward at the start of a
block (it writes K/V of every position) and, for the block's later steps, only a span of columns
(the block, or the block and the suffix), whose fresh K/V overwrite the cached ones before the
span's queries attend to all ``S`` cached keys. Cached K/V carry RoPE already (keys are cached
after the rotary embedding), so every position keeps its true position.

Storage is one tensor per rollout, ``[layers_local, 2, rows, S, kv_heads_local, head_dim]`` in the
model's dtype (``2`` = key, value): each tensor-parallel rank holds its own heads, each pipeline
stage (and virtual chunk) its own layers. A forward reads and writes the rows of its micro-batch
only, so rows that leave the batch (finished blocks) keep their cache untouched.

:class:`CacheView` is what one forward receives (``llada_forward(..., kv_cache=view)``);
:class:`LLaDAModel` binds its layers' slots for the duration of the decoder call.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator, Optional, Sequence, Union

import torch

Rows = Union[slice, torch.Tensor]


def rows_index(rows: Sequence[int], device: torch.device) -> Rows:
    """A slice when ``rows`` are consecutive (views, no copy), else a long index tensor."""
    rows = list(rows)
    if rows and rows == list(range(rows[0], rows[0] + len(rows))):
        return slice(rows[0], rows[0] + len(rows))
    return torch.as_tensor(rows, dtype=torch.long, device=device)


class BlockKVCache:
    """K/V storage of one rollout for the layers of this rank's model chunks."""

    def __init__(self, chunks: Sequence[torch.nn.Module], rows: int, seq_len: int) -> None:
        """Allocate for ``rows`` sequences of ``seq_len`` tokens; ``chunks``: LLaDA model chunks."""
        from rspo_mega.models.llada.model import unwrap_model

        models = [unwrap_model(c) for c in chunks]
        config = models[0].config
        from megatron.core import parallel_state as ps

        tp = ps.get_tensor_model_parallel_world_size() if ps.model_parallel_is_initialized() else 1
        groups = (config.num_query_groups or config.num_attention_heads) // tp
        layers = [len(m.decoder.layers) for m in models]
        device = next(models[0].parameters()).device
        dtype = torch.bfloat16 if config.bf16 else torch.float16 if config.fp16 else torch.float32
        self.kv = torch.empty(sum(layers), 2, rows, seq_len, groups, config.kv_channels,
                              dtype=dtype, device=device)
        self.offsets = [sum(layers[:i]) for i in range(len(layers))]
        self.chunk_ids = {id(m): i for i, m in enumerate(models)}

    @property
    def nbytes(self) -> int:
        return self.kv.numel() * self.kv.element_size()

    def view(self, rows: Sequence[int], lo: int) -> "CacheView":
        """The cache as seen by a forward of rows ``rows`` (cache row ids) over columns from ``lo``."""
        return CacheView(self, rows_index(rows, self.kv.device), lo)


@dataclass(frozen=True)
class CacheView:
    """One forward's access: its batch rows' cache rows and the first column it runs."""

    cache: BlockKVCache
    rows: Rows
    lo: int

    @contextmanager
    def bound(self, model: torch.nn.Module) -> Iterator[None]:
        """Give each layer of ``model`` (an LLaDAModel chunk) its cache slot while the block runs."""
        base = self.cache.offsets[self.cache.chunk_ids[id(model)]]
        cores = [layer.self_attention.core_attention for layer in model.decoder.layers]
        for i, core in enumerate(cores):
            core.kv_slot = LayerSlot(self.cache.kv[base + i], self.rows, self.lo)
        try:
            yield
        finally:
            for core in cores:
                core.kv_slot = None


@dataclass(frozen=True)
class LayerSlot:
    """One layer's cache ``kv [2, rows, S, ng, hn]`` for one forward."""

    kv: torch.Tensor
    rows: Rows
    lo: int

    def update(self, key: torch.Tensor, value: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Write the span's ``key``/``value [L, b, ng, hn]`` at columns ``[lo, lo + L)``.

        Returns all ``S`` cached keys and values of the batch rows, ``[b, ng, S, hn]`` each (the
        fresh ones themselves when the span is the whole sequence).
        """
        span = key.shape[0]
        if self.lo == 0 and span == self.kv.shape[2]:
            self.kv[0, self.rows] = key.transpose(0, 1)
            self.kv[1, self.rows] = value.transpose(0, 1)
            return key.permute(1, 2, 0, 3), value.permute(1, 2, 0, 3)
        cols = slice(self.lo, self.lo + span)
        if isinstance(self.rows, slice):
            self.kv[:, self.rows, cols] = torch.stack([key, value]).transpose(1, 2)
            keys, values = self.kv[0, self.rows], self.kv[1, self.rows]
        else:
            self.kv[0, self.rows, cols] = key.transpose(0, 1)
            self.kv[1, self.rows, cols] = value.transpose(0, 1)
            both = self.kv[:, self.rows]
            keys, values = both[0], both[1]
        return keys.transpose(1, 2), values.transpose(1, 2)


def cached_attention(slot: Optional[LayerSlot], query: torch.Tensor, key: torch.Tensor,
                     value: torch.Tensor, attention_mask: Optional[torch.Tensor],
                     scale: float, query_index: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Bidirectional SDPA of ``query [L, b, np, hn]`` over the span's keys or, with a cache slot,
    over all cached keys; ``attention_mask`` None or bool ``[b, 1, 1, S_keys]`` (True = masked
    out). ``query_index [b, m]``: only these queries of each row (of the ``L``). Returns the
    context ``[L, b, np * hn]`` (``[m, b, np * hn]`` with ``query_index``)."""
    q = query.permute(1, 2, 0, 3)  # [b, np, L, hn]
    if query_index is not None:
        q = q.gather(2, query_index[:, None, :, None].expand(-1, q.shape[1], -1, q.shape[3]))
    if slot is None:
        k, v = key.permute(1, 2, 0, 3), value.permute(1, 2, 0, 3)
    else:
        k, v = slot.update(key, value)
    keep = None if attention_mask is None else ~attention_mask
    out = torch.nn.functional.scaled_dot_product_attention(
        q, k, v, attn_mask=keep, scale=scale, enable_gqa=k.shape[1] != q.shape[1])
    b, _, span, _ = out.shape
    return out.permute(2, 0, 1, 3).reshape(span, b, -1)
