"""One prompt/answer pair, and the stable uid scheme the rollout seeds its randomness with."""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

__all__ = ["Example", "make_uid", "check_unique_uids"]

_UID_BITS = 63  # fits a signed int64 (torch.Generator.manual_seed, numpy seeds, parquet columns)


@dataclass(frozen=True)
class Example:
    """A task instance.

    uid:    globally unique, stable 63-bit id (see `make_uid`); the rollout seeds by it.
    prompt: the user message text (no chat template applied).
    answer: the gold answer in the form the task's verifier expects
            (str for GSM8K/MATH500, int target for Countdown, 16-char solution for Sudoku).
    task:   registry name of the task that produced it.
    meta:   extra task fields (Countdown numbers, Sudoku puzzle, source row, ...); plain
            Python types only so examples pickle and serialise cleanly.
    """

    uid: int
    prompt: str
    answer: Any
    task: str
    meta: dict[str, Any] = field(default_factory=dict)


def make_uid(task: str, split: str, source: str, index: int) -> int:
    """Stable uid from (task, split, source, index).

    `source` names where the example came from: a file's base name for file datasets or
    `seed=<n>` for generators; `index` is the row / generation index. The digest is
    independent of Python's hash randomisation, so uids are identical across processes,
    ranks and restarts. Collisions within one dataset are checked by `check_unique_uids`.
    """
    key = f"{task}\x1f{split}\x1f{source}\x1f{index}".encode()
    digest = hashlib.blake2b(key, digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << _UID_BITS) - 1)


def check_unique_uids(examples: Iterable[Example]) -> None:
    """Raise ValueError naming the first duplicated uid."""
    seen: dict[int, Example] = {}
    for example in examples:
        if example.uid in seen:
            raise ValueError(
                f"duplicate example uid {example.uid} (tasks {seen[example.uid].task!r} and "
                f"{example.task!r}); uids must be globally unique"
            )
        seen[example.uid] = example
