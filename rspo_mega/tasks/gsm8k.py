"""GSM8K: grade-school word problems with a single numeric answer (gold after '####')."""

from __future__ import annotations

from collections.abc import Mapping
from fractions import Fraction
from typing import Any

from rspo_mega.data.example import Example
from rspo_mega.tasks.answer_format import RESPONSE_FORMAT, clip_completion, extract_answer_block
from rspo_mega.tasks.base import Task
from rspo_mega.tasks.math_answer import last_boxed
from rspo_mega.tasks.numeric import last_number, parse_number

__all__ = ["GSM8KTask", "parse_gsm8k_gold", "extract_gsm8k_prediction", "score_gsm8k"]


def parse_gsm8k_gold(answer_field: str) -> Fraction:
    """Gold value from a GSM8K `answer` field ("...reasoning...\\n#### 1,234"), or a bare number."""
    text = str(answer_field)
    _, sep, tail = text.rpartition("####")
    value = parse_number(tail if sep else text)
    if value is None:
        raise ValueError(f"field 'answer' has no numeric gold after '####': {text[-80:]!r}")
    return value


def extract_gsm8k_prediction(completion: str) -> Fraction | None:
    """Predicted number: the answer block (its last \\boxed{} if any, else its last number);
    without an answer block, the last \\boxed{} and then the last number of the whole text."""
    text = clip_completion(completion)
    block = extract_answer_block(text)
    region = text if block is None else block
    boxed = last_boxed(region)
    if boxed is not None:
        value = parse_number(boxed)
        return value if value is not None else last_number(boxed)
    return last_number(region)


def score_gsm8k(completion: str, gold: Fraction | str) -> float:
    """1.0 if the predicted number equals the gold exactly (as a rational), else 0.0."""
    gold_value = gold if isinstance(gold, Fraction) else parse_gsm8k_gold(gold)
    prediction = extract_gsm8k_prediction(completion)
    return 1.0 if prediction is not None and prediction == gold_value else 0.0


class GSM8KTask(Task):
    """Fields: `prompt` (default column "question"), `answer` (default column "answer")."""

    name = "gsm8k"
    default_fields = {"prompt": "question", "answer": "answer"}

    def example_from_record(self, record: Mapping[str, Any], uid: int) -> Example:
        gold = parse_gsm8k_gold(record["answer"])
        return Example(
            uid=uid,
            prompt=str(record["prompt"]).strip(),
            answer=str(gold),  # canonical "p/q" or integer string
            task=self.name,
            meta={},
        )

    def prompt(self, example: Example) -> str:
        return (
            f"{example.prompt}\n\n"
            "Solve the problem step by step. Put the final numeric answer alone inside the "
            f"answer tags.\n{RESPONSE_FORMAT}"
        )

    def reward(self, completion: str, example: Example) -> float:
        return score_gsm8k(completion, Fraction(example.answer))
