"""LLaDA speed on CPU: the forward against the HF-code baseline, FLOP/s vs plain matmul, TP=2 vs TP=1.

Prints one JSON object.

``vs_reference``: on the same weights (a random HF checkpoint converted with the project's
converter, fp32, TP=1), the median time of one no-grad forward of :class:`hf_baseline.HFLLaDA`
(the published HF modeling code's computation: fused SDPA, logits of every position) and of
``llada_forward`` as the sampler calls it (logits of the current block only: ``--block``
positions per row). ``forward_time_vs_reference`` = ours / reference (target <= 0.9); the same
ratio with logits of every position (``full_logits_time_vs_reference``) is printed too. Two
geometries: the issue's small GQA model (hidden 256, 6 layers, 8/2 heads, vocab 4099) at 4 x 288
tokens and the ~30M model below at 4 x 256.

``efficiency``: the model (~34M parameters by default, fp32, local spec) runs
``llada_forward(..., labels)`` (vocab-parallel log-probs) + backward at sequence length 256.
``efficiency`` = model FLOP/s / torch matmul FLOP/s (best of GEMMs with the model's shapes,
measured before and after the model run, same process and threads; target >= 0.5). The TP=2 run spawns two gloo
ranks with one thread each (TP=1 gets both threads), so ``tp2_speedup`` compares equal hardware.

    python benchmarks/bench_model.py [--layers 8 --hidden 512 --ffn 1408 --vocab 8192 --iters 5]
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import sys
import time

import torch
import torch.multiprocessing as mp

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))


def _model_cfg(a: argparse.Namespace):
    from rspo_mega.config.schema import ModelConfig

    return ModelConfig(num_layers=a.layers, hidden_size=a.hidden, ffn_hidden_size=a.ffn,
                       num_attention_heads=a.heads, vocab_size=a.vocab,
                       max_position_embeddings=a.seq, make_vocab_size_divisible_by=128)


def flops_per_step(a: argparse.Namespace) -> float:
    """Matmul FLOPs of one forward+backward (3x forward): linear layers, attention, output."""
    h, f, s, b, v, layers = a.hidden, a.ffn, a.seq, a.batch, a.vocab, a.layers
    linear = layers * (4 * h * h + 3 * h * f) + v * h  # multiply-adds per token
    attention = layers * 2 * s * h  # QK^T and PV, multiply-adds per token
    return 3 * 2 * b * s * (linear + attention)


def _matmul_flops(a: argparse.Namespace, iters: int = 10) -> float:
    """Best median FLOP/s of torch GEMMs with the model's shapes (MLP in/out, output layer)."""
    tokens = a.batch * a.seq
    best = 0.0
    for k, n in ((a.hidden, a.ffn), (a.ffn, a.hidden), (a.hidden, a.vocab)):
        x, w = torch.randn(tokens, k), torch.randn(k, n)
        for _ in range(2):
            x @ w
        times = []
        for _ in range(iters):
            t = time.perf_counter()
            x @ w
            times.append(time.perf_counter() - t)
        best = max(best, 2 * tokens * k * n / statistics.median(times))
    return best


