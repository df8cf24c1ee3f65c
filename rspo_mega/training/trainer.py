"""The trainer of one run, RL (prompts -> rollouts -> rewards -> advantages -> ELBOs -> loss ->
update) or masked-diffusion SFT.

One :class:`Trainer` per process (``torchrun`` rank). A step of RL (``algorithm.name`` in rspo,
espo, diffu_grpo):

1. this rank's prompts of the global batch (``PromptBatchIterator``, sharded over DP);
2. G completions per prompt with the masked-diffusion sampler (seeded per step and uid);
3. verifiable rewards, then group advantages reduced over the DP group;
4. K shared masks per completion (keyed by seed, step, uid, k); reference log-probs once;
5. ``mu`` inner updates of the configured loss (old log-probs from the first one; or, with
   ``likelihood.fresh_masks_per_update``, new masks and reference log-probs for each), each a
   megatron forward/backward, DP gradient reduction, NaN/Inf guard and optimizer step;
6. metrics, checkpoint and preemption handling.

``algorithm.name=sft`` runs masked-diffusion SFT on the data's reference answers instead (no
rollout), with the same masks and parallel ELBO runner. SFT and RL are separate runs: an RL run
starts from an SFT run's weights through ``checkpoint.init_from`` (its ``save_dir``, one of its
checkpoints, or that policy exported to an HF directory).
"""

from __future__ import annotations

import logging
import time
from typing import Optional

import torch
from megatron.core import parallel_state as ps

from rspo_mega.algorithms import StepResult, build_loss, compute_advantages, loss_backward
from rspo_mega.config import Layout, TrainConfig, config_to_dict
from rspo_mega.data import PromptBatchIterator, shard_examples
from rspo_mega.likelihood import ElboRunner, MaskedBatch, ReferenceModel, run_estimator
from rspo_mega.models.llada import unwrap_model
from rspo_mega.parallel import initialize_distributed, initialize_model_parallel
from rspo_mega.parallel.reductions import data_parallel_group, global_mean, global_sum, global_sums
from rspo_mega.rng import hash64
from rspo_mega.rollout import RolloutEngine, completion_uid
from rspo_mega.rollout.sampler import CacheCheck
from rspo_mega.training import batches, distrib_optimizer_fixes
from rspo_mega.training.builder import (
    build_chunks, build_optimizer, build_reference_fn, build_scheduler, finish_grad_sync,
    optimizer_step, wrap_ddp, zero_grads,
)
from rspo_mega.training.checkpointing import (
    CheckpointManager, check_compatible, load_extra_state, read_metadata, restore_rng_state,
)
from rspo_mega.training.guards import check_finite, grad_tensors
from rspo_mega.training.init_weights import prepare_init
from rspo_mega.training.metrics import MetricsLogger, Timers, memory_stats
from rspo_mega.training.resume_checks import check_resumable
from rspo_mega.training.run_data import RunData, prepare_run_data
from rspo_mega.training.signals import PreemptionHandler

log = logging.getLogger(__name__)

POSTFIX = {"loss": ".4f", "reward": ".3f"}  # progress-bar metrics of a step (those it has)


