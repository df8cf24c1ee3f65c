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

import math
from typing import Any, Optional

import torch
import torch.nn.functional as F
from megatron.core.transformer.attention import SelfAttention
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.transformer_config import TransformerConfig


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

    def forward(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                attention_mask: Optional[torch.Tensor], attn_mask_type: Any = None,
                attention_bias: Any = None, packed_seq_params: Any = None) -> torch.Tensor:
        """``query [sq, b, np, hn]``, ``key``/``value [sk, b, ng, hn]`` -> context ``[sq, b, hp]``.

        ``attention_mask``: None or bool ``[b, 1, 1, sk]``, True = key masked out.
        """
        if attention_bias is not None or packed_seq_params is not None:
            raise ValueError("SDPACoreAttention supports neither attention_bias nor packed sequences")
        q, k, v = (t.permute(1, 2, 0, 3) for t in (query, key, value))  # [b, heads, s, hn]
        keep = None if attention_mask is None else ~attention_mask
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=keep, scale=self.softmax_scale,
                                             enable_gqa=k.shape[1] != q.shape[1])
        sq, b = query.shape[0], query.shape[1]
        return out.permute(2, 0, 1, 3).reshape(sq, b, -1)
