"""What one LLaDA forward hands down to its layers: the KV-cache view and the query selection.

megatron-core threads its ``inference_context`` from ``GPTModel.forward`` through the
``TransformerBlock`` to every ``TransformerLayer`` and its ``SelfAttention``, which finds its
layer's K/V memory by ``layer_number``. :class:`ForwardContext` travels the same way (as the
``inference_context`` argument): ``LLaDAModel.forward`` builds one per call, and each layer reads
its own part of it, so nothing is attached to a module for the duration of a call.

* :class:`CacheView`: one forward's access to the block KV cache
  (:mod:`rspo_mega.models.llada.kv_cache` allocates it): the storage, the cache rows of the
  forward's batch rows and the first column the forward runs. :meth:`CacheView.slot` gives one
  layer its :class:`LayerSlot`.
* :class:`QuerySelection`: the positions whose last-layer outputs are computed (the sampler: the
  block's still-masked positions; the ELBO: the scored positions). The last layer still needs the
  keys and values of all ``s`` positions, but its queries, attention output, output projection,
  residual and MLP only at those positions.

Shapes: ``s`` tokens, ``b`` batch, ``m`` selected positions per row, ``n`` flat positions,
``h`` hidden, ``S`` cached positions, ``ng`` KV groups on this TP rank, ``hn`` head dim.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping, Optional, Union

import torch

Rows = Union[slice, torch.Tensor]  # cache rows: a slice (consecutive) or a long index tensor


def hidden_rows(positions: torch.Tensor, s: int, b: int) -> torch.Tensor:
    """Flat caller positions ``[n]`` (``row * s + position``) -> their rows in a ``[s, b, h]``
    activation flattened as ``[s * b, h]``."""
    return (positions % s) * b + positions // s


@dataclass(frozen=True)
class LayerSlot:
    """One layer's cache ``kv [2, R, S, ng, hn]`` (``2`` = key, value) for one forward: the batch
    rows' cache ``rows`` and the first column ``lo`` the forward runs."""

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


@dataclass(frozen=True)
class CacheView:
    """One forward's access to the block KV cache.

    ``kv [layers, 2, R, S, ng, hn]``: the storage of this rank's layers; ``layers``: global layer
    number (megatron's ``layer_number``, 1-based) -> index into ``kv``; ``rows``: the cache rows
    of the forward's batch rows; ``lo``: the first column the forward runs.
    """

    kv: torch.Tensor
    layers: Mapping[int, int]
    rows: Rows
    lo: int

    @property
    def seq_len(self) -> int:
        """``S``: the cached positions per row."""
        return self.kv.shape[3]

    def slot(self, layer_number: int) -> LayerSlot:
        """The cache slot of layer ``layer_number``."""
        return LayerSlot(self.kv[self.layers[layer_number]], self.rows, self.lo)


@dataclass(frozen=True)
class QuerySelection:
    """The positions whose last-layer outputs are computed.

    ``index [b, m]``: the position of each row's query slot, for the attention (padding slots
    repeat a valid position; their outputs are dropped). Flat caller positions ``[n]`` are kept
    as ``flat``: after the attention the layer runs on exactly those ``n`` rows, as ``[n, 1, h]``
    in the caller's order (``take``: each one's row in the attention output flattened as
    ``[m * b]``, slot-major); ``[b, m]`` caller positions are the slots themselves, ``[m, b, h]``.
    """

    index: torch.Tensor
    flat: Optional[torch.Tensor] = None
    take: Optional[torch.Tensor] = None

    @staticmethod
    def from_positions(positions: torch.Tensor, b: int, s: int) -> Optional["QuerySelection"]:
        """The selection for caller ``positions`` (``[b, m]``, or flat ``[n]`` = ``row * s +
        position``); None when it would not run fewer queries than the full layer."""
        if positions.dim() == 2:
            return QuerySelection(positions) if 0 < positions.shape[1] < s else None
        if positions.numel() == 0:
            return None
        row, col = positions // s, positions % s
        counts = torch.bincount(row, minlength=b)
        m = int(counts.max())  # the padded width: one host sync
        if m >= s:
            return None
        order = torch.argsort(row, stable=True)
        starts = torch.cumsum(counts, 0) - counts
        slot = torch.empty_like(positions)
        slot[order] = torch.arange(positions.numel(), device=positions.device) - starts[row[order]]
        index = torch.zeros(b, m, dtype=positions.dtype, device=positions.device)
        index[row, slot] = col
        return QuerySelection(index, flat=hidden_rows(positions, s, b), take=slot * b + row)

    def rows(self, hidden: torch.Tensor) -> torch.Tensor:
        """``hidden [s, b, h]`` -> the selected rows: ``[m, b, h]`` or flat ``[n, 1, h]``."""
        if self.flat is not None:
            return hidden.reshape(-1, hidden.shape[-1]).index_select(0, self.flat).unsqueeze(1)
        idx = self.index.t().unsqueeze(-1).expand(-1, -1, hidden.shape[-1])
        return hidden.gather(0, idx)

    def context(self, context: torch.Tensor) -> torch.Tensor:
        """Attention output of the slots ``[m, b, hp]`` -> that of the selected rows (flat:
        ``[n, 1, hp]``, padding slots dropped)."""
        if self.take is None:
            return context
        return context.reshape(-1, context.shape[-1]).index_select(0, self.take).unsqueeze(1)

    def head_input(self, hidden: torch.Tensor) -> torch.Tensor:
        """Selected layer output -> the caller's order: ``[b, m, h]`` or ``[n, h]``."""
        if self.flat is None:
            return hidden.transpose(0, 1)
        return hidden.reshape(-1, hidden.shape[-1])


@dataclass(frozen=True)
class ForwardContext:
    """The per-call state of one forward, passed down as megatron's ``inference_context``.

    ``kv_cache``: None, or the cache view every layer writes its span's K/V to and reads all
    ``S`` keys from; ``query_selection``: None, or the queries layer ``selected_layer`` (global
    layer number) runs.
    """

    kv_cache: Optional[CacheView] = None
    query_selection: Optional[QuerySelection] = None
    selected_layer: Optional[int] = None

    def slot(self, layer_number: int) -> Optional[LayerSlot]:
        """Layer ``layer_number``'s cache slot, None without a cache."""
        return None if self.kv_cache is None else self.kv_cache.slot(layer_number)

    def selection(self, layer_number: int) -> Optional[QuerySelection]:
        """The query selection if layer ``layer_number`` runs it, else None."""
        return self.query_selection if layer_number == self.selected_layer else None
