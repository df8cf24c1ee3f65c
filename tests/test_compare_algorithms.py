"""``tools/compare_algorithms.py``: every algorithm from one start, its settings applied, the
table, the curves, reuse of finished runs, and Ctrl-C ending every process it started."""

from __future__ import annotations

import importlib.util
import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from rspo_mega.training.metrics import read_metrics
from tests import processes

ROOT = Path(__file__).resolve().parents[1]
TOOL = ROOT / "tools" / "compare_algorithms.py"
# The tiny default's task and sampler on a 2-layer model (that of the HF start below) and a few
# examples; the geometry keys the tiny default sets must agree with the start's config.json.
SMALL = [
    "model.num_layers=2", "model.hidden_size=64", "model.ffn_hidden_size=160",
    "model.num_attention_heads=4", "model.max_position_embeddings=128", "global_batch_size=8",
    "rollout.micro_batch_size=8", "rollout.steps=8",
    "likelihood.micro_batch_size=16", "data.num_train_examples=64", "data.num_test_examples=8",
]


def _tool():
    spec = importlib.util.spec_from_file_location("compare_algorithms", TOOL)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def start(tmp_path_factory) -> str:
    """A tiny random HF LLaDA directory with a SentencePiece tokenizer trained on task text."""
    from rspo_mega.data.tokenizer_training import train_sentencepiece_tokenizer
    from rspo_mega.tasks.corpus import task_corpus
    from tests.training.test_hf_start import _write_with_tokenizer

    root = tmp_path_factory.mktemp("start")
    model = train_sentencepiece_tokenizer(task_corpus(num_countdown=300, num_sudoku=300),
                                          root / "sp" / "tok", vocab_size=400)
    return _write_with_tokenizer(root / "llada", model, "tokenizer.model")