class Trainer:
    """Owns the parallel state, the policy/reference, data, rollout engine, loss and outputs."""

    def __init__(self, cfg: TrainConfig, layout: Layout) -> None:
        self.cfg, self.layout = cfg, layout
        p = cfg.parallel
        initialize_distributed(backend=p.backend, timeout_minutes=p.timeout_minutes)
        initialize_model_parallel(tp=p.tp, pp=p.pp, cp=p.cp, vpp=p.vpp, seed=cfg.seed,
                                  timeout_minutes=p.timeout_minutes)
        self.rank = torch.distributed.get_rank()
        self.dp_rank = ps.get_data_parallel_rank()
        self.dp_size = ps.get_data_parallel_world_size()
        self.data: RunData = prepare_run_data(cfg)  # may fill model ids from the tokenizer
        self.encoded = {e.example.uid: e for e in self.data.train}
        # RL: the prompts of a step; SFT: its examples, in an order of their own
        self.iterator = PromptBatchIterator(
            [e.example for e in self.data.train],
            layout.prompts_per_step if self.is_rl else cfg.global_batch_size,
            self.dp_rank, self.dp_size, seed=cfg.data.seed + (0 if self.is_rl else 1))

        load_init = prepare_init(cfg)  # checks checkpoint.init_from before any model exists
        chunks = build_chunks(cfg)
        if load_init is not None:
            load_init(chunks)
        self.model = wrap_ddp(chunks, cfg)
        self.optimizer = build_optimizer(self.model, cfg)
        self.updates_per_step = cfg.algorithm.inner_updates if self.is_rl else 1
        self.scheduler = build_scheduler(self.optimizer, cfg,
                                         cfg.train_steps * self.updates_per_step)
        self.loss = build_loss(cfg.algorithm, cfg.likelihood,
                               microbatch_completions=cfg.micro_batch_size)
        self.reference: Optional[ReferenceModel] = None  # built when RL starts
        self.engine = RolloutEngine(self.model, cfg.model, cfg.rollout, seed=cfg.seed)
        self.masks, forward = run_estimator(cfg)  # ELBO masks, or sampled rollout steps (agrpo)
        self.runner = ElboRunner(forward, cfg.likelihood.micro_batch_size,
                                 ddp_averages_gradients=True, one_pass=cfg.likelihood.one_pass)
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
        if self.reference is None and self.is_rl and self.loss.needs_reference:
            self.reference = ReferenceModel.from_policy(
                self.model, build_reference_fn(self.cfg),
                offload=self.cfg.likelihood.offload_reference)

    # -- one step ------------------------------------------------------------------------------

    def _rl_batch(self, timers: Timers):
        cfg, G = self.cfg, self.cfg.rollout.group_size
        examples = next(self.iterator)
        pairs = [(i, completion_uid(ex.uid, j)) for i, ex in enumerate(examples) for j in range(G)]
        prompts = [list(self.encoded[examples[i].uid].prompt_ids) for i, _ in pairs]
        uids = [u for _, u in pairs]
        with timers("rollout"):
            rollout = self.engine.generate(prompts, uids, seed=hash64(cfg.seed, self.step),
                                           trajectory=self.loss.needs_trajectory)
        texts = batches.decode_completions(rollout, self.data.tokenizer, cfg.model.eos_token_id)
        rewards = batches.score(self.data.task, texts, [examples[i] for i, _ in pairs])
        base = self.dp_rank * len(examples)
        group_ids = [base + i for i, _ in pairs]
        batch = batches.completion_batch(rollout, uids, group_ids)
        advantages = compute_advantages(rewards, batch.group_ids, self.layout.prompts_per_step,
                                        cfg.algorithm)
        stats = {
            "reward": float(global_mean(rewards, group=data_parallel_group())),
            "accuracy": float(global_mean((rewards >= 1.0).float(), group=data_parallel_group())),
            "completion_tokens": float(global_sum(rollout.completion_lengths.float(),
                                                  data_parallel_group())),
            "rollout_steps": float(rollout.steps_used.float().mean()),
            **self._cache_check_stats(rollout.cache_check),
        }
        return batch, advantages, self.layout.prompts_per_step, stats

    def _cache_check_stats(self, check: CacheCheck) -> dict[str, float]:
        """``cache_token_mismatch`` / ``cache_confidence_diff`` of the cached steps re-run exactly."""
        if not self.cfg.rollout.cache_check_rate:
            return {}
        committed, mismatched, diff = global_sums(torch.tensor(
            [check.committed, check.mismatched, check.confidence_diff]),
            data_parallel_group()).tolist()
        if not committed:
            return {}
        return {"cache_token_mismatch": mismatched / committed,
                "cache_confidence_diff": diff / committed}

    def _sft_batch(self):
        cfg = self.cfg
        examples = next(self.iterator)
        encoded = [self.encoded[ex.uid] for ex in examples]
        targets = [self.data.sft_target(ex) for ex in examples]
        uids = [completion_uid(ex.uid, 0) for ex in examples]
        batch = batches.sft_batch(encoded, targets, uids, cfg.rollout.gen_length,
                                  cfg.model.eos_token_id)
        advantages = torch.zeros(len(examples))
        batch.group_ids += self.dp_rank * len(examples)
        return batch, advantages, cfg.global_batch_size, {}

    def _reference_logprobs(self, masked: MaskedBatch, timers: Timers) -> Optional[torch.Tensor]:
        """The reference's log-probs on ``masked`` (None without a reference)."""
        if self.reference is None:
            return None
        with timers("likelihood"):
            return self.reference.logprobs(self.runner, masked)

    def _update(self, masked: MaskedBatch, advantages: torch.Tensor, group_ids: torch.Tensor,
                num_groups: int, ref_logp: Optional[torch.Tensor],
                old_logp: Optional[torch.Tensor], timers: Timers) -> tuple[StepResult, bool, float]:
        """One optimizer update of the loss on ``masked``: (loss result, applied, grad norm)."""
        zero_grads(self.model, self.optimizer)
        with timers("likelihood"):
            result = loss_backward(self.loss, self.runner, self.model, masked, advantages,
                                   group_ids, num_groups, ref_logp=ref_logp, old_logp=old_logp)
        with timers("communication"):
            finish_grad_sync(self.model)
        grads = {f"chunk{i}.{k}": g for i, c in enumerate(self.model)
                 for k, g in grad_tensors(c).items()}
        finite = check_finite(grads, self.step, policy=self.cfg.non_finite_policy)
        with timers("optimizer"):
            applied, grad_norm = optimizer_step(self.optimizer, self.scheduler) if finite \
                else (False, float("nan"))
        return result, applied, grad_norm

    def train_step(self) -> dict[str, float]:
        """One step (all inner updates); returns the global metrics of the step."""
        cfg, timers = self.cfg, Timers(synchronize=True)  # GPU: time lands in its section
        t0 = time.perf_counter()
        batch, advantages, num_groups, stats = self._rl_batch(timers) if self.is_rl \
            else self._sft_batch()
        masked = self.masks.sample(batch, iteration=self.step)
        ref_logp, old_logp = self._reference_logprobs(masked, timers), None
        for inner in range(self.updates_per_step):
            if inner and cfg.likelihood.fresh_masks_per_update:  # new masks, reference re-scored
                masked = self.masks.sample(batch, iteration=self.step, update=inner)
                ref_logp = self._reference_logprobs(masked, timers)
            result, applied, grad_norm = self._update(masked, advantages, batch.group_ids,
                                                      num_groups, ref_logp, old_logp, timers)
            if inner == 0 and not cfg.likelihood.fresh_masks_per_update:
                old_logp = result.logp
        elapsed = time.perf_counter() - t0
        out = {**stats, **result.metrics, "grad_norm": grad_norm, "update_applied": float(applied),
               "lr": self.optimizer.param_groups[0]["lr"], "step_seconds": elapsed,
               **timers.elapsed(), **memory_stats()}
        if self.is_rl and elapsed > 0:
            out["tokens_per_s"] = stats["completion_tokens"] / elapsed
        self.step += 1
        return out

    # -- evaluation ----------------------------------------------------------------------------

    def evaluate(self, examples: Optional[list] = None, temperature: float = 0.0,
                 samples: Optional[list] = None) -> dict[str, float]:
        """Reward and accuracy (reward == 1) on ``examples`` (default: the test set), sharded over
        data-parallel ranks; decoded with ``rollout.eval_steps`` denoising steps
        (``rollout.steps`` when unset), without the block KV cache. A ``samples`` list receives,
        on every rank, one record per example in the order of ``examples``: uid, prompt,
        completion and reward."""
        examples = self.data.test if examples is None else examples
        if not examples:
            raise ValueError("evaluate: no test set (set data.test_path, or data.num_test_examples "
                             "for a generated task)")
        mine = shard_examples(examples, self.dp_rank, self.dp_size)
        rewards, records = [], []
        mbs = max(1, self.cfg.rollout.micro_batch_size)
        for start in range(0, len(mine), mbs):
            chunk = mine[start:start + mbs]
            prompts = [list(self.data.encode_prompt(ex)) for ex in chunk]
            rollout = self.engine.generate(prompts, [completion_uid(ex.uid, 0) for ex in chunk],
                                           temperature=temperature, cache="none",
                                           steps=self.cfg.rollout.eval_steps)
            texts = batches.decode_completions(rollout, self.data.tokenizer,
                                               self.cfg.model.eos_token_id)
            rewards.append(batches.score(self.data.task, texts, chunk))
            if samples is not None:
                records += [{"uid": ex.uid, "completion": text,  # the prompt as the model saw it
                             "prompt": batches.prompt_message(self.data.task, self.data.template, ex)}
                            for ex, text in zip(chunk, texts)]
        r = torch.cat(rewards) if rewards else torch.zeros(0)
        group = data_parallel_group()
        if samples is not None:
            for record, reward in zip(records, r.tolist()):
                record["reward"] = reward
            samples.extend(_gather_in_order(records, examples, group))
        return {"eval/reward": float(global_mean(r, group=group)),
                "eval/accuracy": float(global_mean((r >= 1.0).float(), group=group)),
                "eval/examples": float(global_sum(torch.ones_like(r), group))}

    # -- checkpoints ---------------------------------------------------------------------------

    def _sharded_state(self, is_loading: bool = False) -> dict:
        """Model (+ reference) and optimizer state as sharded tensors. ``is_loading`` first
        creates the optimizer's state (torch Adam has none before its first step), else a
        resume would silently start from empty Adam moments."""
        model_sd = {}
        for i, chunk in enumerate(self.model):
            key = "model" if len(self.model) == 1 else f"model{i}"
            model_sd[key] = unwrap_model(chunk).sharded_state_dict()  # DDP would add "module."
        state = dict(model_sd)
        if is_loading:
            distrib_optimizer_fixes.prepare_for_load(self.optimizer)
        state["optimizer"] = self.optimizer.sharded_state_dict(
            model_sd, is_loading=is_loading,
            metadata=distrib_optimizer_fixes.OPTIMIZER_CHECKPOINT_METADATA)
        if self.reference is not None:
            for i, chunk in enumerate(self.reference.chunks):
                state[f"reference{i}"] = chunk.sharded_state_dict(prefix=f"reference{i}.")
        return state

    def _state_keys(self) -> tuple[str, str]:
        """Keys of the data position and the mask-sampler state in the saved plain state (named
        by the run's kind, so a checkpoint of the other kind is never read as this one's)."""
        return ("rl_iterator", "masks") if self.is_rl else ("sft_iterator", "sft_masks")

    def _extra_state(self) -> dict:
        data_key, masks_key = self._state_keys()
        return {"step": self.step, data_key: self.iterator.state_dict(),
                "has_reference": self.reference is not None,
                masks_key: self.masks.state_dict(), "scheduler": self.scheduler.state_dict()}

    def save(self) -> None:
        if self.ckpt is None:
            return
        self.ckpt.save(self.step, self._sharded_state(), extra=self._extra_state(),
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
        if self.ckpt is None:
            return False
        path = self.ckpt.find_resumable()
        if path is None:
            return False
        saved_config, saved = read_metadata(path).get("config"), load_extra_state(path)
        check_resumable(path, saved_config, saved, self.is_rl)
        check_compatible(saved_config or {}, config_to_dict(self.cfg),
                         keys=("model",))  # layouts may change: dist checkpoints reshard
        if saved.get("has_reference"):
            self.start_rl()  # same layout as the policy; its weights come from the checkpoint
        state, extra = self.ckpt.load(path, self._sharded_state(is_loading=True))
        if "rng" in extra:
            restore_rng_state(extra["rng"])
        self._load_weights(state)
        self.optimizer.load_state_dict(state["optimizer"])
        distrib_optimizer_fixes.finish_load(self.optimizer)
        self.scheduler.load_state_dict(extra["scheduler"])
        data_key, masks_key = self._state_keys()
        self.iterator.load_state_dict(extra[data_key])
        self.masks.load_state_dict(extra[masks_key])
        self.step = int(extra["step"])
        log.info("resumed from %s at step %d", path, self.step)
        return True

    def _load_weights(self, state: dict) -> None:
        """The policy's (and reference's) weights from a loaded sharded state."""
        from rspo_mega.models.llada.checkpoint import trusted_te_extra_state

        with trusted_te_extra_state():  # FP8 delayed-scaling metadata of this run's checkpoint
            if self.reference is not None:
                for i, chunk in enumerate(self.reference.chunks):
                    chunk.load_state_dict({k[len(f"reference{i}."):]: v for k, v in
                                           state[f"reference{i}"].items()})
            for i, chunk in enumerate(self.model):  # keys are the inner GPTModel's, not DDP's
                unwrap_model(chunk).load_state_dict(
                    state["model" if len(self.model) == 1 else f"model{i}"])

    # -- the run -------------------------------------------------------------------------------

    def run(self) -> dict[str, float]:
        """``train_steps`` steps (RL, or SFT with ``algorithm.name=sft``) with held-out
        evaluation after them (and before, for RL not resumed); returns the summary."""
        cfg = self.cfg
        resumed = self.resume()
        summary: dict[str, float] = {}
        if self.is_rl:
            self.start_rl()
            if self.data.test and not resumed:
                summary.update({f"before/{k}": v for k, v in self.evaluate().items()})
                self.metrics.log(self.step, summary)
        bar = self.metrics.progress(cfg.train_steps, initial=self.step,
                                    enabled=cfg.logging.progress_bar, desc=cfg.algorithm.name)
        with PreemptionHandler() as preemption:
            while self.step < cfg.train_steps:
                metrics = self.train_step()
                if cfg.eval_interval > 0 and self.step % cfg.eval_interval == 0 and self.data.test:
                    metrics.update(self.evaluate())
                if self.step % cfg.logging.log_interval == 0 or self.step == cfg.train_steps:
                    self.metrics.log(self.step, metrics)
                bar.update(1)
                bar.set_postfix({k: f"{metrics[k]:{f}}" for k, f in POSTFIX.items() if k in metrics})
                if self._stopped(preemption, saved=self._save_on_interval(preemption)):
                    bar.close()
                    return {"preempted": 1.0, "step": float(self.step)}
        bar.close()
        if self.data.test:
            summary.update({f"after/{k}": v for k, v in self.evaluate().items()})
            self.metrics.log(self.step, summary)
        self.save()
        self.metrics.close()
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


def _gather_in_order(records: list[dict], examples: list, group) -> list[dict]:
    """Every data-parallel rank's ``records`` (one per example of its strided shard), on every
    rank, back in the order of ``examples``."""
    parts: list = [None] * torch.distributed.get_world_size(group)
    torch.distributed.all_gather_object(parts, records, group=group)
    by_uid = {rec["uid"]: rec for part in parts for rec in part}
    return [by_uid[ex.uid] for ex in examples]
