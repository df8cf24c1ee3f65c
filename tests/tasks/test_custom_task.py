"""Tasks of one's own: ``data.task: module.path:ClassName`` (or an entry point) loads a task class
written outside the package; the example in ``examples/tasks`` trains as the docs launch it."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from rspo_mega.config import ConfigError
from rspo_mega.setup import load_run_config, validate_run
from rspo_mega.data import Example
from rspo_mega.tasks import get_task
from tests import processes
from tests.training.test_launch import OWN_MODEL, ROOT, _env
from tests.training.test_trainer import TINY

EXAMPLE_DIR = ROOT / "examples" / "tasks"
SORT = "sort_numbers:SortNumbersTask"


@pytest.fixture
def on_path(monkeypatch):
    """``examples/tasks`` importable (as the working directory makes it under rspo-train)."""
    monkeypatch.syspath_prepend(str(EXAMPLE_DIR))
    yield
    sys.modules.pop("sort_numbers", None)


def test_the_example_task_loads_its_file_and_scores(on_path):
    task = get_task(SORT)
    train = task.load("train", path=EXAMPLE_DIR / "sort_numbers_train.jsonl")
    assert len(train) == 224 and train[0].prompt == "97 53 5 33"
    assert train[0].answer == [5, 33, 53, 97]
    ex = train[0]
    assert task.reward("<answer>5 33 53 97</answer>", ex) == 1.0
    assert task.reward("<answer>5 33 97 53</answer>", ex) == 0.5
    assert task.reward("<answer>5 33 53 97 1 2 3 4</answer>", ex) == 0.5  # extra numbers count
    assert task.reward("no answer", ex) == 0.0
    assert "Sort these numbers" in task.prompt(ex)


def test_a_config_names_a_task_class_by_import_path(on_path):
    cfg = load_run_config(None, [f"data.task={SORT}", "data.fields={numbers: nums}"])
    validate_run(cfg)
    with pytest.raises(ConfigError, match=r"data.fields: unknown field\(s\) \['prompt'\] for "
                                          r"task 'sort_numbers:SortNumbersTask'"):
        validate_run(load_run_config(None, [f"data.task={SORT}", "data.fields={prompt: q}"]))


class NotATask:
    pass


def _bad(value: str) -> str:
    with pytest.raises(ConfigError) as err:
        validate_run(load_run_config(None, [f"data.task={value}"]))
    return str(err.value)


def test_a_bad_task_is_one_line_naming_data_task(on_path):
    here = __name__
    assert "cannot import module 'no_such_module'" in _bad("no_such_module:Task")
    assert f"module '{here}'" in _bad(f"{here}:Nope") and "has no 'Nope'" in _bad(f"{here}:Nope")
    assert "is not a subclass of rspo_mega.tasks.base.Task" in _bad(f"{here}:NotATask")
    assert "does not implement example_from_record, prompt" in _bad("rspo_mega.tasks.base:Task")
    unknown = _bad("sudokku")
    assert unknown.startswith("config key 'data.task' must be one of ['sudoku', ")
    assert "did you mean 'sudoku'" in unknown
    for message in (_bad("no_such_module:Task"), _bad(f"{here}:NotATask"), unknown):
        assert "\n" not in message and "data.task" in message


def test_an_installed_entry_point_names_a_task(monkeypatch, on_path):
    import importlib.metadata as md

    from rspo_mega.config.schema import TASK_ENTRY_POINTS

    point = md.EntryPoint("sort", SORT, TASK_ENTRY_POINTS)
    real = md.entry_points
    monkeypatch.setattr(md, "entry_points", lambda group=None, **kw: (
        md.EntryPoints([point]) if group == TASK_ENTRY_POINTS else real(group=group, **kw)))
    cfg = load_run_config(None, ["data.task=sort"])
    validate_run(cfg)
    assert type(get_task("sort")).__name__ == "SortNumbersTask"


def test_two_rl_steps_with_the_example_task_as_the_docs_launch_it(tmp_path):
    """``rspo-train`` started in examples/tasks with the task's import path and data files."""
    out = tmp_path / "run"
    env, run = _env()
    env["PYTHONDONTWRITEBYTECODE"] = "1"  # no __pycache__ left in examples/tasks
    args = [sys.executable, "-m", "rspo_mega.train", *TINY, *OWN_MODEL, "train_steps=2",
            f"data.task={SORT}", "data.train_path=sort_numbers_train.jsonl",
            "data.test_path=sort_numbers_test.jsonl", "data.num_test_examples=4",
            "data.max_prompt_length=32", f"logging.output_dir={out}"]
    done = subprocess.run(args, cwd=EXAMPLE_DIR, env=env, capture_output=True, text=True,
                          timeout=400)
    processes.assert_none_left(lambda: processes.marked(processes.RUN_ENV, run), "rspo-train")
    assert done.returncode == 0, (done.stdout + done.stderr)[-4000:]
    records = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in records if "loss" in r]
    assert [r["step"] for r in steps] == [1, 2]
    assert all(0.0 <= r["reward"] <= 1.0 for r in steps)
    summary = json.loads((out / "summary.json").read_text())["final"]
    assert summary["before/eval/examples"] == summary["after/eval/examples"] == 4  # its test file
    assert 0.0 <= summary["after/eval/reward"] <= 1.0
    saved = (out / "config.yaml").read_text()
    assert f"task: {SORT}" in saved
