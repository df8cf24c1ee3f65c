"""A :class:`~rspo_mega.plan.planner.Plan` as a table (``rspo-plan``) or as JSON (``--json``)."""

from __future__ import annotations

from typing import Any, Optional

from rspo_mega.plan.hardware import GIB
from rspo_mega.plan.planner import Plan
from rspo_mega.plan.timing import PHASES

PHASE_TITLES = {"rollout": "rollout", "reference": "reference scoring",
                "policy": "policy passes", "grad_sync": "DP gradient sync",
                "optimizer": "optimizer step"}


def _unit(plan: Plan) -> tuple[str, int]:
    """GiB, or MiB when no rank's peak reaches 1 GiB."""
    peak = max(s.peak_phase()[1] for s in plan.stages)
    return ("GiB", GIB) if peak >= GIB else ("MiB", 2**20)


def _ranks(r: range) -> str:
    return f"{r.start}" if len(r) == 1 else f"{r.start}-{r.stop - 1}"


def training(plan: Plan) -> str:
    """What trains: every weight (with a reference copy where the loss needs one), or LoRA
    adapters on a frozen base that is also the reference."""
    lora = plan.cfg.model.lora
    if not lora.enabled:
        return "full fine-tuning (every weight trains; a reference is a copy)"
    return (f"LoRA r={lora.rank} alpha {lora.alpha:g} on {', '.join(lora.target_modules)} "
            "(adapters train; the frozen base is the reference, no copy)")


def header(plan: Plan) -> list[str]:
    """The cluster, the layout, the model, what trains and the step's sizes in four lines."""
    hw, m, lay, w = plan.hardware, plan.shapes, plan.layout, plan.work
    passes = "one pass" if w.one_pass else "two passes"
    return [
        f"{lay.world_size} ranks = {hw.nodes} node(s) x {hw.gpus_per_node} {hw.kind}, "
        f"{hw.memory_gib:.1f} GiB each; tp={m.tp} pp={m.pp} dp={lay.dp}",
        f"model: {m.total_params() / 1e9:.3f} B parameters, {m.layers} layers, hidden {m.hidden}, "
        f"ffn {m.ffn}, {m.heads} heads / {m.groups} groups, vocab {m.vocab} (padded "
        f"{m.padded_vocab}), {'bf16' if m.param_bytes == 2 else 'fp32'}, {m.impl} spec",
        f"training: {training(plan)}",
        f"step per rank: {w.completions} completions, prompt {w.prompt_length} + gen "
        f"{w.gen_length} tokens, {w.steps} denoising steps, cache={w.cache}; ELBO {w.sequences} "
        f"masked sequences in micro-batches of {w.elbo_micro_batch} ({passes})",
    ]


def memory_table(plan: Plan) -> list[str]:
    """Resident parts, then each phase's parts and peak, one column per pipeline stage."""
    unit, div = _unit(plan)

    def row(title: str, values: list[float]) -> str:
        return f"{title:34s}" + "".join(f"{v / div:24.2f}" for v in values)

    cols = [f"stage {s.stage} (ranks {_ranks(plan.stage_ranks(s.stage))})" for s in plan.stages]
    lines = [f"{f'memory per rank ({unit})':34s}" + "".join(f"{c:>24s}" for c in cols)]
    for part in plan.stages[0].resident:
        lines.append(row(f"  {part}", [s.resident.get(part, 0) for s in plan.stages]))
    for phase in plan.stages[0].phases:
        lines.append(f"  phase {PHASE_TITLES[phase]}:")
        for part in plan.stages[0].phases[phase]:
            if not any(s.phases[phase].get(part, 0) for s in plan.stages):
                continue  # not alive at this phase's peak on any stage
            lines.append(row(f"    + {part}", [s.phases[phase].get(part, 0) for s in plan.stages]))
        lines.append(row("    = peak", [s.peak(phase) for s in plan.stages]))
    cap = plan.hardware.capacity_bytes
    verdict = []
    for s in plan.stages:
        phase, peak = s.peak_phase()
        verdict.append(f"{'fits' if peak <= cap else 'OVER'} ({phase} {peak / div:.1f})")
    lines.append(f"  {'verdict':32s}" + "".join(f"{v:>24s}" for v in verdict))
    return lines


