"""Errors in what a user gave: a config key, a data file, a tokenizer, a checkpoint, an HF
directory.

The entry points print a :class:`UserError` as one line ``<prog>: <kind> error: <message>`` and
exit with code 2 (:func:`rspo_mega.console.run_entry_point`); any other exception is a bug and
keeps its traceback. Each subclass says its ``kind``; the message names the key or the file.
Subclasses also derive from the builtin type a caller would catch (``ValueError``,
``FileNotFoundError``), so ``except ValueError`` keeps working.
"""

from __future__ import annotations


class UserError(Exception):
    """Base of the errors a user fixes in the config or on disk; ``kind`` names which."""

    kind = "input"

    def message(self) -> str:
        """The text after ``<kind> error: `` (a ``KeyError``'s without its repr quotes)."""
        if len(self.args) == 1 and isinstance(self.args[0], str):
            return self.args[0]
        return str(self)


class ConfigError(UserError, ValueError):
    """A configuration problem; the message names the offending key."""

    kind = "config"


class DataFileError(UserError, ValueError):
    """A data file is unreadable or holds a malformed record (names the file, line or row)."""

    kind = "data file"


class DataFileNotFoundError(DataFileError, FileNotFoundError):
    """A configured data file does not exist."""


class DataFieldError(DataFileError):
    """A record file lacks a required field, or holds an empty value in it."""


class MissingSpecialTokenError(UserError, ValueError):
    """The tokenizer has no token for a special role (mask, eos, bos, ...); names the token and
    the tokenizer file."""

    kind = "tokenizer"


class CheckpointError(UserError, RuntimeError):
    """A checkpoint is missing, incomplete or corrupted, or belongs to another run."""

    kind = "checkpoint"


class HFDirectoryError(UserError, ValueError):
    """An HF LLaDA directory lacks a file, holds a pickle, or its tensors disagree with its
    config.json or the run (names the directory and the file or tensor)."""

    kind = "HF directory"


class PeerTimeoutError(RuntimeError):
    """Ranks did not reach a phase of the run within its bound: a fault of the job, not of the
    input. The entry points print it as one line ``<prog>: <message>`` on the lowest rank that
    arrived (``reporting_rank``) and exit with :data:`PEER_TIMEOUT_EXIT_CODE`."""

    def __init__(self, phase: str, absent: list[int], timeout_s: float, reporting_rank: int,
                 bound: str) -> None:
        ranks = ", ".join(str(r) for r in absent)
        super().__init__(f"{phase}: rank{'s' if len(absent) > 1 else ''} {ranks} did not arrive "
                         f"within {timeout_s:g} s ({bound})")
        self.phase, self.absent, self.reporting_rank = phase, absent, reporting_rank


PEER_TIMEOUT_EXIT_CODE = 1


class OutputExistsError(UserError, FileExistsError):
    """An output directory already exists and is not to be replaced (names it and the flag
    that replaces it)."""

    kind = "output"


class IncompatibleCheckpointError(UserError, ValueError):
    """A checkpoint's saved run config differs from the current one in keys that must match
    (names each key with its old and new value)."""

    kind = "checkpoint"
