"""AGRPO end to end in the trainer, from the shipped tiny instruct checkpoint (which solves some
puzzles, so advantages are not all 0): it trains, and a run resumed mid-way is bitwise the
uninterrupted one."""

from __future__ import annotations

import json
import math
from pathlib import Path

from rspo_mega.setup import load_run_config, validate_run
from rspo_mega.config.paths import TINY_DEFAULT
from rspo_mega.training.metrics import is_wall_clock
from tests.distributed import run_distributed

SMALL = ["global_batch_size=8", "rollout.micro_batch_size=8",
         "likelihood.micro_batch_size=24", "data.num_test_examples=0", "checkpoint.export_hf=null",
         "logging.tensorboard=false", "logging.progress_bar=false", "optimizer.warmup_steps=0",
         "optimizer.decay_style=constant", "optimizer.lr=1e-4"]
AGRPO = ["algorithm.name=agrpo", "likelihood.mask_scheme=trajectory", "likelihood.mc_samples=3",
         "likelihood.mask_sharing=completion", "algorithm.advantage=mean", "algorithm.kl_beta=0.04", "algorithm.inner_updates=2",
         "likelihood.fresh_masks_per_update=true", "rollout.remasking=random"]


def _run(rank: int, world: int, run_dir: str, steps: int) -> list[dict]:
    from rspo_mega.training.trainer import Trainer

    cfg = load_run_config(TINY_DEFAULT, SMALL + AGRPO + [
        f"logging.output_dir={run_dir}", f"train_steps={steps}",
        f"checkpoint.save_dir={run_dir}/ckpt", "checkpoint.save_interval=1"])
    Trainer(cfg, validate_run(cfg, world_size=world)).run()
    lines = Path(run_dir, "metrics.jsonl").read_text().splitlines()
    return [d for d in map(json.loads, lines) if "loss" in d]


def _comparable(row: dict) -> dict:
    return {k: v for k, v in row.items() if not is_wall_clock(k)}


def test_agrpo_trains_and_resumes_bitwise(tmp_path):
    full = run_distributed(_run, 1, args=(str(tmp_path / "full"), 2), timeout=600)[0]
    assert [r["step"] for r in full] == [1, 2]
    for row in full:
        assert math.isfinite(row["loss"]) and row["grad_norm"] > 0, row
        assert row["agrpo/steps"] >= 1 and row["kl/k3_per_token"] >= 0, row
    part = str(tmp_path / "part")
    run_distributed(_run, 1, args=(part, 1), timeout=600)  # step 1, saved
    resumed = run_distributed(_run, 1, args=(part, 2), timeout=600)[0]
    assert _comparable(resumed[-1]) == _comparable(full[-1])
