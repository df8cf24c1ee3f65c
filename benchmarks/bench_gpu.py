"""LLaDA forward/backward speed on one GPU: local spec vs Transformer Engine, bf16 vs FP8.

Prints one JSON object. The model has LLaDA-8B's layer geometry (hidden 4096, 32 heads, FFN
12288, vocab 126464) with fewer layers, run as ``llada_forward(..., labels)`` (per-token
log-probs, the ELBO's inner call) + backward, and forward-only under ``no_grad`` (the sampler's
call). For each variant: median milliseconds over ``--iters`` CUDA-event-timed iterations after
``--warmup``, achieved TFLOP/s (matmul FLOPs of the model, attention included), that rate over a
measured bf16 GEMM rate on this GPU, and peak memory. Ratios against ``te_bf16`` come from the same
process, one variant after the other.

    python benchmarks/bench_gpu.py [--layers 4 --seq 1024 --batch 4 --variants local_bf16,te_bf16,te_fp8]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

VARIANTS = {  # name -> (transformer_impl, fp8 recipe or None)
    "local_bf16": ("local", None),
    "te_bf16": ("transformer_engine", None),
    "te_fp8": ("transformer_engine", "delayed"),
    "te_fp8_tensorwise": ("transformer_engine", "tensorwise"),
}


def model_flops(a: argparse.Namespace, backward: bool) -> float:
    """Matmul FLOPs of one pass: linear layers + attention scores/values + output layer."""
    h, f, s, b, v, layers = a.hidden, a.ffn, a.seq, a.batch, a.vocab, a.layers
    per_token = layers * (4 * h * h + 3 * h * f + 2 * s * h) + v * h  # multiply-adds
    return (3 if backward else 1) * 2 * b * s * per_token


def gemm_tflops(n: int = 8192, iters: int = 20) -> float:
    """Median bf16 GEMM rate (TFLOP/s) on random data: the ceiling the model is compared with."""
    x = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    w = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    return 2 * n**3 / _median_ms(lambda: x @ w, 3, iters) / 1e9


def _median_ms(fn, warmup: int, iters: int) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(iters):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def run_variant(name: str, a: argparse.Namespace, peak: float) -> dict:
    from rspo_mega.config.schema import ModelConfig
    from rspo_mega.models.llada import build_llada_model, llada_forward
    from rspo_mega.parallel import set_random_seed

    impl, recipe = VARIANTS[name]
    cfg = ModelConfig(num_layers=a.layers, hidden_size=a.hidden, ffn_hidden_size=a.ffn,
                      num_attention_heads=a.heads, vocab_size=a.vocab,
                      mask_token_id=a.vocab - 1, eos_token_id=a.vocab - 2,
                      max_position_embeddings=a.seq, params_dtype="bfloat16",
                      transformer_impl=impl)
    if recipe:
        cfg.fp8.enabled, cfg.fp8.recipe = True, recipe
    set_random_seed(1234)
    torch.cuda.reset_peak_memory_stats()
    model = build_llada_model(cfg)
    ids = torch.randint(0, a.vocab, (a.batch, a.seq), device="cuda")

    def train_pass():
        llada_forward(model, ids, labels=ids).mean().backward()

    def forward_pass():
        with torch.no_grad():
            llada_forward(model, ids)

    train_ms = _median_ms(train_pass, a.warmup, a.iters)
    fwd_ms = _median_ms(forward_pass, a.warmup, a.iters)
    train_tflops = model_flops(a, True) / train_ms / 1e9
    out = {
        "variant": name, "params": sum(p.numel() for p in model.parameters()),
        "train_ms": round(train_ms, 2), "forward_ms": round(fwd_ms, 2),
        "train_tflops": round(train_tflops, 1),
        "forward_tflops": round(model_flops(a, False) / fwd_ms / 1e9, 1),
        "train_fraction_of_bf16_gemm": round(train_tflops / peak, 3),
        "tokens_per_s_train": round(a.batch * a.seq / train_ms * 1e3),
        "peak_memory_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2),
    }
    del model
    torch.cuda.empty_cache()
    return out


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--hidden", type=int, default=4096)
    p.add_argument("--heads", type=int, default=32)
    p.add_argument("--ffn", type=int, default=12288)
    p.add_argument("--vocab", type=int, default=126464)
    p.add_argument("--seq", type=int, default=1024)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--iters", type=int, default=10)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--variants", default="local_bf16,te_bf16,te_fp8,te_fp8_tensorwise")
    a = p.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("bench_gpu.py needs a CUDA GPU")
    from rspo_mega.models.llada.spec import te_available
    from rspo_mega.parallel import destroy_parallel, initialize_distributed, initialize_model_parallel

    os.environ.setdefault("RANK", "0")
    os.environ.setdefault("WORLD_SIZE", "1")
    initialize_distributed(backend="nccl")
    initialize_model_parallel(tp=1, pp=1)
    peak = gemm_tflops()
    names = [n for n in a.variants.split(",") if n]
    unknown = sorted(set(names) - set(VARIANTS))
    if unknown:
        raise SystemExit(f"--variants: unknown {unknown}; choose from {sorted(VARIANTS)}")
    results, skipped = [], {}
    for name in names:
        if VARIANTS[name][0] == "transformer_engine" and not te_available():
            skipped[name] = "Transformer Engine not importable"
            continue
        try:
            results.append(run_variant(name, a, peak))
        except Exception as exc:  # noqa: BLE001 - one failing recipe must not hide the others
            skipped[name] = f"{type(exc).__name__}: {exc}"[:400]
            torch.cuda.empty_cache()
    base = next((r for r in results if r["variant"] == "te_bf16"), None)
    for r in results:
        if base:
            r["train_speedup_vs_te_bf16"] = round(base["train_ms"] / r["train_ms"], 3)
    te = None
    if te_available():
        import transformer_engine

        te = transformer_engine.__version__
    print(json.dumps({
        "benchmark": "gpu_model", "device": torch.cuda.get_device_name(),
        "torch": torch.__version__, "transformer_engine": te,
        "shape": {k: getattr(a, k) for k in ("layers", "hidden", "heads", "ffn", "vocab", "seq",
                                             "batch")},
        "bf16_gemm_tflops": round(peak, 1), "results": results, "skipped": skipped,
    }, indent=1))
    destroy_parallel()


if __name__ == "__main__":
    main()
