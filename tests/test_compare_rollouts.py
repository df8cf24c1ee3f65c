"""tools/compare_rollouts.py: the runs it plans and the table and figure it makes of their
metrics (the runs themselves are rspo-train, tested elsewhere)."""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TOOL = ROOT / "tools" / "compare_rollouts.py"


def _tool():
    sys.path.insert(0, str(TOOL.parent))  # it imports compare_algorithms beside it
    spec = importlib.util.spec_from_file_location("compare_rollouts", TOOL)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _run(tmp_path: Path, variant: str, seed: int, accuracy: list[float], step_s: float) -> dict:
    """A finished run's record and metrics: evaluations every 2 steps, ``step_s`` per step."""
    run_dir = tmp_path / f"{variant}_seed{seed}"
    run_dir.mkdir()
    rows = [{"step": 0, "before/eval/accuracy": accuracy[0]}]
    for step in range(1, 2 * len(accuracy) - 1):
        row = {"step": step, "step_seconds": step_s, "time/rollout": step_s / 2}
        if step % 2 == 0:
            row["eval/accuracy"] = accuracy[step // 2]
        rows.append(row)
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return {"algorithm": variant, "seed": seed, "dir": run_dir, "wall_s": 1.0,
            "before/eval/accuracy": accuracy[0], "after/eval/accuracy": accuracy[-1]}


def test_runs_are_planned_per_seed_and_variant(tmp_path):
    tool = _tool()
    args = argparse.Namespace(out=str(tmp_path), config=str(tool.RECIPE), variants="exact,fast",
                              seeds=2, parallel=2, overrides=["train_steps=4"])
    runs = tool.plan_runs(args)
    assert [(r["algorithm"], r["seed"]) for r in runs] == [
        ("exact", 1234), ("fast", 1234), ("exact", 1235), ("fast", 1235)]
    assert "rollout.cache=none" in runs[0]["cmd"] and "rollout.cache=none" not in runs[1]["cmd"]
    assert runs[3]["cmd"][-2:] == ["seed=1235", f"logging.output_dir={tmp_path / 'fast_seed1235'}"]
    with pytest.raises(tool.runs_lib.CompareError, match="--variants"):
        tool.plan_runs(argparse.Namespace(**{**vars(args), "variants": "slow"}))


def test_planned_runs_run_and_are_reused(tmp_path, monkeypatch):
    """The planned runs go through runs_lib.run_one (the trainer replaced by a finished run's
    metrics): records come back, and a second call reuses them without running again."""
    tool = _tool()
    args = argparse.Namespace(out=str(tmp_path), config=str(tool.RECIPE), variants="exact,fast",
                              seeds=1, parallel=2, overrides=[])
    ran = []

    def fake_trainer(cmd, log_path):
        ran.append(log_path.parent.name)
        rows = [{"step": 0, "before/eval/accuracy": 0.2, "before/eval/reward": 0.7},
                {"step": 1, "step_seconds": 1.0, "eval/accuracy": 0.3,
                 "after/eval/accuracy": 0.3, "after/eval/reward": 0.8}]
        (log_path.parent / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        (log_path.parent / "config.yaml").write_text("global_batch_size: 64\ntrain_steps: 1\n")
        return 0

    monkeypatch.setattr(tool.runs_lib, "_run_logged", fake_trainer)
    records = tool.run_all(tool.plan_runs(args), args.parallel)
    assert sorted(ran) == ["exact_seed1234", "fast_seed1234"]
    assert [(r["algorithm"], r["lr"], r["after/eval/accuracy"]) for r in records] == [
        ("exact", None, 0.3), ("fast", None, 0.3)]
    assert tool.run_all(tool.plan_runs(args), args.parallel) == records and len(ran) == 2


def test_time_to_accuracy_table_and_figure(tmp_path):
    tool = _tool()
    records = [_run(tmp_path, "exact", 1, [0.2, 0.25, 0.3], 4.0),
               _run(tmp_path, "exact", 2, [0.2, 0.3, 0.3], 4.0),
               _run(tmp_path, "fast", 1, [0.2, 0.3, 0.2], 1.0)]
    target, table = tool.summarize(records, None)
    assert target == pytest.approx(30.0)  # the exact runs' final mean
    exact, fast = table["exact"]["runs"], table["fast"]["runs"]
    assert [r["tta_step"] for r in exact] == [4, 2] and exact[0]["tta_s"] == pytest.approx(16.0)
    assert fast[0]["tta_s"] == pytest.approx(2.0) and fast[0]["step_s"] == pytest.approx(1.0)
    assert fast[0]["rollout_s"] == pytest.approx(0.5) and fast[0]["gain"] == pytest.approx(0.0)
    text = tool.format_table(target, table)
    assert text.splitlines()[0].split()[0] == "variant" and "time to 30.0% (s)" in text
    assert text.splitlines()[2].split()[:2] == ["fast", "1"]
    png = tool.plot(records, target, tmp_path / "accuracy_vs_time.png")
    assert png.stat().st_size > 0
