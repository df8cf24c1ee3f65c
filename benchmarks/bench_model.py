"""LLaDA forward+backward speed on CPU: achieved FLOP/s vs plain torch matmul, and TP=2 vs TP=1.

Prints one JSON object. The model (~34M parameters by default, fp32, local spec) runs
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


def _run(world: int, a: argparse.Namespace) -> dict:
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    procs = [ctx.Process(target=_worker, args=(r, world, port, a, queue)) for r in range(world)]
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
    a = p.parse_args()
    flops = flops_per_step(a)
    tp1 = _run(1, a)
    tp2 = _run(2, a)
    achieved = flops / tp1["median_s"]
    print(json.dumps({
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
