"""README.md's shell commands, run as written: the README cannot drift from the code.

Every command of its ```bash blocks (continuation lines joined, comments dropped) must have an
entry in :data:`EXPECTED`, found by how the command starts; a new command without one fails the
test. The commands run in README order, in one directory that holds the repository's files (and
the test's virtual environment as ``.venv``), with that environment's ``bin`` first on ``PATH``
(so ``python`` and the console scripts are its own). An entry says what a command must do:

* ``runs``: exit 0. Commands that would train or evaluate for long get small overrides appended
  (``train_steps=2``, 8 held-out puzzles, ...), inside ``ARGS="..."`` for ``make``.
* ``fails``: it needs files only a cluster has (the recipes' placeholder paths): it exits with
  an error and prints exactly one line of its own, naming each missing path.
* ``skip``: with the reason (Slurm, the test suite itself, installing the environment).
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import NamedTuple

from tests import processes
from tests.training.test_launch import ROOT

README = ROOT / "README.md"
RECIPE_TOKENIZER = "/checkpoints/llada-8b-instruct/tokenizer.json"
RECIPE_START = "/checkpoints/llada-8b-instruct-mcore"
# a few steps of 16 completions, 8 held-out puzzles
SHORT_RUN = "train_steps=2 data.num_test_examples=8 global_batch_size=16 rollout.micro_batch_size=16"
SHORT_EVAL = "data.num_test_examples=8"


class Expected(NamedTuple):
    start: str  # how the command starts
    kind: str  # runs | fails | skip
    detail: str = ""  # runs: appended; fails: the missing paths (space-separated); skip: why


EXPECTED = [
    Expected("make train ARGS=", "runs", SHORT_RUN),
    Expected("make train", "runs", SHORT_RUN),
    Expected("make test", "skip", "the test suite itself (.ci/run runs it)"),
    Expected("python tools/convert_hf_to_mcore.py --hf /checkpoints/", "fails",
             "/checkpoints/llada-8b-instruct"),
    Expected("rspo-plan --config examples/configs/", "runs"),
    Expected("rspo-train --config examples/configs/llada8b_rspo_countdown.yaml --dry-run", "fails",
             f"{RECIPE_TOKENIZER} {RECIPE_START}"),
    Expected("CONFIG=examples/configs/llada8b_rspo_countdown.yaml sbatch", "skip",
             "needs Slurm (the sbatch script has a test of its own)"),
    Expected("torchrun --nproc-per-node 8 -m rspo_mega.evaluate", "fails",
             f"{RECIPE_TOKENIZER} {RECIPE_START}"),
    Expected("python tools/convert_mcore_to_hf.py --ckpt runs/llada8b-rspo-countdown/", "fails",
             "runs/llada8b-rspo-countdown/checkpoints/iter_0000600/dist"),
    Expected("rspo-train --config rspo_mega/configs/tiny_sudoku_sft.yaml", "runs", SHORT_RUN),
    Expected("rspo-train --dry-run", "runs"),
    Expected("rspo-eval", "runs", SHORT_EVAL),
    Expected("rspo-plan --nodes", "runs"),
    Expected("python tools/plot_metrics.py", "runs"),
    Expected("python tools/compare_algorithms.py", "runs",
             f"--lr-grid 1e-3 --seeds 1 --algorithms rspo --steps 1 {SHORT_RUN}"),
    Expected("python3 -m venv .venv", "skip", "installs the environment this test runs in"),
    Expected("pip install", "skip", "installs the environment this test runs in"),
]
TIMEOUT_S = 300  # one command


def shell_commands(text: str) -> list[str]:
    """The commands of the ```bash blocks of ``text``, in order."""
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", text, flags=re.S):
        joined = re.sub(r"\\\n\s*", "", block)
        for line in joined.splitlines():
            line = line.strip()
            if line and not line.startswith("#"):
                commands.append(_strip_comment(line))
    return commands


def _strip_comment(line: str) -> str:
    """``line`` without a trailing `` # comment`` outside quotes."""
    quote = None
    for i, ch in enumerate(line):
        if quote:
            quote = None if ch == quote else quote
        elif ch in "'\"":
            quote = ch
        elif ch == "#" and i and line[i - 1].isspace():
            return line[:i].strip()
    return line


def expectation(command: str) -> Expected:
    found = [e for e in EXPECTED if command.startswith(e.start)]
    assert found, f"README command without an entry in tests/test_readme.py EXPECTED: {command}"
    return found[0]


def with_short_settings(command: str, extra: str) -> str:
    """``command`` with ``extra`` appended (into ``ARGS="..."`` for make)."""
    if not extra:
        return command
    if command.startswith("make "):
        if 'ARGS="' in command:
            return re.sub(r'ARGS="([^"]*)"', lambda m: f'ARGS="{m.group(1)} {extra}"', command)
        return f'{command} ARGS="{extra}"'
    return f"{command} {extra}"


def _workdir(tmp: Path) -> Path:
    """The repository's files, and a ``.venv`` of links into this test's environment (with its
    own ``.installed`` stamp, so make never rebuilds the real one)."""
    work = tmp / "clone"
    work.mkdir()
    for entry in ROOT.iterdir():
        if entry.name not in (".git", ".venv", "runs") and not entry.name.startswith(".pytest"):
            (work / entry.name).symlink_to(entry)
    venv = work / ".venv"
    venv.mkdir()
    for entry in Path(sys.prefix).iterdir():
        if entry.name != ".installed":
            (venv / entry.name).symlink_to(entry)
    (venv / ".installed").touch()
    return work


def _run(command: str, work: Path) -> tuple[subprocess.CompletedProcess, float]:
    env, run = processes.marked_env()
    env["PATH"] = f"{work / '.venv' / 'bin'}{os.pathsep}{env['PATH']}"
    env["PYTHONPATH"] = str(work) + os.pathsep + env.get("PYTHONPATH", "")
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "VIRTUAL_ENV"):
        env.pop(key, None)
    start = time.monotonic()
    done = subprocess.run(["bash", "-c", command], cwd=work, env=env, capture_output=True,
                          text=True, timeout=TIMEOUT_S)
    seconds = time.monotonic() - start
    processes.assert_none_left(lambda: processes.marked(processes.RUN_ENV, run), command[:60])
    return done, seconds


def _check_failure(command: str, done: subprocess.CompletedProcess, paths: str) -> None:
    """A placeholder path stopped it: one line of its own, naming every missing path."""
    text = done.stdout + done.stderr
    prog = {"python tools/convert_hf_to_mcore.py": "convert_hf_to_mcore:",
            "python tools/convert_mcore_to_hf.py": "convert_mcore_to_hf:",
            "torchrun": "rspo-eval:", "rspo-train": "rspo-train:"}
    prefix = next(p for start, p in prog.items() if command.startswith(start))
    lines = [line for line in text.splitlines() if line.startswith(prefix)]
    assert done.returncode != 0 and len(lines) == 1, f"{command}\n{text[-3000:]}"
    assert all(path in lines[0] for path in paths.split()), lines[0]
    assert "[rank" not in text and 'rspo_mega/' not in text.split(lines[0])[0], text[-3000:]


def test_every_readme_command_runs_as_written(tmp_path):
    commands = shell_commands(README.read_text())
    assert len(commands) >= 15, commands
    plan = [(c, expectation(c)) for c in commands]  # every command classified before any runs
    work = _workdir(tmp_path)
    for placeholder in ("/checkpoints/llada-8b-instruct", "/checkpoints/llada-8b-instruct-mcore"):
        assert not Path(placeholder).exists(), f"{placeholder} exists: not a placeholder here"
    times = []
    for command, expected in plan:
        if expected.kind == "skip":
            times.append(f"skipped ({expected.detail}): {command}")
            continue
        run = with_short_settings(command, expected.detail if expected.kind == "runs" else "")
        done, seconds = _run(run, work)
        times.append(f"{seconds:5.1f} s  {run}")
        if expected.kind == "runs":
            text = done.stdout + done.stderr
            assert done.returncode == 0, f"{run}\n{text[-3000:]}"
            assert "Traceback" not in text, f"{run}\n{text[-3000:]}"
        else:
            _check_failure(command, done, expected.detail)
    print("\n" + "\n".join(times))
