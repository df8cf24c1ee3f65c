"""LLaDA's attention: megatron-core self-attention used bidirectionally, with a cached path.

* :class:`BidirectionalSelfAttention` is megatron's ``SelfAttention`` (QKV projection, RoPE, core
  attention, output projection) with no causal mask; a key-padding mask, when given, switches
  Transformer Engine's attention to the ``padding`` type. Given a
  :class:`~rspo_mega.models.llada.forward_context.ForwardContext` with a cache slot or a query
  selection for its layer, it runs the cached attention (:func:`cached_attention`) instead of
  the spec's core attention: the span's K/V are written to the block KV cache and its queries
  (or the selected ones) attend to all cached keys.
* :class:`SDPACoreAttention` is the core attention of the local spec: one fused
  ``torch.nn.functional.scaled_dot_product_attention`` call per layer (bidirectional, key padding,
  grouped-query heads without repeating K/V), in place of megatron's unfused
  ``DotProductAttention`` (``baddbmm`` + softmax + ``bmm`` with a scores buffer ``[b*np, s, s]``).
  The TE spec keeps TE's fused attention.

Shapes: ``s`` tokens (``L`` of a cached span, ``S`` cached), ``b`` batch, ``np`` query heads and
``ng`` KV groups on this TP rank, ``hn`` head dim, ``hp = np * hn``, ``m`` selected queries.
"""

from __future__ import annotations

import math
from typing import Any, Optional

import torch
from megatron.core.models.common.embeddings.rope_utils import apply_rotary_pos_emb
from megatron.core.transformer.attention import SelfAttention
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.transformer_config import TransformerConfig

from rspo_mega.models.llada.forward_context import ForwardContext, LayerSlot, QuerySelection


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


class BidirectionalSelfAttention(SelfAttention):
    """Self-attention without a causal mask; a key-padding mask switches TE to ``padding``.

    ``attention_mask``: None (every token attends to every token) or bool ``[b, 1, 1, S]`` with
    True = masked out. TE only applies a mask when the mask type says ``padding``, so the type
    follows the call. ``inference_context``: a :class:`ForwardContext` (or None); megatron's own
    inference contexts are not used with LLaDA.
    """

    def forward(self, hidden_states: torch.Tensor, attention_mask: Optional[torch.Tensor] = None,
                *args: Any, inference_context: Optional[ForwardContext] = None,
                **kwargs: Any) -> Any:
        """``hidden_states [L, b, h]`` -> ``(output [L, b, h] or [m, b, h] / [n, 1, h], bias)``."""
        self.attn_mask_type = (
            AttnMaskType.no_mask if attention_mask is None else AttnMaskType.padding
        )
        if inference_context is not None:
            if not isinstance(inference_context, ForwardContext):
                raise TypeError("BidirectionalSelfAttention: inference_context must be a "
                                f"ForwardContext, got {type(inference_context).__name__}")
            slot = inference_context.slot(self.layer_number)
            selection = inference_context.selection(self.layer_number)
            if slot is not None or selection is not None:
                if args:
                    raise TypeError("BidirectionalSelfAttention: a cached or selected-query "
                                    "forward takes keywords only")
                return self._cached_forward(hidden_states, attention_mask, slot, selection,
                                            **kwargs)
        return super().forward(hidden_states, attention_mask, *args, **kwargs)

    def _cached_forward(self, hidden_states: torch.Tensor, attention_mask: Optional[torch.Tensor],
                        slot: Optional[LayerSlot], selection: Optional[QuerySelection],
                        rotary_pos_emb: Optional[torch.Tensor] = None,
                        **unused: Any) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        """megatron's attention forward (QKV, RoPE on queries and keys, output projection) with
        :func:`cached_attention` as the core attention."""
        for name in ("attention_bias", "packed_seq_params", "rotary_pos_cos", "rotary_pos_sin",
                     "rotary_pos_cos_sin"):
            if unused.get(name) is not None:
                raise ValueError(f"BidirectionalSelfAttention: a cached forward takes no {name}")
        if self.config.attention_output_gate:
            raise ValueError("BidirectionalSelfAttention: LLaDA has no attention output gate")
        query, key, value = self.get_query_key_value_tensors(hidden_states, None)
        if rotary_pos_emb is not None:
            q_emb, k_emb = rotary_pos_emb if isinstance(rotary_pos_emb, tuple) else \
                (rotary_pos_emb, rotary_pos_emb)
            cp = self.pg_collection.cp
            query = apply_rotary_pos_emb(query, q_emb, config=self.config, cp_group=cp)
            key = apply_rotary_pos_emb(key, k_emb, config=self.config, cp_group=cp)
        scale = self.config.softmax_scale or 1.0 / math.sqrt(self.config.kv_channels)
        index = None if selection is None else selection.index
        context = cached_attention(slot, query, key, value, attention_mask, scale, index)
        if selection is not None:
            context = selection.context(context)
        return self.linear_proj(context)


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

    def forward(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                attention_mask: Optional[torch.Tensor], attn_mask_type: Any = None,
                attention_bias: Any = None, packed_seq_params: Any = None) -> torch.Tensor:
        """``query [s, b, np, hn]``, ``key``/``value [s, b, ng, hn]`` -> context ``[s, b, hp]``;
        ``attention_mask``: None or bool ``[b, 1, 1, s]``, True = key masked out."""
        if attention_bias is not None or packed_seq_params is not None:
            raise ValueError("SDPACoreAttention supports neither attention_bias nor packed sequences")
        return cached_attention(None, query, key, value, attention_mask, self.softmax_scale)
