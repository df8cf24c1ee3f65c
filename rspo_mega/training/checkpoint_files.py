"""File-level pieces of a checkpoint save: synced writes, atomic replacement, checksums.

Every write that a checkpoint depends on is flushed to disk (``fsync``) before the rename that
publishes it, so a crash or power loss leaves either the old file or the complete new one.
"""

from __future__ import annotations

import hashlib
import os
import uuid
from pathlib import Path

import torch

TMP_MARK = ".tmp-"  # in the name of every temporary file or directory of a save


def sha256_file(path: Path) -> str:
    """Hex SHA-256 of the file at ``path``, read in 1 MiB chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def fsync_dir(path: Path) -> None:
    """Flush the directory entry changes of ``path`` (best effort: not every FS supports it)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write_text(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` via a synced temporary file and a rename: whole or not at all
    (on an error the temporary file is removed and ``path`` is untouched)."""
    tmp = path.with_name(f".{path.name}{TMP_MARK}{uuid.uuid4().hex[:8]}")
    try:
        with open(tmp, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def make_save_dirs(tmp: Path) -> None:
    """The temporary directory of a save, with its ``dist/`` and ``extra/`` parts."""
    (tmp / "dist").mkdir(parents=True)
    (tmp / "extra").mkdir()


def save_synced(payload: dict, path: Path) -> None:
    """``torch.save`` ``payload`` to ``path`` through a Python file (so that a failed write raises
    ``OSError`` with its errno, not torch's bare "file write failed"), then fsync it."""
    with open(path, "wb") as f:
        torch.save(payload, f)
        f.flush()
        os.fsync(f.fileno())
