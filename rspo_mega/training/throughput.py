"""Model FLOPs of each step by phase, model TFLOP/s per device and MFU.

The count is the planner's (:func:`rspo_mega.plan.timing.step_times`): matmul FLOPs (2 per
multiply-add) of the layers, of the bidirectional attention and of the head at the positions it
runs on, a backward twice its forward. It is taken for one whole model replica (``tp = pp = 1``:
no pipeline padding, no TP split) on each data-parallel rank's batch, at the batch's prompt
length, and summed over the data-parallel ranks. Per step and phase (the planner's names):

* ``rollout``: the denoising forwards of the exact schedule, times the share of the scheduled
  steps the rows ran (``rollout_steps / rollout.steps``: threshold decoding and rows that ended
  run fewer); with the block KV cache the planner's cached geometry is scaled alike;
* ``policy``: the ELBO forward and backward (AGRPO: its sampled rollout steps) of every inner
  update, and the scoring forward of runs that take two passes;
* ``reference``: the reference model's scoring forwards.

``tflops_per_device`` = the step's FLOPs / ``step_seconds`` / world size / 1e12 (so TP and PP
ranks, which each run part of a replica, share it); ``mfu`` = that / the device's peak:
``logging.peak_tflops``, else the GPU's bf16 peak by name
(:func:`rspo_mega.plan.hardware.peak_tflops`), else none (CPUs, unknown GPUs).
"""

from __future__ import annotations

import logging
from dataclasses import replace
from typing import TYPE_CHECKING, Optional

import torch

from rspo_mega.config import Layout, TrainConfig
from rspo_mega.parallel.reductions import data_parallel_group, global_sums
from rspo_mega.plan.hardware import peak_tflops
from rspo_mega.plan.shapes import ModelShapes, Workload, model_shapes, planned_impl, workload
from rspo_mega.plan.timing import Rates, step_times

if TYPE_CHECKING:
    from rspo_mega.training.batch_sources import StepBatch

log = logging.getLogger(__name__)

PHASES = ("rollout", "policy", "reference")
_COUNT_ONLY = Rates(flops=1.0, memory_bytes_s=1.0, tp_bytes_s=1.0, pp_bytes_s=1.0, dp_bytes_s=1.0,
                    latency_s=0.0, optimizer_bytes_per_param=0.0)  # the FLOPs do not use rates


def replica_shapes(cfg: TrainConfig) -> ModelShapes:
    """The policy's shapes as one device holding the whole model (``tp = pp = 1``)."""
    kind = "gpu" if torch.cuda.is_available() else "cpu"
    whole = replace(cfg.parallel, tp=1, pp=1, vpp=None, sequence_parallel=False)
    return model_shapes(replace(cfg, parallel=whole), planned_impl(cfg, kind))


def replica_flops(shapes: ModelShapes, work: Workload, rollout_share: float) -> dict[str, float]:
    """FLOPs by phase of one replica's step on ``work`` (one data-parallel rank's batch), the
    rollout's scaled by the share of its scheduled denoising steps that ran."""
    times = step_times(shapes, work, _COUNT_ONLY)
    return {"rollout": times["rollout"].flops * rollout_share,
            "policy": times["policy"].flops, "reference": times["reference"].flops}


def device_peak_tflops(cfg: TrainConfig) -> Optional[float]:
    """``logging.peak_tflops``, else the bf16 peak of this rank's GPU when its name is known."""
    if cfg.logging.peak_tflops is not None:
        return cfg.logging.peak_tflops
    if not torch.cuda.is_available():
        return None
    name = torch.cuda.get_device_name()
    peak = peak_tflops(name)
    if peak is None:
        log.info("no known peak TFLOP/s for %r: set logging.peak_tflops for MFU", name)
    return peak


class Throughput:
    """Per step: model TFLOP by phase, TFLOP/s per device and MFU; over the run: their totals."""

    def __init__(self, cfg: TrainConfig, layout: Layout) -> None:
        self.shapes = replica_shapes(cfg)
        self.work = workload(cfg, layout)
        self.gen_length, self.steps = cfg.rollout.gen_length, cfg.rollout.steps
        self.world = layout.world_size
        self.peak = device_peak_tflops(cfg)
        self.flops = 0.0  # all steps of this process, all devices
        self.seconds = 0.0

    def step_metrics(self, batch: "StepBatch", seconds: float) -> dict[str, float]:
        """The figures of one step that took ``seconds`` (collective over the DP group)."""
        prompt = batch.completions.input_ids.shape[1] - self.gen_length
        share = batch.metrics.get("rollout_steps", 0.0) / self.steps
        local = replica_flops(self.shapes, replace(self.work, prompt_length=prompt), share)
        total = global_sums(torch.tensor([local[p] for p in PHASES], dtype=torch.float64),
                            data_parallel_group()).tolist()
        out = {f"model_tflop/{p}": v / 1e12 for p, v in zip(PHASES, total)}
        self.flops += sum(total)
        self.seconds += seconds
        out.update(self._rates(sum(total), seconds))
        return out

    def _rates(self, flops: float, seconds: float) -> dict[str, float]:
        if seconds <= 0:
            return {}
        tflops = flops / seconds / self.world / 1e12
        out = {"tflops_per_device": tflops}
        if self.peak is not None:
            out["mfu"] = tflops / self.peak
        return out

    def summary(self) -> dict[str, float]:
        """``throughput/``: TFLOP/s per device and MFU over every step of this process, and the
        peak they were measured against."""
        out = {f"throughput/{k}": v for k, v in self._rates(self.flops, self.seconds).items()}
        if out and self.peak is not None:
            out["throughput/peak_tflops"] = self.peak
        return out
