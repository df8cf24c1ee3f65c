"""FLOP-based throughput: the model FLOPs of a step by phase against a count done by hand, TFLOP/s
per device and MFU from them, and the peak of known GPUs by name. (The figures of a real run, per
step and in ``summary.json``, are checked in ``test_trackers.py`` under torchrun.)"""

from __future__ import annotations

import pytest

from rspo_mega.setup import load_run_config, validate_run
from rspo_mega.plan.hardware import peak_tflops
from rspo_mega.plan.shapes import workload
from rspo_mega.training.throughput import Throughput, replica_flops, replica_shapes
from tests.training.test_trainer import TINY


def _hand_count(prompt: int) -> dict[str, float]:
    """TINY's model (4 layers, width 64, SwiGLU 128, 4 heads of 16, 2 KV groups, 512 logits) on
    one rank's RSPO step: 8 completions of 32 tokens in 2 blocks of 4 denoising steps, coupled
    masks (16 sequences, each scoring 16 positions on average), one inner update, one reference
    scoring; 2 FLOPs per multiply-add, a backward twice the forward."""
    per_token = 2 * (64 * (4 * 16 + 2 * 2 * 16)  # QKV
                     + 64 * 64  # output projection
                     + 64 * 2 * 128 + 128 * 64)  # SwiGLU up/gate, down
    seq = prompt + 32

    def forward(rows: int, logits: float) -> float:
        attention = 4 * seq * 4 * 16  # QK^T and AV per query over all keys (bidirectional)
        return 4 * rows * seq * (per_token + attention) + 2 * logits * 64 * 512

    still_masked = [16, 12, 8, 4]  # a block's masked positions at each of its 4 steps
    rollout = 2 * sum(forward(8, 8 * m) for m in still_masked)
    elbo = forward(16, 16 * 16)
    return {"rollout": rollout, "policy": 3 * elbo, "reference": elbo}


def test_step_flops_by_phase_are_the_hand_count():
    cfg = load_run_config(None, TINY + ["rollout.cache=none"])
    layout = validate_run(cfg)
    work = workload(cfg, layout, prompt_length=20)
    assert replica_flops(replica_shapes(cfg), work, 1.0) == _hand_count(20)
    half = replica_flops(replica_shapes(cfg), work, 0.5)  # threshold decoding ran half the steps
    assert half["rollout"] == _hand_count(20)["rollout"] / 2
    assert half["policy"] == _hand_count(20)["policy"]


def test_tflops_per_device_and_mfu():
    cfg = load_run_config(None, TINY + ["rollout.cache=none", "logging.peak_tflops=0.002"])
    throughput = Throughput(cfg, validate_run(cfg))
    flops = sum(_hand_count(20).values())
    rates = throughput._rates(flops, 2.0)
    assert rates["tflops_per_device"] == pytest.approx(flops / 2.0 / 1e12)
    assert rates["mfu"] == pytest.approx(flops / 2.0 / 1e12 / 0.002)
    assert throughput._rates(flops, 0.0) == {}
    no_peak = Throughput(load_run_config(None, TINY), validate_run(load_run_config(None, TINY)))
    assert no_peak.peak is None or no_peak.peak > 0  # a CPU: none; a known GPU: its peak
    if no_peak.peak is None:
        assert "mfu" not in no_peak._rates(flops, 2.0)


@pytest.mark.parametrize("name,peak", [
    ("NVIDIA H100 80GB HBM3", 989.5), ("NVIDIA H100 PCIe", 756.0), ("NVIDIA H200", 989.5),
    ("NVIDIA GH200 480GB", 989.5), ("NVIDIA H20", 148.0), ("NVIDIA A100-SXM4-80GB", 312.0),
    ("NVIDIA L40S", 362.0), ("NVIDIA L4", 121.0), ("NVIDIA B200", 2250.0),
    ("AMD Instinct MI300X", 1307.4), ("Tesla T4", None)])
def test_known_gpus_have_their_bf16_peak(name, peak):
    assert peak_tflops(name) == peak

