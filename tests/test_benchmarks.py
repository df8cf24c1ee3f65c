"""The benchmarks in ``benchmarks/`` run end to end at tiny sizes and print the JSON they
document: the issues' acceptance commands cannot rot unnoticed. Their own checks run too (the
exact sampler's tokens equal the reference's, the baselines' gradients and logits equal ours);
timings are not judged here."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TINY_ROLLOUT = ["--gen", "16", "--block", "8", "--steps", "8", "--batch", "2", "--prompt", "8",
                "--repeats", "1"]


def run_benchmark(name: str, *args: str, timeout: int = 240) -> dict:
    """Run ``benchmarks/<name>.py`` with ``args``; its one JSON object from stdout."""
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / f"{name}.py"), *args],
                          capture_output=True, text=True, cwd=ROOT, timeout=timeout)
    assert done.returncode == 0, done.stderr[-3000:]
    start = done.stdout.find("\n{") + 1 if not done.stdout.startswith("{") else 0
    return json.loads(done.stdout[start:])


def test_bench_rollout_exact_matches_reference() -> None:
    out = run_benchmark("bench_rollout", *TINY_ROLLOUT)
    assert out["exact"]["token_agreement_vs_reference"] == 1.0
    assert out["exact"]["model_calls"] == 8
    assert out["reference"]["forward_ms"] > 0 and out["speedup_vs_reference"] > 0


@pytest.mark.parametrize("variant", [["--cache", "dual", "--threshold", "0.9"],
                                     ["--cache", "prefix"]], ids=["dual_threshold", "prefix"])
def test_bench_rollout_cached_variants(variant: list[str]) -> None:
    out = run_benchmark("bench_rollout", *TINY_ROLLOUT, *variant)
    assert 0.0 <= out["token_agreement"] <= 1.0 and out["speedup_vs_exact"] > 0
    # the small geometry: 6 layers, 2 KV heads of 32, fp32; 2 rows of 8 + 16 tokens
    assert out["cache_bytes"] == 6 * 2 * 2 * (8 + 16) * 2 * 32 * 4
    assert out["variant"]["model_calls"] <= 8


def test_bench_elbo_sections() -> None:
    out = run_benchmark("bench_elbo", "--baseline-gen", "16", "--repeats", "1", "--hidden", "64",
                        "--layers", "1", "--ffn", "128", "--vocab", "256", "--gen", "16",
                        "--k", "2")
    base = out["vs_baseline"]["gen16"]
    assert base["output_grad_rel_diff"] < 1e-5  # ours and the ESPO-style baseline agree
    assert base["likelihood_time_vs_one_pass_baseline"] > 0
    assert out["k_scaling"]["k"] == 2 and out["k_scaling"]["memory_ratio"] > 0
    split = out["step_split"]
    assert split["micro_batches"] == 2 and split["total_ms"] >= split["backward_ms"] > 0


def test_bench_model_reference_forward() -> None:
    out = run_benchmark("bench_model", "--only-reference")
    for case in out["vs_reference"].values():
        assert case["max_abs_logit_diff"] < 1e-4
        assert case["forward_time_vs_reference"] > 0


def test_bench_train_step_fractions() -> None:
    out = run_benchmark("bench_train_step", "--steps", "1", "--sizes", "tiny", "--cache",
                        "none,dual")
    assert [r["cache"] for r in out["results"]] == ["none", "dual"]
    for r in out["results"]:
        parts = sum(r[k] for k in ("rollout_s", "likelihood_s", "optimizer_s", "communication_s",
                                   "other_s"))
        assert abs(parts - r["step_seconds_s"]) < 0.05 * r["step_seconds_s"] + 1e-3
        assert 0 < r["rollout_fraction"] < 1


def test_bench_agrpo_tiny() -> None:
    out = run_benchmark("bench_agrpo", "--hidden", "64", "--layers", "1", "--gen", "16",
                        "--prompt", "8", "--steps", "8", "--repeats", "1")
    assert out["agrpo_vs_rspo_total"] > 0 and out["agrpo_vs_rspo_policy_step"] > 0


def test_bench_convert_round_trip() -> None:
    out = run_benchmark("bench_convert", "--layers", "1", "--hidden", "64", "--heads", "4",
                        "--ffn", "128", "--vocab", "256")
    deep = out["twice_the_layers"]
    for direction in (out["hf_to_mcore"], out["mcore_to_hf"], deep["hf_to_mcore"],
                      deep["mcore_to_hf"]):
        assert direction["seconds"] >= 0 and direction["process_peak_rss_mib"] > 0
    assert deep["model_size_mb_bf16"] > out["model_size_mb_bf16"]


def test_bench_rl_step_parts_and_ratios() -> None:
    """The RL step against the research scripts' step, on the shipped tiny start: every part
    timed, the exact trainer's schedule and the fast path's fewer model calls."""
    out = run_benchmark("bench_rl_step", "--config", "rspo_mega/configs/tiny_sudoku.yaml",
                        "--repeats", "1", "global_batch_size=8", "data.num_train_examples=50",
                        "rollout.cache=dual", "rollout.cache_check_rate=0.5",
                        "rollout.guard.enabled=true", timeout=600)
    for name in ("fast", "exact", "baseline"):
        part = out[name]
        assert part["step_s"] >= part["rollout_s"] + part["likelihood_s"] > 0, name
        assert 0.0 <= part["reward"] <= 1.0
    assert out["exact"]["rollout_steps"] == 16 and out["fast"]["rollout_steps"] <= 16
    assert out["step_time_vs_baseline_step"] > 0 and out["exact_step_time_vs_baseline_step"] > 0


def test_gpu_checks_script_parses_and_refuses_without_a_gpu(tmp_path: Path) -> None:
    """``benchmarks/gpu_checks.sh`` (run where a GPU is lent) is valid bash, runs every file of
    ``tests/gpu`` (the LoRA check on its own, its figures in ``lora_te.out``) and, without CUDA,
    stops at once with exit status 2."""
    import os

    import torch

    script = ROOT / "benchmarks" / "gpu_checks.sh"
    assert subprocess.run(["bash", "-n", str(script)]).returncode == 0
    text = script.read_text()
    assert "-m pytest -q tests/gpu --ignore=tests/gpu/test_gpu_lora.py" in text
    assert "run lora_te " in text and "-s tests/gpu/test_gpu_lora.py" in text
    if torch.cuda.is_available():
        pytest.skip("a GPU is present: the script would run the GPU checks")
    done = subprocess.run(["bash", str(script)], capture_output=True, text=True, cwd=ROOT,
                          env={**os.environ, "OUT": str(tmp_path), "PYTHON": sys.executable},
                          timeout=120)
    assert done.returncode == 2 and "no CUDA GPU visible" in done.stderr, done.stderr


def test_bench_plan_lora_case() -> None:
    """bench_plan's LoRA comparison at the tiny size: its JSON (resident parts without a
    reference copy, every phase, the step's peak) and the saved activations as planned (the
    plan's count of a frozen base's graph, exact on the local spec; RSS figures are too small
    to judge at this size)."""
    out = run_benchmark("bench_plan", "--cases", "tiny_lora", timeout=600)
    rank = out["cases"]["tiny_lora"][0]
    assert set(rank["resident"]) == {"policy weights", "gradients", "optimizer states",
                                     "reference model"}
    assert rank["resident"]["reference model"]["planned"] == 0
    assert set(rank["phases"]) == {"rollout", "reference", "policy", "optimizer"}
    assert abs(rank["phases"]["policy"]["saved_ratio"] - 1.0) < 0.01, rank["phases"]["policy"]
    peak = rank["step_peak"]
    assert peak["planned"] > 0 and peak["measured"] > 0 and peak["ratio"] > 0
    assert peak["planned_phase"] in rank["phases"] and peak["measured_phase"] in rank["phases"]