def _worker(rank: int, world: int, port: int, a: argparse.Namespace, queue) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(max(1, a.threads // world))
    from rspo_mega.models.llada import build_llada_model, llada_forward
    from rspo_mega.parallel import destroy_parallel, initialize_distributed, initialize_model_parallel

    initialize_distributed(backend="gloo")
    initialize_model_parallel(tp=world)
    matmul = _matmul_flops(a) if world == 1 else None
    model = build_llada_model(_model_cfg(a))
    params = sum(p.numel() for p in model.parameters())
    ids = torch.randint(0, a.vocab, (a.batch, a.seq), generator=torch.Generator().manual_seed(0))
    times = []
    for i in range(a.warmup + a.iters):
        model.zero_grad(set_to_none=True)
        t = time.perf_counter()
        loss = -llada_forward(model, ids, labels=ids).mean()
        loss.backward()
        if i >= a.warmup:
            times.append(time.perf_counter() - t)
    if world == 1:  # again after the model run: the best of both (machine load varies)
        matmul = max(matmul, _matmul_flops(a))
    if rank == 0:
        queue.put({"median_s": statistics.median(times), "matmul_flops": matmul,
                   "params_per_rank": params})
    destroy_parallel()


REFERENCE_GEOMETRIES = {
    # name: (same_weights kwargs, batch, sequence length)
    "gqa_h256_l6_4x288": (dict(n_layers=6, d_model=256, n_heads=8, n_kv_heads=2, ffn=768,
                               vocab=4099), 4, 288),
    "h512_l8_30m_4x256": (dict(n_layers=8, d_model=512, n_heads=8, n_kv_heads=8, ffn=1408,
                               vocab=8192), 4, 256),
}


def _interleaved_medians(fns: dict, rounds: int, burst: int = 4) -> dict:
    """Median seconds per call of each no-arg callable.

    The callables take turns in bursts of ``burst`` calls (the first call of a burst, which
    finds the other model's weights in the caches, is not timed), so machine load hits all alike.
    """
    times: dict = {k: [] for k in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            fn()
            for _ in range(burst):
                t = time.perf_counter()
                fn()
                times[name].append(time.perf_counter() - t)
    return {k: statistics.median(v) for k, v in times.items()}


def _reference_worker(rank: int, world: int, port: int, a: argparse.Namespace, queue) -> None:
    """One process: each geometry's baseline vs ours on the same converted weights."""
    import tempfile

    os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    torch.set_num_threads(a.threads)
    from hf_baseline import same_weights
    from rspo_mega.models.llada import llada_forward
    from rspo_mega.parallel import destroy_parallel, initialize_distributed, initialize_model_parallel

    initialize_distributed(backend="gloo")
    initialize_model_parallel(tp=1)
    out = {}
    for name, (geometry, batch, seq) in REFERENCE_GEOMETRIES.items():
        with tempfile.TemporaryDirectory() as tmp:
            ref, ours, _ = same_weights(tmp, max_len=seq, **geometry)
        ids = torch.randint(0, geometry["vocab"] - 2, (batch, seq),
                            generator=torch.Generator().manual_seed(0))
        lo = seq - 4 * a.block  # a block in the generated span, as the sampler runs it
        block = torch.arange(lo, lo + a.block).expand(batch, a.block)
        with torch.no_grad():
            err = (llada_forward(ours, ids) - ref(ids)).abs().max().item()
            med = _interleaved_medians({
                "reference": lambda: ref(ids),
                "ours_block_logits": lambda: llada_forward(ours, ids, positions=block),
                "ours_full_logits": lambda: llada_forward(ours, ids),
            }, rounds=a.iters)
        out[name] = {
            "tokens": [batch, seq], "params_m": round(sum(p.numel() for p in ref.parameters()) / 1e6, 1),
            "max_abs_logit_diff": err,
            "reference_forward_ms": round(1e3 * med["reference"], 2),
            "ours_forward_ms": round(1e3 * med["ours_block_logits"], 2),
            "ours_full_logits_forward_ms": round(1e3 * med["ours_full_logits"], 2),
            "forward_time_vs_reference": round(med["ours_block_logits"] / med["reference"], 3),
            "full_logits_time_vs_reference": round(med["ours_full_logits"] / med["reference"], 3),
        }
    queue.put(out)
    destroy_parallel()


def _run(world: int, a: argparse.Namespace, target=None) -> dict:
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    procs = [ctx.Process(target=target or _worker, args=(r, world, port, a, queue))
             for r in range(world)]
    for p in procs:
        p.start()
    result = queue.get(timeout=1800)
    for p in procs:
        p.join()
    return result


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--hidden", type=int, default=512)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--ffn", type=int, default=1408)
    p.add_argument("--vocab", type=int, default=8192)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--iters", type=int, default=5)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    p.add_argument("--block", type=int, default=32, help="positions whose logits the sampler reads")
    p.add_argument("--only-reference", action="store_true", help="skip the FLOP/s and TP parts")
    a = p.parse_args()
    vs_reference = _run(1, a, target=_reference_worker)
    if a.only_reference:
        print(json.dumps({"threads": a.threads, "vs_reference": vs_reference}, indent=2))
        return
    flops = flops_per_step(a)
    tp1 = _run(1, a)
    tp2 = _run(2, a)
    achieved = flops / tp1["median_s"]
    print(json.dumps({
        "vs_reference": vs_reference,
        "params_m": round(tp1["params_per_rank"] / 1e6, 1),
        "tokens_per_step": a.batch * a.seq,
        "threads": a.threads,
        "gflop_per_step": round(flops / 1e9, 2),
        "tp1_step_s": round(tp1["median_s"], 3),
        "tp1_achieved_gflops": round(achieved / 1e9, 2),
        "torch_matmul_gflops": round(tp1["matmul_flops"] / 1e9, 2),
        "efficiency_vs_matmul": round(achieved / tp1["matmul_flops"], 3),
        "tp2_step_s": round(tp2["median_s"], 3),
        "tp2_speedup_vs_tp1": round(tp1["median_s"] / tp2["median_s"], 3),
    }, indent=2))


if __name__ == "__main__":
    main()
