"""Text for training the built-in tokenizer: task prompts plus responses in the expected format,
from the Countdown and Sudoku generators (no files needed), optionally extended with local text
files (one document per line)."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

from rspo_mega.tasks import get_task
from rspo_mega.tasks.answer_format import format_response


def task_corpus(
    *,
    num_countdown: int = 2000,
    num_sudoku: int = 1000,
    seed: int = 0,
    extra_text_files: Sequence[str | os.PathLike] = (),
) -> list[str]:
    """Documents for tokenizer training: generated train-split prompts with formatted responses,
    then the non-empty lines of each extra text file."""
    documents: list[str] = []
    countdown = get_task("countdown")
    for example in countdown.load("train", seed=seed, num_examples=num_countdown) if num_countdown else []:
        solution = example.meta["solution"]
        reasoning = f"Try {solution} = {example.answer}."
        documents.append(countdown.prompt(example) + "\n" + format_response(reasoning, solution))
    sudoku = get_task("sudoku")
    for example in sudoku.load("train", seed=seed, num_examples=num_sudoku) if num_sudoku else []:
        reasoning = "Each row, column and box holds 1, 2, 3 and 4 once."
        documents.append(sudoku.prompt(example) + "\n" + format_response(reasoning, example.answer))
    for path in extra_text_files:
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"tokenizer corpus file not found: {path}")
        documents.extend(line for line in path.read_text(encoding="utf-8").splitlines() if line.strip())
    if not documents:
        raise ValueError("tokenizer corpus is empty: enable a generator or pass extra_text_files")
    return documents
