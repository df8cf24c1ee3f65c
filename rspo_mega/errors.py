"""Errors in what a user gave: a config key, a data file, a checkpoint, an HF directory.

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


class DataFileError(UserError, ValueError):
    """A data file is unreadable or holds a malformed record (names the file, line or row)."""

    kind = "data file"


class DataFileNotFoundError(DataFileError, FileNotFoundError):
    """A configured data file does not exist."""


class HFDirectoryError(UserError, ValueError):
    """An HF LLaDA directory lacks a file, holds a pickle, or its tensors disagree with its
    config.json or the run (names the directory and the file or tensor)."""

    kind = "HF directory"
