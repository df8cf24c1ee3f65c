"""Planned vs measured memory and step-time split of real RL steps on this CPU; prints one JSON.

Each case runs the production trainer (``rspo_mega.training.trainer.Trainer``, one process per
rank on gloo, one thread each) for four RSPO steps and, in the same processes, the plan of the
same resolved config (``rspo_mega.plan.plan_run`` on ``cpu`` hardware: no framework allowance,
rates measured here). Cases: the tiny default; a 51M-parameter model (10 layers, hidden 640, its
own random start) at TP1, TP2 and PP2 (coupled masks, K=1); the same at TP1 with K=4; the same at
TP1 with LoRA (``model.lora``: ESPO's recipe scaled to the width, r=16 and alpha 8 on the fused
QKV and fc1 linears, on a base the ranks first save and then start from as
``checkpoint.init_from``); the tiny model with the same LoRA settings and a small step (the test's
case, too small for RSS figures).

Memory, per rank, from RSS deltas:

* resident parts: the RSS growth of building the policy (after one throwaway build), wrapping
  it in DDP (fp32 gradient buffer), the first optimizer step (Adam's lazily created moments) and
  freezing the reference (with LoRA the adapters are built with the policy, and freezing the
  reference copies nothing);
* each phase of step 2 (rollout, reference scoring, policy passes, optimizer step): the peak RSS
  above the phase's start, read from ``VmHWM`` after resetting it (``/proc/self/clear_refs``).
  glibc serves every allocation over 64 KiB with its own mapping here (``mallopt``), so RSS
  follows the live tensors; a phase's peak is the resident parts plus that rise (the process's
  other memory, code and allocator state, is reported beside it);
* the policy passes' autograd-saved bytes (storages counted once, weights excluded);
* the step's peak: the largest phase peak, planned and measured (``step_peak``).

Time: each phase of steps 3-4 (allocator back to its fast setting) against the plan's seconds at
the GEMM rate measured on the model's shapes here and a stated efficiency of 0.5. The orders
must agree; phases under 2% of the measured step (timer noise) may come in any order among
themselves, below the others.

    python benchmarks/bench_plan.py [--cases tiny,50m_tp1,50m_tp2,50m_pp2,50m_k4,50m_lora,tiny_lora]
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import gc
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from typing import Any, Callable

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

COMMON = ["data.num_test_examples=0",
          "data.num_train_examples=64", "logging.tensorboard=false", "logging.progress_bar=false",
          "train_steps=100"]
M50 = ["model.num_layers=10", "model.hidden_size=640", "model.ffn_hidden_size=1792",
       "model.num_attention_heads=10", "global_batch_size=4",
       "rollout.group_size=4", "rollout.steps=4", "rollout.micro_batch_size=4",
       "rollout.confidence_threshold=null", "likelihood.mask_scheme=coupled", "likelihood.mask_sharing=completion",
       "likelihood.mc_samples=1", "likelihood.micro_batch_size=4",
       "checkpoint.init_from=null"]  # not the tiny default's shipped start: another geometry
# ESPO's LoRA recipe (r=128, alpha=64 on LLaDA-8B's width 4096) scaled to width 640
LORA = ["model.lora.enabled=true", "model.lora.rank=16", "model.lora.alpha=8",
        "model.lora.target_modules=[linear_qkv, linear_fc1]"]
CASES = {  # name -> (ranks, overrides of the tiny default)
    "tiny": (1, []),
    "50m_tp1": (1, M50),
    "50m_tp2": (2, M50 + ["parallel.tp=2"]),
    "50m_pp2": (2, M50 + ["parallel.pp=2"]),
    "50m_k4": (1, M50 + ["likelihood.mc_samples=4"]),
    "50m_lora": (1, M50 + LORA),
    "tiny_lora": (1, ["checkpoint.init_from=null", "global_batch_size=8", "rollout.steps=8",
                      "likelihood.micro_batch_size=8", *LORA]),  # tests/test_benchmarks.py
}
PHASES = ("rollout", "reference", "policy", "grad_sync", "optimizer")
EFFICIENCY = 0.5  # the stated share of the measured GEMM rate
MINOR = 0.02  # share of the measured step under which a phase's rank is timer noise
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # glibc mallopt parameters


class Probe:
    """This process's resident memory and its high-water mark (bytes)."""

    def __init__(self) -> None:
        self.libc = ctypes.CDLL("libc.so.6")

    @staticmethod
    def _status(key: str) -> int:
        with open("/proc/self/status") as f:
            return int(re.search(key + r":\s+(\d+)", f.read()).group(1)) * 1024

    def rss(self) -> int:
        return self._status("VmRSS")

    def hwm(self) -> int:
        return self._status("VmHWM")

    def settle(self) -> int:
        """Free what is garbage and reset the high-water mark; the RSS then. (The heap's freed
        small chunks stay resident, so reusing them in the next phase adds no pages.)"""
        gc.collect()
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return self.rss()

    def measuring(self, on: bool) -> None:
        """Own mappings for allocations over 64 KiB (RSS tracks tensors), or glibc's fast reuse."""
        self.libc.mallopt(M_MMAP_THRESHOLD, 64 * 1024 if on else 32 * 2**20)
        self.libc.mallopt(M_TRIM_THRESHOLD, 128 * 1024 if on else 2**30)


