"""Benchmark an AGRPO likelihood step against an RSPO one at equal MC budget; prints one JSON object.

Completions come from the production sampler on a small LLaDA (``--gen`` tokens in ``--steps``
denoising steps), generated once with the trajectory record and once without (the record's
cost). Then, on the same completions and weights, one step of each loss (reference log-probs,
policy log-probs, loss, backward; ``likelihood.one_pass``):

* RSPO: coupled ELBO masks, ``--pairs`` pairs per completion = ``2 * pairs`` masked sequences;
* AGRPO: the trajectory estimator with ``2 * pairs`` sampled steps (entropy-weighted) per
  completion, k3 to the reference, scored under the rollout temperature.

Both run the same number of masked sequences through the same runner; they differ in the
positions scored (a coupled half scores about half the span, a sampled step only the tokens it
committed) and in building the inputs. Single process (1-rank gloo group). Usage::

    python benchmarks/bench_agrpo.py [--hidden 256 --layers 4 --gen 64 --steps 32 --repeats 2]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from bench_elbo import _init_single_process  # noqa: E402
from rspo_mega.config.schema import (  # noqa: E402
    AlgorithmConfig, LikelihoodConfig, ModelConfig, RolloutConfig,
)


def _rollouts(policy, cfg: ModelConfig, args) -> tuple[object, dict]:
    """Completions with their record, and the generation time with and without it."""
    from rspo_mega.rollout.engine import RolloutEngine
    from rspo_mega.training.completion_batches import completion_batch

    rcfg = RolloutConfig(gen_length=args.gen, block_length=args.gen // 2, steps=args.steps,
                         temperature=1.0, micro_batch_size=args.completions, stop_on_eos_block=False)
    engine = RolloutEngine(policy, cfg, rcfg, seed=3)
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(0, cfg.eos_token_id - 1, (args.prompt,), generator=g).tolist()
               for _ in range(args.completions)]
    uids = list(range(args.completions))
    times = {}
    engine.generate(prompts, uids)  # warm-up
    for record in (False, True):
        t0 = time.perf_counter()
        rollout = engine.generate(prompts, uids, trajectory=record)
        times["generate_with_record_s" if record else "generate_s"] = round(
            time.perf_counter() - t0, 3)
    return completion_batch(rollout, uids, [u // 2 for u in uids]), times


def _step(name: str, lik: LikelihoodConfig, algo: AlgorithmConfig, forward, policy, ref, batch,
          adv, repeats: int) -> dict:
    """Best time of (inputs, reference log-probs, policy step) over ``repeats``."""
    from rspo_mega.algorithms import build_loss, loss_backward
    from rspo_mega.likelihood import ElboRunner, MaskSampler, TrajectorySampler

    kind = TrajectorySampler if lik.mask_scheme == "trajectory" else MaskSampler
    sampler = kind(lik, 7, 511, 510)
    runner = ElboRunner(forward, lik.micro_batch_size, ddp_averages_gradients=False, one_pass=True)
    loss = build_loss(algo, lik)
    best: dict = {}
    for r in range(repeats + 1):  # the first is a warm-up
        t0 = time.perf_counter()
        masked = sampler.sample(batch, iteration=r)
        t1 = time.perf_counter()
        ref_lp = ref.logprobs(runner, masked)
        t2 = time.perf_counter()
        for p in policy[0].parameters():
            p.grad = None
        loss_backward(loss, runner, policy, masked, adv, batch.group_ids, batch.size // 2,
                      ref_logp=ref_lp)
        t3 = time.perf_counter()
        if r:
            for key, dt in (("inputs_s", t1 - t0), ("reference_s", t2 - t1),
                            ("policy_step_s", t3 - t2), ("total_s", t3 - t0)):
                best[key] = round(min(best.get(key, dt), dt), 4)
    best.update(sequences=masked.num_sequences,
                scored_positions=int(masked.score_mask.sum()), name=name)
    return best


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--completions", type=int, default=4)
    ap.add_argument("--prompt", type=int, default=32)
    ap.add_argument("--gen", type=int, default=64)
    ap.add_argument("--steps", type=int, default=32)
    ap.add_argument("--pairs", type=int, default=2, help="RSPO coupled pairs (AGRPO: 2x steps)")
    ap.add_argument("--micro-batch", type=int, default=8, help="masked sequences per forward")
    ap.add_argument("--repeats", type=int, default=2)
    args = ap.parse_args()

    _init_single_process()
    from rspo_mega.algorithms import compute_advantages
    from rspo_mega.likelihood import ReferenceModel, tempered_forward
    from rspo_mega.models.llada.model import build_llada_model, llada_forward

    cfg = ModelConfig(num_layers=args.layers, hidden_size=args.hidden, ffn_hidden_size=3 * args.hidden,
                      num_attention_heads=8, vocab_size=512, max_position_embeddings=args.prompt + args.gen,
                      mask_token_id=511, eos_token_id=510, init_method_std=0.2)
    policy = [build_llada_model(cfg)]
    ref = ReferenceModel.from_policy(policy, lambda: [build_llada_model(cfg)])
    batch, gen_times = _rollouts(policy, cfg, args)
    rewards = torch.arange(args.completions, dtype=torch.float32) % 3
    mb = args.micro_batch
    rspo = _step("rspo", LikelihoodConfig(mask_scheme="coupled", mc_samples=args.pairs,
                                          micro_batch_size=mb),
                 AlgorithmConfig(name="rspo"), llada_forward, policy, ref, batch,
                 compute_advantages(rewards, batch.group_ids, args.completions // 2,
                                    AlgorithmConfig(name="rspo")), args.repeats)
    agrpo_algo = AlgorithmConfig(name="agrpo", advantage="mean", kl_beta=0.04)
    agrpo = _step("agrpo", LikelihoodConfig(mask_scheme="trajectory", mc_samples=2 * args.pairs,
                                            micro_batch_size=mb),
                  agrpo_algo, tempered_forward(1.0), policy, ref, batch,
                  compute_advantages(rewards, batch.group_ids, args.completions // 2, agrpo_algo),
                  args.repeats)
    print(json.dumps({
        "model": "LLaDA (rspo_mega.models.llada), local spec, fp32, CPU",
        "params": sum(p.numel() for p in policy[0].parameters()),
        "threads": torch.get_num_threads(), "completions": args.completions,
        "gen_length": args.gen, "rollout_steps": args.steps, "rollout": gen_times,
        "rspo": rspo, "agrpo": agrpo,
        "agrpo_vs_rspo_total": round(agrpo["total_s"] / rspo["total_s"], 3),
        "agrpo_vs_rspo_policy_step": round(agrpo["policy_step_s"] / rspo["policy_step_s"], 3),
    }, indent=1))


if __name__ == "__main__":
    main()
