"""The multi-block recipe (rspo_mega/configs/tiny_sudoku_long.yaml): it validates, starts from
the shipped model, and its RL steps roll out on the fast path (dual cache, threshold, checks,
guard) over completions longer than one block."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from rspo_mega.setup import load_run_config, validate_run
from tests.distributed import run_distributed

RECIPE = Path(__file__).resolve().parents[2] / "rspo_mega" / "configs" / "tiny_sudoku_long.yaml"
SHORT = ["train_steps=2", "global_batch_size=8", "data.num_train_examples=64",
         "data.num_test_examples=4", "rollout.cache_check_rate=1.0",
         "logging.tensorboard=false", "logging.progress_bar=false"]


def test_recipe_is_multi_block_on_the_fast_path():
    cfg = load_run_config(RECIPE)
    validate_run(cfg, world_size=1)
    assert cfg.rollout.gen_length >= 4 * cfg.rollout.block_length
    assert cfg.rollout.cache == "dual" and cfg.rollout.confidence_threshold is not None
    assert cfg.rollout.guard.enabled and cfg.rollout.cache_check_rate > 0
    assert Path(cfg.checkpoint.init_from).name == "tiny_sudoku_long_instruct"


def _body(rank: int, world: int, out: str) -> dict:
    from rspo_mega.training.trainer import Trainer

    cfg = load_run_config(RECIPE, SHORT + [f"logging.output_dir={out}"])
    trainer = Trainer(cfg, validate_run(cfg, world_size=world))
    return {"summary": trainer.run(), "step": trainer.step}


@pytest.mark.timeout(400)
def test_two_rl_steps_from_the_shipped_start(tmp_path):
    out = tmp_path / "run"
    (result,) = run_distributed(_body, 1, args=(str(out),), timeout=380)
    assert result["step"] == 2
    steps = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in steps if "loss" in r]
    assert len(steps) == 2 and all(torch.isfinite(torch.tensor([r["loss"] for r in steps])))
    for r in steps:
        # 8 completions whose answers span the four 32-token blocks (99 tokens to the answer)
        assert r["completion_tokens"] / 8 > 96
        assert r["cache_token_mismatch"] is not None and "guard/refresh_interval" in r
    # the shipped start solves some held-out grids before RL (exact decoding)
    assert result["summary"]["before/eval/reward"] > 0.3
