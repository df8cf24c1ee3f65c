"""Bytes of the tensors one forward/backward of the LLaDA model holds, per rank.

Each count names the tensors it is made of, as the layer specs create them (``local``: torch
RMSNorm, megatron linears, SDPA core attention, unfused SwiGLU; ``transformer_engine``: TE's
LayerNorm+Linear, fused attention and megatron's fused SwiGLU). ``tokens`` = rows * sequence
length of one micro-batch; ``positions`` = head outputs (scored ELBO positions or the sampler's
block positions). Activations are in the parameter dtype (``a`` bytes), softmax statistics and
logits in float32, token ids in int64. Sequence parallelism divides the ``[s, b, h]`` tensors by tp.

With LoRA (``m.lora_rank``) the base is frozen: a base linear saves no input for a weight
gradient, a norm with a frozen weight no normalised copy, the frozen head no hidden rows and the
embedding no token ids; autograd records nothing before the first adapter of a stage's first
layer when the stage's input carries no gradient (stage 0); each adapter saves its input and
``A x`` (``r`` values). Adapter dropout's masks are not counted.

The local-spec counts match what autograd saves on a CPU exactly, with and without LoRA
(``tests/test_plan_model.py`` counts the saved storages); the TE counts follow TE 2.x's saved
tensors and are not measured here (with LoRA the TE layers keep the dense layer's tensors and
add the adapters': an upper bound).
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


def _lora_local(m: ModelShapes) -> bool:
    """Whether the LoRA counts of the local spec apply (frozen base, measured)."""
    return bool(m.lora_rank) and m.impl == "local"


def saved_per_token(m: ModelShapes, grad_in: bool = True) -> float:
    """Bytes one layer saves for backward per token (``grad_in``: whether the layer's input
    carries a gradient; only LoRA's first layer of stage 0 has none).

    local: norm input, normalised input and norm output (the next linear's input) of both norms;
    fc1 output (both SwiGLU halves are views of it), SiLU output, the product (fc2 input).
    TE: norm input and norm output per LayerNorm+Linear; fc1 output (fused SwiGLU input) and the
    SwiGLU output. Both: the attention tensors of :func:`_attention`, the log-sum-exp (fp32 per
    head) and one fp32 rstd per norm. LoRA: local, :func:`_lora_front` and
    :func:`_lora_back`; TE, the dense count plus each adapter's ``A x``.
    """
    if _lora_local(m):
        front, grad = _lora_front(m, grad_in)
        core = (m.heads * m.head_dim / m.tp * m.param_bytes + m.heads / m.tp * F32) if grad else 0
        return front + core + _lora_back(m, grad, proj_input_saved=grad)
    dense = (6 * _h(m) + 4 * m.ffn / m.tp) if m.impl == "local" else (4 * _h(m) + 3 * m.ffn / m.tp)
    adapters = len(m.lora_targets) * m.lora_rank
    return (dense + adapters + _attention(m)) * m.param_bytes + (m.heads / m.tp + 2) * F32


def _lora_front(m: ModelShapes, grad_in: bool) -> tuple[float, bool]:
    """Bytes per token a LoRA layer (local spec) saves up to the core attention's inputs, and
    whether the attention is in the graph: the first norm's input and rstd (with ``grad_in``),
    the QKV adapter's input (the norm output) and ``A x``, the mixed QKV and Q, K after RoPE."""
    a, grad = m.param_bytes, grad_in or "linear_qkv" in m.lora_targets
    saved = (m.hidden * a + F32) if grad_in else 0.0
    if "linear_qkv" in m.lora_targets:
        saved += (m.hidden + m.lora_rank) * a
    if grad:
        saved += (2 * m.heads + 3 * m.groups) * m.head_dim / m.tp * a
    return saved, grad


def _lora_back(m: ModelShapes, grad: bool, proj_input_saved: bool) -> float:
    """Bytes per row a LoRA layer (local spec) saves from the output projection on, ``grad``:
    whether the attention was in the graph, ``proj_input_saved``: whether the attention already
    saved the projection's input. In order: the proj adapter's input and ``A x``; the second
    norm's input and rstd; the fc1 adapter's input and ``A x``; fc1's output and the SiLU output;
    the fc2 adapter's input (the SwiGLU product) and ``A x``. Each part is saved once the graph
    has begun (a gradient flows in, or an adapter before it)."""
    a, r, targets = m.param_bytes, m.lora_rank, m.lora_targets
    saved = 0.0
    if "linear_proj" in targets:
        saved += ((0 if proj_input_saved else m.heads * m.head_dim / m.tp) + r) * a
    grad = grad or "linear_proj" in targets
    saved += (m.hidden * a + F32) if grad else 0.0
    if "linear_fc1" in targets:
        saved += (m.hidden + r) * a
    grad = grad or "linear_fc1" in targets
    saved += 3 * m.ffn / m.tp * a if grad else 0.0
    if "linear_fc2" in targets:
        saved += (m.ffn / m.tp + r) * a
    return saved


def selected_layer_saved(m: ModelShapes, tokens: int, slots: int, outputs: int,
                         grad_in: bool = True) -> float:
    """Bytes the local spec's last layer saves for the ELBO's ``outputs`` flat positions: its
    queries run at ``slots`` = rows x the widest row's positions, the rest of the layer at the
    positions themselves (:mod:`rspo_mega.models.llada.layer`).

    Every token: the first norm (input, normalised input, output, rstd), the mixed QKV and Q and
    K after RoPE (the query gather keeps its input). Every slot: the gathered Q, the attention
    output, the log-sum-exp and the slots' position index (int64). Every output row: the
    projection's input, the second norm and the MLP as in :func:`saved_per_token`, and the int64
    index of the residual rows (that of the attention-output rows is the head's row index,
    counted by :func:`head_saved`). LoRA: the parts of :func:`_lora_front` per token, the slots'
    as above while the attention is in the graph, :func:`_lora_back` per output row (the
    projection's input is a row selection, saved by its adapter) and its residual index.
    """
    hp = m.heads * m.head_dim / m.tp
    if _lora_local(m):
        front, grad = _lora_front(m, grad_in)
        at_slots = (2 * hp * m.param_bytes + (m.heads / m.tp) * F32 + I64) if grad else 0.0
        back = _lora_back(m, grad, proj_input_saved=False) + I64
        return tokens * front + slots * at_slots + outputs * back
    kv_side = (3 * m.hidden + (2 * m.heads + 3 * m.groups) * m.head_dim / m.tp) * m.param_bytes
    attention = 2 * hp * m.param_bytes + (m.heads / m.tp) * F32 + I64
    rest = (hp + 3 * m.hidden + 4 * m.ffn / m.tp) * m.param_bytes + F32 + I64
    return tokens * (kv_side + F32) + slots * attention + outputs * rest


def saved_per_layer_fixed(m: ModelShapes, seq: int, grad_in: bool = True) -> float:
    """Bytes one layer saves per micro-batch whatever its rows: the local spec's RoPE cos/sin
    (``[s, 1, 1, head_dim]``, once for Q and once for K) while the attention is in the graph;
    TE's fused RoPE keeps no such copy."""
    if m.impl != "local" or (_lora_local(m) and not _lora_front(m, grad_in)[1]):
        return 0.0
    return 4 * seq * m.head_dim * m.param_bytes


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
    """Elements of the largest trained weight on a rank of ``stage`` (its gradient is one
    temporary; with LoRA an adapter factor's)."""
    if m.lora_rank:
        return max(m.adapter_matrices())
    layer = max(2 * m.ffn * m.hidden, (m.heads + 2 * m.groups) * m.head_dim * m.hidden) // m.tp
    ends = m.vocab_shard * m.hidden if stage in (0, m.pp - 1) else 0
    return max(layer, ends)


def head_saved(m: ModelShapes, tokens: int, positions: int) -> float:
    """Bytes the ELBO head saves per micro-batch: the final norm's input (and, local, its
    normalised input) with its rstd over the ``tokens`` the last layer output; the gathered
    hidden rows ``[n, h]``; the softmax ``[n, v]`` in fp32; the label index (int64, twice) and
    the shard mask (bool). A frozen head (LoRA) saves neither the normalised input nor the rows
    (local; TE: the rows only)."""
    copies = 2 if m.impl == "local" and not m.lora_rank else 1
    norm = copies * m.hidden * m.param_bytes + F32
    rows = 0 if m.lora_rank else m.hidden * m.param_bytes
    per_position = rows + m.vocab_columns * F32 + 2 * I64 + 1
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
