"""Memory of one rank of each pipeline stage: what stays resident, and each phase's peak.

A phase's peak is the resident parts plus the parts alive at that phase's busiest moment
(``StageMemory.phases[name]``, bytes). Phases, in step order:

* ``rollout``: one no-grad forward micro-batch, the block logits of all rows, the sampler's
  buffers, the block KV cache (``rollout.cache``);
* ``reference``: the reference weights when offloaded (moved in for scoring), one no-grad ELBO
  micro-batch, the head's logits, the collected log-probs;
* ``policy``: the saved activations of the micro-batches whose graphs are alive (one pass: all
  local ones; two passes: one; 1F1B: the stage's in-flight ones), the head's softmax buffers, the
  backward's temporaries;
* ``optimizer``: Adam's temporaries (torch's per-tensor Adam on CPUs; fused on GPUs: none).

Resident: policy weights, fp32 gradient buffer (megatron DDP, ``grad_reduce_in_fp32``), Adam
states (two fp32 moments, plus fp32 main weights for bf16; divided by dp with the distributed
optimizer), the reference weights unless offloaded, and the framework allowance. With LoRA
(``model.lora``) the gradients and Adam states are the adapters' only, the adapters are resident
beside the frozen weights, and there is no reference copy (the reference is the base: the same
weights with the adapters off).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from rspo_mega.plan import activations as act
from rspo_mega.plan.shapes import ModelShapes, Workload


@dataclass(frozen=True)
class Allowance:
    """What the framework needs beyond tensors: ``fixed_bytes`` per rank (CUDA context, cuBLAS/TE
    workspaces, NCCL buffers) and ``fragmentation`` (share of a phase's transient bytes the caching
    allocator holds beyond them)."""

    fixed_bytes: int
    fragmentation: float


@dataclass
class StageMemory:
    """Bytes on one rank of pipeline stage ``stage``."""

    stage: int
    resident: dict[str, int]
    phases: dict[str, dict[str, int]] = field(default_factory=dict)

    def peak(self, phase: str) -> int:
        return sum(self.resident.values()) + sum(self.phases[phase].values())

    def peak_phase(self) -> tuple[str, int]:
        """(phase, bytes) of the largest peak."""
        name = max(self.phases, key=self.peak)
        return name, self.peak(name)

    def largest_parts(self, phase: str, n: int = 3) -> list[tuple[str, int]]:
        parts = {**self.resident, **self.phases[phase]}
        return sorted(parts.items(), key=lambda kv: -kv[1])[:n]


def optimizer_state_bytes(params: int, m: ModelShapes, w: Workload) -> int:
    """Adam moments (fp32) and, for bf16 weights, fp32 main weights; sharded over dp with the
    distributed optimizer."""
    per_param = 8 + (4 if m.param_bytes == 2 else 0)
    shards = w.dp if w.distributed_optimizer else 1
    return -(-params * per_param // shards)


def resident_parts(m: ModelShapes, w: Workload, stage: int, kind: str,
                   allowance: Allowance) -> dict[str, int]:
    """The parts held through the whole step on a rank of ``stage``."""
    params, trained = m.stage_params(stage), m.stage_trainable(stage)
    parts = {"policy weights": params * m.param_bytes, "gradients": trained * act.F32,
             "optimizer states": optimizer_state_bytes(trained, m, w)}
    if m.lora_rank:
        parts["adapters"] = trained * m.param_bytes
    elif w.reference_passes:
        offloaded = w.offload_reference and kind == "gpu"  # offload is a no-op on a CPU
        parts["reference model"] = 0 if offloaded else params * m.param_bytes
    parts["framework"] = allowance.fixed_bytes
    return parts


def _forward_transient(m: ModelShapes, rows: int, seq: int) -> float:
    """A no-grad forward micro-batch's layer peak (the head is counted by its caller)."""
    return rows * seq * act.forward_peak_per_token(m)


