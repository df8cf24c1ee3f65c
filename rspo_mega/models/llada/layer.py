"""LLaDA's transformer layer: megatron's ``TransformerLayer`` whose queries can be restricted, and
the local spec's SwiGLU MLP.

In a bidirectional model the outputs of the last layer feed only the head. When a consumer
reads ``m`` of the ``s`` positions of each row (the sampler: the current block's still-masked
positions; the ELBO: the scored masked positions), the last layer still needs the keys and
values of all ``s`` positions, but its queries, attention output, output projection, residual
and MLP only at those positions. :class:`LLaDATransformerLayer` runs them there when a
:class:`QuerySelection` is bound to it (``LLaDAModel`` binds one to its last layer); the result
at the selected positions is the full layer's, up to float summation order.

:class:`SwiGLUMLP` is megatron's MLP for LLaDA's bias-free SwiGLU: ``silu(gate) * up`` with no
further elementwise pass (megatron adds ``glu_linear_offset`` to ``up`` even when it is 0), in
place on fc1's output when no autograd graph is recorded (rollout forwards).

Shapes: ``s`` tokens, ``b`` batch, ``m`` selected positions per row, ``n`` flat positions,
``h`` hidden.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Iterator, Optional

import torch
import torch.nn.functional as F
from megatron.core.tensor_parallel.layers import ColumnParallelLinear, RowParallelLinear
from megatron.core.transformer.mlp import MLP, MLPSubmodules
from megatron.core.transformer.transformer_layer import TransformerLayer


def hidden_rows(positions: torch.Tensor, s: int, b: int) -> torch.Tensor:
    """Flat caller positions ``[n]`` (``row * s + position``) -> their rows in a ``[s, b, h]``
    activation flattened as ``[s * b, h]``."""
    return (positions % s) * b + positions // s


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

    @contextmanager
    def bound(self, layer: "LLaDATransformerLayer") -> Iterator[None]:
        """``layer`` runs this selection while the block runs."""
        layer.query_selection = self
        try:
            yield
        finally:
            layer.query_selection = None

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


class LLaDATransformerLayer(TransformerLayer):
    """megatron's transformer layer; with ``query_selection`` bound, the attention block runs its
    queries, output projection and residual only at the selected positions (keys and values at
    all), so the layer returns the selected rows (``[m, b, h]`` or flat ``[n, 1, h]``) and the
    MLP runs on those rows only."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.query_selection: Optional[QuerySelection] = None

    def _forward_attention(self, hidden_states: torch.Tensor, *args: Any,
                           **kwargs: Any) -> tuple[torch.Tensor, Any]:
        selection = self.query_selection
        if selection is None:
            return super()._forward_attention(hidden_states, *args, **kwargs)
        if args:
            raise TypeError("LLaDATransformerLayer: a selected-query forward takes keywords only")
        core = self.self_attention.core_attention
        core.query_selection = selection
        try:
            attention = self.self_attention(
                self.input_layernorm(hidden_states),
                attention_mask=kwargs.get("attention_mask"),
                rotary_pos_emb=kwargs.get("rotary_pos_emb"),
                rotary_pos_cos=kwargs.get("rotary_pos_cos"),
                rotary_pos_sin=kwargs.get("rotary_pos_sin"),
                rotary_pos_cos_sin=kwargs.get("rotary_pos_cos_sin"),
                attention_bias=kwargs.get("attention_bias"),
                packed_seq_params=kwargs.get("packed_seq_params"),
                sequence_len_offset=kwargs.get("sequence_len_offset"),
            )
        finally:
            core.query_selection = None
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
