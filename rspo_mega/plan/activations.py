"""Bytes of the tensors one forward/backward of the LLaDA model holds, per rank.

Each count names the tensors it is made of, as the layer specs create them (``local``: torch
RMSNorm, megatron linears, SDPA core attention, unfused SwiGLU; ``transformer_engine``: TE's
LayerNorm+Linear, fused attention and megatron's fused SwiGLU). ``tokens`` = rows * sequence
length of one micro-batch; ``positions`` = head outputs (scored ELBO positions or the sampler's
block positions). Activations are in the parameter dtype (``a`` bytes), softmax statistics and
logits in float32, token ids in int64. Sequence parallelism divides the ``[s, b, h]`` tensors by tp.

The local-spec counts match what autograd saves on a CPU exactly (``tests/test_plan_model.py``
counts the saved storages); the TE counts follow TE 2.x's saved tensors and are not measured here.
"""

from __future__ import annotations

from rspo_mega.plan.shapes import ModelShapes

F32, F64, I64 = 4, 8, 8


def _h(m: ModelShapes) -> float:
    """Elements per token of a ``[s, b, h]`` activation on this rank."""
    return m.hidden / m.tp if m.sequence_parallel else float(m.hidden)


def _attention(m: ModelShapes) -> float:
    """Mixed QKV output (V is a view of it), Q and K after RoPE, attention output (= proj input)."""
    return ((m.heads + 2 * m.groups) + (2 * m.heads + m.groups)) * m.head_dim / m.tp


def saved_per_token(m: ModelShapes) -> float:
    """Bytes one layer saves for backward per token.

    local: norm input, normalised input and norm output (the next linear's input) of both norms;
    fc1 output (both SwiGLU halves are views of it), SiLU output, the product (fc2 input).
    TE: norm input and norm output per LayerNorm+Linear; fc1 output (fused SwiGLU input) and the
    SwiGLU output. Both: the attention tensors of :func:`_attention`, the log-sum-exp (fp32 per
    head) and one fp32 rstd per norm. LoRA: each adapter's ``A x`` (``r`` values, the input of
    ``B``; ``x`` is the base linear's saved input).
    """
    dense = (6 * _h(m) + 4 * m.ffn / m.tp) if m.impl == "local" else (4 * _h(m) + 3 * m.ffn / m.tp)
    adapters = len(m.lora_targets) * m.lora_rank
    return (dense + adapters + _attention(m)) * m.param_bytes + (m.heads / m.tp + 2) * F32


def selected_layer_saved(m: ModelShapes, tokens: int, slots: int, outputs: int) -> float:
    """Bytes the local spec's last layer saves for the ELBO's ``outputs`` flat positions: its
    queries run at ``slots`` = rows x the widest row's positions, the rest of the layer at the
    positions themselves (:mod:`rspo_mega.models.llada.layer`).

    Every token: the first norm (input, normalised input, output, rstd), the mixed QKV and Q and
    K after RoPE (the query gather keeps its input). Every slot: the gathered Q, the attention
    output, the log-sum-exp and the slots' position index (int64). Every output row: the
    projection's input, the second norm and the MLP as in :func:`saved_per_token`, and the int64
    index of the residual rows (that of the attention-output rows is the head's row index,
    counted by :func:`head_saved`).
    """
    hp = m.heads * m.head_dim / m.tp
    kv_side = (3 * m.hidden + (2 * m.heads + 3 * m.groups) * m.head_dim / m.tp) * m.param_bytes
    attention = 2 * hp * m.param_bytes + (m.heads / m.tp) * F32 + I64
    rest = (hp + 3 * m.hidden + 4 * m.ffn / m.tp) * m.param_bytes + F32 + I64
    return tokens * (kv_side + F32) + slots * attention + outputs * rest


def saved_per_layer_fixed(m: ModelShapes, seq: int) -> float:
    """Bytes one layer saves per micro-batch whatever its rows: the local spec's RoPE cos/sin
    (``[s, 1, 1, head_dim]``, once for Q and once for K); TE's fused RoPE keeps no such copy."""
    return 4 * seq * m.head_dim * m.param_bytes if m.impl == "local" else 0.0