def time_table(plan: Plan) -> list[str]:
    """FLOPs, compute and communication seconds of each phase, and the step's throughput."""
    hw = plan.hardware
    lines = [f"time per step on the busiest rank, at {hw.efficiency:.0%} of {hw.gemm_tflops:g} "
             f"TFLOP/s (TP/PP/DP bytes sent per rank):",
             f"  {'phase':20s}{'TFLOP':>10s}{'compute s':>11s}{'comm s':>9s}{'total s':>9s}"
             f"{'share':>7s}{'TP GB':>9s}{'PP GB':>8s}{'DP GB':>8s}"]
    total = plan.step_s or 1.0
    for name in PHASES:
        t = plan.times[name]
        b = t.comm_bytes
        lines.append(f"  {PHASE_TITLES[name]:20s}{t.flops / 1e12:10.2f}{t.compute_s:11.3f}"
                     f"{t.comm_s:9.3f}{t.seconds:9.3f}{t.seconds / total:7.1%}"
                     f"{b['tp'] / 1e9:9.2f}{b['pp'] / 1e9:8.2f}{b['dp'] / 1e9:8.2f}")
    w = plan.work
    lines.append(f"  step {plan.step_s:.2f} s: {plan.completions_per_s:.2f} completions/s, "
                 f"{plan.completions_per_s * w.gen_length:.0f} generated tokens/s "
                 "(rollouts as the exact schedule: every step runs)")
    return lines


def text(plan: Plan) -> str:
    return "\n".join(header(plan) + [""] + memory_table(plan) + [""] + time_table(plan))


def search_table(plans: list[Plan], lora: bool = False) -> str:
    """A title saying whether the layouts are LoRA or full fine-tuning ones, then one line per
    fitting layout, fastest first (``lora``: the config's ``model.lora.enabled``, for the title
    when none fits)."""
    kind = training(plans[0]) if plans else ("LoRA" if lora else "full fine-tuning")
    if not plans:
        return f"no layout fits ({kind})"
    lines = [f"layouts that fit, fastest first, {kind}:",
             f"{'tp':>3s}{'pp':>4s}{'dp':>4s}{'elbo mbs':>9s}{'roll mbs':>9s}{'passes':>7s}"
             f"{'offload':>8s}{'dist opt':>9s}{'peak GiB':>10s}{'step s':>9s}{'compl/s':>9s}"]
    for p in plans:
        c, m = p.cfg, p.shapes
        peak = max(s.peak_phase()[1] for s in p.stages) / GIB
        lines.append(f"{m.tp:3d}{m.pp:4d}{p.layout.dp:4d}{p.work.elbo_micro_batch:9d}"
                     f"{c.rollout.micro_batch_size:9d}{1 if p.work.one_pass else 2:7d}"
                     f"{'-' if c.model.lora.enabled else str(c.likelihood.offload_reference):>8s}"
                     f"{str(c.optimizer.use_distributed_optimizer):>9s}{peak:10.1f}"
                     f"{p.step_s:9.2f}{p.completions_per_s:9.2f}")
    return "\n".join(lines)


def _stage_json(plan: Plan, s) -> dict[str, Any]:
    ranks = plan.stage_ranks(s.stage)
    phase, peak = s.peak_phase()
    return {"stage": s.stage, "ranks": [ranks.start, ranks.stop - 1],
            "resident_bytes": s.resident,
            "phases": {name: {"parts_bytes": parts, "peak_bytes": s.peak(name)}
                       for name, parts in s.phases.items()},
            "peak_phase": phase, "peak_bytes": peak,
            "fits": peak <= plan.hardware.capacity_bytes}


def _lora_json(plan: Plan) -> Optional[dict[str, Any]]:
    """``model.lora`` and the adapters' parameters per rank of each stage (None without LoRA)."""
    lora, m = plan.cfg.model.lora, plan.shapes
    if not lora.enabled:
        return None
    return {"rank": lora.rank, "alpha": lora.alpha, "target_modules": list(lora.target_modules),
            "trained_parameters_per_rank": [m.stage_trainable(s) for s in range(m.pp)]}


def to_json(plan: Plan) -> dict[str, Any]:
    """The plan as plain data (bytes, FLOPs, seconds)."""
    hw = plan.hardware
    return {
        "hardware": {k: getattr(hw, k) for k in hw.__dataclass_fields__},
        "layout": {"world_size": plan.layout.world_size, "tp": plan.shapes.tp,
                   "pp": plan.shapes.pp, "dp": plan.layout.dp},
        "model": {"parameters": plan.shapes.total_params(), "impl": plan.shapes.impl,
                  "param_bytes": plan.shapes.param_bytes, "training": training(plan),
                  "lora": _lora_json(plan)},
        "workload": {k: getattr(plan.work, k) for k in plan.work.__dataclass_fields__},
        "stages": [_stage_json(plan, s) for s in plan.stages],
        "time": {"phases": {n: {"flops": t.flops, "compute_s": t.compute_s, "comm_s": t.comm_s,
                                "seconds": t.seconds, "comm_bytes": t.comm_bytes}
                            for n, t in plan.times.items()},
                 "step_s": plan.step_s, "completions_per_s": plan.completions_per_s},
        "fits": plan.fits,
    }
