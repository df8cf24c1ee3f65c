"""LLaDA's transformer layer: megatron's ``TransformerLayer`` whose queries can be restricted, and
the local spec's SwiGLU MLP.

In a bidirectional model the outputs of the last layer feed only the head. When a consumer
reads ``m`` of the ``s`` positions of each row (the sampler: the current block's still-masked
positions; the ELBO: the scored masked positions), the last layer still needs the keys and
values of all ``s`` positions, but its queries, attention output, output projection, residual
and MLP only at those positions. :class:`LLaDATransformerLayer` runs them there when a
:class:`~rspo_mega.models.llada.forward_context.QuerySelection` for it comes in the forward's
context (``LLaDAModel`` selects queries of its last layer); the result at the selected positions
is the full layer's, up to float summation order.

:class:`SwiGLUMLP` is megatron's MLP for LLaDA's bias-free SwiGLU: ``silu(gate) * up`` with no
further elementwise pass (megatron adds ``glu_linear_offset`` to ``up`` even when it is 0), in
place on fc1's output when no autograd graph is recorded (rollout forwards).

Shapes: ``s`` tokens, ``b`` batch, ``m`` selected positions per row, ``n`` flat positions,
``h`` hidden.
"""

from __future__ import annotations

from typing import Any, Optional

import torch
import torch.nn.functional as F
from megatron.core.tensor_parallel.layers import ColumnParallelLinear, RowParallelLinear
from megatron.core.transformer.mlp import MLP, MLPSubmodules
from megatron.core.transformer.transformer_layer import TransformerLayer

from rspo_mega.models.llada.forward_context import ForwardContext


class LLaDATransformerLayer(TransformerLayer):
    """megatron's transformer layer that reads a :class:`ForwardContext` (megatron's
    ``inference_context`` argument). When the context selects queries for this layer, the
    attention block runs its queries, output projection and residual only at the selected
    positions (keys and values at all), so the layer returns the selected rows (``[m, b, h]`` or
    flat ``[n, 1, h]``) and the MLP runs on those rows only. A cache slot in the context reaches
    the attention through the same argument."""

    def forward(self, *args: Any, **kwargs: Any) -> tuple[torch.Tensor, Any]:
        """megatron's layer forward; with a context, its MLP is not shown the context (it is
        not one of megatron's inference contexts)."""
        if kwargs.get("inference_context") is None:
            return super().forward(*args, **kwargs)
        kwargs.pop("dynamic_inference_decode_only", None)
        hidden, cross = self._forward_attention(*args, **kwargs)
        return self._forward_mlp(hidden, None, padding_mask=kwargs.get("padding_mask")), cross

    def _forward_attention(self, hidden_states: torch.Tensor, *args: Any,
                           **kwargs: Any) -> tuple[torch.Tensor, Any]:
        """megatron's attention block; with a query selection for this layer in the context,
        ``hidden_states [s, b, h]`` -> the selected rows after the residual add."""
        context: Optional[ForwardContext] = kwargs.get("inference_context")
        selection = None if context is None else context.selection(self.layer_number)
        if selection is None:
            return super()._forward_attention(hidden_states, *args, **kwargs)
        if args:
            raise TypeError("LLaDATransformerLayer: a selected-query forward takes keywords only")
        attention = self.self_attention(
            self.input_layernorm(hidden_states),
            attention_mask=kwargs.get("attention_mask"),
            inference_context=context,
            rotary_pos_emb=kwargs.get("rotary_pos_emb"),
            rotary_pos_cos=kwargs.get("rotary_pos_cos"),
            rotary_pos_sin=kwargs.get("rotary_pos_sin"),
            rotary_pos_cos_sin=kwargs.get("rotary_pos_cos_sin"),
            attention_bias=kwargs.get("attention_bias"),
            packed_seq_params=kwargs.get("packed_seq_params"),
            sequence_len_offset=kwargs.get("sequence_len_offset"),
        )
        with self.bias_dropout_add_exec_handler():
            hidden = self.self_attn_bda(self.training, self.config.bias_dropout_fusion)(
                attention, selection.rows(hidden_states), self.hidden_dropout)
        return hidden, kwargs.get("context")


class SwiGLUMLP(MLP):
    """megatron's MLP; LLaDA's SwiGLU (gated silu, no biases) runs as ``silu(gate) * up``, in
    place on fc1's output ``[s, b, 2f]`` without grad. Any other activation setting runs
    megatron's forward unchanged."""

    default_submodules = MLPSubmodules(linear_fc1=ColumnParallelLinear,
                                       linear_fc2=RowParallelLinear)

    def __init__(self, config: Any, submodules: Optional[MLPSubmodules] = None,
                 **kwargs: Any) -> None:
        """``submodules`` default to the local spec's (Column/RowParallelLinear); the layer spec
        names this class itself, not a ``ModuleSpec``, so megatron builds it with ``config``
        only and the MLP takes the default tensor-parallel group."""
        super().__init__(config, submodules or self.default_submodules, **kwargs)
        self.plain_swiglu = (
            config.gated_linear_unit and self.activation_func is F.silu
            and not config.add_bias_linear and not config.bias_activation_fusion
            and not config.use_te_activation_func and config.glu_linear_offset == 0
            and config.activation_func_clamp_value is None)

    def forward(self, hidden_states: torch.Tensor, per_token_scale: Optional[torch.Tensor] = None,
                **kwargs: Any) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        """``hidden_states [s, b, h]`` -> ``([s, b, h], None)`` as megatron's MLP."""
        if not self.plain_swiglu or per_token_scale is not None:
            return super().forward(hidden_states, per_token_scale, **kwargs)
        fc1, _ = self.linear_fc1(hidden_states)
        gate, up = torch.chunk(fc1, 2, dim=-1)
        if torch.is_grad_enabled():
            return self.linear_fc2(F.silu(gate) * up)
        return self.linear_fc2(F.silu(gate, inplace=True).mul_(up))