def forward_peak_per_token(m: ModelShapes) -> float:
    """Bytes per token live at a no-grad layer's busiest moment (beyond the block's input).

    MLP: residual, norm output, fc1 output and the SwiGLU temporaries (local: none, SwiGLU runs
    in place on fc1's output without grad; TE: the fused output). Attention: residual, norm
    output, mixed QKV, Q/K after RoPE with one RoPE temporary of Q, attention output. The larger
    of the two.
    """
    swiglu = 0 if m.impl == "local" else 1
    mlp = 2 * _h(m) + (2 + swiglu) * m.ffn / m.tp
    attn = 2 * _h(m) + _attention(m) + m.heads * m.head_dim / m.tp
    return (max(mlp, attn) + _h(m)) * m.param_bytes  # + the block's input, held by the caller


def backward_peak_per_token(m: ModelShapes) -> float:
    """Bytes per token of gradient temporaries in a layer's backward (MLP: the gradients of fc2's
    input, of the SwiGLU halves and of fc1's output, with two hidden-state gradients)."""
    return (2 * _h(m) + 4 * m.ffn / m.tp) * m.param_bytes


def largest_weight(m: ModelShapes, stage: int) -> int:
    """Elements of the largest weight on a rank of ``stage`` (its gradient is one temporary)."""
    layer = max(2 * m.ffn * m.hidden, (m.heads + 2 * m.groups) * m.head_dim * m.hidden) // m.tp
    ends = m.vocab_shard * m.hidden if stage in (0, m.pp - 1) else 0
    return max(layer, ends)


def head_saved(m: ModelShapes, tokens: int, positions: int) -> float:
    """Bytes the ELBO head saves per micro-batch: the final norm's input (and, local, its
    normalised input) with its rstd over the ``tokens`` the last layer output; the gathered
    hidden rows ``[n, h]``; the softmax ``[n, v]`` in fp32; the label index (int64, twice) and
    the shard mask (bool)."""
    norm = (2 if m.impl == "local" else 1) * m.hidden * m.param_bytes + F32
    per_position = m.hidden * m.param_bytes + m.vocab_columns * F32 + 2 * I64 + 1
    return tokens * norm + positions * per_position


def head_forward_peak(m: ModelShapes, tokens: int, positions: int, log_probs: bool) -> float:
    """Bytes the head holds at its busiest moment of a forward: the final norm output, the
    gathered rows, the float32 logits and (for log-probs) the shifted copy that becomes the
    softmax."""
    logits = positions * m.vocab_columns * F32 * (2 if log_probs else 1)
    return tokens * m.hidden * m.param_bytes + positions * m.hidden * m.param_bytes + logits


def kv_cache_bytes(m: ModelShapes, rows: int, seq: int) -> int:
    """The rollout's block KV cache on one rank: ``[layers_local, 2, rows, S, kv_heads_local,
    head_dim]`` in the parameter dtype."""
    return m.layers_per_stage * 2 * rows * seq * (m.groups // m.tp) * m.head_dim * m.param_bytes


def sampling_bytes(m: ModelShapes, rows: int, block: int, sampled: bool, on_host: bool) -> float:
    """The sampler's buffers of a block's first step (all ``block`` positions still masked).

    With noise: the keyed float64 uniforms of every row, ``[rows, block, V]`` over the real vocab
    on every TP rank, stacked and gathered on the device (two copies at the gather; on a CPU the
    per-row draws are a third), then three ``[rows * block, v]`` float64 scores of Gumbel-max
    beside the gathered noise. Without noise: three float64 copies of the logits (the chosen
    token's softmax).
    """
    n = rows * block
    scores = 3 * n * m.vocab_columns * F64
    if not sampled:
        return scores
    noise = n * m.vocab * F64
    host = noise if on_host else 0.0
    return host + max(2 * noise, noise + scores)
