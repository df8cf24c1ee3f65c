"""Task interface: load examples (from a local file or a generator), build prompts, score completions."""

from __future__ import annotations

import os
from abc import ABC, abstractmethod
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from rspo_mega.data.example import Example, check_unique_uids, make_uid
from rspo_mega.data.records import DataFieldError, read_records
from rspo_mega.errors import DataFileError
from rspo_mega.tasks.answer_format import format_response

__all__ = ["Task", "SPLITS"]

SPLITS = ("train", "validation", "test")


class Task(ABC):
    """A verifiable-reward task.

    Subclasses set `name` and `default_fields` (logical field -> column name in the source
    file) and implement `example_from_record`, `prompt` and `reward`. Generator tasks also
    override `generate`.
    """

    name: str = ""
    default_fields: Mapping[str, str] = {}

    def load(
        self,
        split: str,
        *,
        path: str | os.PathLike | None = None,
        fields: Mapping[str, str] | None = None,
        seed: int = 0,
        num_examples: int | None = None,
        json_field: str | None = None,
        cache_dir: str | None = None,
        hold_out_validation: bool = False,
    ) -> list[Example]:
        """Examples of `split`, in source order (the batch iterator shuffles).

        Args:
            split: "train", "validation" or "test"; part of every uid.
            path: local data file; None uses the task's generator (if it has one).
            fields: overrides of `default_fields`, e.g. {"prompt": "question"}.
            seed: generator seed (ignored for files).
            num_examples: keep the first N file rows / generate N examples (None: all / default).
            json_field, cache_dir: passed to `read_records`.
            hold_out_validation: generators only: a fixed share of the problems forms the
                validation split and leaves train (without it there is no validation split).
        """
        if split not in SPLITS:
            raise ValueError(f"task {self.name!r}: unknown split {split!r}; expected one of {SPLITS}")
        if num_examples is not None and num_examples < 1:
            raise ValueError(f"task {self.name!r}: num_examples must be >= 1, got {num_examples}")
        if path is None:
            examples = self.generate(split, seed=seed, num_examples=num_examples,
                                     hold_out_validation=hold_out_validation)
        else:
            examples = self._load_file(split, Path(path), fields, num_examples, json_field, cache_dir)
        check_unique_uids(examples)
        return examples

    def _load_file(
        self,
        split: str,
        path: Path,
        fields: Mapping[str, str] | None,
        num_examples: int | None,
        json_field: str | None,
        cache_dir: str | None,
    ) -> list[Example]:
        mapping = dict(self.default_fields)
        for logical, column in (fields or {}).items():
            if logical not in mapping:
                raise KeyError(
                    f"task {self.name!r}: unknown field {logical!r} in field mapping; "
                    f"known fields: {sorted(mapping)}"
                )
            mapping[logical] = column
        records = read_records(path, list(mapping.values()), json_field=json_field, cache_dir=cache_dir)
        if num_examples is not None:
            records = records[:num_examples]
        examples = []
        for row, record in enumerate(records):
            logical_record = {logical: record[column] for logical, column in mapping.items()}
            uid = make_uid(self.name, split, path.name, row)
            try:
                examples.append(self.example_from_record(logical_record, uid))
            except (TypeError, ValueError) as err:
                raise DataFieldError(f"dataset file {path}, row {row}: {err}") from err
        return examples

    def generate(self, split: str, *, seed: int, num_examples: int | None,
                 hold_out_validation: bool = False) -> list[Example]:
        """Generate examples without files; tasks that only read files refuse with an error."""
        raise DataFileError(
            f"task {self.name!r} has no built-in generator: set a local data file path for "
            f"split {split!r} (data.{split}_path; see docs/DATA.md for how to prepare it)"
        )

    @abstractmethod
    def example_from_record(self, record: Mapping[str, Any], uid: int) -> Example:
        """Build an Example from one record keyed by logical field names.

        Raise ValueError naming the field when a value is malformed.
        """

    @abstractmethod
    def prompt(self, example: Example) -> str:
        """User message text (instruction + problem + response format); no chat template."""

    def reference_answer(self, example: Example) -> str:
        """The text a correct response puts inside the answer tags."""
        return str(example.answer)

    def reference_response(self, example: Example) -> str:
        """The whole response an SFT target holds: empty reasoning, then the reference answer
        in the verifier's format (tasks with a worked solution fill the reasoning)."""
        return format_response("", self.reference_answer(example))

    @abstractmethod
    def reward(self, completion: str, example: Example) -> float:
        """Score a decoded completion in [0, 1]; bounded time on any input, never executes it."""
