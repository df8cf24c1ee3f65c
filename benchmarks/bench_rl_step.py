"""One RL step of a recipe against the same step built the way the research scripts build it.

Prints one JSON object. Same weights (the recipe's ``checkpoint.init_from``, a trained policy),
same prompts (the recipe's first step), timed interleaved in one process:

* ``fast``: ``Trainer.train_step`` of the recipe as shipped (for the default
  ``rspo_mega/configs/tiny_sudoku_long.yaml``: dual KV cache, threshold decoding, the guard);
* ``exact``: the same trainer with exact rollouts (``rollout.cache=none``, no threshold);
* ``baseline``: the research scripts' step (:mod:`hf_baseline` on the HF weights): LLaDA's
  ``generate`` at the recipe's gen/block/steps/temperature (every step the whole sequence,
  float64 Gumbel noise, a full-vocabulary softmax), the same rewards and advantages, an
  ESPO-style one-pass ELBO with the policy's gradient (logits at every position) on the same
  kind of masked sequences, the reference's forward on them, the same loss, one backward and a
  torch Adam step.

Each repeat starts every contender at the same data position (the same prompts). Parts are the
fastest repeat's; ``step_time_vs_baseline_step`` = fast / baseline and
``exact_step_time_vs_baseline_step`` = exact / baseline, each from its fastest repeat.

    python benchmarks/bench_rl_step.py [--config PATH] [--repeats 3] [key=value ...]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from typing import Any

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from rspo_mega.setup import load_run_config, validate_run  # noqa: E402

DEFAULT = os.path.join(os.path.dirname(__file__), "..", "rspo_mega", "configs",
                       "tiny_sudoku_long.yaml")
QUIET = ["data.num_test_examples=0", "logging.tensorboard=false", "logging.progress_bar=false",
         "checkpoint.save_dir=null", "checkpoint.export_hf=null"]


class OursStep:
    """``Trainer.train_step`` from a fixed data position, with the recipe's rollouts or exact
    ones (the guard off)."""

    def __init__(self, trainer) -> None:
        self.trainer = trainer
        self.engine = trainer.batches.engine
        self.start = trainer.batches.state_dict()
        self.settings, self.guard = self.engine.settings, trainer.batches.guard
        self.guard_start = None if self.guard is None else self.guard.state_dict()
        self.exact_settings = self.settings.replace(cache="none", confidence_threshold=None,
                                                    cache_check_rate=0.0, cache_refresh_interval=0)

    def __call__(self, exact: bool) -> dict[str, float]:
        t = self.trainer
        t.batches.load_state_dict(self.start)
        t.state.step = 0
        self.engine.settings = self.exact_settings if exact else self.settings
        t.batches.guard = None if exact else self.guard
        if self.guard is not None:  # every fast repeat starts from the configured settings
            self.guard.load_state_dict(self.guard_start)
        metrics = t.train_step()
        rollout = metrics.get("time/rollout", 0.0)
        return {"step_s": metrics["step_seconds"], "rollout_s": rollout,
                "likelihood_s": metrics.get("time/likelihood", 0.0),
                "optimizer_s": metrics.get("time/optimizer", 0.0),
                "rollout_steps": metrics["rollout_steps"], "reward": metrics["reward"]}


class BaselineStep:
    """The research scripts' RL step on the HF weights (see the module docstring)."""

    def __init__(self, trainer, hf_dir: str) -> None:
        import hf_baseline

        self.hf = hf_baseline
        self.trainer, cfg = trainer, trainer.cfg
        self.policy = hf_baseline.HFLLaDA(hf_dir).train()
        self.reference = hf_baseline.HFLLaDA(hf_dir).eval().requires_grad_(False)
        o = cfg.optimizer
        self.optimizer = torch.optim.Adam(self.policy.parameters(), lr=o.lr,
                                          betas=(o.adam_beta1, o.adam_beta2), eps=o.adam_eps)
        self.masks, self.loss = trainer.updates.masks, trainer.updates.loss

    def __call__(self) -> dict[str, float]:
        from rspo_mega.algorithms import compute_advantages
        from rspo_mega.algorithms.base import LossInputs
        from rspo_mega.rollout import completion_uid

        t, cfg = self.trainer, self.trainer.cfg
        t0 = time.perf_counter()
        batches = t.batches
        start = batches.state_dict()
        examples = next(batches.iterator)
        batches.load_state_dict(start)
        G = cfg.rollout.group_size
        rows = [(i, completion_uid(ex.uid, j)) for i, ex in enumerate(examples) for j in range(G)]
        prompts = [list(batches.encoded[examples[i].uid].prompt_ids) for i, _ in rows]
        if len({len(p) for p in prompts}) != 1:
            raise SystemExit("bench_rl_step: LLaDA's generate takes prompts of one length")
        ro = cfg.rollout
        x = self.hf.reference_generate(self.policy, torch.tensor(prompts), ro.steps, ro.gen_length,
                                       ro.block_length, cfg.model.mask_token_id,
                                       temperature=ro.temperature)
        t_rollout = time.perf_counter()
        comps, rewards = self._score(x, prompts, rows, examples)
        advantages = compute_advantages(rewards, comps.group_ids, len(examples), cfg.algorithm)
        masked = self.masks.sample(comps, 0)
        with torch.no_grad():
            ref_logp = self.hf.one_pass_elbo_logprobs(self.reference, masked.input_ids,
                                                      masked.attention_mask, masked.labels,
                                                      masked.score_mask)
        self.optimizer.zero_grad(set_to_none=True)
        logp = self.hf.one_pass_elbo_logprobs(self.policy, masked.input_ids, masked.attention_mask,
                                              masked.labels, masked.score_mask)
        inputs = LossInputs(masked, logp, advantages, comps.group_ids, len(examples), ref_logp)
        self.loss(inputs).loss.backward()
        t_likelihood = time.perf_counter()
        torch.nn.utils.clip_grad_norm_(self.policy.parameters(), cfg.optimizer.clip_grad)
        self.optimizer.step()
        end = time.perf_counter()
        return {"step_s": end - t0, "rollout_s": t_rollout - t0,
                "likelihood_s": t_likelihood - t_rollout, "optimizer_s": end - t_likelihood,
                "reward": float(rewards.mean())}

    def _score(self, x: torch.Tensor, prompts: list, rows: list, examples: list):
        """The baseline's completions as a batch, and their rewards (the task's verifier)."""
        from rspo_mega.rollout.sampler import Rollout, _completion_lengths
        from rspo_mega.training import completion_batches

        cfg, plen = self.trainer.cfg, len(prompts[0])
        gen = x[:, plen:]
        rollout = Rollout(x[:, :plen], torch.full((len(rows),), plen), gen,
                          _completion_lengths(gen, cfg.model.eos_token_id),
                          torch.zeros(len(rows), dtype=torch.long))
        texts = completion_batches.decode_completions(rollout, self.trainer.data.tokenizer,
                                           cfg.model.eos_token_id)
        rewards = completion_batches.score(self.trainer.data.task, texts, [examples[i] for i, _ in rows])
        comps = completion_batches.completion_batch(rollout, [u for _, u in rows], [i for i, _ in rows])
        return comps, rewards