class SavedBytes:
    """Peak bytes of storages autograd saves for backward (each counted once, weights excluded)."""

    def __init__(self, excluded: set[int]) -> None:
        self.excluded, self.refs, self.sizes = excluded, defaultdict(int), {}
        self.live = self.peak = 0

    def _pack(self, t: torch.Tensor) -> Any:
        key = t.untyped_storage().data_ptr()
        if key in self.excluded or t.untyped_storage().nbytes() == 0:
            return t
        if not self.refs[key]:
            self.sizes[key] = t.untyped_storage().nbytes()
            self.live += self.sizes[key]
            self.peak = max(self.peak, self.live)
        self.refs[key] += 1
        return _Held(self, key, t)

    def release(self, key: int) -> None:
        self.refs[key] -= 1
        if not self.refs[key]:
            self.live -= self.sizes.pop(key)

    def hooks(self) -> Any:
        unpack = lambda h: h.tensor if isinstance(h, _Held) else h  # noqa: E731
        return torch.autograd.graph.saved_tensors_hooks(self._pack, unpack)


class _Held:
    def __init__(self, owner: SavedBytes, key: int, tensor: torch.Tensor) -> None:
        self.owner, self.key, self.tensor = owner, key, tensor

    def __del__(self) -> None:
        self.owner.release(self.key)


class Meter:
    """Wraps the trainer's phase calls: memory (step 2) or seconds (steps 3-4) of each."""

    def __init__(self, probe: Probe) -> None:
        self.probe, self.memory_step = probe, False
        self.memory: dict[str, dict] = {}
        self.seconds: dict[str, list[float]] = defaultdict(list)
        self.first_optimizer_growth = None
        self.saved: SavedBytes | None = None

    def wrap(self, name: str, fn: Callable) -> Callable:
        def run(*args: Any, **kwargs: Any) -> Any:
            first = name == "optimizer" and self.first_optimizer_growth is None
            start = self.probe.settle() if self.memory_step or first else 0
            hooks = self.saved.hooks() if (self.memory_step and name == "policy") \
                else contextlib.nullcontext()
            t0 = time.perf_counter()
            with hooks:
                out = fn(*args, **kwargs)
            dt = time.perf_counter() - t0
            if first:
                self.first_optimizer_growth = self.probe.rss() - start
            elif self.memory_step:
                self.memory[name] = {"start": start, "hwm": self.probe.hwm()}
            else:
                self.seconds[name].append(dt)
            return out
        return run


