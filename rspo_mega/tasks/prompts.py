"""Prompt encoding: the user message of an example (the task's instructions through a prompt
template) and its prompt token ids."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

from rspo_mega.data.example import Example
from rspo_mega.data.templates import PromptTemplate
from rspo_mega.data.tokenizer import Tokenizer
from rspo_mega.tasks.base import Task


@dataclass(frozen=True)
class EncodedExample:
    """An example with the token ids of its prompt (template applied)."""

    example: Example
    prompt_ids: tuple[int, ...]


def prompt_message(task: Task, template: PromptTemplate, example: Example) -> str:
    """The user message: the task's full instructions for chat models; with the ``plain``
    template (tiny models trained from scratch) the bare problem text."""
    return example.prompt if template.name == "plain" else task.prompt(example)


def encode_prompt(task: Task, template: PromptTemplate, tokenizer: Tokenizer,
                  example: Example) -> list[int]:
    """The prompt ids of ``example``: its user message through ``template``."""
    return template.encode(tokenizer, prompt_message(task, template, example))


def encode_prompts(
    examples: Sequence[Example], task: Task, template: PromptTemplate, tokenizer: Tokenizer,
    max_prompt_length: int,
) -> list[EncodedExample]:
    """Token ids of every prompt; all too-long prompts are reported at once, before training."""
    out, too_long = [], []
    for ex in examples:
        ids = tuple(encode_prompt(task, template, tokenizer, ex))
        if len(ids) > max_prompt_length:
            too_long.append((ex.uid, len(ids)))
        out.append(EncodedExample(ex, ids))
    if too_long:
        uid, n = too_long[0]
        raise ValueError(
            f"{len(too_long)} of {len(examples)} {task.name} prompts exceed "
            f"data.max_prompt_length={max_prompt_length} tokens (e.g. uid {uid}: {n} tokens)"
        )
    return out
