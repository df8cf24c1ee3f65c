"""Prompt templates that turn a task's user message into prompt token ids.

Special tokens are inserted by id, never re-tokenised from text; only the text between them
is encoded, segment by segment (as an HF tokenizer splits around special tokens).
"""

from __future__ import annotations

from abc import ABC, abstractmethod

from rspo_mega.data.tokenizer import Tokenizer

__all__ = ["PromptTemplate", "LLaDAChatTemplate", "PlainTemplate", "TEMPLATES", "get_template"]


class PromptTemplate(ABC):
    name: str = ""

    @abstractmethod
    def encode(self, tokenizer: Tokenizer, message: str) -> list[int]:
        """Prompt ids for one user message; generation continues right after the last id."""


class LLaDAChatTemplate(PromptTemplate):
    """LLaDA-Instruct (LLaMA-3 style) single-turn chat prompt:

    <|startoftext|><|start_header_id|>user<|end_header_id|>\\n\\n{message}<|eot_id|>
    <|start_header_id|>assistant<|end_header_id|>\\n\\n
    """

    name = "llada_chat"

    def encode(self, tokenizer: Tokenizer, message: str) -> list[int]:
        bos = tokenizer.special_id("bos")
        start = tokenizer.special_id("start_header")
        end = tokenizer.special_id("end_header")
        eot = tokenizer.special_id("eot")
        return (
            [bos, start]
            + tokenizer.encode("user")
            + [end]
            + tokenizer.encode("\n\n" + message.strip())
            + [eot, start]
            + tokenizer.encode("assistant")
            + [end]
            + tokenizer.encode("\n\n")
        )


class PlainTemplate(PromptTemplate):
    """For tiny models without chat training: [BOS] message "\\n"."""

    name = "plain"

    def encode(self, tokenizer: Tokenizer, message: str) -> list[int]:
        bos = tokenizer.special_ids.get("bos")
        return ([] if bos is None else [bos]) + tokenizer.encode(message.strip() + "\n")


TEMPLATES: dict[str, type[PromptTemplate]] = {
    LLaDAChatTemplate.name: LLaDAChatTemplate,
    PlainTemplate.name: PlainTemplate,
}


def get_template(name: str) -> PromptTemplate:
    """Template by name: "llada_chat" or "plain"."""
    try:
        return TEMPLATES[name]()
    except KeyError:
        raise KeyError(f"unknown prompt template {name!r}; available: {sorted(TEMPLATES)}") from None
