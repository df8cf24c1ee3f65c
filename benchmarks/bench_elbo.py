"""Benchmark the multi-sample ELBO step; prints one JSON object.

1. ``k_scaling``: one RSPO step (reference + policy log-probs, loss, backward) with K MC samples
   versus K steps with one sample each, same process, same micro-batch size. Target: ratio <= 1.05.
   Memory: peak bytes of live autograd-saved activations (tracked with saved-tensor hooks; on a GPU
   also ``torch.cuda.max_memory_allocated``) must not grow with K, since K only adds micro-batches.
2. ``step_split``: time of one policy+reference step split into mask sampling, forward (reference
   and policy pass 1, ``no_grad``), loss + reductions (coefficients, global metrics) and
   backward (pass 2: forward + backward of the linear surrogate), for a ~25M-parameter LLaDA.

3. ``vs_baseline``: the likelihood part of an RSPO step (policy log-probs, loss, backward;
   coupled masks, K=2, no reference) against a one-pass baseline written like ESPO's ELBO
   (:func:`hf_baseline.one_pass_elbo_logprobs` on :class:`hf_baseline.HFLLaDA`: one forward with
   logits at every position, cross entropy of the masked ones, the same loss, one backward), on
   the same masked batch and the same weights (a random HF checkpoint converted with the
   project's converter; the small GQA geometry of bench_model). Ours is timed in both runner
   modes; ``likelihood_time_vs_one_pass_baseline`` = ours (``likelihood.one_pass``, the
   default) / baseline (target <= 0.8). Gradients of the two are compared as well.

Runs as one process (a 1-rank gloo group, so collectives are trivially cheap here). Usage::

    python benchmarks/bench_elbo.py [--hidden 512 --layers 6 --k 4 --repeats 2]
    python benchmarks/bench_elbo.py --only-baseline [--baseline-gen 64 256]
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import sys
import time
from dataclasses import dataclass
from typing import Any

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from rspo_mega.config.schema import AlgorithmConfig, LikelihoodConfig, ModelConfig  # noqa: E402
from rspo_mega.likelihood.batch_types import CompletionBatch  # noqa: E402
from timing import interleaved, timed  # noqa: E402


class SavedActivationPeak:
    """Peak bytes of tensors saved for backward that are alive at the same time."""

    def __init__(self) -> None:
        self.live = 0
        self.peak = 0

    def _pack(self, t: torch.Tensor) -> Any:
        tracker, size = self, t.numel() * t.element_size()
        tracker.live += size
        tracker.peak = max(tracker.peak, tracker.live)

        class _Held:
            def __init__(self, tensor: torch.Tensor):
                self.tensor = tensor

            def __del__(self) -> None:
                tracker.live -= size

        return _Held(t)

    @staticmethod
    def _unpack(held: Any) -> torch.Tensor:
        return held.tensor

    def hooks(self) -> Any:
        return torch.autograd.graph.saved_tensors_hooks(self._pack, self._unpack)


def _init_single_process() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    from rspo_mega.parallel import initialize_distributed, initialize_model_parallel

    initialize_distributed(backend="gloo")
    initialize_model_parallel(tp=1, pp=1, seed=1234)


def _completions(num: int, prompt: int, gen: int, cfg: ModelConfig) -> CompletionBatch:
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, cfg.eos_token_id, (num, prompt + gen), generator=g)
    comp = torch.zeros(num, prompt + gen, dtype=torch.bool)
    comp[:, prompt:] = True
    return CompletionBatch(ids, torch.ones_like(comp), comp, torch.arange(num),
                           torch.arange(num) // 2)


def vs_baseline(gen: int, repeats: int, batch: int = 4, prompt: int = 32) -> dict:
    """Ours (both runner modes) vs the ESPO-style one-pass baseline on one batch; see module doc."""
    import tempfile

    import hf_baseline
    from rspo_mega.algorithms import build_loss, compute_advantages, loss_backward
    from rspo_mega.algorithms.base import LossInputs
    from rspo_mega.likelihood import ElboRunner, MaskSampler
    from rspo_mega.models.llada.model import llada_forward

    with tempfile.TemporaryDirectory() as tmp:
        ref, ours, cfg = hf_baseline.same_weights(tmp, max_len=prompt + gen)
    ref.train(), ours.train()
    comps = _completions(batch, prompt, gen, cfg)
    lik = LikelihoodConfig(mask_scheme="coupled", mc_samples=2)
    algo = AlgorithmConfig(name="rspo")
    groups = batch // 2
    comps.group_ids = torch.arange(batch) // 2
    adv = compute_advantages(torch.arange(batch, dtype=torch.float32), comps.group_ids, groups, algo)
    loss_fn = build_loss(algo, lik)
    masked = MaskSampler(lik, 7, cfg.mask_token_id, cfg.eos_token_id).sample(comps, 0)
    n = masked.num_sequences
    # RSPO reads reference log-probs; they are scored once, before the timing, for both sides
    ref_logp = ElboRunner(llada_forward, n).logprobs([ours], masked)

    def baseline() -> None:
        ref.zero_grad(set_to_none=True)
        logp = hf_baseline.one_pass_elbo_logprobs(ref, masked.input_ids, masked.attention_mask,
                                                  masked.labels, masked.score_mask)
        loss_fn(LossInputs(masked, logp, adv, comps.group_ids, groups, ref_logp)).loss.backward()

    def ours_step(one_pass: bool) -> None:
        ours.zero_grad(set_to_none=True)
        runner = ElboRunner(llada_forward, n, ddp_averages_gradients=False, one_pass=one_pass)
        loss_backward(loss_fn, runner, [ours], masked, adv, comps.group_ids, groups,
                      ref_logp=ref_logp)

    runs = {"baseline": baseline, "ours_one_pass": lambda: ours_step(True),
            "ours_two_pass": lambda: ours_step(False)}
    for fn in runs.values():
        fn()  # warm-up
    best = {k: min(v) for k, v in interleaved(runs, repeats)[0].items()}
    ours_step(True)
    grad_ours = ours.output_layer.weight.grad[: cfg.vocab_size]
    baseline()
    grad_ref = ref.ff_out.weight.grad
    return {
        "sequences": n, "seq_length": masked.seq_length, "gen_length": gen,
        "baseline_s": round(best["baseline"], 3),
        "ours_one_pass_s": round(best["ours_one_pass"], 3),
        "ours_two_pass_s": round(best["ours_two_pass"], 3),
        "likelihood_time_vs_one_pass_baseline": round(best["ours_one_pass"] / best["baseline"], 3),
        "two_pass_time_vs_one_pass_baseline": round(best["ours_two_pass"] / best["baseline"], 3),
        "output_grad_rel_diff": float((grad_ours - grad_ref).norm() / grad_ref.norm()),
    }


@dataclass
class RSPOSetup:
    """One policy, its frozen reference and a batch of completions with advantages."""

    cfg: ModelConfig
    policy: list
    ref: Any
    batch: CompletionBatch
    adv: torch.Tensor
    groups: int
    runner: Any
    micro_batch: int

    def likelihood(self, k: int) -> LikelihoodConfig:
        return LikelihoodConfig(mask_scheme="coupled", mc_samples=k,
                                micro_batch_size=self.micro_batch)

    def masks(self, lik: LikelihoodConfig, iteration: int) -> Any:
        from rspo_mega.likelihood import MaskSampler

        return MaskSampler(lik, 7, self.cfg.mask_token_id,
                           self.cfg.eos_token_id).sample(self.batch, iteration)


def _setup(args: argparse.Namespace) -> RSPOSetup:
    from rspo_mega.algorithms import compute_advantages
    from rspo_mega.likelihood import ElboRunner, ReferenceModel
    from rspo_mega.models.llada.model import build_llada_model, llada_forward

    cfg = ModelConfig(num_layers=args.layers, hidden_size=args.hidden, ffn_hidden_size=args.ffn,
                      num_attention_heads=8, vocab_size=args.vocab, make_vocab_size_divisible_by=128,
                      max_position_embeddings=args.prompt + args.gen, mask_token_id=args.vocab - 1,
                      eos_token_id=args.vocab - 2)
    policy = [build_llada_model(cfg)]
    ref = ReferenceModel.from_policy(policy, lambda: [build_llada_model(cfg)])
    batch = _completions(args.completions, args.prompt, args.gen, cfg)
    groups = args.completions // 2 + 1
    rewards = torch.arange(args.completions, dtype=torch.float32)
    adv = compute_advantages(rewards, batch.group_ids, groups, AlgorithmConfig(name="rspo"))
    runner = ElboRunner(llada_forward, args.micro_batch, ddp_averages_gradients=True)
    return RSPOSetup(cfg, policy, ref, batch, adv, groups, runner, args.micro_batch)


def k_scaling(s: RSPOSetup, k: int, repeats: int) -> dict:
    """One step with ``k`` MC samples against ``k`` steps with one: time and saved activations."""
    from rspo_mega.algorithms import build_loss, loss_backward

    algo = AlgorithmConfig(name="rspo")

    def step(samples: int, iteration: int, tracker: SavedActivationPeak) -> None:
        lik = s.likelihood(samples)
        masked = s.masks(lik, iteration)
        ref_lp = s.ref.logprobs(s.runner, masked)
        with tracker.hooks():
            loss_backward(build_loss(algo, lik), s.runner, s.policy, masked, s.adv,
                          s.batch.group_ids, s.groups, ref_logp=ref_lp)

    step(1, 0, SavedActivationPeak())  # warm-up
    t_k, t_1 = [], []
    mem_k, mem_1 = SavedActivationPeak(), SavedActivationPeak()
    for r in range(repeats):
        t_k.append(timed(lambda: step(k, 100 + r, mem_k))[0])
        t_1.append(timed(lambda: [step(1, 200 + 10 * r + i, mem_1) for i in range(k)])[0])
    return {
        "k": k, "sequences_per_step_k": s.batch.size * k * 2,
        "micro_batch_size": s.micro_batch,
        "one_step_with_k_samples_s": min(t_k), "k_steps_with_one_sample_s": min(t_1),
        "ratio": min(t_k) / min(t_1), "target_ratio": 1.05,
        "peak_saved_activation_bytes_k": mem_k.peak, "peak_saved_activation_bytes_1": mem_1.peak,
        "memory_ratio": mem_k.peak / max(mem_1.peak, 1),
    }


def step_split(s: RSPOSetup, repeats: int) -> dict:
    """Milliseconds of each phase of a K=2 step (fastest of ``repeats``)."""
    from rspo_mega.algorithms import build_loss
    from rspo_mega.algorithms.base import LossInputs
    from rspo_mega.algorithms.step import loss_coefficients

    lik = s.likelihood(2)
    loss_fn = build_loss(AlgorithmConfig(name="rspo"), lik)
    phases = ("masks", "forward_reference", "forward_policy", "loss_and_reduction", "backward",
              "total")
    splits: dict[str, list[float]] = {k: [] for k in phases}

    def reduce(masked: Any, lp: torch.Tensor, ref_lp: torch.Tensor) -> Any:
        inputs = LossInputs(masked, lp, s.adv, s.batch.group_ids, s.groups, ref_lp)
        out, coeff = loss_coefficients(loss_fn, inputs)
        out.metrics.reduce(loss_fn.group)
        return coeff

    for r in range(repeats):
        t0 = time.perf_counter()
        dt, masked = timed(lambda: s.masks(lik, 300 + r))
        splits["masks"].append(dt)
        dt, ref_lp = timed(lambda: s.ref.logprobs(s.runner, masked))
        splits["forward_reference"].append(dt)
        dt, lp = timed(lambda: s.runner.logprobs(s.policy, masked))
        splits["forward_policy"].append(dt)
        dt, coeff = timed(lambda: reduce(masked, lp, ref_lp))
        splits["loss_and_reduction"].append(dt)
        splits["backward"].append(timed(lambda: s.runner.backward(s.policy, masked, coeff))[0])
        splits["total"].append(time.perf_counter() - t0)
    out = {f"{k}_ms": round(1000 * min(v), 2) for k, v in splits.items()}
    out.update(sequences=masked.num_sequences, seq_length=masked.seq_length,
               micro_batches=s.runner.num_microbatches(masked))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--hidden", type=int, default=512)
    ap.add_argument("--layers", type=int, default=6)
    ap.add_argument("--ffn", type=int, default=1536)
    ap.add_argument("--vocab", type=int, default=4096)
    ap.add_argument("--completions", type=int, default=2)
    ap.add_argument("--prompt", type=int, default=32)
    ap.add_argument("--gen", type=int, default=64)
    ap.add_argument("--k", type=int, default=4, help="coupled pairs per completion")
    ap.add_argument("--micro-batch", type=int, default=4, help="masked sequences per forward")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--baseline-gen", type=int, nargs="+", default=[64, 256])
    ap.add_argument("--only-baseline", action="store_true", help="only the vs_baseline section")
    args = ap.parse_args()

    _init_single_process()
    baseline = {f"gen{g}": vs_baseline(g, max(3, args.repeats)) for g in args.baseline_gen}
    if args.only_baseline:
        print(json.dumps({"threads": torch.get_num_threads(), "vs_baseline": baseline}, indent=1))
        return
    setup = _setup(args)
    print(json.dumps({
        "model": "LLaDA (rspo_mega.models.llada), local spec, fp32, CPU",
        "params": sum(p.numel() for p in setup.policy[0].parameters()),
        "threads": torch.get_num_threads(), "vs_baseline": baseline,
        "k_scaling": k_scaling(setup, args.k, args.repeats),
        "step_split": step_split(setup, args.repeats),
        "notes": "single process: reductions are local; backward = pass-2 forward+backward",
    }, indent=1))


if __name__ == "__main__":
    main()
