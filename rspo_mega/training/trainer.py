"""The trainer of one run, RL (prompts -> rollouts -> rewards -> advantages -> ELBOs -> loss ->
update) or masked-diffusion SFT.

One :class:`Trainer` per process (``torchrun`` rank), made of parts that each do one thing:

* a batch source (:mod:`step_batches`): RL rollouts with rewards and group advantages, or SFT
  examples with their reference answers, as one :class:`StepBatch` per step;
* the :class:`UpdateLoop`: shared masks, reference log-probs and the ``mu`` inner updates;
* the :class:`Policy`: DDP chunks, optimizer, LR scheduler, frozen reference, one update;
* the :class:`Evaluator`: held-out reward and accuracy (also used by ``rspo-eval``);
* checkpoints: the run's stateful parts (:meth:`Trainer.parts`) in one
  :class:`CheckpointManager`, which saves them and loads them back in one loop; metrics and
  preemption handling.

SFT and RL are separate runs: an RL run starts from an SFT run's weights through
``checkpoint.init_from`` (its ``save_dir``, one of its checkpoints, or that policy exported to
an HF directory).
"""

from __future__ import annotations

import logging
import time
from functools import partial
from pathlib import Path
from typing import Any, Callable, Optional

import torch

from rspo_mega.algorithms import is_rl, needs_reference
from rspo_mega.config import Layout, TrainConfig, config_to_dict
from rspo_mega.likelihood import run_estimator
from rspo_mega.parallel.bounded_barrier import wait_for_ranks
from rspo_mega.rollout import RolloutEngine
from rspo_mega.training.builder import build_chunks, setup_parallel
from rspo_mega.training.checkpoint.compat import check_resume, lora_base_record
from rspo_mega.training.checkpoint.init_from import prepare_init
from rspo_mega.training.checkpoint.manager import RNG, TRAIN_STATE, CheckpointManager
from rspo_mega.training.checkpoint.parts import RNGState, TrainState
from rspo_mega.training.evaluator import Evaluator
from rspo_mega.training.metrics import MetricsLogger, Timers, memory_stats, read_metrics
from rspo_mega.training.policy import Policy
from rspo_mega.training.run_data import RunData, prepare_run_data
from rspo_mega.training.samples import SampleLog
from rspo_mega.training.signals import INTERRUPT_SIGNALS, PreemptionHandler
from rspo_mega.training.batch_sources import build_batches
from rspo_mega.training.step_report import step_reporter
from rspo_mega.training.throughput import Throughput
from rspo_mega.training.trackers import Trackers
from rspo_mega.training.update_loop import UpdateLoop
from rspo_mega.parallel.ranks import rank

log = logging.getLogger(__name__)

ModelBuilder = Callable[[TrainConfig], list[torch.nn.Module]]  # this rank's model chunks