def rollout_parts(m: ModelShapes, w: Workload, stage: int, kind: str) -> dict[str, int]:
    """The rollout's peak: the forward of one micro-batch, or the sampler after all of them."""
    rows, seq, last = w.rollout_rows, w.seq_len, stage == m.pp - 1
    mb = min(rows, w.rollout_micro_batch)
    logits = rows * w.block_length * m.vocab_columns * act.F32 if last else 0
    head = act.head_forward_peak(m, mb * seq, mb * w.block_length, False) if last else 0
    forward = max(_forward_transient(m, mb, seq), head) + logits
    sampling = act.sampling_bytes(m, w.completions, w.block_length, w.sampled, kind == "cpu") \
        if last else 0
    sample = logits + max(logits, sampling)  # the micro-batches' logits are concatenated first
    parts = {"activations": forward - logits, "logits": logits, "sampling": 0.0}
    if sample > forward:
        parts = {"activations": 0.0, "logits": logits, "sampling": sample - logits}
    if w.cache != "none":
        parts["kv cache"] = act.kv_cache_bytes(m, rows, seq)
    return {k: int(v) for k, v in parts.items()}


def _elbo_io(w: Workload) -> float:
    """The ELBO runner's micro-batch inputs (ids and labels, int64) and the collected log-probs
    ``[N, S]`` fp32 (twice while they are concatenated)."""
    return w.sequences * w.seq_len * (2 * act.I64 + 2 * act.F32)


def reference_parts(m: ModelShapes, w: Workload, stage: int, kind: str) -> dict[str, int]:
    """Scoring the reference: one no-grad micro-batch (or the head's logits), plus the outputs."""
    if not w.reference_passes:
        return {}
    mb, seq, last = w.elbo_micro_batch, w.seq_len, stage == m.pp - 1
    head = act.head_forward_peak(m, mb * seq, w.scored_max, True) if last else 0
    parts = {"activations": _forward_transient(m, mb, seq), "logits": 0.0}
    if head > parts["activations"]:
        parts = {"activations": 0.0, "logits": head}
    parts["elbo inputs and log-probs"] = _elbo_io(w)
    if w.offload_reference and kind == "gpu" and not m.lora_rank:
        parts["reference model"] = m.stage_params(stage) * m.param_bytes
    return {k: int(v) for k, v in parts.items()}


def in_flight(m: ModelShapes, w: Workload, stage: int, vpp: int) -> float:
    """Micro-batches whose graphs a rank of ``stage`` holds at once, in units of the stage's
    layers (one pass: all; two passes: one; 1F1B: ``pp - stage``; interleaved 1F1B: megatron's
    warm-up count of model chunks, each ``1 / vpp`` of the stage's layers)."""
    n = w.elbo_micro_batches
    if w.one_pass:
        return float(n)
    if vpp > 1:
        chunks = min(n * vpp, (m.pp - stage - 1) * 2 + (vpp - 1) * m.pp + 1)
        return chunks / vpp
    return float(min(n, m.pp - stage))


def graph_bytes(m: ModelShapes, stage: int, rows: int, seq: int, positions: int,
                widest: int) -> dict[str, float]:
    """What autograd saves for one forward of ``rows`` x ``seq`` tokens on a rank of ``stage``:
    the layers' tensors, with the embedding's token ids (and, under TP, its out-of-shard mask)
    on the first stage (not with LoRA), and the head's at ``positions`` (flat) scored positions on the last,
    where the local spec's last layer runs its queries at ``rows x widest`` slots (``widest``:
    the most positions of one row) and the rest at the ``positions`` when ``widest < seq``."""
    tokens, last = rows * seq, stage == m.pp - 1
    # LoRA: no gradient flows into stage 0's first layer (the embedding is frozen)
    grads_in = [not (m.lora_rank and stage == 0 and i == 0) for i in range(m.layers_per_stage)]
    per_layer = [tokens * act.saved_per_token(m, g) for g in grads_in]
    head_tokens = tokens
    if last and m.impl == "local" and not m.sequence_parallel and 0 < widest < seq:
        head_tokens = positions  # the ELBO's flat positions: the layer's output rows
        per_layer[-1] = act.selected_layer_saved(m, tokens, rows * widest, positions,
                                                 grads_in[-1])
    layers = sum(per_layer) + sum(act.saved_per_layer_fixed(m, seq, g) for g in grads_in)
    if stage == 0 and not m.lora_rank:  # a frozen embedding saves no ids
        layers += tokens * (act.I64 + (1 if m.tp > 1 else 0))
    head = act.head_saved(m, head_tokens, positions) if last else 0.0
    return {"layers": layers, "head": head}


