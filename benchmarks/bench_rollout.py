"""Rollout throughput: the production sampler vs LLaDA's published sampler, same weights, same run.

Prints one JSON object. The baseline is :func:`hf_baseline.reference_generate` (LLaDA's
``generate``: full-sequence logits and a full-vocabulary softmax every step) on
:class:`hf_baseline.HFLLaDA` (the HF modeling code's computation, fused SDPA); ours is
``RolloutEngine`` (exact mode, temperature 0, low-confidence remasking) on the same random HF
checkpoint converted with the project's converter (the small GQA geometry of bench_model).
``speedup_vs_reference`` = our tokens/s / the baseline's; ``token_agreement`` is the fraction of
identical tokens (asserted to be 1.0). The baseline's per-forward time is printed beside it.
With ``--cache prefix|dual`` and/or ``--threshold T`` the block-KV-cache / confidence-threshold
sampler is timed too: ``speedup_vs_exact``, ``speedup_vs_reference`` and ``token_agreement`` (share
of tokens equal to the exact sampler's at T=0) then describe it, with ``cache_bytes``; the exact
sampler's figures stay under ``exact``.

Each sampler runs ``--repeats`` times, in turn, so that a drift of the machine slows all of them
alike; times and ratios are those of the fastest run of each (``seconds_runs`` lists every run).

    python benchmarks/bench_rollout.py [--gen 256 --block 32 --steps 128 --batch 4]
    python benchmarks/bench_rollout.py --cache dual --threshold 0.9 --batch 8
    python benchmarks/bench_rollout.py --run-dir runs/default   # a trained run's model + prompts

Confidence-threshold decoding only pays off on a trained model (a random one is never
confident), so ``--run-dir`` loads a run's config, tokenizer, latest checkpoint and test prompts.

On a GPU (the model is built on it when CUDA is present), ``--model llada8b`` times a randomly
initialised model of LLaDA-8B's layer geometry (the shipped ``llada_8b.json``: hidden 4096, 32
heads, FFN 12288, vocab 126464; ``--layers`` of them) in ``--dtype`` with ``--impl``; LLaDA's reference sampler is not run there
(it would need an HF checkpoint of that size), so only the ratios between our samplers print::

    python benchmarks/bench_rollout.py --model llada8b --layers 4 --impl transformer_engine \
        --dtype bfloat16 --batch 32 --prompt 64 --cache dual --threshold 0.9
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from rspo_mega.config.schema import RolloutConfig  # noqa: E402
from rspo_mega.parallel import initialize_distributed, initialize_model_parallel  # noqa: E402
from rspo_mega.rollout.engine import RolloutEngine  # noqa: E402
from rspo_mega.parallel.runtime import free_port  # noqa: E402
import hf_baseline  # noqa: E402
from timing import interleaved, timed  # noqa: E402


def _latest_dist(run_dir: str) -> str:
    """The dist-checkpoint of the newest valid checkpoint of the run (what a resume takes)."""
    from rspo_mega.training.checkpoint.manager import CheckpointManager

    newest = CheckpointManager(os.path.join(run_dir, "ckpt")).find_resumable()
    if newest is None:
        raise SystemExit(f"no valid checkpoint in {run_dir}/ckpt")
    return os.path.join(str(newest), "dist")


def _trained(args):
    """Model config and equal-length test prompts [batch, P] of a trained run."""
    from rspo_mega.setup import load_run_config
    from rspo_mega.data import get_template, load_tokenizer
    from rspo_mega.tasks.prompts import prompt_message
    from rspo_mega.training.run_data import build_task

    cfg = load_run_config(os.path.join(args.run_dir, "config.yaml"))
    cfg.model.max_position_embeddings = max(cfg.model.max_position_embeddings, 128 + args.gen)
    tok = load_tokenizer(os.path.join(args.run_dir, "tokenizer", "tokenizer.model"))
    task, template = build_task(cfg), get_template(cfg.data.template)
    encoded = [template.encode(tok, prompt_message(task, template, ex))
               for ex in task.load("test", seed=cfg.data.seed, num_examples=64)]
    width = max(set(map(len, encoded)), key=[len(e) for e in encoded].count)  # commonest length
    same = [e for e in encoded if len(e) == width][: args.batch]
    return cfg.model, torch.tensor(same)


def _llada8b(args):
    """Model config (the shipped LLaDA-8B geometry, ``--layers`` of its layers) and random
    prompts [batch, P]; the weights are a random init."""
    from dataclasses import replace

    from rspo_mega.setup.hf_start import shipped_hf_config
    from rspo_mega.models.llada.hf_config import model_config_from_hf

    mcfg = replace(model_config_from_hf(shipped_hf_config("shipped:llada_8b")),
                   num_layers=args.layers, max_position_embeddings=args.prompt + args.gen,
                   params_dtype=args.dtype, transformer_impl=args.impl)
    special = {mcfg.mask_token_id, mcfg.eos_token_id, mcfg.bos_token_id, mcfg.pad_token_id}
    prompts = torch.randint(0, min(i for i in special if i is not None), (args.batch, args.prompt),
                            generator=torch.Generator().manual_seed(1))
    return mcfg, prompts


def _models(args, workdir: str):
    """(baseline forward fn or None, our model, model config, prompts [batch, P])."""
    from rspo_mega.models.llada import build_llada_model, load_model

    if args.model == "llada8b":  # no HF checkpoint of this size: no reference sampler
        from rspo_mega.parallel import set_random_seed

        mcfg, prompts = _llada8b(args)
        set_random_seed(1234)
        return None, build_llada_model(mcfg).eval(), mcfg, prompts
    if args.run_dir:  # a trained run: our model only, the baseline runs our forward's logits
        mcfg, prompts = _trained(args)
        model = build_llada_model(mcfg).eval()
        load_model(model, _latest_dist(args.run_dir))
        from rspo_mega.models.llada import llada_forward

        return (lambda x: llada_forward(model, x)), model, mcfg, prompts
    ref, model, mcfg = hf_baseline.same_weights(
        workdir, n_layers=6, d_model=256, n_heads=8, n_kv_heads=2, ffn=768, vocab=4099,
        max_len=args.prompt + args.gen)
    prompts = torch.randint(0, mcfg.vocab_size - 2, (args.batch, args.prompt),
                            generator=torch.Generator().manual_seed(1))
    return ref, model, mcfg, prompts


def _variant_label(args) -> str:
    parts = ([f"cache={args.cache}"] if args.cache != "none" else []) + \
        ([f"threshold={args.threshold}"] if args.threshold is not None else [])
    return " ".join(parts) or "exact"


def _summary(rollout, seconds: float, tokens: int) -> dict:
    return {"seconds": round(seconds, 3), "tokens_per_s": round(tokens / seconds, 1),
            "mean_steps_used": float(rollout.steps_used.float().mean()),
            "model_calls": len(rollout.step_seconds)}


def _args() -> argparse.Namespace:
    p = argparse.ArgumentParser()
    p.add_argument("--gen", type=int, default=256)
    p.add_argument("--block", type=int, default=32)
    p.add_argument("--steps", type=int, default=128)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--prompt", type=int, default=32)
    p.add_argument("--cache", choices=("none", "prefix", "dual"), default="none",
                   help="also time the sampler with this block KV cache")
    p.add_argument("--threshold", type=float, default=None,
                   help="also time confidence-threshold decoding (with --cache, both)")
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    p.add_argument("--run-dir", default=None, help="trained run: config.yaml, tokenizer/, ckpt/")
    p.add_argument("--repeats", type=int, default=3,
                   help="timed runs of each sampler, in turn; ratios use the fastest of each")
    p.add_argument("--model", choices=("small", "llada8b"), default="small",
                   help="small: the converted GQA checkpoint, with the reference sampler; "
                        "llada8b: LLaDA-8B's layer geometry, random init, no reference")
    p.add_argument("--layers", type=int, default=4, help="layers of --model llada8b")
    p.add_argument("--impl", choices=("local", "transformer_engine"), default="local",
                   help="layer spec of --model llada8b")
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32",
                   help="parameters of --model llada8b")
    args = p.parse_args()
    if args.model == "llada8b" and args.run_dir:
        p.error("--model llada8b builds a random model; it takes no --run-dir")
    return args


def main() -> None:
    args = _args()
    torch.set_num_threads(args.threads)
    os.environ.setdefault("MASTER_PORT", str(free_port()))
    initialize_distributed()
    initialize_model_parallel(seed=0)
    with tempfile.TemporaryDirectory() as tmp:
        ref, model, mcfg, prompts = _models(args, tmp)
    uids = list(range(prompts.shape[0]))

    def engine(cache: str = "none", threshold: float | None = None) -> RolloutEngine:
        cfg = RolloutConfig(gen_length=args.gen, block_length=args.block, steps=args.steps,
                            temperature=0.0, micro_batch_size=prompts.shape[0],
                            confidence_threshold=threshold, stop_on_eos_block=False,
                            cache=cache)
        return RolloutEngine(model, mcfg, cfg, seed=0)

    variant = args.cache != "none" or args.threshold is not None
    runs = {"exact": lambda: engine().generate(prompts.tolist(), uids)}
    if variant:
        runs["variant"] = lambda: engine(args.cache, args.threshold).generate(prompts.tolist(), uids)
    with torch.no_grad():  # warm-up of all (first calls of new shapes build kernels)
        engine().generate(prompts.tolist(), uids, steps=args.gen // args.block)
        if variant:
            engine(args.cache, args.threshold).generate(prompts.tolist(), uids,
                                                        steps=2 * args.gen // args.block)
    out = _header(args, model, prompts)
    if ref is not None:
        forward_ms = _reference_forward_ms(ref, prompts, mcfg, args)
        runs = {"reference": lambda: hf_baseline.reference_generate(
            ref, prompts, args.steps, args.gen, args.block, mcfg.mask_token_id), **runs}
    times, outs = interleaved(runs, args.repeats)
    out.update(_report(times, outs, prompts, args, engine))
    if ref is not None:
        out["reference"]["forward_ms"] = forward_ms
    print(json.dumps(out, indent=1))
    if ref is not None:
        agreement = out["exact"]["token_agreement_vs_reference"]
        assert agreement == 1.0, f"exact sampler tokens differ from the reference: {agreement}"


def _header(args, model: torch.nn.Module, prompts: torch.Tensor) -> dict:
    """The JSON fields that describe the run (machine, model, batch, schedule)."""
    out = {
        "benchmark": "rollout", "threads": torch.get_num_threads(),
        "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
        "model": args.model, "model_params": sum(p.numel() for p in model.parameters()),
        "batch": prompts.shape[0], "gen_length": args.gen, "block_length": args.block,
        "steps": args.steps, "run_dir": args.run_dir, "repeats": args.repeats,
    }
    if args.model == "llada8b":
        out.update(layers=args.layers, impl=args.impl, dtype=args.dtype)
    return out


def _report(times: dict, outs: dict, prompts: torch.Tensor, args, engine) -> dict:
    """The JSON fields of the timed runs; ratios from the fastest repeat of each."""
    tokens = prompts.shape[0] * args.gen
    best = {name: min(t) for name, t in times.items()}
    exact = outs["exact"]
    rep: dict = {}
    if "reference" in outs:
        rep["reference"] = {"seconds": round(best["reference"], 3),
                            "tokens_per_s": round(tokens / best["reference"], 1),
                            "seconds_runs": _rounded(times["reference"])}
    rep["exact"] = {**_summary(exact, best["exact"], tokens),
                    "seconds_runs": _rounded(times["exact"])}
    if "reference" in outs:
        ref_tokens = outs["reference"][:, prompts.shape[1]:]
        agreement = float((exact.completion_ids == ref_tokens).float().mean())
        rep["exact"].update(token_agreement_vs_reference=agreement,
                            speedup_vs_reference=round(best["reference"] / best["exact"], 3))
        rep.update(token_agreement=agreement,
                   speedup_vs_reference=round(best["reference"] / best["exact"], 3))
    if "variant" in outs:
        var = outs["variant"]
        rep.update({
            "variant": {"name": _variant_label(args), **_summary(var, best["variant"], tokens),
                        "seconds_runs": _rounded(times["variant"])},
            "speedup_vs_exact": round(best["exact"] / best["variant"], 3),
            # share of generated tokens equal to the exact sampler's (T=0)
            "token_agreement": float((var.completion_ids == exact.completion_ids).float().mean()),
            "cache_bytes": 0 if args.cache == "none" else _cache_bytes(
                engine(args.cache, args.threshold), prompts, args.gen),
        })
        if "reference" in outs:
            rep["speedup_vs_reference"] = round(best["reference"] / best["variant"], 3)
    return rep


def _rounded(values: list[float]) -> list[float]:
    return [round(v, 3) for v in values]


def _reference_forward_ms(ref, prompts: torch.Tensor, mcfg, args) -> float:
    """Milliseconds of one forward of the reference model over the full sequence (best of 3)."""
    full = torch.cat([prompts, torch.full((prompts.shape[0], args.gen), mcfg.mask_token_id)], 1)
    with torch.no_grad():
        for _ in range(3):
            ref(full)
        return round(1e3 * min(timed(lambda: ref(full))[0] for _ in range(3)), 2)


def _cache_bytes(eng: RolloutEngine, prompts: torch.Tensor, gen: int) -> int:
    """Bytes of the block KV cache one generate() call of this batch allocates."""
    from rspo_mega.models.llada.kv_cache import BlockKVCache

    return BlockKVCache(eng.chunks, prompts.shape[0], prompts.shape[1] + gen).nbytes


if __name__ == "__main__":
    main()
