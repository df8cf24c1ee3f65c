"""MATH500: competition problems with a LaTeX answer graded by `math_answer`."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from rspo_mega.data.example import Example
from rspo_mega.tasks.answer_format import RESPONSE_FORMAT
from rspo_mega.tasks.base import Task
from rspo_mega.tasks.math_answer import (
    DEFAULT_SYMBOLIC_TIMEOUT_S,
    extract_math_answer,
    math_answers_equal,
    normalize_math_answer,
)

__all__ = ["Math500Task", "score_math"]


def score_math(completion: str, gold: str, *, timeout_s: float = DEFAULT_SYMBOLIC_TIMEOUT_S) -> float:
    """1.0 if the extracted answer is equivalent to `gold`, else 0.0 (bounded by `timeout_s`)."""
    prediction = extract_math_answer(completion)
    if prediction is None:
        return 0.0
    return 1.0 if math_answers_equal(prediction, gold, timeout_s=timeout_s) else 0.0


class Math500Task(Task):
    """Fields: `prompt` (default column "problem"), `answer` (default column "answer")."""

    name = "math500"
    default_fields = {"prompt": "problem", "answer": "answer"}

    def __init__(self, symbolic_timeout_s: float = DEFAULT_SYMBOLIC_TIMEOUT_S) -> None:
        self.symbolic_timeout_s = symbolic_timeout_s

    def example_from_record(self, record: Mapping[str, Any], uid: int) -> Example:
        answer = str(record["answer"]).strip()
        if not normalize_math_answer(answer):
            raise ValueError(f"field 'answer' is empty or too long after normalisation: {answer[:80]!r}")
        return Example(uid, str(record["prompt"]).strip(), answer, self.name, {})

    def prompt(self, example: Example) -> str:
        return (
            f"{example.prompt}\n\n"
            "Solve the problem step by step. Inside the answer tags give the final answer in "
            f"\\boxed{{}}.\n{RESPONSE_FORMAT}"
        )

    def reward(self, completion: str, example: Example) -> float:
        return score_math(completion, str(example.answer), timeout_s=self.symbolic_timeout_s)
