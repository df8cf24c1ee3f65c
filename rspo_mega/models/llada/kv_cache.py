"""Block KV cache for masked-diffusion rollouts: K/V of every position, per layer of this rank.

A bidirectional model has no causal prefix whose K/V stay valid, but in semi-autoregressive
decoding most of the sequence changes little within a block: the prompt and finished blocks not
at all, the masked suffix hardly. The sampler therefore runs one full forward at the start of a
block (it writes K/V of every position) and, for the block's later steps, only a span of columns
(the block, or the block and the suffix), whose fresh K/V overwrite the cached ones before the
span's queries attend to all ``S`` cached keys (the cached attention:
:func:`rspo_mega.models.llada.attention.cached_attention`). Cached K/V carry RoPE already (keys
are cached after the rotary embedding), so every position keeps its true position.

:class:`BlockKVCache` is the storage of one rollout, sized by the model
(``LLaDAModel.kv_cache_shape``): one tensor ``[layers_local, 2, rows, S, kv_heads_local,
head_dim]`` in the model's dtype (``2`` = key, value); each tensor-parallel rank holds its own
heads, each pipeline stage (and virtual chunk) its own layers. A forward reads and writes the
rows of its micro-batch only, so rows that leave the batch (finished blocks) keep their cache
untouched. :meth:`BlockKVCache.view` is what one forward receives
(``llada_forward(..., kv_cache=view)``).
"""

from __future__ import annotations

from typing import Sequence

import torch

from rspo_mega.models.llada.forward_context import CacheView, Rows
from rspo_mega.models.llada.model import unwrap_model


def rows_index(rows: Sequence[int], device: torch.device) -> Rows:
    """A slice when ``rows`` are consecutive (views, no copy), else a long index tensor."""
    rows = list(rows)
    if rows and rows == list(range(rows[0], rows[0] + len(rows))):
        return slice(rows[0], rows[0] + len(rows))
    return torch.as_tensor(rows, dtype=torch.long, device=device)


class BlockKVCache:
    """K/V storage of one rollout for the layers of this rank's model chunks."""

    def __init__(self, chunks: Sequence[torch.nn.Module], rows: int, seq_len: int) -> None:
        """Allocate for ``rows`` sequences of ``seq_len`` tokens; ``chunks``: this rank's LLaDA
        model chunks (wrapped or not), whose ``kv_cache_shape`` gives the storage."""
        models = [unwrap_model(c) for c in chunks]
        shapes = [m.kv_cache_shape(rows, seq_len) for m in models]
        layers = [n for m in models for n in m.kv_cache_layers]
        if len(set(layers)) != len(layers):
            raise ValueError(f"BlockKVCache: the chunks' layer numbers repeat: {layers}")
        device = next(models[0].parameters()).device
        self.kv = torch.empty(sum(s[0] for s in shapes), *shapes[0][1:],
                              dtype=models[0].kv_cache_dtype, device=device)
        self.layers = {number: i for i, number in enumerate(layers)}

    @property
    def nbytes(self) -> int:
        return self.kv.numel() * self.kv.element_size()

    def view(self, rows: Sequence[int], lo: int) -> CacheView:
        """The cache as seen by a forward of rows ``rows`` (cache row ids) over columns from ``lo``."""
        return CacheView(self.kv, self.layers, rows_index(rows, self.kv.device), lo)
