"""Verifiable-reward tasks: GSM8K, MATH500, Countdown and 4x4 Sudoku.

    task = get_task("countdown")
    examples = task.load("train", path=None, seed=0)      # generator; or path="gsm8k_train.jsonl"
    message = task.prompt(examples[0])                     # user message, no chat template
    reward = task.reward(completion_text, examples[0])     # float in [0, 1]
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from rspo_mega.tasks.base import SPLITS, Task
from rspo_mega.tasks.countdown import CountdownTask
from rspo_mega.tasks.gsm8k import GSM8KTask
from rspo_mega.tasks.math500 import Math500Task
from rspo_mega.tasks.sudoku import SudokuTask

__all__ = ["SPLITS", "Task", "TASKS", "available_tasks", "get_task", "register_task"]

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


def get_task(name: str, **options: Any) -> Task:
    """A fresh task object by registry name, e.g. get_task("math500", symbolic_timeout_s=3.0)."""
    try:
        factory = TASKS[name.lower()]
    except KeyError:
        raise KeyError(f"unknown task {name!r}; available tasks: {available_tasks()}") from None
    return factory(**options)
