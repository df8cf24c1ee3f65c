"""FLOPs, communication and time of each phase of an RL step on the busiest rank.

Compute: matmul FLOPs (2 per multiply-add) of the layers (QKV, proj, fc1, fc2 and the
bidirectional attention, ``4 * heads_local * head_dim * keys`` per query token), and of the
head over its real vocab columns at the positions it runs on; a backward costs twice its
forward. Time = FLOPs / (GEMM rate * efficiency); with pipeline parallelism every pass runs
``micro-batches + pp - 1`` slots of the slowest stage (the fill and drain bubble).

Communication (bytes sent per rank; ring collectives send ``2 (n-1)/n`` of an all-reduce's
message and ``(n-1)/n`` of a reduce-scatter's or all-gather's): TP all-reduces two ``[s, b, h]``
activations per layer and pass (forward, and again in the backward) plus the embedding's; PP
sends one ``[s, b, h]`` activation per micro-batch and stage boundary each way (rollouts also
broadcast the tokens); DP all-reduces the fp32 gradients (distributed optimizer: reduce-scatter
them and all-gather the weights). Each collective also costs a latency.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from rspo_mega.plan.shapes import ModelShapes, Workload

PHASES = ("rollout", "reference", "policy", "grad_sync", "optimizer")


@dataclass(frozen=True)
class Rates:
    """Rates the estimate assumes per rank."""

    flops: float  # sustained model FLOP/s (GEMM rate * efficiency)
    memory_bytes_s: float  # memory bandwidth (optimizer)
    tp_bytes_s: float  # collective bandwidth of the TP group
    pp_bytes_s: float
    dp_bytes_s: float
    latency_s: float  # per collective
    optimizer_bytes_per_param: float  # bytes Adam reads and writes per local parameter


@dataclass
class PhaseTime:
    """One phase on the busiest rank: FLOPs, bytes sent per group, seconds."""

    flops: float = 0.0
    compute_s: float = 0.0
    comm_bytes: dict[str, float] = field(default_factory=lambda: {"tp": 0.0, "pp": 0.0, "dp": 0.0})
    comm_s: float = 0.0

    @property
    def seconds(self) -> float:
        return self.compute_s + self.comm_s


def layer_flops(m: ModelShapes, queries: float, keys: int) -> float:
    """Forward FLOPs of one layer on one TP rank for ``queries`` tokens attending ``keys`` each."""
    attention = 4 * queries * keys * (m.heads // m.tp) * m.head_dim
    return 2 * queries * m.layer_matmul_params() + attention


def head_flops(m: ModelShapes, positions: float) -> float:
    return 2 * positions * m.hidden * m.vocab_columns


def _ring(n: int, kind: str) -> float:
    """Share of a message one rank sends in a ring all-reduce / reduce-scatter / all-gather."""
    if n == 1:
        return 0.0
    return (2.0 if kind == "all_reduce" else 1.0) * (n - 1) / n


def _pass(m: ModelShapes, r: Rates, rows: float, queries: float, keys: int, positions: float,
          backward: bool) -> PhaseTime:
    """One forward (and backward) of a micro-batch on the slowest stage (the first or last).
    A backward costs two forwards (input and weight gradients), one with LoRA (the frozen base
    computes no weight gradients; the adapters' are negligible)."""
    mult = (2.0 if m.lora_rank else 3.0) if backward else 1.0
    body = m.layers_per_stage * layer_flops(m, rows * queries, keys)
    t = PhaseTime(flops=mult * (body + head_flops(m, positions)))  # the last stage is busiest
    act = rows * queries * m.hidden * m.param_bytes
    reduces = (2 * m.layers_per_stage + 1) * (2 if backward else 1)
    t.comm_bytes["tp"] = reduces * act * _ring(m.tp, "all_reduce")
    t.comm_bytes["pp"] = act * (2 if backward else 1) if m.pp > 1 else 0.0
    t.compute_s = t.flops / r.flops
    t.comm_s = (t.comm_bytes["tp"] / r.tp_bytes_s + t.comm_bytes["pp"] / r.pp_bytes_s
                + (reduces if m.tp > 1 else 0) * r.latency_s + (m.pp > 1) * r.latency_s)
    return t


def _add(total: PhaseTime, part: PhaseTime, times: float, slots: float = 0.0) -> None:
    """Add ``times`` runs of ``part`` whose compute takes ``slots`` runs' time (0: ``times``)."""
    total.flops += part.flops * times
    total.compute_s += part.compute_s * (slots or times)
    total.comm_s += part.comm_s * times
    for k, v in part.comm_bytes.items():
        total.comm_bytes[k] += v * times


def _micro_batches(m: ModelShapes, total: int, size: int) -> tuple[float, int, int]:
    """(rows per micro-batch, micro-batches, slots) of a pass over ``total`` rows.

    One stage: the micro-batches of ``size`` rows run one after the other, the last one smaller.
    A pipeline pads them to equal size and takes ``micro-batches + pp - 1`` slots (fill and drain).
    """
    count = -(-total // size)
    if m.pp == 1:
        return total / count, count, count
    return float(min(total, size)), count, count + m.pp - 1


def rollout_time(m: ModelShapes, w: Workload, r: Rates) -> PhaseTime:
    """All denoising steps: every row runs every step (exact schedule); the head runs on the
    block's still-masked positions. With the KV cache a block's first step runs the whole
    sequence and its later ones the block (``dual``) or the block and the suffix (``prefix``);
    ``cache_check_rate`` of those also run the whole sequence."""
    out = PhaseTime()
    spb, blocks, blen = w.steps_per_block, w.gen_length // w.block_length, w.block_length
    rows, count, slots = _micro_batches(m, w.rollout_rows, w.rollout_micro_batch)
    for blk in range(blocks if w.steps else 0):
        for i in range(spb):
            masked = blen - i * (blen // spb) - min(i, blen % spb)  # num_transfer_tokens' schedule
            if masked <= 0:
                break  # the block is decoded: its remaining steps do not run
            queries = w.seq_len
            if i and w.cache == "dual":
                queries = w.block_length
            elif i and w.cache == "prefix":
                queries = w.gen_length - blk * w.block_length
            _add(out, _pass(m, r, rows, queries, w.seq_len, rows * masked, False), count, slots)
            _add(out, _sampler_collectives(m, w, r), 1)
            if queries < w.seq_len and w.cache_check_rate:
                check = _pass(m, r, rows, w.seq_len, w.seq_len, rows * masked, False)
                _add(out, check, count * w.cache_check_rate, slots * w.cache_check_rate)
    return out


def _sampler_collectives(m: ModelShapes, w: Workload, r: Rates) -> PhaseTime:
    """Per denoising step: five small TP collectives of the vocab-parallel sampler and the PP
    broadcast of the tokens ``[rows, S]`` (int64)."""
    t = PhaseTime()
    t.comm_bytes["pp"] = w.completions * w.seq_len * 8 * _ring(m.pp, "all_gather")
    t.comm_s = (5 * r.latency_s if m.tp > 1 else 0.0) + (r.latency_s if m.pp > 1 else 0.0) \
        + t.comm_bytes["pp"] / r.pp_bytes_s
    return t


def elbo_time(m: ModelShapes, w: Workload, r: Rates, backward: bool) -> PhaseTime:
    """One pass over this rank's masked sequences (forward only, or forward + backward)."""
    out = PhaseTime()
    rows, count, slots = _micro_batches(m, w.sequences, w.elbo_micro_batch)
    _add(out, _pass(m, r, rows, w.seq_len, w.seq_len, rows * w.scored_mean, backward), count, slots)
    return out


def policy_time(m: ModelShapes, w: Workload, r: Rates) -> PhaseTime:
    """Every inner update: one pass with graphs (one_pass), or a scoring pass then forward +
    backward (two passes); plus the old policy's scorings of fresh masks (ratio losses)."""
    out = PhaseTime()
    _add(out, elbo_time(m, w, r, backward=True), w.inner_updates)
    scorings = w.old_policy_passes + (0 if w.one_pass else w.inner_updates)
    if scorings:
        _add(out, elbo_time(m, w, r, backward=False), scorings)
    return out


def grad_sync_time(m: ModelShapes, w: Workload, r: Rates, params: int) -> PhaseTime:
    """DP reduction of the fp32 gradients per update (and the weights' all-gather of the
    distributed optimizer)."""
    t = PhaseTime()
    if w.distributed_optimizer:
        sent = params * (4 + m.param_bytes) * _ring(w.dp, "reduce_scatter")
    else:
        sent = params * 4 * _ring(w.dp, "all_reduce")
    t.comm_bytes["dp"] = sent * w.inner_updates
    latency = r.latency_s * w.inner_updates if w.dp > 1 else 0.0
    t.comm_s = t.comm_bytes["dp"] / r.dp_bytes_s + latency
    return t


def optimizer_time(w: Workload, r: Rates, params: int) -> PhaseTime:
    """Adam over the locally owned parameters: bandwidth-bound."""
    owned = params / (w.dp if w.distributed_optimizer else 1)
    t = PhaseTime()
    t.compute_s = w.inner_updates * owned * r.optimizer_bytes_per_param / r.memory_bytes_s
    return t


def step_times(m: ModelShapes, w: Workload, r: Rates) -> dict[str, PhaseTime]:
    """Every phase of one RL step on the busiest rank (gradients and Adam: the trained
    parameters, with LoRA the adapters')."""
    params = max(m.stage_trainable(s) for s in range(m.pp))
    ref = PhaseTime()
    if w.reference_passes:
        _add(ref, elbo_time(m, w, r, backward=False), w.reference_passes)
    return {"rollout": rollout_time(m, w, r), "reference": ref, "policy": policy_time(m, w, r),
            "grad_sync": grad_sync_time(m, w, r, params), "optimizer": optimizer_time(w, r, params)}