def _gemm_flops(m) -> float:
    """Best FLOP/s of torch matmuls with the model's shapes (one micro-batch of 512 tokens)."""
    best = 0.0
    for k, n in ((m.hidden, 2 * m.ffn // m.tp), (m.ffn // m.tp, m.hidden),
                 (m.hidden, (m.heads + 2 * m.groups) * m.head_dim // m.tp)):
        x, w = torch.randn(512, k), torch.randn(k, n)
        times = []
        for _ in range(8):
            t0 = time.perf_counter()
            x @ w
            times.append(time.perf_counter() - t0)
        best = max(best, 2 * 512 * k * n / sorted(times)[len(times) // 2])
    return best


def _rates(m) -> dict[str, float]:
    """GEMM rate, copy bandwidth, and (several ranks) gloo all-reduce bandwidth and latency."""
    src, dst = torch.randn(2**24), torch.empty(2**24)
    dst.copy_(src)  # first touch
    best = float("inf")
    for _ in range(5):  # the best copy: the machine is shared, the rate is what it can do
        t0 = time.perf_counter()
        dst.copy_(src)
        best = min(best, time.perf_counter() - t0)
    out = {"gemm_tflops": _gemm_flops(m) / 1e12, "memory_gbps": 2 * src.nbytes / best / 1e9,
           "link_gbps": 1.0, "latency_us": 0.0}
    world = torch.distributed.get_world_size()
    if world > 1:
        big, one = torch.randn(2**21), torch.zeros(1)
        torch.distributed.all_reduce(big)
        t0 = time.perf_counter()
        for _ in range(3):
            torch.distributed.all_reduce(big)
        bw = 3 * big.nbytes * 2 * (world - 1) / world / (time.perf_counter() - t0)
        t0 = time.perf_counter()
        for _ in range(20):
            torch.distributed.all_reduce(one)
        out.update(link_gbps=bw / 1e9, latency_us=(time.perf_counter() - t0) / 20 * 1e6)
    return out


def _build(cfg, layout, probe: Probe, record: dict):
    """The trainer, with the RSS growth of each resident part recorded."""
    import rspo_mega.training.policy as policy
    import rspo_mega.training.trainer as tr

    originals = {"build_chunks": tr.build_chunks, "wrap_ddp": policy.wrap_ddp}

    def measured(name: str, part: str) -> Callable:
        def run(*args: Any, **kwargs: Any) -> Any:
            before = probe.settle()
            record.setdefault("base", before)
            out = originals[name](*args, **kwargs)
            record[part] = probe.settle() - before
            return out
        return run

    policy.wrap_ddp = measured("wrap_ddp", "gradients")
    trainer = tr.Trainer(cfg, layout, build_model=measured("build_chunks", "policy weights"))
    policy.wrap_ddp = originals["wrap_ddp"]
    before = probe.settle()
    trainer.start_rl()
    record["reference model"] = probe.settle() - before
    return trainer


def _instrument(trainer, meter: Meter) -> None:
    import rspo_mega.training.policy as policy
    import rspo_mega.training.update_loop as update_loop

    engine, reference = trainer.batches.engine, trainer.policy.reference
    engine.generate = meter.wrap("rollout", engine.generate)
    reference.logprobs = meter.wrap("reference", reference.logprobs)
    update_loop.loss_backward = meter.wrap("policy", update_loop.loss_backward)
    policy.finish_grad_sync = meter.wrap("grad_sync", policy.finish_grad_sync)
    policy.optimizer_step = meter.wrap("optimizer", policy.optimizer_step)
    weights = [p for c in trainer.policy.model for p in c.parameters()] + reference.parameters()
    meter.saved = SavedBytes({p.untyped_storage().data_ptr() for p in weights})


def _compare(plan, record: dict, meter: Meter, stage: int) -> dict:
    """Planned vs measured bytes (resident parts, phase peaks) and seconds of one rank."""
    mem = plan.stages[stage]
    measured_resident = {"policy weights": record["policy weights"],
                         "gradients": record["gradients"],
                         "optimizer states": meter.first_optimizer_growth,
                         "reference model": record["reference model"]}
    planned_resident = _planned_resident(mem.resident)
    resident = {k: {"planned": planned_resident[k], "measured": v,
                    "ratio": round(planned_resident[k] / max(v, 1), 3)}
                for k, v in measured_resident.items()}
    held = sum(planned_resident.values())
    held_measured = sum(measured_resident.values())
    phases = {}
    for name, m in meter.memory.items():
        if name not in mem.phases:
            continue
        planned_t = sum(mem.phases[name].values())
        measured_t = m["hwm"] - m["start"]
        peak = held_measured + measured_t  # the parts' RSS deltas: resident ones + the phase's
        phases[name] = {"planned_transient": planned_t, "measured_transient": measured_t,
                        "transient_ratio": round(planned_t / max(measured_t, 1), 3),
                        "planned_peak": held + planned_t, "measured_peak": peak,
                        "peak_ratio": round((held + planned_t) / max(peak, 1), 3),
                        "rss_above_base": m["hwm"] - record["base"],
                        "other_process_memory": m["hwm"] - record["base"] - peak}
    from rspo_mega.plan.memory import saved_bytes

    planned_saved = sum(saved_bytes(plan.shapes, plan.work, stage, 1).values())
    phases["policy"]["planned_saved"] = int(planned_saved)
    phases["policy"]["measured_saved"] = meter.saved.peak
    phases["policy"]["saved_ratio"] = round(planned_saved / max(meter.saved.peak, 1), 3)
    return {"resident": resident, "phases": phases, "step_peak": _step_peak(phases),
            "time": _times(plan, meter)}


def _planned_resident(parts: dict[str, int]) -> dict[str, int]:
    """The plan's resident parts as this benchmark measures them: no framework allowance, the
    LoRA adapters within the policy's build, and a reference copy of 0 bytes where there is
    none (LoRA: the reference is the base)."""
    out = {k: v for k, v in parts.items() if k not in ("framework", "adapters")}
    out["policy weights"] += parts.get("adapters", 0)
    out.setdefault("reference model", 0)
    return out


def _step_peak(phases: dict[str, dict]) -> dict:
    """The step's peak: the largest phase peak, planned and measured (bytes), and their ratio."""
    planned = max(p["planned_peak"] for p in phases.values())
    measured = max(p["measured_peak"] for p in phases.values())
    return {"planned": planned, "measured": measured, "ratio": round(planned / max(measured, 1), 3),
            "planned_phase": max(phases, key=lambda n: phases[n]["planned_peak"]),
            "measured_phase": max(phases, key=lambda n: phases[n]["measured_peak"])}


def _ranked(seconds: dict[str, float]) -> list[str]:
    return sorted(seconds, key=lambda p: -seconds[p])


def _times(plan, meter: Meter) -> dict:
    """Each phase's seconds, planned and measured, and whether the plan ranks them alike.

    Phases under ``MINOR`` of the measured step are timer noise: they may come in any order
    among themselves, but the plan must rank them below all the others.
    """
    measured = {p: sum(meter.seconds[p]) / max(len(meter.seconds[p]), 1) for p in PHASES}
    planned = {p: plan.times[p].seconds for p in PHASES}
    major = [p for p in _ranked(measured) if measured[p] >= MINOR * sum(measured.values())]
    p_order = _ranked(planned)
    same = p_order[:len(major)] == major
    return {"planned_s": {k: round(v, 4) for k, v in planned.items()},
            "measured_s": {k: round(v, 4) for k, v in measured.items()},
            "planned_order": p_order, "measured_order": _ranked(measured),
            "ranked_phases": major, "same_order": same}


def _run_steps(trainer, meter: Meter, probe: Probe) -> None:
    """Step 1 creates Adam's moments; step 2 is measured for memory; steps 3-4 for time."""
    trainer.train_step()
    meter.memory_step = True
    trainer.train_step()
    meter.memory_step = False
    probe.measuring(False)
    meter.seconds.clear()
    for _ in range(2):
        trainer.train_step()


def _cpu_hardware(world: int, rates: dict):
    from rspo_mega.plan import Hardware

    return Hardware(kind="cpu", gpus_per_node=world, nodes=1, memory_gib=1024.0,
                    gemm_tflops=rates["gemm_tflops"], efficiency=EFFICIENCY,
                    memory_gbps=rates["memory_gbps"], nvlink_gbps=rates["link_gbps"],
                    network_gbps=rates["link_gbps"], latency_us=rates["latency_us"],
                    framework_gib=0.0, fragmentation=0.0)


def _first_build(cfg, base_dir: str | None) -> None:
    """A process's first model build leaves ~7 MB of imports and allocator state behind (later
    builds grow RSS by their weights alone): build one and drop it. With ``base_dir`` (LoRA),
    its weights are saved there first: the base the run starts from (adapters are not read)."""
    from rspo_mega.models.llada.checkpoint import save_model
    from rspo_mega.training.builder import build_chunks

    chunks = build_chunks(cfg)
    if base_dir is not None:
        save_model(chunks[0], base_dir)
    del chunks[:]


def worker(case: str, out_dir: str) -> None:
    """One rank of ``case``: build, run four steps, plan, write the comparison into ``out_dir``
    (shared by the ranks: rank 0 trains the tokenizer there)."""
    torch.set_num_threads(1)
    from megatron.core import parallel_state as ps

    from rspo_mega.setup import load_run_config, validate_run
    from rspo_mega.parallel import (
        destroy_parallel, initialize_distributed, initialize_model_parallel,
    )
    from rspo_mega.plan import plan_run
    from rspo_mega.plan.shapes import model_shapes
    from rspo_mega.config.paths import TINY_DEFAULT

    probe, record = Probe(), {}
    probe.measuring(True)
    overrides = COMMON + CASES[case][1] + [f"logging.output_dir={out_dir}"]
    base_dir = os.path.join(out_dir, "base")  # LoRA: the base the adapters train on
    lora = "model.lora.enabled=true" in overrides
    cfg = load_run_config(TINY_DEFAULT, overrides + ([f"checkpoint.init_from={base_dir}"] * lora))
    layout = validate_run(cfg, world_size=int(os.environ["WORLD_SIZE"]))
    initialize_distributed(backend="gloo")
    initialize_model_parallel(tp=cfg.parallel.tp, pp=cfg.parallel.pp)
    _first_build(cfg, base_dir if lora else None)
    trainer = _build(cfg, layout, probe, record)
    meter = Meter(probe)
    _instrument(trainer, meter)
    _run_steps(trainer, meter, probe)
    rates = _rates(model_shapes(cfg, "local"))
    plen = max(len(e.prompt_ids) for e in trainer.data.train)
    plan = plan_run(cfg, _cpu_hardware(layout.world_size, rates), prompt_length=plen)
    stage = ps.get_pipeline_model_parallel_rank()
    result = {"rank": int(os.environ["RANK"]), "stage": stage, "rates": rates,
              "params": sum(p.numel() for c in trainer.policy.model for p in c.parameters()),
              **_compare(plan, record, meter, stage)}
    with open(os.path.join(out_dir, f"rank{result['rank']}.json"), "w") as f:
        json.dump(result, f)
    destroy_parallel()


def run_case(case: str, timeout: float = 900.0) -> list[dict]:
    """Start the ranks of ``case`` (each its own process), wait for all, return their results."""
    from rspo_mega.parallel.runtime import free_port

    ranks, _ = CASES[case]
    port = free_port()
    with tempfile.TemporaryDirectory() as tmp:
        procs, outs = [], []
        for rank in range(ranks):
            env = dict(os.environ, RANK=str(rank), WORLD_SIZE=str(ranks), LOCAL_RANK=str(rank),
                       LOCAL_WORLD_SIZE=str(ranks), MASTER_ADDR="127.0.0.1",
                       MASTER_PORT=str(port), OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
            outs.append(os.path.join(tmp, f"rank{rank}.json"))
            procs.append(subprocess.Popen([sys.executable, __file__, "--worker", case,
                                           "--out", tmp], env=env))
        try:
            for p in procs:
                if p.wait(timeout=timeout):
                    raise RuntimeError(f"{case}: a rank exited with code {p.returncode}")
        finally:
            for p in procs:
                if p.poll() is None:
                    p.kill()
                    p.wait()
        results = []
        for path in outs:
            with open(path) as f:
                results.append(json.load(f))
    return results


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cases", default=",".join(CASES))
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--out", default=None, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.worker:
        worker(a.worker, a.out)
        return
    results = {case: run_case(case) for case in a.cases.split(",")}
    print(json.dumps({"benchmark": "plan_vs_measured", "threads_per_rank": 1,
                      "efficiency": EFFICIENCY, "cases": results}, indent=1))


if __name__ == "__main__":
    main()
