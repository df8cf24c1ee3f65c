"""The trainer of one run, RL (prompts -> rollouts -> rewards -> advantages -> ELBOs -> loss ->
update) or masked-diffusion SFT.

One :class:`Trainer` per process (``torchrun`` rank), made of parts that each do one thing:

* a batch source (:mod:`step_batches`): RL rollouts with rewards and group advantages, or SFT
  examples with their reference answers, as one :class:`StepBatch` per step;
* the :class:`UpdateLoop`: shared masks, reference log-probs and the ``mu`` inner updates;
* the :class:`Policy`: DDP chunks, optimizer, LR scheduler, frozen reference, one update;
* the :class:`Evaluator`: held-out reward and accuracy (also used by ``rspo-eval``);
* checkpoints: the policy's sharded state plus each component's ``state_dict``, so a resume
  loads them in one loop; metrics and preemption handling.

SFT and RL are separate runs: an RL run starts from an SFT run's weights through
``checkpoint.init_from`` (its ``save_dir``, one of its checkpoints, or that policy exported to
an HF directory).
"""

from __future__ import annotations

import logging
import time
from typing import Any, Callable

import torch

from rspo_mega.config import Layout, TrainConfig, config_to_dict
from rspo_mega.likelihood import run_estimator
from rspo_mega.rollout import RolloutEngine
from rspo_mega.training.builder import build_chunks, setup_parallel
from rspo_mega.training.checkpointing import (
    CheckpointManager, check_compatible, load_extra_state, read_metadata, restore_rng_state,
)
from rspo_mega.training.evaluator import Evaluator
from rspo_mega.training.init_weights import prepare_init
from rspo_mega.training.metrics import MetricsLogger, StepPostfix, Timers, memory_stats
from rspo_mega.training.policy import Policy
from rspo_mega.training.resume_checks import check_resumable
from rspo_mega.training.run_data import RunData, prepare_run_data
from rspo_mega.training.signals import PreemptionHandler
from rspo_mega.training.step_batches import build_batches
from rspo_mega.training.update_loop import UpdateLoop

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
        self.rank = torch.distributed.get_rank()
        self.data: RunData = prepare_run_data(cfg)
        load_init = prepare_init(cfg)  # checks checkpoint.init_from before any model exists
        chunks = build_model(cfg)
        if load_init is not None:
            load_init(chunks)
        updates_per_step = cfg.algorithm.inner_updates if self.is_rl else 1
        self.policy = Policy(cfg, chunks, cfg.train_steps * updates_per_step)
        engine = RolloutEngine(self.policy.model, cfg.model, cfg.rollout, seed=cfg.seed)
        self.batches = build_batches(cfg, layout, self.data, engine)
        masks, forward = run_estimator(cfg)  # ELBO masks, or sampled rollout steps (agrpo)
        self.updates = UpdateLoop(self.policy, cfg, masks, forward, updates_per_step)
        self.evaluator = Evaluator(engine, self.data, cfg.rollout.eval_steps)
        self.metrics = MetricsLogger(cfg.logging.output_dir, tensorboard=cfg.logging.tensorboard,
                                     rank=self.rank)
        self.ckpt = CheckpointManager(cfg.checkpoint.save_dir, cfg.checkpoint.keep_last) \
            if cfg.checkpoint.save_dir else None
        self.step = 0

    @property
    def is_rl(self) -> bool:
        return self.cfg.algorithm.name != "sft"

    def start_rl(self) -> None:
        """Freeze the current policy as the reference (the RL start point), if the loss needs
        one. :meth:`run` calls it before the first RL step; :meth:`resume` before loading a
        checkpoint that holds a reference (whose weights then replace the copy)."""
        if self.is_rl and self.updates.loss.needs_reference:
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
        self.step += 1
        return out

    # -- checkpoints ---------------------------------------------------------------------------

    def components(self) -> dict[str, Any]:
        """The parts with plain per-rank checkpoint state (``state_dict`` / ``load_state_dict``),
        by key. The data position and mask-sampler keys are named by the run's kind, so a
        checkpoint of the other kind is never read as this one's."""
        data_key, masks_key = ("rl_iterator", "masks") if self.is_rl else ("sft_iterator",
                                                                          "sft_masks")
        return {data_key: self.batches, masks_key: self.updates.masks,
                "scheduler": self.policy.scheduler}

    def save(self) -> None:
        """Checkpoint the step (collective; nothing without ``checkpoint.save_dir``)."""
        if self.ckpt is None:
            return
        extra = {key: part.state_dict() for key, part in self.components().items()}
        extra.update(step=self.step, has_reference=self.policy.reference is not None)
        self.ckpt.save(self.step, self.policy.sharded_state_dict(), extra=extra,
                       config=config_to_dict(self.cfg))

    def _save_on_interval(self, preemption: PreemptionHandler) -> bool:
        """Save if ``checkpoint.save_interval`` divides the step; whether it saved. A stop signal
        arriving during the save is named: the save completes, then the run stops."""
        interval = self.cfg.checkpoint.save_interval
        if self.ckpt is None or not interval or self.step % interval:
            return False
        pending = preemption.received
        self.save()
        if preemption.received and not pending:
            log.warning("preemption: %s arrived during the save of step %d; the checkpoint is "
                        "complete, stopping after it", preemption.signal_name, self.step)
        return True

    def resume(self) -> bool:
        """Load the newest valid checkpoint of ``checkpoint.save_dir``, saved by a run of this
        kind (:func:`check_resumable` names what to do with any other); whether one was found."""
        path = self.ckpt.find_resumable() if self.ckpt is not None else None
        if path is None:
            return False
        saved_config, saved = read_metadata(path).get("config"), load_extra_state(path)
        check_resumable(path, saved_config, saved, self.is_rl)
        check_compatible(saved_config or {}, config_to_dict(self.cfg),
                         keys=("model",))  # layouts may change: dist checkpoints reshard
        if saved.get("has_reference"):
            self.start_rl()  # same layout as the policy; its weights come from the checkpoint
        state, extra = self.ckpt.load(path, self.policy.sharded_state_dict(is_loading=True))
        if "rng" in extra:
            restore_rng_state(extra["rng"])
        self.policy.load_sharded_state_dict(state)
        for key, part in self.components().items():
            part.load_state_dict(extra[key])
        self.step = int(extra["step"])
        log.info("resumed from %s at step %d", path, self.step)
        return True

    # -- the run -------------------------------------------------------------------------------

    def run(self) -> dict[str, float]:
        """``train_steps`` steps (RL, or SFT with ``algorithm.name=sft``) with held-out
        evaluation after them (and before, for RL not resumed); returns the summary."""
        cfg = self.cfg
        summary = self._evaluate_before(resumed=self.resume())
        bar = self.metrics.progress(cfg.train_steps, initial=self.step,
                                    enabled=cfg.logging.progress_bar, desc=cfg.algorithm.name)
        postfix = StepPostfix("rl" if self.is_rl else "sft")
        with PreemptionHandler() as preemption:
            while self.step < cfg.train_steps:
                metrics = self.train_step()
                if cfg.eval_interval > 0 and self.step % cfg.eval_interval == 0 and \
                        self.data.held_out:
                    metrics.update(self.evaluator.evaluate_held_out())
                if self.step % cfg.logging.log_interval == 0 or self.step == cfg.train_steps:
                    self.metrics.log(self.step, metrics)
                bar.update(1)
                bar.set_postfix(postfix(metrics))
                if self._stopped(preemption, saved=self._save_on_interval(preemption)):
                    bar.close()
                    return {"preempted": 1.0, "step": float(self.step)}
        bar.close()
        if self.data.held_out:
            summary.update({f"after/{k}": v
                            for k, v in self.evaluator.evaluate_held_out().items()})
            self.metrics.log(self.step, summary)
        self.save()
        self.metrics.close()
        return summary

    def _evaluate_before(self, resumed: bool) -> dict[str, float]:
        """RL: freeze the reference; unless resumed, evaluate the start policy (``before/``)."""
        if not self.is_rl:
            return {}
        self.start_rl()
        if not self.data.held_out or resumed:
            return {}
        summary = {f"before/{k}": v for k, v in self.evaluator.evaluate_held_out().items()}
        self.metrics.log(self.step, summary)
        return summary

    def _stopped(self, preemption: PreemptionHandler, saved: bool) -> bool:
        """After a preemption signal: save (unless this step's checkpoint was just written),
        close the metrics and say so; else False."""
        if not preemption.should_stop():
            return False
        log.warning("preemption signal: %s step %d and exiting",
                    "saved" if saved else "saving", self.step)
        if not saved:
            self.save()
        self.metrics.close()
        return True
