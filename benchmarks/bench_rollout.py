"""Rollout throughput: production sampler vs the plain reference sampler, same weights, same run.

Prints one JSON object: tokens/s and denoising steps/s of both, their ratio, whether the tokens
are identical (exact mode, temperature 0), and for the opt-in confidence-threshold mode its
speed-up over the reference at gen 256 / block 32 and the fraction of its tokens that differ from
the exact sampler.

    python benchmarks/bench_rollout.py [--gen 256 --block 32 --steps 128 --batch 4]
    python benchmarks/bench_rollout.py --run-dir runs/default   # a trained run's model + prompts

Confidence-threshold decoding only pays off on a trained model (a random one is never
confident), so ``--run-dir`` loads a run's config, tokenizer, latest checkpoint and test prompts.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from rspo_mega.config.schema import ModelConfig, RolloutConfig  # noqa: E402
from rspo_mega.parallel import initialize_distributed, initialize_model_parallel  # noqa: E402
from rspo_mega.rollout.engine import RolloutEngine  # noqa: E402
from rspo_mega.parallel.runtime import free_port  # noqa: E402
from tests.reference.llada_sampler import reference_generate  # noqa: E402


def _latest_dist(run_dir: str) -> str:
    ckpt = os.path.join(run_dir, "ckpt")
    return os.path.join(ckpt, open(os.path.join(ckpt, "latest")).read().strip(), "dist")


def _trained(args):
    """Model config and equal-length test prompts [batch, P] of a trained run."""
    from rspo_mega.config import load_config
    from rspo_mega.data import get_template, load_tokenizer
    from rspo_mega.training.batches import prompt_message
    from rspo_mega.training.run_data import build_task

    cfg = load_config(os.path.join(args.run_dir, "config.yaml"))
    cfg.model.max_position_embeddings = max(cfg.model.max_position_embeddings, 128 + args.gen)
    tok = load_tokenizer(os.path.join(args.run_dir, "tokenizer", "tokenizer.model"))
    task, template = build_task(cfg), get_template(cfg.data.template)
    encoded = [template.encode(tok, prompt_message(task, template, ex))
               for ex in task.load("test", seed=cfg.data.seed, num_examples=64)]
    width = max(set(map(len, encoded)), key=[len(e) for e in encoded].count)  # commonest length
    same = [e for e in encoded if len(e) == width][: args.batch]
    return cfg.model, torch.tensor(same)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--gen", type=int, default=256)
    p.add_argument("--block", type=int, default=32)
    p.add_argument("--steps", type=int, default=128)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--prompt", type=int, default=32)
    p.add_argument("--threshold", type=float, default=0.9)
    p.add_argument("--run-dir", default=None, help="trained run: config.yaml, tokenizer/, ckpt/")
    args = p.parse_args()
    os.environ.setdefault("MASTER_PORT", str(free_port()))
    initialize_distributed()
    initialize_model_parallel(seed=0)
    from rspo_mega.models.llada import build_llada_model, llada_forward, load_model

    if args.run_dir:
        mcfg, prompts = _trained(args)
    else:
        # init std 0.1 gives peaked predictive distributions, as a trained model has; a std-0.02
        # random model is near-uniform and would never pass a confidence threshold.
        mcfg = ModelConfig(num_layers=4, hidden_size=256, ffn_hidden_size=704,
                           num_attention_heads=8, vocab_size=1000, mask_token_id=999,
                           eos_token_id=998, max_position_embeddings=args.prompt + args.gen,
                           init_method_std=0.1)
        prompts = torch.randint(0, 990, (args.batch, args.prompt),
                                generator=torch.Generator().manual_seed(1))
    model = build_llada_model(mcfg).eval()
    if args.run_dir:
        load_model(model, _latest_dist(args.run_dir))
    uids = list(range(prompts.shape[0]))

    def rollout_cfg(mode: str) -> RolloutConfig:
        return RolloutConfig(gen_length=args.gen, block_length=args.block, steps=args.steps,
                             temperature=0.0, micro_batch_size=args.batch, mode=mode,
                             confidence_threshold=args.threshold, stop_on_eos_block=False)

    torch.manual_seed(0)
    t0 = time.perf_counter()
    ref = reference_generate(lambda x: llada_forward(model, x)[..., : mcfg.vocab_size], prompts,
                             args.steps, args.gen, args.block, 0.0, "low_confidence", mcfg.mask_token_id)
    t_ref = time.perf_counter() - t0
    ref = ref[:, prompts.shape[1]:]

    t0 = time.perf_counter()
    exact = RolloutEngine(model, mcfg, rollout_cfg("exact"), seed=0).generate(prompts.tolist(), uids)
    t_exact = time.perf_counter() - t0

    t0 = time.perf_counter()
    fast = RolloutEngine(model, mcfg, rollout_cfg("threshold"), seed=0).generate(prompts.tolist(), uids)
    t_fast = time.perf_counter() - t0

    tokens = prompts.shape[0] * args.gen
    print(json.dumps({
        "benchmark": "rollout",
        "model_params": sum(p.numel() for p in model.parameters()),
        "batch": prompts.shape[0], "gen_length": args.gen, "block_length": args.block, "steps": args.steps,
        "reference": {"seconds": round(t_ref, 3), "tokens_per_s": round(tokens / t_ref, 1),
                      "steps_per_s": round(args.steps / t_ref, 2)},
        "exact": {"seconds": round(t_exact, 3), "tokens_per_s": round(tokens / t_exact, 1),
                  "steps_per_s": round(int(exact.steps_used.max()) / t_exact, 2),
                  "identical_to_reference": bool(torch.equal(exact.completion_ids, ref))},
        "threshold": {"threshold": args.threshold, "seconds": round(t_fast, 3),
                      "tokens_per_s": round(tokens / t_fast, 1),
                      "mean_steps_used": float(fast.steps_used.float().mean()),
                      "model_calls": len(fast.step_seconds),
                      # rows left out of calls once their block was decoded (work not done)
                      "row_forwards_skipped": round(1 - float(fast.steps_used.sum())
                                                    / (len(fast.step_seconds) * prompts.shape[0]), 3),
                      "token_diff_rate_vs_exact": float((fast.completion_ids != exact.completion_ids).float().mean())},
        "speedup_exact_vs_reference": round(t_ref / t_exact, 3),
        "speedup_threshold_vs_reference": round(t_ref / t_fast, 3),
    }, indent=1))


if __name__ == "__main__":
    main()
