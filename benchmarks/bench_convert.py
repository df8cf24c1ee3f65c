"""Conversion throughput and peak memory: HF -> megatron torch_dist -> HF on a few-hundred-MB model.

Prints one JSON object. Each direction runs in a fresh interpreter so its peak RSS (``ru_maxrss``)
is its own; ``baseline`` is the same interpreter with the same imports and a checkpoint-I/O
process group but no conversion. Imports dominate the process high-water mark, so RSS is also
sampled (5 ms) during the conversion: the goal is peak RSS during conversion <= RSS before it
(the interpreter baseline) + 3 x the largest single tensor, independent of the model size.

    python benchmarks/bench_convert.py [--layers 8 --hidden 1024 --ffn 2816 --vocab 32003]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))


def _child(mode: str, src: str, dst: str, warm_src: str, warm_dst: str) -> None:
    """Run one direction (or nothing, for the baseline) and print seconds + RSS (MiB).

    A conversion of a tiny model first (``warm_*``) loads every lazily imported module and code
    path, so the sampled increase is what the conversion itself holds.
    """
    from rspo_mega.models.llada.checkpoint import single_process_group
    from rspo_mega.models.llada.convert import convert_hf_to_mcore, convert_mcore_to_hf

    if mode == "hf_to_mcore":
        convert_hf_to_mcore(warm_src, warm_dst)
    elif mode == "mcore_to_hf":
        convert_mcore_to_hf(warm_src, warm_dst)

    import threading

    import psutil

    proc = psutil.Process()
    before = proc.memory_info().rss
    peak = [before]
    done = threading.Event()

    def sample() -> None:  # RSS high-water mark of the conversion itself (5 ms sampling)
        while not done.wait(0.005):
            peak[0] = max(peak[0], proc.memory_info().rss)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    start = time.perf_counter()
    if mode == "baseline":
        with single_process_group():
            pass
    elif mode == "hf_to_mcore":
        convert_hf_to_mcore(src, dst, tp=1, pp=1)
    elif mode == "mcore_to_hf":
        convert_mcore_to_hf(src, dst)
    seconds = time.perf_counter() - start
    done.set()
    sampler.join()
    peak[0] = max(peak[0], proc.memory_info().rss)
    print(json.dumps({
        "seconds": seconds,
        "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "rss_before_mib": before / 2**20,
        "conversion_peak_rss_mib": peak[0] / 2**20,
    }))


def _run(mode: str, src: str, dst: str, warm_src: str, warm_dst: str) -> dict:
    out = subprocess.run([sys.executable, __file__, "--child", mode, src, dst, warm_src, warm_dst],
                         check=True, capture_output=True, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--hidden", type=int, default=1024)
    p.add_argument("--heads", type=int, default=16)
    p.add_argument("--ffn", type=int, default=2816)
    p.add_argument("--vocab", type=int, default=32003)
    p.add_argument("--child", nargs=5, metavar=("MODE", "SRC", "DST", "WARM_SRC", "WARM_DST"))
    args = p.parse_args()
    if args.child:
        _child(*args.child)
        return

    from tests.fixtures.hf_llada import TinyLLaDA, tensor_shapes, write_hf_llada

    def geometry(layers: int) -> TinyLLaDA:
        return TinyLLaDA(n_layers=layers, d_model=args.hidden, n_heads=args.heads,
                         n_kv_heads=args.heads, mlp_hidden_size=args.ffn, vocab_size=args.vocab,
                         mask_token_id=args.vocab - 1, eos_token_id=args.vocab - 2)

    g = geometry(args.layers)
    shapes = tensor_shapes(g)
    numels = [int(torch_numel(s)) for s in shapes.values()]
    model_mb = 2 * sum(numels) / 1e6  # bf16
    largest_mib = 2 * max(numels) / 2**20
    root = tempfile.mkdtemp(prefix="bench_convert_")
    try:
        hf, mc, back, deep_hf, deep_mc, tiny_hf, tiny_mc = (os.path.join(root, n) for n in (
            "hf", "mcore", "hf_back", "deep_hf", "deep_mcore", "tiny_hf", "tiny_mc"))
        write_hf_llada(hf, g, seed=0)
        write_hf_llada(tiny_hf, TinyLLaDA(), seed=0)
        base = _run("baseline", hf, mc, "", "")
        h2m = _run("hf_to_mcore", hf, mc, tiny_hf, os.path.join(root, "w1"))
        m2h = _run("mcore_to_hf", mc, back, os.path.join(root, "w1"), os.path.join(root, "w2"))
        shutil.rmtree(back)
        write_hf_llada(deep_hf, geometry(2 * args.layers), seed=0)  # twice the model, same tensors
        deep = _run("hf_to_mcore", deep_hf, deep_mc, tiny_hf, os.path.join(root, "w3"))
        deep_back = _run("mcore_to_hf", deep_mc, back, os.path.join(root, "w3"),
                         os.path.join(root, "w4"))

        deep_mb = 2 * sum(torch_numel(x) for x in tensor_shapes(geometry(2 * args.layers)).values()) / 1e6

        def summary(r: dict, size_mb: float = model_mb) -> dict:
            extra = r["conversion_peak_rss_mib"] - r["rss_before_mib"]
            return {"seconds": round(r["seconds"], 2),
                    "mb_per_s": round(size_mb / r["seconds"], 1),
                    "process_peak_rss_mib": round(r["peak_rss_mib"], 1),
                    "rss_before_conversion_mib": round(r["rss_before_mib"], 1),
                    "peak_rss_during_conversion_mib": round(r["conversion_peak_rss_mib"], 1),
                    "conversion_rss_increase_mib": round(extra, 1),
                    "increase_over_largest_tensor": round(extra / largest_mib, 2),
                    "within_baseline_plus_3x_largest":
                        r["conversion_peak_rss_mib"] <= r["rss_before_mib"] + 3 * largest_mib}

        result = {
            "model_params_m": round(sum(numels) / 1e6, 1),
            "model_size_mb_bf16": round(model_mb, 1),
            "largest_tensor_mib": round(largest_mib, 1),
            "baseline_process_peak_rss_mib": round(base["peak_rss_mib"], 1),
            "hf_to_mcore": summary(h2m),
            "mcore_to_hf": summary(m2h),
            "twice_the_layers": {"model_size_mb_bf16": round(deep_mb, 1),
                                 "hf_to_mcore": summary(deep, deep_mb),
                                 "mcore_to_hf": summary(deep_back, deep_mb)},
        }
        print(json.dumps(result, indent=2))
    finally:
        shutil.rmtree(root, ignore_errors=True)


def torch_numel(shape: tuple[int, ...]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


if __name__ == "__main__":
    main()
