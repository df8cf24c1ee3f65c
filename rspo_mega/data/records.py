"""Local-file record reading, data-parallel sharding and the resumable prompt-batch iterator.

Files are read through the `datasets` library from local paths only (JSONL, JSON, parquet,
CSV); nothing is downloaded at run time. Tasks turn the records into `Example`s.

Batching semantics (`PromptBatchIterator`): the dataset is laid out as an endless stream of
epochs, each epoch a fresh permutation drawn from (seed, epoch). A training step consumes the
next `global_batch_prompts` examples of the stream ("wrap": a step may straddle two epochs, no
example is ever dropped) and data-parallel rank r keeps the r-th contiguous block of
`global_batch_prompts // dp_size` of them. Within one epoch every example therefore appears
exactly once across all ranks. The position (epoch, index into the epoch's permutation) is
global, so a checkpoint can be resumed with a different dp_size.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np

from rspo_mega.data.example import Example, check_unique_uids
from rspo_mega.errors import DataFieldError, DataFileError, DataFileNotFoundError

__all__ = [
    "SUPPORTED_SUFFIXES",
    "read_records",
    "shard_examples",
    "PromptBatchIterator",
]

# File suffix -> `datasets` packaged builder.
SUPPORTED_SUFFIXES: dict[str, str] = {
    ".jsonl": "json",
    ".json": "json",
    ".parquet": "parquet",
    ".csv": "csv",
}


def read_records(
    path: str | os.PathLike,
    fields: Sequence[str],
    *,
    json_field: str | None = None,
    cache_dir: str | None = None,
) -> list[dict[str, Any]]:
    """Read a local JSONL/JSON/parquet/CSV file and return its rows restricted to `fields`.

    Args:
        path: local file; the format follows the suffix (see `SUPPORTED_SUFFIXES`).
        fields: column names every row must carry (non-null).
        json_field: for a JSON file holding {"<json_field>": [records...]}.
        cache_dir: `datasets` Arrow cache directory (None: the library default).

    CSV cells of `fields` are read as strings (so "0140..." Sudoku grids keep their leading
    zeros); tasks convert types. Raises :class:`DataFileError` (a ``ValueError``; a
    ``FileNotFoundError`` for a missing file) naming the file and the line, row or field.
    """
    path = Path(path)
    builder = _builder_for(path)
    table = _load_table(path, builder, fields, json_field, cache_dir)
    return _table_records(path, table, fields)


def _builder_for(path: Path) -> str:
    """The `datasets` builder for an existing, non-empty file of a supported suffix."""
    if not path.is_file():
        raise DataFileNotFoundError(f"dataset file not found: {path}")
    builder = SUPPORTED_SUFFIXES.get(path.suffix.lower())
    if builder is None:
        raise DataFileError(
            f"unsupported dataset file type {path.suffix!r} for {path}; "
            f"expected one of {sorted(SUPPORTED_SUFFIXES)}"
        )
    if path.stat().st_size == 0:
        raise DataFileError(f"dataset file {path} is empty")
    return builder


def _load_table(
    path: Path,
    builder: str,
    fields: Sequence[str],
    json_field: str | None,
    cache_dir: str | None,
) -> Any:
    """The file as one `datasets.Dataset` split; a read failure is re-raised naming the file."""
    import datasets  # deferred: importing `datasets` costs ~1 s

    kwargs: dict[str, Any] = {}
    if builder == "csv":
        kwargs["converters"] = {name: str for name in fields}  # raw cell text, no type inference
    if json_field is not None:
        if builder != "json":
            raise ValueError(f"json_field={json_field!r} given for non-JSON file {path}")
        kwargs["field"] = json_field
    try:
        with _quiet_datasets():
            return datasets.load_dataset(
                builder, data_files=str(path), split="train", cache_dir=cache_dir, **kwargs
            )
    except Exception as err:  # the library raises many types; keep the file name attached
        where = _json_syntax_error(path) if builder == "json" else None
        raise DataFileError(f"dataset file {path}" + (f", {where}" if where else
                            f": could not read it: {type(err).__name__}: {err}")) from err


def _table_records(path: Path, table: Any, fields: Sequence[str]) -> list[dict[str, Any]]:
    """Rows of `table` restricted to `fields`; every field present and every value non-empty."""
    if len(table) == 0:
        raise DataFileError(f"dataset file {path} contains no records")
    for name in fields:
        if name not in table.column_names:
            raise DataFieldError(
                f"dataset file {path} has no field {name!r} (available: {table.column_names}); "
                "set the task's field mapping in the data config"
            )
    records = table.select_columns(list(dict.fromkeys(fields))).to_list()  # one Arrow -> Python pass
    for row, record in enumerate(records):
        for name, value in record.items():
            if value is None or (isinstance(value, str) and not value.strip()):
                raise DataFieldError(f"dataset file {path}, row {row}: field {name!r} is empty")
    return records


def _check_dp(dp_rank: int, dp_size: int) -> None:
    if dp_size < 1:
        raise ValueError(f"dp_size must be >= 1, got {dp_size}")
    if not 0 <= dp_rank < dp_size:
        raise ValueError(f"dp_rank must be in [0, {dp_size}), got {dp_rank}")


@contextmanager
def _quiet_datasets() -> Iterator[None]:
    """No progress bar and no log records from `datasets` (a failure is re-raised naming the
    file, so its own error record would say the same twice)."""
    from datasets.utils import logging as datasets_logging

    verbosity, bar = datasets_logging.get_verbosity(), datasets_logging.is_progress_bar_enabled()
    datasets_logging.set_verbosity(datasets_logging.CRITICAL)
    datasets_logging.disable_progress_bar()
    try:
        yield
    finally:
        datasets_logging.set_verbosity(verbosity)
        if bar:
            datasets_logging.enable_progress_bar()


def _json_syntax_error(path: Path) -> str | None:
    """Where a JSON Lines or JSON file stops parsing, as ``"line N: <reason> (column C)"``;
    None when it parses. A file whose first record parses on its own line is read as JSON
    Lines, any other as one JSON document."""
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        return f"byte {err.start}: not UTF-8 text"
    lines = [(n, line) for n, line in enumerate(text.splitlines(), 1) if line.strip()]
    for index, (number, line) in enumerate(lines):
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            if index == 0:  # not JSON Lines: one document over several lines
                break
            return f"line {number}: {err.msg} (column {err.colno})"
        if not isinstance(record, dict):
            return f"line {number}: a JSON {type(record).__name__}, not an object"
    else:
        return None
    try:
        json.loads(text)
    except json.JSONDecodeError as err:
        return f"line {err.lineno}: {err.msg} (column {err.colno})"
    return None


def shard_examples(examples: Sequence[Example], dp_rank: int, dp_size: int) -> list[Example]:
    """Strided shard for evaluation: rank r gets examples[r::dp_size], in order.

    Every example lands on exactly one rank; shard sizes differ by at most one, so callers
    that run collectives per example must pad the shorter shards themselves.
    """
    _check_dp(dp_rank, dp_size)
    return list(examples[dp_rank::dp_size])


def _fingerprint(examples: Sequence[Example]) -> str:
    """Digest of the ordered uids; detects a changed dataset on resume."""
    uids = np.fromiter((e.uid for e in examples), dtype=np.int64, count=len(examples))
    return hashlib.blake2b(uids.tobytes(), digest_size=8).hexdigest()


class PromptBatchIterator:
    """Endless iterator over this rank's share of each global batch of prompts.

    Each `next()` returns a list of `global_batch_prompts // dp_size` examples for `dp_rank`;
    globally a step consumes exactly `global_batch_prompts` examples of the epoch stream
    (see the module docstring). The position is captured by `state_dict()`; after
    `load_state_dict()` the next batch is exactly the one that would have followed.
    """

    def __init__(
        self,
        examples: Sequence[Example],
        global_batch_prompts: int,
        dp_rank: int,
        dp_size: int,
        *,
        seed: int = 0,
        shuffle: bool = True,
    ) -> None:
        _check_dp(dp_rank, dp_size)
        if global_batch_prompts < 1:
            raise ValueError(f"global_batch_prompts must be >= 1, got {global_batch_prompts}")
        if global_batch_prompts % dp_size != 0:
            raise ValueError(
                f"global_batch_prompts={global_batch_prompts} is not divisible by dp_size={dp_size}"
            )
        if len(examples) < global_batch_prompts:
            raise ValueError(
                f"dataset has {len(examples)} examples, fewer than global_batch_prompts="
                f"{global_batch_prompts}; one step would repeat prompts"
            )
        check_unique_uids(examples)
        self.examples = list(examples)
        self.global_batch_prompts = global_batch_prompts
        self.dp_rank = dp_rank
        self.dp_size = dp_size
        self.seed = seed
        self.shuffle = shuffle
        self.epoch = 0
        self.index = 0  # position inside the current epoch's permutation
        self._order_epoch = -1
        self._order = np.arange(0)
        self._fingerprint = _fingerprint(self.examples)

    @property
    def prompts_per_rank(self) -> int:
        return self.global_batch_prompts // self.dp_size

    @property
    def consumed_prompts(self) -> int:
        """Examples consumed globally since the start of epoch 0."""
        return self.epoch * len(self.examples) + self.index

    def epoch_order(self, epoch: int) -> np.ndarray:
        """Permutation of dataset indices for `epoch` ([num_examples] int64)."""
        if not self.shuffle:
            return np.arange(len(self.examples))
        rng = np.random.default_rng([self.seed, epoch])
        return rng.permutation(len(self.examples))

    def _current_order(self) -> np.ndarray:
        if self._order_epoch != self.epoch:
            self._order = self.epoch_order(self.epoch)
            self._order_epoch = self.epoch
        return self._order

    def __iter__(self) -> Iterator[list[Example]]:
        return self

    def __next__(self) -> list[Example]:
        picked: list[int] = []
        while len(picked) < self.global_batch_prompts:
            order = self._current_order()
            take = min(self.global_batch_prompts - len(picked), len(order) - self.index)
            picked.extend(order[self.index : self.index + take].tolist())
            self.index += take
            if self.index == len(order):
                self.epoch += 1
                self.index = 0
        start = self.dp_rank * self.prompts_per_rank
        return [self.examples[i] for i in picked[start : start + self.prompts_per_rank]]

    def state_dict(self) -> dict[str, Any]:
        """Global position plus what is needed to check the dataset did not change."""
        return {
            "epoch": self.epoch,
            "index": self.index,
            "seed": self.seed,
            "shuffle": self.shuffle,
            "num_examples": len(self.examples),
            "fingerprint": self._fingerprint,
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore a position saved by `state_dict()` (possibly under another dp_size)."""
        for key in ("epoch", "index", "seed", "shuffle", "num_examples", "fingerprint"):
            if key not in state:
                raise KeyError(f"data iterator state is missing key {key!r}")
        expected = {
            "seed": self.seed,
            "shuffle": self.shuffle,
            "num_examples": len(self.examples),
            "fingerprint": self._fingerprint,
        }
        for key, value in expected.items():
            if state[key] != value:
                raise ValueError(
                    f"data iterator state key {key!r} is {state[key]!r} but the current dataset "
                    f"has {value!r}; the dataset or data config changed since the checkpoint"
                )
        epoch, index = int(state["epoch"]), int(state["index"])
        if epoch < 0 or not 0 <= index < len(self.examples):
            raise ValueError(f"data iterator state has invalid position epoch={epoch}, index={index}")
        self.epoch, self.index = epoch, index
