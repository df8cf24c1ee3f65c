"""Held-out evaluation: reward and accuracy of a policy's greedy (or sampled) completions.

:class:`Evaluator` needs only a rollout engine around the policy's chunks and the run's data;
the trainer evaluates through one, and ``rspo-eval`` builds one with :func:`build_evaluator`
(weights only: no DDP, no optimizer).
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional, Sequence

import torch
from megatron.core import parallel_state as ps

from rspo_mega.config import TrainConfig, config_to_dict
from rspo_mega.data import Example, shard_examples
from rspo_mega.parallel.reductions import data_parallel_group, global_mean, global_sum
from rspo_mega.rollout import RolloutEngine, completion_uid
from rspo_mega.training import completion_batches
from rspo_mega.training.builder import build_chunks, setup_parallel
from rspo_mega.errors import CheckpointError
from rspo_mega.training.checkpoint.compat import check_compatible
from rspo_mega.training.checkpoint.files import read_metadata
from rspo_mega.training.checkpoint.init_from import prepare_init
from rspo_mega.training.checkpoint.manager import CheckpointManager
from rspo_mega.training.policy import PolicyWeights
from rspo_mega.training.run_data import RunData, prepare_run_data


class Evaluator:
    """Evaluates the policy behind ``engine`` on examples of ``data`` (default: its test set).

    Decoding is exact, whatever the rollouts use: no KV cache, no confidence threshold, with
    ``steps`` denoising steps (``rollout.eval_steps``; the engine's ``rollout.steps`` when None),
    ``engine.micro_batch_size`` prompts per call. Runs that differ in their rollouts' fast path
    are thus measured alike.
    """

    def __init__(self, engine: RolloutEngine, data: RunData, steps: Optional[int] = None) -> None:
        self.engine, self.data, self.steps = engine, data, steps

    def evaluate(self, examples: Optional[Sequence[Example]] = None, temperature: float = 0.0,
                 samples: Optional[list] = None) -> dict[str, float]:
        """``eval/reward``, ``eval/accuracy`` (reward == 1) and ``eval/examples`` on
        ``examples``, sharded over data-parallel ranks. A ``samples`` list receives, on every
        rank, one record per example in the order of ``examples``: uid, prompt, completion and
        reward."""
        examples = self.data.test if examples is None else examples
        if not examples:
            raise ValueError("evaluate: no test set (set data.test_path, or data.num_test_examples "
                             "for a generated task)")
        mine = shard_examples(examples, ps.get_data_parallel_rank(),
                              ps.get_data_parallel_world_size())
        mbs = max(1, self.engine.micro_batch_size)
        texts, rewards = [], []
        for start in range(0, len(mine), mbs):
            chunk_texts = self._complete(mine[start:start + mbs], temperature)
            rewards.append(completion_batches.score(self.data.task, chunk_texts, mine[start:start + mbs]))
            texts += chunk_texts
        r = torch.cat(rewards) if rewards else torch.zeros(0)
        group = data_parallel_group()
        if samples is not None:
            samples.extend(self._records(examples, mine, texts, r.tolist()))
        return {"eval/reward": float(global_mean(r, group=group)),
                "eval/accuracy": float(global_mean((r >= 1.0).float(), group=group)),
                "eval/examples": float(global_sum(torch.ones_like(r), group))}

    def evaluate_held_out(self) -> dict[str, float]:
        """The test set's ``eval/*`` and, when the run has one, the validation set's figures as
        ``val/*`` (``val/reward``, ``val/accuracy``, ``val/examples``)."""
        out = self.evaluate() if self.data.test else {}
        if self.data.validation:
            out.update({f"val/{k.split('/', 1)[1]}": v
                        for k, v in self.evaluate(self.data.validation).items()})
        return out

    def _complete(self, examples: Sequence[Example], temperature: float) -> list[str]:
        """One completion text per example (exact decoding)."""
        prompts = [list(self.data.encode_prompt(ex)) for ex in examples]
        exact = dict(temperature=temperature, cache="none", confidence_threshold=None)
        if self.steps is not None:
            exact["steps"] = self.steps
        rollout = self.engine.generate(prompts, [completion_uid(ex.uid, 0) for ex in examples],
                                       **exact)
        return completion_batches.decode_completions(rollout, self.data.tokenizer,
                                          self.engine.model_cfg.eos_token_id)

    def _records(self, examples: Sequence[Example], mine: Sequence[Example], texts: list[str],
                 rewards: list[float]) -> list[dict]:
        """Every rank's records (uid, prompt as the model saw it, completion, reward), gathered
        on every rank in the order of ``examples``."""
        records = [{"uid": ex.uid, "completion": text, "prompt": self.data.prompt_message(ex),
                    "reward": reward} for ex, text, reward in zip(mine, texts, rewards)]
        group = data_parallel_group()
        parts: list = [None] * torch.distributed.get_world_size(group)
        torch.distributed.all_gather_object(parts, records, group=group)
        by_uid = {rec["uid"]: rec for part in parts for rec in part}
        return [by_uid[ex.uid] for ex in examples]


def _newest(cfg: TrainConfig) -> Path:
    """The newest valid checkpoint of ``checkpoint.save_dir``, whose model section must be the
    run's (layouts may change: dist checkpoints reshard)."""
    newest = CheckpointManager(cfg.checkpoint.save_dir).find_resumable()
    if newest is None:
        hint = " (--start evaluates checkpoint.init_from, the start weights)" \
            if cfg.checkpoint.init_from else ""
        raise CheckpointError(f"checkpoint.save_dir={cfg.checkpoint.save_dir}: no valid "
                              f"checkpoint in it{hint}")
    check_compatible(read_metadata(newest).get("config") or {}, config_to_dict(cfg),
                     keys=("model",))
    return newest


def build_evaluator(cfg: TrainConfig, start: bool = False) -> tuple[Evaluator, int]:
    """For ``rspo-eval``: the parallel state, the run's data and the policy's weights: those of
    the newest valid checkpoint of ``checkpoint.save_dir``, or with ``start`` (or without a
    ``save_dir``) those of ``checkpoint.init_from`` (with LoRA, the base a checkpoint's adapters
    go on). Returns the evaluator and the step of those weights (0: the start)."""
    setup_parallel(cfg)
    newest = _newest(cfg) if cfg.checkpoint.save_dir and not start else None
    load_init = prepare_init(cfg) if newest is None or cfg.model.lora.enabled else None
    if newest is None and load_init is None:
        raise CheckpointError("--start evaluates checkpoint.init_from, which is not set")
    data = prepare_run_data(cfg)
    chunks = build_chunks(cfg, init_weights=False)  # every tensor is loaded next
    if load_init is not None:
        load_init(chunks)
    if newest is not None:  # the policy's tensors; the optimizer's and reference's stay
        weights = PolicyWeights(chunks, cfg.model.lora.enabled)
        CheckpointManager(cfg.checkpoint.save_dir, parts={"policy": weights}).load(newest)
    step = int(read_metadata(newest)["step"]) if newest is not None else 0
    engine = RolloutEngine(chunks, cfg.model, cfg.rollout, seed=cfg.seed,
                           sequence_multiple=cfg.parallel.sequence_multiple)
    return Evaluator(engine, data, cfg.rollout.eval_steps), step
