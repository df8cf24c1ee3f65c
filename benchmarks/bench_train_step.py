"""End-to-end RL step time breakdown (CPU, or the GPU where one is present): rollout, likelihood
(forward/backward), optimizer, communication, and the rest (rewards, decoding, masks, advantages,
bookkeeping).

Prints one JSON object per model size: mean seconds of each part over the measured RL steps
(after one warm-up step) and ``non_compute_fraction`` = 1 - (rollout + likelihood + optimizer)
/ step, the overhead the trainer adds around the model math (target < 0.10).

    python benchmarks/bench_train_step.py [--steps 3] [--sizes tiny,50m] [--cache none,dual]
        [key=value ...]

``--cache`` measures each size under each ``rollout.cache`` mode in the same run
(``rollout_fraction``: rollout's share of the step).

Trailing ``key=value`` config overrides apply to every size (e.g. the TE spec and bf16 on a GPU).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from rspo_mega.setup import load_run_config, validate_run  # noqa: E402

COMMON = ["data.num_test_examples=0", "logging.tensorboard=false",
          "logging.progress_bar=false", "rollout.group_size=4", "global_batch_size=16",
          "likelihood.mc_samples=1", "likelihood.micro_batch_size=32",
          "rollout.gen_length=32", "rollout.block_length=32", "rollout.steps=16",
          "rollout.temperature=1.0", "data.num_train_examples=500"]
SIZES = {
    "tiny": [],
    "50m": ["model.num_layers=10", "model.hidden_size=640", "model.ffn_hidden_size=1792",
            "model.num_attention_heads=10"],
}


def measure(size: str, steps: int, extra: list[str]) -> dict:
    from rspo_mega.training.trainer import Trainer

    with tempfile.TemporaryDirectory() as out:
        cfg = load_run_config(None, COMMON + SIZES[size] + extra + [f"train_steps={steps + 1}",
                                                                f"logging.output_dir={out}"])
        trainer = Trainer(cfg, validate_run(cfg, world_size=1))
        trainer.start_rl()
        params = sum(p.numel() for c in trainer.policy.model for p in c.parameters())
        rows = [trainer.train_step() for _ in range(steps + 1)][1:]
    keys = ["step_seconds", "time/rollout", "time/likelihood", "time/optimizer",
            "time/communication"]
    mean = {k: sum(r.get(k, 0.0) for r in rows) / len(rows) for k in keys}
    compute = mean["time/rollout"] + mean["time/likelihood"] + mean["time/optimizer"]
    return {"size": size, "params": params, "steps": steps, "cache": cfg.rollout.cache,
            **{k.replace("time/", "") + "_s": round(v, 4) for k, v in mean.items()},
            "other_s": round(mean["step_seconds"] - compute - mean["time/communication"], 4),
            "rollout_fraction": round(mean["time/rollout"] / mean["step_seconds"], 4),
            "non_compute_fraction": round(1 - compute / mean["step_seconds"], 4)}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--sizes", default="tiny,50m")
    p.add_argument("--cache", default="none",
                   help="comma-separated rollout.cache modes, each size measured under each")
    p.add_argument("overrides", nargs="*", help="config overrides for every size, e.g. "
                   "model.transformer_impl=transformer_engine model.params_dtype=bfloat16")
    args = p.parse_args()
    from rspo_mega.parallel import destroy_parallel

    results = []
    for size in args.sizes.split(","):
        for cache in args.cache.split(","):
            results.append(measure(size, args.steps, args.overrides + [f"rollout.cache={cache}"]))
            destroy_parallel()
    print(json.dumps({"benchmark": "train_step", "overrides": args.overrides,
                      "results": results}, indent=1))


if __name__ == "__main__":
    main()
