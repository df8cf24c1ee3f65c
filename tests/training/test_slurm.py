"""``examples/slurm/rspo_llada8b.sbatch`` under a real Slurm: launch, preemption, requeue, resume.

``examples/slurm/local_cluster.py`` starts ``munged``, ``slurmctld`` and ``slurmd`` (Debian's
``slurm-wlm`` and ``munge``; ``.ci/run`` installs them) for one CPU node in a temporary directory.
The unmodified script is submitted as a user submits it, from a directory without ``logs/``, with
the tiny default on two ranks (``NPROC_PER_NODE=2 IMAGE=none``): first a job that runs through,
then one that is sent SIGUSR1 (its batch shell, as ``--signal=B:USR1@300`` does) and later
SIGTERM (its ranks, as a preemption does). Each stop saves, the job requeues itself, resumes from
the saved step and finishes with metrics bitwise equal to the uninterrupted job's. The cluster
and every process of the jobs carry the launch marker of :mod:`tests.processes`; after the daemons
are stopped by pid nothing with the marker may be alive.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator

import pytest

from tests import processes
from tests.training.test_launch import _comparable

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "examples" / "slurm" / "rspo_llada8b.sbatch"
CLUSTER = ROOT / "examples" / "slurm" / "local_cluster.py"
STEPS = 8
# The tiny default, shorter: 8 steps, 64 held-out puzzles. No HF export: at two ranks it waits
# forever for a collective (issue 32, finish_run); remove the override once that is fixed.
EXTRA = f"train_steps={STEPS} data.num_test_examples=64 checkpoint.export_hf=null"
JOB_LOG = "rspo-llada8b-{}.out"
METRICS = Path("runs") / "tiny_sudoku" / "metrics.jsonl"


def _missing() -> str:
    sys.path.insert(0, str(CLUSTER.parent))
    try:
        from local_cluster import missing_programs
    finally:
        sys.path.pop(0)
    missing = missing_programs()
    if missing:
        return f"Slurm is not installed ({' '.join(missing)}; .ci/run installs slurm-wlm munge)"
    return "" if os.geteuid() == 0 else "a local Slurm cluster needs root (slurmd, GPU devices)"


SKIP = _missing()
pytestmark = pytest.mark.skipif(bool(SKIP), reason=SKIP)


def _job_env(env: dict, submit: Path) -> dict:
    out = {k: v for k, v in env.items()
           if not k.startswith("SLURM_") and k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK",
                                                        "MASTER_ADDR", "MASTER_PORT")}
    out.update(SLURM_CONF=env["SLURM_CONF"], CONFIG=str(ROOT / "rspo_mega/configs/tiny_sudoku.yaml"),
               NPROC_PER_NODE="2", IMAGE="none", EXTRA=EXTRA, PWD=str(submit),
               PATH=str(Path(sys.executable).parent) + os.pathsep + env["PATH"])
    return out


def _slurm(env: dict, *args: str) -> str:
    done = subprocess.run(args, env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, f"{' '.join(args)}: {done.stderr.strip()}"
    return done.stdout


def _job(env: dict, job: str) -> dict[str, str]:
    """``scontrol show job``'s fields of ``job`` (finished jobs stay for MinJobAge, 300 s)."""
    return dict(re.findall(r"(\w+)=(\S*)", _slurm(env, "scontrol", "show", "job", "-o", job)))


@contextmanager
def local_cluster(root: Path) -> Iterator[dict]:
    """The cluster's environment (``SLURM_CONF``, launch marker). Afterwards ``stop`` cancels
    the jobs and stops the daemons by pid; none of them, and no marked process, may be left."""
    env, run = processes.marked_env()
    env.pop("SLURM_CONF", None)
    started = subprocess.run([sys.executable, str(CLUSTER), "start", str(root)], env=env,
                             capture_output=True, text=True, timeout=120)
    env["SLURM_CONF"] = str(root / "slurm.conf")
    try:
        assert started.returncode == 0, started.stderr + started.stdout
        assert started.stdout.strip() == f"export SLURM_CONF={env['SLURM_CONF']}"
        yield env
    finally:
        files = {"slurmctld": "slurmctld.pid", "slurmd": "slurmd.pid", "munged": "munge/munged.pid"}
        daemons = {d: int((root / f).read_text().split()[0])
                   for d, f in files.items() if (root / f).exists()}
        stopped = subprocess.run([sys.executable, str(CLUSTER), "stop", str(root)], env=env,
                                 capture_output=True, text=True, timeout=180)
        assert stopped.returncode == 0 and not stopped.stderr, stopped.stderr
        live = {p.pid for p in processes.processes()}
        alive = [f"{d} (pid {pid})" for d, pid in daemons.items() if pid in live]
        assert not alive, f"daemons still running after stop: {alive}"
        assert started.returncode != 0 or set(daemons) == set(files), sorted(daemons)
        processes.assert_none_left(lambda: processes.marked(processes.RUN_ENV, run),
                                   "the local Slurm cluster and its jobs")


ENDED = ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL")


def _tail(log: Path) -> str:
    return f"job log {log.name}:\n" + (log.read_text()[-4000:] if log.exists() else "(none)")


def _wait(what: str | Callable[[], str], ready: Callable[[], bool], log: Path,
          timeout: float = 600) -> None:
    deadline = time.monotonic() + timeout
    while not ready():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out waiting for {what() if callable(what) else what}; {_tail(log)}")
        time.sleep(0.5)


