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


def _summary(r: dict, size_mb: float, largest_mib: float) -> dict:
    """One direction's child figures: time, throughput and RSS against the 3x-tensor bound."""
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


def _bf16_mb(geometry: object) -> tuple[float, float]:
    """Model size and largest tensor of an HF LLaDA ``geometry`` in bf16: (MB, MiB)."""
    from tests.fixtures.hf_llada import tensor_shapes

    numels = [torch_numel(s) for s in tensor_shapes(geometry).values()]
    return 2 * sum(numels) / 1e6, 2 * max(numels) / 2**20


def _round_trips(root: str, geometry: object, deep: object) -> dict[str, dict]:
    """Child figures of the baseline, both directions, and both directions at twice the layers."""
    from tests.fixtures.hf_llada import TinyLLaDA, write_hf_llada

    path = {n: os.path.join(root, n) for n in ("hf", "mcore", "hf_back", "deep_hf", "deep_mcore",
                                               "tiny_hf", "w1", "w2", "w3", "w4")}
    write_hf_llada(path["hf"], geometry, seed=0)
    write_hf_llada(path["tiny_hf"], TinyLLaDA(), seed=0)
    runs = {"baseline": _run("baseline", path["hf"], path["mcore"], "", "")}
    runs["hf_to_mcore"] = _run("hf_to_mcore", path["hf"], path["mcore"], path["tiny_hf"],
                               path["w1"])
    runs["mcore_to_hf"] = _run("mcore_to_hf", path["mcore"], path["hf_back"], path["w1"],
                               path["w2"])
    shutil.rmtree(path["hf_back"])
    write_hf_llada(path["deep_hf"], deep, seed=0)  # twice the model, same tensors
    runs["deep_hf_to_mcore"] = _run("hf_to_mcore", path["deep_hf"], path["deep_mcore"],
                                    path["tiny_hf"], path["w3"])
    runs["deep_mcore_to_hf"] = _run("mcore_to_hf", path["deep_mcore"], path["hf_back"],
                                    path["w3"], path["w4"])
    return runs


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

    from tests.fixtures.hf_llada import TinyLLaDA

    def geometry(layers: int) -> TinyLLaDA:
        return TinyLLaDA(n_layers=layers, d_model=args.hidden, n_heads=args.heads,
                         n_kv_heads=args.heads, mlp_hidden_size=args.ffn, vocab_size=args.vocab,
                         mask_token_id=args.vocab - 1, eos_token_id=args.vocab - 2)

    model_mb, largest_mib = _bf16_mb(geometry(args.layers))
    deep_mb, _ = _bf16_mb(geometry(2 * args.layers))
    root = tempfile.mkdtemp(prefix="bench_convert_")
    try:
        runs = _round_trips(root, geometry(args.layers), geometry(2 * args.layers))
    finally:
        shutil.rmtree(root, ignore_errors=True)
    print(json.dumps({
        "model_params_m": round(model_mb / 2, 1),
        "model_size_mb_bf16": round(model_mb, 1),
        "largest_tensor_mib": round(largest_mib, 1),
        "baseline_process_peak_rss_mib": round(runs["baseline"]["peak_rss_mib"], 1),
        "hf_to_mcore": _summary(runs["hf_to_mcore"], model_mb, largest_mib),
        "mcore_to_hf": _summary(runs["mcore_to_hf"], model_mb, largest_mib),
        "twice_the_layers": {
            "model_size_mb_bf16": round(deep_mb, 1),
            "hf_to_mcore": _summary(runs["deep_hf_to_mcore"], deep_mb, largest_mib),
            "mcore_to_hf": _summary(runs["deep_mcore_to_hf"], deep_mb, largest_mib)},
    }, indent=2))


def torch_numel(shape: tuple[int, ...]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


if __name__ == "__main__":
    main()