def _best(runs: list[dict[str, float]]) -> dict[str, float]:
    """The fastest repeat's figures, rounded."""
    best = min(runs, key=lambda r: r["step_s"])
    return {k: round(v, 4) for k, v in best.items()}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--config", default=DEFAULT)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("overrides", nargs="*", help="config overrides, e.g. global_batch_size=16")
    args = p.parse_args()
    from rspo_mega.training.trainer import Trainer

    with tempfile.TemporaryDirectory() as out:
        cfg = load_run_config(args.config, QUIET + args.overrides + [f"logging.output_dir={out}"])
        hf_dir = cfg.checkpoint.init_from
        trainer = Trainer(cfg, validate_run(cfg, world_size=1))
        trainer.start_rl()
        ours, baseline = OursStep(trainer), BaselineStep(trainer, hf_dir)
        runs: dict[str, Any] = {"fast": lambda: ours(exact=False), "exact": lambda: ours(exact=True),
                                "baseline": baseline}
        for fn in runs.values():
            fn()  # warm-up
        results = {name: [] for name in runs}
        for _ in range(args.repeats):
            for name, fn in runs.items():
                results[name].append(fn())
        from rspo_mega.parallel import destroy_parallel

        destroy_parallel()
    best = {name: _best(r) for name, r in results.items()}
    ro = cfg.rollout
    print(json.dumps({
        "benchmark": "rl_step", "config": os.path.relpath(args.config), "overrides": args.overrides,
        "completions": cfg.global_batch_size, "gen_length": ro.gen_length,
        "block_length": ro.block_length, "steps": ro.steps, "cache": ro.cache,
        "threshold": ro.confidence_threshold, "guard": ro.guard.enabled,
        "threads": torch.get_num_threads(), **{name: b for name, b in best.items()},
        "step_seconds_runs": {name: [round(r["step_s"], 3) for r in rs]
                              for name, rs in results.items()},
        "step_time_vs_baseline_step": round(best["fast"]["step_s"] / best["baseline"]["step_s"], 3),
        "exact_step_time_vs_baseline_step": round(
            best["exact"]["step_s"] / best["baseline"]["step_s"], 3),
    }, indent=1))


if __name__ == "__main__":
    main()
