"""The default config under torchrun, as a cluster runs it: several ranks, the HF export on.

Each test launches ``torchrun ... -m rspo_mega.train`` with the tiny default
(``rspo_mega/configs/tiny_sudoku.yaml``: its shipped start, checkpoints and HF export in the run
directory) made small: a few steps of 16 completions, 8 held-out puzzles. A run at TP2 and one at
DP2 are each stopped with SIGTERM, resumed, stopped with Ctrl-C (SIGINT), resumed and finished:
the end of the run evaluates, saves and exports once and every process exits within the time
bound. A TP2 x PP2 run on 4 ranks exports as well.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from rspo_mega.training.checkpoint.files import validate_checkpoint
from rspo_mega.training.metrics import read_metrics
from tests.distributed import free_port
from tests import processes
from tests.training.test_launch import _launch
from tests.training.test_launch import _wait as _wait_launch

SMALL = ["data.num_test_examples=8", "eval_interval=2", "global_batch_size=16",
         "rollout.micro_batch_size=16", "likelihood.micro_batch_size=16",
         "checkpoint.save_interval=1", "logging.tensorboard=false"]
RUN_BOUND_S = 240  # one launch of 2 ranks: start, a few steps, evaluation, save, export


def _torchrun(ranks: int, out: Path, *overrides: str):
    return _launch([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node",
                    str(ranks), "--master-port", str(free_port()), "-m", "rspo_mega.train",
                    *SMALL, *overrides, f"logging.output_dir={out}"])


def _fail(proc, why: str) -> None:
    """Kill the launch (torchrun and every process it started) and fail the test."""
    proc.kill()
    processes.reap(lambda: processes.marked(processes.RUN_ENV, proc.run_id), grace_s=0)
    out = proc.communicate()[0] or ""
    pytest.fail(f"{why}:\n{out[-3000:]}")


def _wait(proc, timeout: float = RUN_BOUND_S) -> str:
    """The launch's output once it ended; past ``timeout`` the test fails: a run's time bound."""
    try:
        return _wait_launch(proc, timeout=timeout)
    except subprocess.TimeoutExpired:
        _fail(proc, f"the launch did not end within {timeout:.0f} s")


def _newest_step(ckpt: Path) -> int:
    steps = [int(p.name[5:]) for p in ckpt.glob("iter_*") if ".tmp-" not in p.name]
    return max(steps, default=0)


def _stop_after_a_save(proc, ckpt: Path, after: int, sig: int) -> None:
    """Send ``sig`` to torchrun once a checkpoint of a step past ``after`` exists."""
    deadline = time.monotonic() + RUN_BOUND_S
    while _newest_step(ckpt) <= after:
        if proc.poll() is not None or time.monotonic() > deadline:
            _fail(proc, f"no checkpoint past step {after} in {ckpt} within {RUN_BOUND_S} s")
        time.sleep(0.05)
    proc.send_signal(sig)


def _no_tracebacks(log: str) -> None:
    """No rank printed a traceback (torchrun prints its own when a signal stops it)."""
    ours = [line for line in log.splitlines()
            if line.strip().startswith("File ") and "rspo_mega" in line]
    assert not ours and "[rank" not in log, log[-3000:]


@pytest.mark.parametrize("layout", [["parallel.tp=2"], []], ids=["tp2", "dp2"])
def test_two_ranks_stop_on_sigterm_and_ctrl_c_resume_and_finish_with_the_export(tmp_path, layout):
    out, steps = tmp_path / "run", 5
    run = [*layout, f"train_steps={steps}"]
    start = time.monotonic()

    proc = _torchrun(2, out, *run)
    _stop_after_a_save(proc, out / "ckpt", 0, signal.SIGTERM)
    log = _wait(proc)
    first = _newest_step(out / "ckpt")
    assert f"preempted at step {first}: the same command resumes" in log, log[-3000:]
    assert validate_checkpoint(out / "ckpt" / f"iter_{first:07d}") is None
    assert not (out / "hf").exists()  # a stopped run is not exported
    _no_tracebacks(log)

    proc = _torchrun(2, out, *run)
    _stop_after_a_save(proc, out / "ckpt", first, signal.SIGINT)
    log = _wait(proc)
    second = _newest_step(out / "ckpt")
    assert f"resumed from {out / 'ckpt' / f'iter_{first:07d}'} at step {first}" in log
    interrupted = [line for line in log.splitlines() if line.startswith("interrupted at step")]
    assert interrupted == [f"interrupted at step {second}, checkpoint saved; resume with: "
                           "torchrun --nproc-per-node 2 -m rspo_mega.train "
                           + " ".join([*SMALL, *run, f"logging.output_dir={out}"])], log[-3000:]
    assert log.count("interrupt: saving a checkpoint after this step") == 1, log[-3000:]
    _no_tracebacks(log)

    proc = _torchrun(2, out, *run)
    log = _wait(proc)
    assert proc.returncode == 0, log[-3000:]
    _no_tracebacks(log)
    assert log.count(f"saved step {steps} ") == 1, log[-3000:]  # the last step: saved once
    summary = json.loads((out / "summary.json").read_text())["final"]
    assert summary["before/eval/examples"] == summary["after/eval/examples"] == 8.0, summary
    assert log.count("held-out accuracy on 8 examples: ") == 1, log[-3000:]
    hf = out / "hf"
    assert (hf / "config.json").is_file() and list(hf.glob("*.safetensors")), log[-3000:]
    assert (hf / "tokenizer.model").is_file()
    records = read_metrics(out / "metrics.jsonl")
    logged = [r["step"] for r in records if "loss" in r]
    assert logged == list(range(1, steps + 1)), logged  # no step twice after two resumes
    final = [r for r in records if r["step"] == steps]
    assert len(final) == 1 and "after/eval/accuracy" in final[0] and "eval/accuracy" in final[0]
    print(f"\n{layout or ['dp=2']}: stopped at steps {first} and {second}, three launches in "
          f"{time.monotonic() - start:.0f} s")


def test_four_ranks_tp2_pp2_export_at_the_end(tmp_path):
    out = tmp_path / "run"
    start = time.monotonic()
    proc = _torchrun(4, out, "parallel.tp=2", "parallel.pp=2", "train_steps=2")
    log = _wait(proc)
    assert proc.returncode == 0, log[-3000:]
    _no_tracebacks(log)
    assert (out / "hf" / "config.json").is_file() and list((out / "hf").glob("*.safetensors"))
    assert json.loads((out / "summary.json").read_text())["final"]["after/eval/examples"] == 8.0
    print(f"\ntp2 x pp2: {time.monotonic() - start:.0f} s")
