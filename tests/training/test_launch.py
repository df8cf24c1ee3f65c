"""The product as users launch it: torchrun multi-node rendezvous, kill -9 and resume, SIGTERM.

Each test starts real ``rspo-train`` processes (``python -m rspo_mega.train``), so the whole path
(config validation, process groups, checkpoints, signals) is the production one. Every launch is
marked (``RSPO_MEGA_TEST_RUN``, see :mod:`tests.processes`); after it ended, also by ``kill -9``,
any process carrying its marker (checkpoint writers, torchrun workers, their helpers) fails the
test.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from rspo_mega.training.checkpoint.files import validate_checkpoint
from rspo_mega.training.metrics import is_wall_clock, read_metrics
from tests import processes
from tests.distributed import free_port
from tests.training.test_trainer import TINY

ROOT = Path(__file__).resolve().parents[2]
# the tiny default's model, without its shipped start, checkpoint directory and HF export
OWN_MODEL = ["checkpoint.init_from=null", "checkpoint.save_dir=null", "checkpoint.export_hf=null"]
RUN = TINY + OWN_MODEL + ["train_steps=5", "checkpoint.save_interval=1", "checkpoint.keep_last=5"]


def _env() -> tuple[dict, str]:
    """The launch environment, marked with a new run id (returned too)."""
    env, run = processes.marked_env()
    env.update(PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    return env, run


def _launch(args: list[str]) -> subprocess.Popen:
    env, run = _env()
    proc = subprocess.Popen(args, cwd=ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    proc.run_id = run  # type: ignore[attr-defined]
    return proc


def _train(out: Path, *extra: str) -> subprocess.Popen:
    return _launch([sys.executable, "-m", "rspo_mega.train", *RUN, f"logging.output_dir={out}",
                    f"checkpoint.save_dir={out}/ckpt", *extra])


def _nothing_left(run: str, what: str) -> None:
    processes.assert_none_left(lambda: processes.marked(processes.RUN_ENV, run), what)


def _metrics(out: Path) -> dict[int, dict]:
    return {r["step"]: r for r in read_metrics(out / "metrics.jsonl") if "loss" in r}


def _comparable(row: dict) -> dict:
    return {k: v for k, v in row.items() if not is_wall_clock(k)}


def _wait(proc: subprocess.Popen, timeout: float = 300) -> str:
    """The process's output once it ended; fails if anything it started is still running."""
    out, _ = proc.communicate(timeout=timeout)
    _nothing_left(proc.run_id, f"{' '.join(proc.args[2:4])} (exit code {proc.returncode})")
    return out