def _requeued(env: dict, job: str, restarts: int, log: Path) -> bool:
    """Whether ``job`` started its run number ``restarts``; fails if it ended before."""
    state = _job(env, job)
    assert int(state["Restarts"]) >= restarts or state["JobState"] not in ENDED, (
        f"job {job} ended {state['JobState']} (exit {state['ExitCode']}) instead of requeueing "
        f"itself a {restarts}. time; {_tail(log)}")
    return int(state["Restarts"]) >= restarts


def _metrics(submit: Path) -> dict[int, dict]:
    """Every metrics row of the run, merged by step, without times and memory. The final
    summary row repeats the ``before/`` figures of step 0 only where the run was not resumed
    (issue 32); they are compared at step 0."""
    rows: dict[int, dict] = {}
    path = submit / METRICS
    for line in path.read_text().splitlines() if path.exists() else []:
        if line.strip():
            row = _comparable(json.loads(line))
            if row["step"] > 0:
                row = {k: v for k, v in row.items() if not k.startswith("before/")}
            rows.setdefault(row["step"], {}).update(row)
    return rows


def _newest_checkpoint(submit: Path) -> int:
    """The step of the newest complete checkpoint of the run."""
    names = (submit / METRICS).parent.glob("ckpt/iter_*")
    return max(int(p.name.split("_")[1]) for p in names if ".tmp-" not in p.name)


def _last_step(submit: Path) -> int:
    return max((s for s, r in _metrics(submit).items() if "loss" in r), default=0)


def _completed(env: dict, job: str, log: Path) -> None:
    """Wait for ``job`` to end; it must have completed with exit code 0."""
    state: dict[str, str] = {}

    def ended() -> bool:
        state.update(_job(env, job))
        return state["JobState"] in ENDED

    _wait(lambda: f"job {job} to end (now {state['JobState']}, reason {state['Reason']})",
          ended, log)
    assert (state["JobState"], state["ExitCode"]) == ("COMPLETED", "0:0"), (
        f"job {job} ended {state['JobState']} {state['ExitCode']} ({state.get('Reason')}); "
        f"{_tail(log)}")


def _submit(env: dict, submit: Path) -> tuple[str, Path]:
    """sbatch the script from ``submit``, a new directory (no ``logs/``); the job id, its log."""
    submit.mkdir()
    job_env = _job_env(env, submit)
    job = subprocess.run(["sbatch", "--parsable", str(SCRIPT)], cwd=submit, env=job_env,
                         capture_output=True, text=True, timeout=60)
    assert job.returncode == 0, job.stderr
    job_id = job.stdout.strip().split(";")[0]
    return job_id, submit / JOB_LOG.format(job_id)


def _check_log(log: Path, job: str, restarts: int) -> str:
    """The job's log: each run's first line says what runs where; no traceback."""
    text = log.read_text()
    host = re.escape(os.uname().nodename.split(".")[0])
    first = (rf"\S+ job {job} \(restart {{}}\): 1 node\(s\) \[{host}\] x 2 ranks, image none, "
             rf"config \S+tiny_sudoku.yaml, layout 'parallel.world_size=2', extra '{EXTRA}', "
             rf"rendezvous {host}:\d+")
    assert re.match(first.format(0), text), text[:2000]
    runs = [line for line in text.splitlines() if re.match(first.format(r"\d+"), line)]
    assert len(runs) == restarts + 1, runs
    assert "Traceback" not in text and "ChildFailedError" not in text, text[-4000:]
    return text


def test_sbatch_preemption_requeue_resume(tmp_path):
    with local_cluster(tmp_path / "slurm") as env:
        t0 = time.monotonic()
        ref_job, ref_log = _submit(env, tmp_path / "uninterrupted")
        _completed(env, ref_job, ref_log)
        _check_log(ref_log, ref_job, restarts=0)
        expected = _metrics(tmp_path / "uninterrupted")
        assert sorted(s for s, r in expected.items() if "loss" in r) == list(range(1, STEPS + 1))
        t_ref = time.monotonic() - t0

        submit = tmp_path / "preempted"
        job, log = _submit(env, submit)
        _wait("step 2", lambda: _last_step(submit) >= 2, log)
        _slurm(env, "scancel", "--signal=USR1", "--batch", job)  # the time limit's warning
        _wait("the first requeue", lambda: _requeued(env, job, 1, log), log)
        first = _newest_checkpoint(submit)
        _wait("a step after the resume", lambda: _last_step(submit) > first, log)
        _slurm(env, "scancel", "--signal=TERM", job)  # every process of the job's steps
        _wait("the second requeue", lambda: _requeued(env, job, 2, log), log)
        second = _newest_checkpoint(submit)
        _completed(env, job, log)
        t_preempted = time.monotonic() - t0 - t_ref

    text = _check_log(log, job, restarts=2)
    assert "SIGUSR1: asking every rank to save and stop" in text
    for step, cause in ((first, "stop file"), (second, "SIGTERM")):
        assert f"preempted at step {step}, checkpoint saved: requeueing job {job}" in text, text
        assert f"resumed from runs/tiny_sudoku/ckpt/iter_{step:07d} at step {step}" in text, text
        lines = [x for x in text.splitlines() if f"step {step} and exiting" in x]
        assert 1 <= len(lines) <= 2 and any(f"{cause}: " in x for x in lines), lines
    assert first < second < STEPS
    assert not list(submit.glob("*.stop")) + list(submit.glob("*.preempted"))
    assert _metrics(submit) == expected  # bitwise: the same floats in the same JSON
    print(f"slurm test: uninterrupted job {t_ref:.0f} s, preempted job {t_preempted:.0f} s")