def _launch(args: list[str]) -> tuple[subprocess.Popen, str]:
    env, run = processes.marked_env()
    env["OMP_NUM_THREADS"] = "1"
    proc = subprocess.Popen([sys.executable, str(TOOL), *args], cwd=ROOT, env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    return proc, run


def _finish(proc: subprocess.Popen, run: str, timeout: float = 360) -> tuple[str, str]:
    out, err = proc.communicate(timeout=timeout)
    processes.assert_none_left(lambda: processes.marked(processes.RUN_ENV, run),
                               f"compare_algorithms (exit code {proc.returncode})")
    return out, err


@pytest.mark.timeout(600)
def test_every_algorithm_searches_its_rate_on_validation_then_runs_at_it(start, tmp_path):
    out = tmp_path / "cmp"
    args = ["--out", str(out), "--seeds", "1", "--steps", "2", "--eval-interval", "1",
            "--lr-grid", "1e-3,1e-4", "--validation", "8", "--init-from", start, *SMALL]
    stdout, stderr = _finish(*_launch(args))
    assert "Traceback" not in stderr, stderr[-3000:]
    result = json.loads((out / "comparison.json").read_text())
    algorithms = ["rspo", "espo", "diffu_grpo", "agrpo"]
    assert [(r["algorithm"], r["lr"]) for r in result["grid"]] == [
        (a, lr) for a in algorithms for lr in (1e-4, 1e-3)], stdout
    for r in result["grid"]:
        cfg = yaml.safe_load((Path(r["dir"]) / "config.yaml").read_text())
        assert cfg["optimizer"]["lr"] == r["lr"] and cfg["data"]["num_validation_examples"] == 8
        assert r["after/val/accuracy"] is not None and r["before/val/reward"] is not None
    for a in algorithms:  # the rate with the most validation solved, then cells, then smaller
        mine = [r for r in result["grid"] if r["algorithm"] == a]
        best = max(mine, key=lambda r: (r["after/val/accuracy"], r["after/val/reward"], -r["lr"]))
        assert result["chosen_lr"][a] == best["lr"]
    runs = result["runs"]
    assert [(r["algorithm"], r["seed"], r["lr"]) for r in runs] == [
        (a, 1234, result["chosen_lr"][a]) for a in algorithms]
    assert stdout.count("(reused)") == 4  # the first seed's run at the chosen rate is the grid's
    for r in runs:
        cfg = yaml.safe_load((Path(r["dir"]) / "config.yaml").read_text())
        assert (cfg["algorithm"]["name"], cfg["seed"]) == (r["algorithm"], 1234)
        assert cfg["checkpoint"]["init_from"] == start and cfg["train_steps"] == 2
        assert cfg["model"]["num_query_groups"] == 2  # from the start's config.json
        rows = read_metrics(Path(r["dir"]) / "metrics.jsonl")
        assert [x["step"] for x in rows if "loss" in x] == [1, 2]
        assert [x["step"] for x in rows if "eval/accuracy" in x] == [1, 2]
        assert [x["step"] for x in rows if "val/accuracy" in x] == [1, 2]
        after = [x for x in rows if "after/eval/accuracy" in x][0]
        assert r["after/eval/accuracy"] == after["after/eval/accuracy"]
        assert r["after/eval/reward"] == after["after/eval/reward"]
        assert (r["completions_per_step"], r["train_steps"]) == (8, 2)
        r["cfg"] = cfg
    espo, diffu, agrpo = runs[1]["cfg"], runs[2]["cfg"], runs[3]["cfg"]
    assert (espo["likelihood"]["mask_scheme"], espo["likelihood"]["mc_samples"]) == ("coupled", 2)
    assert (espo["algorithm"]["inner_updates"], espo["algorithm"]["kl_beta"],
            espo["algorithm"]["advantage"]) == (8, 0.01, "leave_one_out")
    assert diffu["likelihood"]["mask_scheme"] == "one_step"
    assert (diffu["algorithm"]["inner_updates"], diffu["algorithm"]["clip_eps"],
            diffu["algorithm"]["kl_beta"]) == (12, 0.5, 0.04)
    assert espo["likelihood"]["fresh_masks_per_update"] and \
        diffu["likelihood"]["fresh_masks_per_update"]  # a mask draw per inner update
    assert (agrpo["likelihood"]["mask_scheme"], agrpo["likelihood"]["step_sampling"],
            agrpo["likelihood"]["mc_samples"], agrpo["algorithm"]["advantage"]) == (
        "trajectory", "entropy", 3, "mean")
    assert runs[0]["cfg"]["likelihood"]["mask_scheme"] == "bernoulli"  # RSPO: the config's
    lines = stdout.splitlines()
    table = lines[[line.split()[:3] for line in lines].index(["algorithm", "lr", "seeds"]):]
    assert [line.split()[:2] for line in table[1:5]] == [
        [a, f"{result['chosen_lr'][a]:g}"] for a in algorithms], stdout
    assert "val solved after %" in stdout  # the grid's table
    assert (out / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    again, _ = _finish(*_launch(args))  # the same command: every finished run is reused
    assert again.count("(reused)") == 12, again


@pytest.mark.timeout(200)
def test_ctrl_c_ends_the_running_training_and_keeps_nothing_alive(start, tmp_path):
    out = tmp_path / "cmp"
    proc, run = _launch(["--out", str(out), "--algorithms", "rspo", "--seeds", "1",
                         "--steps", "500", "--init-from", start, *SMALL])
    metrics = out / "rspo_seed1234" / "metrics.jsonl"
    deadline = time.monotonic() + 150
    while not (metrics.is_file() and '"loss"' in metrics.read_text()):  # training under way
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
        time.sleep(0.2)
    proc.send_signal(signal.SIGINT)
    _, stderr = _finish(proc, run, timeout=120)
    assert proc.returncode == 130 and "interrupted" in stderr, stderr[-3000:]
    assert not (out / "rspo_seed1234" / "result.json").exists()


def test_a_config_without_a_start_is_refused(tmp_path):
    config = tmp_path / "run.yaml"
    config.write_text("seed: 7\n")
    done = subprocess.run([sys.executable, str(TOOL), "--config", str(config), "--out",
                           str(tmp_path / "o")], capture_output=True, text=True, timeout=60)
    assert done.returncode == 2
    assert f"{config} has no checkpoint.init_from: name the start of every run with " \
           "--init-from DIR" in done.stderr
    bad = subprocess.run([sys.executable, str(TOOL), "--algorithms", "rspo,grpo", "--init-from",
                          str(tmp_path)], capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and "['grpo']" in bad.stderr


def test_table_gives_mean_spread_and_range_per_algorithm():
    tool = _tool()
    records = [{"algorithm": "espo", "seed": s, "lr": 3e-4, "wall_s": w,
                "before/eval/accuracy": 0.1, "before/eval/reward": 0.5, "after/eval/accuracy": a,
                "after/eval/reward": 0.7, "train_steps": 100, "completions_per_step": 64,
                "to_target": hit}
               for s, a, w, hit in ((1, 0.2, 10.0, {"step": 40, "rollouts": 2560, "train_s": 50.0}),
                                    (2, 0.3, 20.0, {"step": 20, "rollouts": 1280, "train_s": 30.0}),
                                    (3, 0.25, 30.0, None))]
    summary = tool.summarize(records)
    assert summary["espo"]["gain"] == pytest.approx([10.0, 20.0, 15.0])
    assert summary["espo"]["rollouts"] == [6400] * 3
    row = tool.format_table(summary).splitlines()[1]
    assert row.split()[:4] == ["espo", "0.0003", "3", "2/3"]  # rate, seeds, reached the target
    assert "15.0 ± 5.0 [10.0, 20.0]" in row  # gain, points
    assert "25.0 ± 5.0 [20.0, 30.0]" in row  # solved after
    assert "20 ± 10 [10, 30]" in row  # wall seconds
    assert "30 ± 14 [20, 40]" in row and "40 ± 14 [30, 50]" in row  # steps and seconds to target
    assert " 6400 " in row  # rollouts per run, the same for all
    single = tool.format_table(tool.summarize(records[2:])).splitlines()[1].split()
    assert single[:6] == ["espo", "0.0003", "1", "0/1", "10.0", "25.0"]
    assert single[-3:] == ["-", "-", "-"]  # never reached the target


def test_the_rate_is_chosen_on_validation_and_every_seed_runs_at_it(tmp_path):
    tool = _tool()

    def grid(algorithm, lr, solved, cells):
        return {"algorithm": algorithm, "lr": lr, "after/val/accuracy": solved,
                "after/val/reward": cells, "after/eval/accuracy": 1.0 - solved}

    records = [grid("rspo", 1e-4, 0.30, 0.7), grid("rspo", 3e-4, 0.35, 0.6),
               grid("rspo", 1e-3, 0.35, 0.8), grid("espo", 1e-5, 0.2, 0.5),
               grid("espo", 1e-4, 0.2, 0.5)]
    assert tool.choose_rates(records) == {"rspo": 1e-3, "espo": 1e-5}  # test figures unused
    config = tmp_path / "run.yaml"
    config.write_text("seed: 7\ncheckpoint: {init_from: somewhere}\n")
    planner = tool.Planner(tool.parse_args([
        "--config", str(config), "--out", str(tmp_path / "o"), "--algorithms", "rspo,espo",
        "--seeds", "2", "--lr-grid", "1e-3,1e-4", "--validation", "64", "rollout.steps=8"]))
    assert [(r["algorithm"], r["lr"], r["seed"]) for r in planner.grid()] == [
        ("rspo", 1e-4, 7), ("rspo", 1e-3, 7), ("espo", 1e-4, 7), ("espo", 1e-3, 7)]
    seeded = planner.seeded({"rspo": 1e-3, "espo": 1e-4})
    assert [(r["algorithm"], r["lr"], r["seed"]) for r in seeded] == [
        ("rspo", 1e-3, 7), ("rspo", 1e-3, 8), ("espo", 1e-4, 7), ("espo", 1e-4, 8)]
    assert seeded[0] == planner.grid()[1]  # the first seed's run is the grid's: reused
    cmd = seeded[3]["cmd"]
    assert "optimizer.lr=0.0001" in cmd and "data.num_validation_examples=64" in cmd
    assert cmd.index("rollout.steps=8") < cmd.index("optimizer.lr=0.0001")
    assert seeded[3]["dir"].name == "espo_lr0.0001_seed8"
    for bad, message in ((["--lr-grid", "1e-3,x"], "expected comma-separated numbers"),
                         (["--lr-grid", "0,1e-3"], "expected learning rates > 0"),
                         (["--lr-grid", "1e-3", "optimizer.lr=1e-4"], "drop the override")):
        with pytest.raises(tool.CompareError, match=message):
            tool.Planner(tool.parse_args(["--config", str(config), *bad]))


def test_time_to_target_is_the_first_evaluation_reaching_it():
    tool = _tool()
    records = [{"step": 0, "before/eval/accuracy": 0.20}]
    for step in range(1, 7):
        records.append({"step": step, "loss": 0.0, "step_seconds": float(step)})
        if step % 2 == 0:
            records.append({"step": step, "eval/accuracy": {2: 0.22, 4: 0.26, 6: 0.24}[step]})
    records.append({"step": 6, "after/eval/accuracy": 0.24})
    assert tool.time_to_target(records, 0.25) == {"step": 4, "train_s": 1.0 + 2 + 3 + 4}
    assert tool.time_to_target(records, 0.22) == {"step": 2, "train_s": 3.0}
    assert tool.time_to_target(records, 0.30) is None
