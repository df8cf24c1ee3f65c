"""Checkpoints written by earlier versions of the trainer (``tests/fixtures/checkpoint_v1``, see
its README) resume: the step, weights, Adam moments, RNG state and the run's parts are restored,
and training goes on from them."""

from __future__ import annotations

import random
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.distributed import run_distributed
from tests.fixtures.make_checkpoint_v1 import CONFIG, HERE, KINDS, expected_state


def _resume(rank: int, world: int, out: str, kind: str) -> dict:
    from rspo_mega.setup import load_run_config, validate_run
    from rspo_mega.training.trainer import Trainer

    cfg = load_run_config(None, CONFIG + KINDS[kind] + [
        "train_steps=2", f"logging.output_dir={out}", f"checkpoint.save_dir={out}/ckpt"])
    trainer = Trainer(cfg, validate_run(cfg, world_size=world))
    resumed = trainer.resume()
    got = {"resumed": resumed, "loaded": expected_state(trainer), "python_rng": random.getstate(),
           "numpy_rng": np.random.get_state()[1].astype(np.int64),
           "has_reference": trainer.policy.reference is not None,
           "position": trainer.batches.state_dict()}
    summary = Trainer(cfg, validate_run(cfg, world_size=world)).run()
    got["after"] = {"loss": summary.get("loss"), "saved": sorted(
        p.name for p in Path(out, "ckpt").iterdir())}
    return got


@pytest.mark.parametrize("kind", sorted(KINDS))
def test_a_format_1_checkpoint_resumes_and_trains_on(tmp_path, kind):
    shutil.copytree(HERE / kind, tmp_path / "ckpt", ignore=shutil.ignore_patterns("expected.pt"))
    want = torch.load(HERE / kind / "expected.pt", weights_only=True)
    saved = torch.load(HERE / kind / "iter_0000001" / "extra" / "rank_00000.pt", weights_only=True)
    got = run_distributed(_resume, 1, args=(str(tmp_path), kind), timeout=300)[0]
    loaded = got["loaded"]
    assert got["resumed"] and loaded["step"] == want["step"] == 1
    assert got["has_reference"] == (kind == "rl")
    assert torch.equal(loaded["rng"], want["rng"])
    assert list(got["python_rng"][1]) == saved["rng"]["python"]["state"]
    assert torch.equal(torch.from_numpy(got["numpy_rng"]), saved["rng"]["numpy"]["keys"])
    assert loaded["weights"].keys() == want["weights"].keys()
    assert all(torch.equal(loaded["weights"][k], v) for k, v in want["weights"].items())
    assert len(loaded["exp_avg"]) == len(want["exp_avg"]) > 0
    assert all(torch.equal(a, b) for a, b in zip(loaded["exp_avg"], want["exp_avg"]))
    if kind == "sft":  # an SFT step moves the weights and the moments
        assert any(a.abs().sum() > 0 for a in loaded["exp_avg"])
    assert got["position"] == saved[f"{kind}_iterator"]
    assert got["after"]["saved"] == ["iter_0000001", "iter_0000002"]