class Trainer:
    """Owns the parallel state and the run's parts (see the module docstring).

    ``build_model`` builds this rank's model chunks from the config (default
    :func:`builder.build_chunks`), after the data and ``checkpoint.init_from`` are checked.
    """

    def __init__(self, cfg: TrainConfig, layout: Layout,
                 build_model: ModelBuilder = build_chunks) -> None:
        self.cfg, self.layout = cfg, layout
        setup_parallel(cfg)
        self.rank = rank()
        self.data: RunData = prepare_run_data(cfg)
        load_init = prepare_init(cfg)  # checks checkpoint.init_from before any model exists
        self.trackers = Trackers.open(cfg, self.rank)  # W&B / MLflow runs (rank 0)
        chunks = build_model(cfg)
        if load_init is not None:
            load_init(chunks)
        updates_per_step = cfg.algorithm.inner_updates if self.is_rl else 1
        self.policy = Policy(cfg, chunks, cfg.train_steps * updates_per_step)
        self.state = TrainState("rl" if self.is_rl else "sft", self.policy,
                                lora_base_record(cfg, chunks))
        engine = RolloutEngine(self.policy.model, cfg.model, cfg.rollout, seed=cfg.seed,
                               sequence_multiple=cfg.parallel.sequence_multiple)
        self.batches = build_batches(cfg, layout, self.data, engine)
        masks, forward = run_estimator(cfg)  # ELBO masks, or sampled rollout steps (agrpo)
        self.updates = UpdateLoop(self.policy, cfg, masks, forward, updates_per_step)
        self.evaluator = Evaluator(engine, self.data, cfg.rollout.eval_steps)
        self.metrics = MetricsLogger(cfg.logging.output_dir, tensorboard=cfg.logging.tensorboard,
                                     rank=self.rank, trackers=self.trackers)
        self.samples = SampleLog(cfg.logging.output_dir, cfg.logging.sample_interval,
                                 cfg.rollout.group_size, self.data, self.trackers, self.rank)
        self.throughput = Throughput(cfg, layout)
        ck, check = cfg.checkpoint, partial(check_resume, cfg=cfg, lora_base=self.state.lora_base)
        self.ckpt = CheckpointManager(ck.save_dir, ck.keep_last, self.parts(), ck.save_interval,
                                      config_to_dict(cfg), check) if ck.save_dir else None
        self.saved: Optional[Path] = None  # the checkpoint the run saved last

    @property
    def is_rl(self) -> bool:
        return is_rl(self.cfg.algorithm)

    @property
    def step(self) -> int:
        """Optimizer steps done (the train state's)."""
        return self.state.step

    def start_rl(self) -> None:
        """Freeze the current policy as the reference (the RL start point), if the loss needs
        one; :meth:`run` calls it before the first RL step. (A resume freezes it through the
        train state, before the checkpoint's reference weights replace the copy.)"""
        if needs_reference(self.cfg.algorithm):
            self.policy.freeze_reference()

    def train_step(self) -> dict[str, float]:
        """One step (its batch, then all inner updates); returns the global metrics of the step."""
        timers = Timers(synchronize=True)  # GPU: time lands in its section
        t0 = time.perf_counter()
        batch = self.batches.next_batch(self.step, timers)
        update = self.updates.run(batch, self.step, timers, reference=self.policy.reference)
        elapsed = time.perf_counter() - t0
        out = {**batch.metrics, **update, "step_seconds": elapsed, **timers.elapsed(),
               **memory_stats()}
        if self.is_rl and elapsed > 0:
            out["tokens_per_s"] = batch.metrics["completion_tokens"] / elapsed
        out.update(self.throughput.step_metrics(batch, elapsed))
        self.state.step += 1
        self.samples.log(self.step, batch)
        return out

    # -- checkpoints ---------------------------------------------------------------------------

    def parts(self) -> dict[str, Any]:
        """The run's stateful parts, in the order a resume loads them: the train state (which
        freezes the reference the policy's state then fills), the policy's sharded state, the
        data position, the mask sampler, the LR schedule and last the RNG states. The data and
        mask keys are named by the run's kind, so a checkpoint of the other kind is never read
        as this one's."""
        return {TRAIN_STATE: self.state, "policy": self.policy,
                f"{self.state.kind}_iterator": self.batches,
                "masks" if self.is_rl else "sft_masks": self.updates.masks,
                "scheduler": self.policy.scheduler, RNG: RNGState()}

    def _save_if_due(self, preemption: PreemptionHandler, last: bool) -> bool:
        """Save at the last step and where ``checkpoint.save_interval`` divides the step; whether
        it saved. A stop signal arriving during the save is named: the save completes, then the
        run stops."""
        if self.ckpt is None:
            return False
        if last:
            self._arrive("final save")
        pending = preemption.received
        saved = self.ckpt.save(self.step, last=last)
        if saved is None:
            return False
        self.saved = saved
        if preemption.received and not pending:
            log.warning("preemption: %s arrived during the save of step %d; the checkpoint is "
                        "complete, stopping after it", preemption.signal_name, self.step)
        return True

    def resume(self) -> bool:
        """Load every part from the newest valid checkpoint of ``checkpoint.save_dir`` saved by
        this run (:func:`check_resume` names what to do with any other); whether one was found."""
        path = self.ckpt.load() if self.ckpt is not None else None
        if path is not None:
            log.info("resumed from %s at step %d", path, self.step)
        return path is not None

    # -- the run -------------------------------------------------------------------------------

    def run(self) -> dict[str, float]:
        """``train_steps`` steps (RL, or SFT with ``algorithm.name=sft``) with held-out
        evaluation before them (RL), every ``eval_interval`` steps and at the last step, and a
        checkpoint at the last step; returns the summary (``before/`` and ``after/`` figures,
        or where a stop signal ended the run)."""
        cfg = self.cfg
        resumed = self.resume()
        self.metrics.rewind(self.step)  # drop what an earlier attempt logged after this step
        self.samples.rewind(self.step)
        summary = self._evaluate_before(resumed)
        report = step_reporter(self.rank, cfg.train_steps, self.step, self.state.kind,
                               cfg.algorithm.name, cfg.logging.log_interval,
                               cfg.logging.progress_bar)
        with PreemptionHandler(signals=INTERRUPT_SIGNALS) as preemption:
            while self.step < cfg.train_steps:
                metrics = self.train_step()
                last = self.step == cfg.train_steps
                if self.data.held_out and (last or cfg.eval_interval > 0
                                       and self.step % cfg.eval_interval == 0):
                    metrics.update(self._evaluate(summary if last else None))
                if self.step % cfg.logging.log_interval == 0 or last:
                    self.metrics.log(self.step, metrics)
                report.step(self.step, metrics)
                saved = self._save_if_due(preemption, last)
                if not last and self._stopped(preemption, saved):
                    report.close()
                    return self._stop_summary(preemption)
        report.close()
        summary.update(self.throughput.summary())
        self.metrics.close()
        return summary

    def _arrive(self, phase: str) -> None:
        """Wait for every rank at an end-of-run ``phase``, at most
        ``parallel.end_of_run_timeout_minutes``."""
        wait_for_ranks(phase, 60 * self.cfg.parallel.end_of_run_timeout_minutes,
                       bound="parallel.end_of_run_timeout_minutes")

    def _evaluate(self, summary: Optional[dict[str, float]]) -> dict[str, float]:
        """Held-out figures of the current policy; at the last step (``summary`` given) also
        as ``after/`` figures, added to the summary."""
        if summary is None:
            return self.evaluator.evaluate_held_out()
        self._arrive("final evaluation")
        held_out = self.evaluator.evaluate_held_out()
        after = {f"after/{k}": v for k, v in held_out.items()}
        summary.update(after)
        return {**held_out, **after}

    def _evaluate_before(self, resumed: bool) -> dict[str, float]:
        """RL: freeze the reference; evaluate the start policy (``before/``), or after a resume
        read those figures back from ``metrics.jsonl`` (rank 0)."""
        if not self.is_rl:
            return {}
        self.start_rl()
        if not self.data.held_out:
            return {}
        if resumed:
            return {k: v for r in read_metrics(self.metrics.path) if self.rank == 0
                    for k, v in r.items() if k.startswith("before/")}
        summary = {f"before/{k}": v for k, v in self.evaluator.evaluate_held_out().items()}
        self.metrics.log(self.step, summary)
        return summary

    def _stopped(self, preemption: PreemptionHandler, saved: bool) -> bool:
        """After a stop signal: save (unless this step's checkpoint was just written), close
        the metrics and say so; else False."""
        if not preemption.should_stop():
            return False
        if self.rank == 0:
            log.warning("%s: %s step %d and exiting", preemption.signal_name or "stop requested",
                        "saved" if saved else "saving", self.step)
        if not saved and self.ckpt is not None:
            self.saved = self.ckpt.save(self.step, last=True)
        self.metrics.close()
        return True

    def _stop_summary(self, preemption: PreemptionHandler) -> dict[str, float]:
        """The summary of a run a stop signal ended: ``preempted``, the step, and
        ``interrupted`` when this rank got Ctrl-C (SIGINT)."""
        summary = {"preempted": 1.0, "step": float(self.step)}
        if preemption.interrupted:
            summary["interrupted"] = 1.0
        return summary