def saved_bytes(m: ModelShapes, w: Workload, stage: int, vpp: int) -> dict[str, float]:
    """Autograd's saved bytes for the policy's graphs alive at once on a rank of ``stage``."""
    widest = min(w.gen_length, w.scored_max)  # scored positions lie in the generated span
    one = graph_bytes(m, stage, w.elbo_micro_batch, w.seq_len, w.scored_max, widest)
    graphs = in_flight(m, w, stage, vpp)
    return {"elbo activations": graphs * one["layers"],
            "head": min(graphs, w.elbo_micro_batches) * one["head"]}


def policy_parts(m: ModelShapes, w: Workload, stage: int, vpp: int) -> dict[str, int]:
    """The policy passes' peak: the saved tensors of the graphs alive at once (and, between
    pipeline stages, the outputs the schedule keeps for their backward) plus the larger of the
    head's forward logits and the backward's temporaries."""
    saved = saved_bytes(m, w, stage, vpp)
    tokens, last = w.elbo_micro_batch * w.seq_len, stage == m.pp - 1
    backward = tokens * act.backward_peak_per_token(m) \
        + act.largest_weight(m, stage) * m.param_bytes
    head_fwd = w.scored_max * m.vocab_columns * act.F32 if last else 0
    parts = {"elbo activations": saved["elbo activations"], "logits": saved["head"] + head_fwd,
             "backward temporaries": max(backward - head_fwd, 0),
             "elbo inputs and log-probs": _elbo_io(w)}
    if w.old_policy_passes:  # fresh masks of a ratio loss: each later update's draw, scored
        parts["old-policy draws"] = w.old_policy_passes * w.sequences * w.seq_len * (
            2 * act.I64 + act.F32 + 2 + (act.F32 if last else 0))  # ids, labels, weights, masks
    if not last:
        parts["pipeline outputs"] = in_flight(m, w, stage, vpp) * tokens * m.hidden * m.param_bytes
    return {k: int(v) for k, v in parts.items()}


def _weights_in_order(m: ModelShapes, stage: int) -> list[int]:
    """Element counts of a stage's trained matrices in megatron's parameter-group order
    (embedding; per layer proj, QKV, fc1, fc2; output layer; with LoRA the adapters' only)."""
    if m.lora_rank:
        return m.adapter_matrices() * m.layers_per_stage
    h, hn = m.hidden, m.head_dim
    layer = [m.heads * hn * h // m.tp, (m.heads + 2 * m.groups) * hn * h // m.tp,
             2 * m.ffn * h // m.tp, m.ffn * h // m.tp]
    ends = m.vocab_shard * h
    return ([ends] if stage == 0 else []) + layer * m.layers_per_stage \
        + ([ends] if stage == m.pp - 1 else [])


def optimizer_parts(m: ModelShapes, stage: int, kind: str) -> dict[str, int]:
    """Adam's temporaries. torch's per-tensor AdamW (CPU) builds a weight's denominator from two
    fp32 temporaries while the previous weight's denominator is still bound; the fused GPU
    optimizers make none."""
    if kind != "cpu":
        return {"optimizer temporaries": 0}
    sizes = _weights_in_order(m, stage)
    peak = max(2 * b + a for a, b in zip([0] + sizes, sizes))
    return {"optimizer temporaries": peak * act.F32}


def stage_memory(m: ModelShapes, w: Workload, stage: int, kind: str, vpp: int,
                 allowance: Allowance) -> StageMemory:
    """Resident parts and every phase's parts (with the allocator's fragmentation share)."""
    mem = StageMemory(stage, resident_parts(m, w, stage, kind, allowance))
    phases = {"rollout": rollout_parts(m, w, stage, kind) if w.steps else {},
              "reference": reference_parts(m, w, stage, kind),
              "policy": policy_parts(m, w, stage, vpp),
              "optimizer": optimizer_parts(m, stage, kind)}
    for name, parts in phases.items():
        if not parts:
            continue
        moving = sum(v for k, v in parts.items() if k != "reference model")
        parts["fragmentation"] = int(allowance.fragmentation * moving)
        mem.phases[name] = parts
    return mem
