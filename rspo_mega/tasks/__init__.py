"""Verifiable-reward tasks: GSM8K, MATH500, Countdown and 4x4 Sudoku, and tasks of one's own
(a :class:`Task` subclass named by import path or entry point, :mod:`rspo_mega.tasks.custom`).

    task = get_task("countdown")
    examples = task.load("train", path=None, seed=0)      # generator; or path="gsm8k_train.jsonl"
    message = task.prompt(examples[0])                     # user message, no chat template
    reward = task.reward(completion_text, examples[0])     # float in [0, 1]
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from rspo_mega.config.schema import TASK_ENTRY_POINTS, entry_point_names
from rspo_mega.tasks.base import SPLITS, Task
from rspo_mega.tasks.countdown import CountdownTask
from rspo_mega.tasks.gsm8k import GSM8KTask
from rspo_mega.tasks.math500 import Math500Task
from rspo_mega.tasks.sudoku import SudokuTask

__all__ = ["SPLITS", "Task", "TASKS", "available_tasks", "get_task", "register_task",
           "task_factory"]

TASKS: dict[str, Callable[..., Task]] = {
    "gsm8k": GSM8KTask,
    "math500": Math500Task,
    "countdown": CountdownTask,
    "sudoku": SudokuTask,
}


def register_task(name: str, factory: Callable[..., Task]) -> None:
    """Add a task under `name` (raises if the name is taken)."""
    if name in TASKS:
        raise ValueError(f"task {name!r} is already registered")
    TASKS[name] = factory


def available_tasks() -> list[str]:
    return sorted(TASKS)


def task_factory(name: str) -> Callable[..., Task]:
    """The task class of ``data.task``: a registered name, else an import path
    ``module.path:ClassName`` or an entry point of group ``rspo_mega.tasks``
    (:func:`rspo_mega.tasks.custom.load_task_class`, whose errors name ``data.task``)."""
    if name.lower() in TASKS:
        return TASKS[name.lower()]
    installed = entry_point_names(TASK_ENTRY_POINTS)
    if ":" not in name and name not in installed:
        raise KeyError(f"unknown task {name!r}; available tasks: {available_tasks()}, entry "
                       f"points {list(installed)}, or an import path module.path:ClassName")
    from rspo_mega.tasks.custom import load_task_class

    return load_task_class(name)


def get_task(name: str, **options: Any) -> Task:
    """A fresh task object by registry name (e.g. get_task("math500", symbolic_timeout_s=3.0)),
    import path or entry point (see :func:`task_factory`)."""
    return task_factory(name)(**options)
