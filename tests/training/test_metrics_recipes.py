"""Metrics sinks, timers, plots, the cluster recipes and the sbatch script."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from rspo_mega.setup import load_run_config, validate_run
from rspo_mega.training.metrics import (
    MetricsLogger, Timers, memory_stats, plot_metrics, read_metrics,
)

ROOT = Path(__file__).resolve().parents[2]
RECIPES = sorted((ROOT / "examples" / "configs").glob("*.yaml"))
SBATCH = ROOT / "examples" / "slurm" / "rspo_llada8b.sbatch"
LLADA_8B = {  # geometry fields of LLaDA-8B-Instruct's config.json
    "d_model": 4096, "n_heads": 32, "n_kv_heads": 32, "n_layers": 32, "vocab_size": 126464,
    "embedding_size": 126464, "mask_token_id": 126336, "eos_token_id": 126081,
    "max_sequence_length": 4096,
}


def test_metrics_logger_jsonl_tensorboard_and_other_ranks(tmp_path: Path) -> None:
    with MetricsLogger(tmp_path, tensorboard=True, rank=0) as logger:
        logger.log(1, {"reward": 0.5, "loss": torch.tensor(2.0)})
        logger.log(2, {"reward": 0.75, "loss": float("nan")})
    records = read_metrics(tmp_path / "metrics.jsonl")
    assert [r["step"] for r in records] == [1, 2]
    assert records[0]["reward"] == 0.5 and records[0]["loss"] == 2.0
    assert records[1]["loss"] is None and isinstance(records[1]["time"], float)
    assert list((tmp_path / "tensorboard").glob("events.out.tfevents.*"))

    other = tmp_path / "rank1"
    with MetricsLogger(other, tensorboard=True, rank=1) as logger:
        logger.log(1, {"reward": 1.0})
    assert not other.exists()


def test_timers_sum_and_memory() -> None:
    timers = Timers()
    for _ in range(2):
        with timers("rollout"):
            time.sleep(0.02)
    with timers("optimizer"):
        time.sleep(0.01)
    t = timers.elapsed(reset=True)
    assert set(t) == {"time/rollout", "time/optimizer"}
    assert 0.04 <= t["time/rollout"] < 0.5 and 0.01 <= t["time/optimizer"] < 0.5
    assert timers.elapsed() == {}
    mem = memory_stats()
    assert mem["memory/rss_gib"] > 0


def test_plot_metrics_writes_png(tmp_path: Path) -> None:
    jsonl = tmp_path / "metrics.jsonl"
    jsonl.write_text("".join(
        json.dumps({"step": s, "reward": s / 10, "loss": 1 / (s + 1), "tokens_per_s": 100.0}) + "\n"
        for s in range(12)
    ) + '{"step": 12, "rew')  # a torn last line from a killed run
    out = tmp_path / "plots" / "run.png"
    assert plot_metrics(jsonl, out) == ["reward", "loss", "tokens_per_s"]
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(ValueError):
        plot_metrics(jsonl, out, keys=["absent"])
    cli = subprocess.run(
        [sys.executable, str(ROOT / "tools" / "plot_metrics.py"), str(jsonl), "-o",
         str(tmp_path / "cli.png"), "--keys", "reward"],
        capture_output=True, text=True, cwd=ROOT, timeout=60,
    )
    assert cli.returncode == 0, cli.stderr
    assert (tmp_path / "cli.png").stat().st_size > 0


NODES = (1, 2, 4, 8)


def test_sbatch_directives() -> None:
    """What the GPU cluster gets by default; tests/training/test_slurm.py runs the script."""
    text = SBATCH.read_text()
    for directive in ("--nodes=1", "--gpus-per-node=8", "--exclusive", "--requeue",
                      "--signal=B:USR1@300", "--open-mode=append", "--output=%x-%j.out"):
        assert f"#SBATCH {directive}\n" in text
    for default in ("NPROC_PER_NODE=${NPROC_PER_NODE:-8}",
                    "IMAGE=${IMAGE:-/shared/images/rspo_mega.sqsh}",
                    "LAYOUT=${LAYOUT:-parallel.world_size=$WORLD}",
                    "WORLD=$((SLURM_NNODES * NPROC_PER_NODE))", "--container-image=\"$IMAGE\"",
                    "exec python -m rspo_mega.train", "scontrol requeue"):
        assert default in text, default


@pytest.mark.parametrize("recipe", RECIPES, ids=[p.stem for p in RECIPES])
def test_recipe_valid_for_every_layout(recipe: Path) -> None:
    """The script's default layout on N nodes of 8 GPUs (world_size=8N, the file's TP and PP)
    validates and fits 80 GiB."""
    from rspo_mega.plan import plan_run
    from rspo_mega.plan.hardware import Hardware
    from rspo_mega.plan.launch import refusal

    for nodes in NODES:
        cfg = load_run_config(recipe, [f"parallel.world_size={8 * nodes}"])  # shipped:llada_8b
        m = cfg.model
        assert (m.hidden_size, m.num_attention_heads, m.num_layers, m.vocab_size, m.mask_token_id,
                m.eos_token_id, m.max_position_embeddings) == tuple(LLADA_8B[k] for k in (
                    "d_model", "n_heads", "n_layers", "vocab_size", "mask_token_id",
                    "eos_token_id", "max_sequence_length"))
        layout = validate_run(cfg, world_size=8 * nodes)
        assert (cfg.parallel.tp, cfg.parallel.pp, layout.dp) == (2, 1, 4 * nodes)
        plan = plan_run(cfg, Hardware(gpus_per_node=8, nodes=nodes, memory_gib=80))
        assert refusal(plan) is None, (nodes, refusal(plan))
        assert cfg.model.fp8.enabled and cfg.model.transformer_impl == "transformer_engine"
        ro = cfg.rollout
        assert (ro.gen_length, ro.block_length, ro.steps) == (256, 32, 128)
        assert cfg.rollout.temperature == 1.0 and cfg.rollout.group_size in (6, 8)
        assert cfg.algorithm.name == "rspo" and cfg.algorithm.lambda_ == 0.01
        assert cfg.likelihood.mask_scheme == "coupled" and cfg.likelihood.mc_samples == 2
    tasks = {p.stem.removesuffix("_lora").rsplit("_", 1)[1] for p in RECIPES}
    assert tasks == {"countdown", "sudoku", "gsm8k", "math500"}


def _flat(section: dict, prefix: str = "") -> dict:
    """A config as ``{dotted key: value}``."""
    out: dict = {}
    for key, value in section.items():
        if isinstance(value, dict):
            out.update(_flat(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def test_every_task_has_a_lora_recipe_with_espo_settings() -> None:
    """Beside each full-fine-tuning recipe, its LoRA one: ESPO's settings (r=128, alpha=64 on QKV
    and fc1, no dropout, lr 3e-6) and otherwise the same run but for where it writes."""
    from dataclasses import asdict

    full = [p for p in RECIPES if not p.stem.endswith("_lora")]
    assert {p.stem for p in RECIPES} == {p.stem for p in full} | {f"{p.stem}_lora" for p in full}
    for recipe in full:
        base, lora = load_run_config(recipe), load_run_config(recipe.with_name(f"{recipe.stem}_lora.yaml"))
        adapters = lora.model.lora
        assert adapters.enabled and not base.model.lora.enabled, recipe
        assert (adapters.rank, adapters.alpha, adapters.dropout) == (128, 64.0, 0.0), recipe
        assert adapters.target_modules == ["linear_qkv", "linear_fc1"], recipe
        assert (base.optimizer.lr, lora.optimizer.lr) == (1.0e-6, 3.0e-6), recipe
        a, b = _flat(asdict(base)), _flat(asdict(lora))
        differ = {k for k in a if a[k] != b[k]} - {"optimizer.lr"}
        assert {k for k in differ if not k.startswith("model.lora.")} == {
            "logging.output_dir", "checkpoint.save_dir", "checkpoint.export_hf",
            "checkpoint.export_peft"}, recipe
        assert b["logging.output_dir"] == a["logging.output_dir"] + "-lora", recipe
