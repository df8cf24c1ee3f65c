"""LLaDA's attention: megatron-core self-attention used bidirectionally.

* :class:`BidirectionalSelfAttention` is megatron's ``SelfAttention`` (QKV projection, RoPE, core
  attention, output projection) with no causal mask; a key-padding mask, when given, switches
  Transformer Engine's attention to the ``padding`` type.
* :class:`SDPACoreAttention` is the core attention of the local spec: one fused
  ``torch.nn.functional.scaled_dot_product_attention`` call per layer (bidirectional, key padding,
  grouped-query heads without repeating K/V), in place of megatron's unfused
  ``DotProductAttention`` (``baddbmm`` + softmax + ``bmm`` with a scores buffer ``[b*np, s, s]``).
  The TE spec keeps TE's fused attention.

Shapes: ``s`` tokens, ``b`` batch, ``np`` query heads and ``ng`` KV groups on this TP rank, ``hn``
head dim, ``hp = np * hn``.
"""

from __future__ import annotations

import functools
import math
from typing import Any, Optional

import torch
from megatron.core.transformer.attention import SelfAttention
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.transformer_config import TransformerConfig

from rspo_mega.models.llada.kv_cache import LayerSlot, cached_attention
from rspo_mega.models.llada.layer import QuerySelection


class BidirectionalSelfAttention(SelfAttention):
    """Self-attention without a causal mask; a key-padding mask switches TE to ``padding``.

    ``attention_mask``: None (every token attends to every token) or bool ``[b, 1, 1, s]`` with
    True = masked out. TE only applies a mask when the mask type says ``padding``, so the type
    follows the call.
    """

    def forward(self, hidden_states: torch.Tensor, attention_mask: Optional[torch.Tensor] = None,
                *args: Any, **kwargs: Any) -> Any:
        self.attn_mask_type = (
            AttnMaskType.no_mask if attention_mask is None else AttnMaskType.padding
        )
        return super().forward(hidden_states, attention_mask, *args, **kwargs)


class SDPACoreAttention(MegatronModule):
    """Bidirectional core attention through torch's fused SDPA (the local spec's ``core_attention``).

    Built by megatron's ``Attention`` with the arguments of ``DotProductAttention``; it holds no
    parameters, so checkpoints are those of the unfused attention.
    """

    def __init__(self, config: TransformerConfig, layer_number: int, attn_mask_type: AttnMaskType,
                 attention_type: str, attention_dropout: Optional[float] = None,
                 softmax_scale: Optional[float] = None, cp_comm_type: Optional[str] = None,
                 pg_collection: Any = None) -> None:
        super().__init__(config=config)
        if config.context_parallel_size != 1:
            raise ValueError("SDPACoreAttention: context parallelism needs the TE attention")
        dropout = config.attention_dropout if attention_dropout is None else attention_dropout
        if dropout:
            raise ValueError("SDPACoreAttention: LLaDA has no attention dropout (got "
                             f"{dropout})")
        self.softmax_scale = softmax_scale or 1.0 / math.sqrt(config.kv_channels)
        self.kv_slot: Optional[LayerSlot] = None  # bound by a cached rollout forward
        self.query_selection: Optional[QuerySelection] = None  # bound by LLaDATransformerLayer

    def forward(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                attention_mask: Optional[torch.Tensor], attn_mask_type: Any = None,
                attention_bias: Any = None, packed_seq_params: Any = None) -> torch.Tensor:
        """``query [sq, b, np, hn]``, ``key``/``value [sk, b, ng, hn]`` -> context ``[sq, b, hp]``.

        ``attention_mask``: None or bool ``[b, 1, 1, S]``, True = key masked out. With a bound
        cache slot the span's K/V are written to the cache and the queries attend to all ``S``
        cached keys (:mod:`rspo_mega.models.llada.kv_cache`). With a query selection bound only
        its queries run: context of the selected rows (:class:`QuerySelection`).
        """
        if attention_bias is not None or packed_seq_params is not None:
            raise ValueError("SDPACoreAttention supports neither attention_bias nor packed sequences")
        return _selected_attention(self.kv_slot, self.query_selection, query, key, value,
                                   attention_mask, self.softmax_scale)


def _selected_attention(slot: Optional[LayerSlot], selection: Optional[QuerySelection],
                        query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                        attention_mask: Optional[torch.Tensor], scale: float) -> torch.Tensor:
    """:func:`cached_attention` of the selection's queries (all without one)."""
    if selection is None:
        return cached_attention(slot, query, key, value, attention_mask, scale)
    return selection.context(cached_attention(slot, query, key, value, attention_mask, scale,
                                              selection.index))


@functools.cache
def te_cached_core_attention() -> type:
    """TE's core attention (megatron's ``TEDotProductAttention``) that, with a bound cache slot
    or query selection, runs through torch SDPA (queries and keys of different lengths, an
    explicit key-padding mask); without them it is TE's fused attention unchanged. Needs TE
    (GPU)."""
    from megatron.core.extensions.transformer_engine import TEDotProductAttention

    class TECachedCoreAttention(TEDotProductAttention):
        def __init__(self, config: TransformerConfig, *args: Any, **kwargs: Any) -> None:
            super().__init__(config, *args, **kwargs)
            scale = kwargs.get("softmax_scale") or config.softmax_scale
            self.cached_softmax_scale = scale or 1.0 / math.sqrt(config.kv_channels)
            self.kv_slot: Optional[LayerSlot] = None
            self.query_selection: Optional[QuerySelection] = None

        def forward(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                    attention_mask: Optional[torch.Tensor], *args: Any, **kwargs: Any) -> Any:
            if self.kv_slot is None and self.query_selection is None:
                return super().forward(query, key, value, attention_mask, *args, **kwargs)
            return _selected_attention(self.kv_slot, self.query_selection, query, key, value,
                                       attention_mask, self.cached_softmax_scale)

    return TECachedCoreAttention