def test_kill_9_then_resume_is_bitwise_identical(tmp_path):
    ref = tmp_path / "uninterrupted"
    proc = _train(ref)
    log = _wait(proc)
    assert proc.returncode == 0, log[-3000:]
    expected = _metrics(ref)
    assert sorted(expected) == [1, 2, 3, 4, 5]

    run = tmp_path / "killed"
    proc = _train(run)
    deadline = time.monotonic() + 300
    while not (run / "ckpt" / "iter_0000003").is_dir():  # kill -9 right after step 3 is saved
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()[0][-3000:]
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    _nothing_left(proc.run_id, "rspo-train killed with SIGKILL after its checkpoints")
    # Corrupt the newest checkpoint: resume must report it and fall back to the previous one.
    newest = sorted((run / "ckpt").glob("iter_*"))[-1]
    victim = max((p for p in (newest / "dist").rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)
    victim.write_bytes(victim.read_bytes()[: victim.stat().st_size // 2])
    proc = _train(run)
    log = _wait(proc)
    assert proc.returncode == 0, log[-3000:]
    assert "skipping invalid checkpoint" in log and newest.name in log
    resumed = _metrics(run)
    steps = [r["step"] for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())
             if "loss" in r]
    assert steps == [1, 2, 3, 4, 5], steps  # what the killed attempt logged after step 3: redone
    for step in (4, 5):
        assert _comparable(resumed[step]) == _comparable(expected[step]), step

    # rspo-eval on the finished run: newest checkpoint, held-out set sharded over ranks.
    samples = tmp_path / "samples.jsonl"
    args = [sys.executable, "-m", "rspo_mega.evaluate", *RUN, f"logging.output_dir={ref}",
            f"checkpoint.save_dir={ref}/ckpt", "data.num_test_examples=6", "--samples", str(samples)]
    env, run = _env()
    done = subprocess.run(args, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    _nothing_left(run, "rspo-eval")
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["step"] == 5 and result["eval/examples"] == 6.0
    assert 0.0 <= result["eval/reward"] <= 1.0
    records = [json.loads(line) for line in samples.read_text().splitlines()]
    assert len(records) == 6 and len({r["uid"] for r in records}) == 6
    assert all(isinstance(r["completion"], str) for r in records)
    # the prompt as the model saw it: the plain template's bare puzzle, not the chat instructions
    assert all(r["prompt"].startswith("Puzzle: ") for r in records), records[0]["prompt"]
    mean = sum(r["reward"] for r in records) / 6
    assert abs(mean - result["eval/reward"]) < 1e-6, (mean, result)
    env, run = _env()
    bad = subprocess.run(args[:-1] + [str(tmp_path / "missing" / "s.jsonl")], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=300)
    _nothing_left(run, "rspo-eval with a bad --samples path")
    assert bad.returncode == 2 and "--samples" in bad.stderr and "does not exist" in bad.stderr


def _freeze_during_a_save(proc: subprocess.Popen, ckpt: Path) -> str:
    """SIGSTOP ``proc`` while a save of step >= 2 is under way; the name of that save's dir."""
    deadline = time.monotonic() + 300
    while True:
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()[0][-3000:]
        saving = [p for p in ckpt.glob("iter_*.tmp-*") if p.name >= "iter_0000002"]
        if saving:
            proc.send_signal(signal.SIGSTOP)
            if saving[0].exists():  # still there while stopped: the save is not finished
                return saving[0].name.split(".tmp-")[0]
            proc.send_signal(signal.SIGCONT)
        time.sleep(0.01)


def test_sigterm_during_a_save_then_resume(tmp_path):
    """SIGTERM in the middle of a save: the save completes, the run stops with 143 after it
    (naming the signal), and the next start resumes from that checkpoint."""
    proc = _train(tmp_path, "train_steps=200", "checkpoint.save_interval=1")
    name = _freeze_during_a_save(proc, tmp_path / "ckpt")
    proc.send_signal(signal.SIGTERM)  # pending until the save resumes
    proc.send_signal(signal.SIGCONT)
    log = _wait(proc, timeout=120)
    assert proc.returncode == 143, log[-3000:]  # the Slurm script requeues on 143
    step = int(name.split("_")[1])
    assert f"SIGTERM arrived during the save of step {step}" in log, log[-3000:]
    newest = max(p.name for p in (tmp_path / "ckpt").glob("iter_*") if ".tmp-" not in p.name)
    assert newest == name and validate_checkpoint(tmp_path / "ckpt" / newest) is None
    assert f"preempted at step {step}" in log, log[-3000:]
    assert json.loads((tmp_path / "summary.json").read_text())["final"]["preempted"] == 1.0
    proc = _train(tmp_path, f"train_steps={step + 1}")  # one step after the resume
    log = _wait(proc)
    assert proc.returncode == 0, log[-3000:]
    assert f"resumed from {tmp_path / 'ckpt' / name} at step {step}" in log, log[-3000:]
    assert step + 1 in _metrics(tmp_path)


def test_two_nodes_rendezvous_on_localhost(tmp_path):
    port = free_port()
    procs = []
    for node in range(2):
        args = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2",
                "--nproc-per-node", "1", "--rdzv-backend", "c10d",
                "--rdzv-endpoint", f"127.0.0.1:{port}", "--rdzv-id", "rspo-test",
                "-m", "rspo_mega.train", *TINY, *OWN_MODEL, "train_steps=2",
                f"logging.output_dir={tmp_path}",
                "parallel.world_size=2"]
        procs.append(_launch(args))
    logs = [_wait(p) for p in procs]
    for p, log in zip(procs, logs):
        assert p.returncode == 0, log[-3000:]
    assert sorted(_metrics(tmp_path)) == [1, 2]  # DP=2 across the two "nodes"


def _wait_for_a_step(proc: subprocess.Popen, out: Path, after: int = 0) -> None:
    """Until ``metrics.jsonl`` holds a training step past ``after``."""
    deadline = time.monotonic() + 300
    while not ((out / "metrics.jsonl").is_file() and max(_metrics(out), default=0) > after):
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()[0][-3000:]
        time.sleep(0.05)


def test_ctrl_c_saves_and_a_second_ctrl_c_exits_at_once(tmp_path):
    """The default save_interval (0: no periodic saves): Ctrl-C saves the step it stopped after,
    prints one line with the command that resumes, exits with 130; twice, it exits at once."""
    args = ["train_steps=200", "checkpoint.save_interval=0"]
    proc = _train(tmp_path, *args)
    _wait_for_a_step(proc, tmp_path)
    proc.send_signal(signal.SIGINT)
    log = _wait(proc, timeout=120)
    assert proc.returncode == 130, log[-3000:]
    assert "Traceback" not in log and "KeyboardInterrupt" not in log, log[-3000:]
    step = max(_metrics(tmp_path))
    assert validate_checkpoint(tmp_path / "ckpt" / f"iter_{step:07d}") is None
    lines = [line for line in log.splitlines() if line.startswith("interrupted at step")]
    assert lines == [f"interrupted at step {step}, checkpoint saved; resume with: python -m "
                     f"rspo_mega.train {' '.join(proc.args[3:])}"], log[-3000:]

    # a fresh run with steps of about a second, so that the second Ctrl-C comes within one
    twice = tmp_path / "twice"
    proc = _train(twice, *args, "rollout.steps=32", "global_batch_size=32")
    _wait_for_a_step(proc, twice)
    proc.send_signal(signal.SIGINT)
    time.sleep(0.1)
    proc.send_signal(signal.SIGINT)
    log = _wait(proc, timeout=60)
    assert proc.returncode == 130 and "interrupted again: exiting without saving" in log, log
    assert "Traceback" not in log, log[-3000:]
