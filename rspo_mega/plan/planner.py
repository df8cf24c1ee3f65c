"""The plan of a run on a cluster: memory per stage and phase, time per phase, and what fits.

:func:`plan_run` validates the config for the cluster's world size (the same
:func:`~rspo_mega.setup.validate_run` a launch runs), reads the model's shapes through the
model builder's functions and returns a :class:`Plan`. :func:`fixes` finds single (then paired)
config changes that make a plan fit; :func:`search` ranks the layouts that fit by throughput.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
from dataclasses import dataclass
from typing import Any, Iterable, Optional

from rspo_mega.config import ConfigError, Layout, TrainConfig
from rspo_mega.config.validate import check_layer_spec
from rspo_mega.plan.hardware import Hardware
from rspo_mega.plan.memory import StageMemory, stage_memory
from rspo_mega.plan.shapes import ModelShapes, Workload, model_shapes, planned_impl, workload
from rspo_mega.plan.timing import PhaseTime, step_times


@dataclass
class Plan:
    """Memory (per pipeline stage, the busiest TP rank) and time (per phase) of one RL step."""

    cfg: TrainConfig
    layout: Layout
    hardware: Hardware
    shapes: ModelShapes
    work: Workload
    stages: list[StageMemory]
    times: dict[str, PhaseTime]

    @property
    def step_s(self) -> float:
        return sum(t.seconds for t in self.times.values())

    @property
    def completions_per_s(self) -> float:
        return self.cfg.global_batch_size / self.step_s if self.step_s > 0 else float("inf")

    def over(self) -> list[StageMemory]:
        """Stages whose peak exceeds the memory of a rank."""
        return [s for s in self.stages if s.peak_phase()[1] > self.hardware.capacity_bytes]

    @property
    def fits(self) -> bool:
        return not self.over()

    def stage_ranks(self, stage: int) -> range:
        """Global ranks of pipeline stage ``stage`` (megatron's order: pp outermost)."""
        per_stage = self.layout.world_size // self.shapes.pp
        return range(stage * per_stage, (stage + 1) * per_stage)


def with_overrides(cfg: TrainConfig, changes: dict[str, Any]) -> TrainConfig:
    """``cfg`` with dotted keys replaced (``{"parallel.tp": 2}``); sections copied, not shared."""
    for key, value in changes.items():
        head, _, rest = key.partition(".")
        if rest:
            value = with_overrides(getattr(cfg, head), {rest: value})
        cfg = dataclasses.replace(cfg, **{head: value})
    return cfg


def plan_run(cfg: TrainConfig, hardware: Hardware, prompt_length: Optional[int] = None) -> Plan:
    """Plan ``cfg`` on ``hardware`` (raises ``ConfigError`` naming a bad key or option)."""
    hardware.check()
    from rspo_mega.setup import validate_run  # megatron-core: after the CLI hides its warnings

    planned = (f"the plan is for {{world}} ranks ({hardware.nodes} nodes x "
               f"{hardware.gpus_per_node}); set parallel.world_size={{world}} (or null)")
    layout = validate_run(cfg, world_size=hardware.world, world_source=planned)
    impl = planned_impl(cfg, hardware.kind)
    check_layer_spec(cfg, impl, keys=("parallel.sequence_parallel",))  # it changes the memory
    shapes = model_shapes(cfg, impl)
    work = workload(cfg, layout, prompt_length)
    vpp = cfg.parallel.vpp or 1
    stages = [stage_memory(shapes, work, s, hardware.kind, vpp, hardware.allowance())
              for s in range(shapes.pp)]
    times = step_times(shapes, work, hardware.rates(shapes, layout.dp))
    return Plan(cfg, layout, hardware, shapes, work, stages, times)


def candidate_changes(plan: Plan) -> list[dict[str, Any]]:
    """Single config changes that lower some rank's memory, in the order they are tried."""
    cfg, w, m, hw = plan.cfg, plan.work, plan.shapes, plan.hardware
    out: list[dict[str, Any]] = []
    if w.reference_passes and not w.offload_reference and hw.kind == "gpu" and not m.lora_rank:
        out.append({"likelihood.offload_reference": True})  # LoRA: no reference copy to move
    if w.dp > 1 and not w.distributed_optimizer:
        out.append({"optimizer.use_distributed_optimizer": True})
    if w.one_pass:
        out.append({"likelihood.one_pass": False})
    if cfg.likelihood.micro_batch_size > 1:
        out.append({"likelihood.micro_batch_size": cfg.likelihood.micro_batch_size // 2})
    if cfg.rollout.micro_batch_size > 1:
        out.append({"rollout.micro_batch_size": cfg.rollout.micro_batch_size // 2})
    out.append({"parallel.pp": m.pp * 2})
    if m.tp * 2 <= hw.gpus_per_node:
        out.append({"parallel.tp": m.tp * 2})
    return out


def _try(cfg: TrainConfig, hw: Hardware, changes: dict[str, Any],
         prompt_length: Optional[int]) -> Optional[Plan]:
    """The plan with ``changes`` applied, or None where the config or layout becomes invalid."""
    try:
        return plan_run(with_overrides(cfg, changes), hw, prompt_length)
    except (ConfigError, ValueError):
        return None


def fixes(plan: Plan, prompt_length: Optional[int] = None,
          limit: int = 3) -> list[tuple[dict, Plan]]:
    """Changes that make ``plan`` fit, fastest first: single ones, else pairs of them."""
    singles = candidate_changes(plan)
    found: list[tuple[dict, Plan]] = []
    for group in (singles, [{**a, **b} for a, b in itertools.combinations(singles, 2)]):
        for changes in group:
            p = _try(plan.cfg, plan.hardware, changes, prompt_length)
            if p is not None and p.fits:
                found.append((changes, p))
        if found:
            break
    found.sort(key=lambda item: -item[1].completions_per_s)
    return found[:limit]


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def search_space(cfg: TrainConfig, hw: Hardware) -> Iterable[dict[str, Any]]:
    """Layouts and options to try: TP within a node, PP dividing the layers, micro-batch sizes,
    one or two ELBO passes, reference offload (not with LoRA: the reference is the base, no
    copy), distributed optimizer. The config's ``model.lora`` stays as it is: with LoRA on, each
    layout is planned with the adapters' gradients and Adam state and a frozen base. (With
    ``algorithm.centering=microbatch`` its chunk shrinks to a divisor of a rank's completions
    where it must.)"""
    world, gbs = hw.world, cfg.global_batch_size
    lik_mbs = sorted({1, 2, 4, 8, 16, 32, cfg.likelihood.micro_batch_size})
    roll_mbs = sorted({4, 8, 16, 32, 64, cfg.rollout.micro_batch_size})
    offload = (False, True) if hw.kind == "gpu" and not cfg.model.lora.enabled else (False,)
    for tp in [t for t in _divisors(world) if t <= hw.gpus_per_node]:
        for pp in _divisors(world // tp):
            passes = (True, False) if pp == 1 else (False,)
            for lm, rm, one, off, dist in itertools.product(lik_mbs, roll_mbs, passes, offload,
                                                            (False, True)):
                if dist and world // (tp * pp) == 1:
                    continue
                dp = world // (tp * pp)
                chunk = cfg.algorithm.microbatch_completions
                chunk = math.gcd(chunk, gbs // dp) if gbs % dp == 0 else chunk
                yield {"parallel.tp": tp, "parallel.pp": pp, "parallel.vpp": None,
                       "algorithm.microbatch_completions": chunk,
                       "parallel.world_size": world, "likelihood.micro_batch_size": lm,
                       "rollout.micro_batch_size": rm, "likelihood.one_pass": one,
                       "likelihood.offload_reference": off,
                       "optimizer.use_distributed_optimizer": dist}


def _estimate_key(p: Plan) -> tuple:
    """Plans alike but for micro-batch sizes that leave the estimated time unchanged."""
    w = p.work
    return (p.shapes.tp, p.shapes.pp, w.one_pass, w.offload_reference, w.distributed_optimizer,
            round(p.step_s, 6))


def search(cfg: TrainConfig, hw: Hardware, prompt_length: Optional[int] = None,
           top: int = 10) -> list[Plan]:
    """The ``top`` fitting plans of :func:`search_space`, highest throughput first.

    The estimate takes one efficiency for every GEMM size, so larger micro-batches rarely change
    its time; of plans alike but for that, the one with the largest micro-batches is kept (on a
    GPU they run closer to the GEMM rate).
    """
    best: dict[tuple, Plan] = {}
    for changes in search_space(cfg, hw):
        p = _try(cfg, hw, changes, prompt_length)
        if p is None or not p.fits:
            continue
        key, sizes = _estimate_key(p), (p.work.elbo_micro_batch, p.work.rollout_micro_batch)
        kept = best.get(key)
        if kept is None or sizes > (kept.work.elbo_micro_batch, kept.work.rollout_micro_batch):
            best[key] = p
    plans = sorted(best.values(),
                   key=lambda p: (-p.completions_per_s, max(s.peak_phase()[1] for s in p.stages)))
    return plans[:top]
