"""All-or-nothing output directories for the converters."""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from typing import Iterator

CHECKPOINT_MARKERS = ("config.json", "metadata.json", ".metadata", "model.safetensors.index.json",
                      "model.safetensors", "common.pt")


def holds_checkpoint(path: str) -> bool:
    """Whether ``path`` is a directory with checkpoint files (HF or megatron) in it."""
    if not os.path.isdir(path):
        return False
    names = os.listdir(path)
    return any(n in CHECKPOINT_MARKERS or n.endswith((".safetensors", ".distcp")) for n in names)


def check_output_dir(target: str, overwrite: bool = False) -> None:
    """Raise ``FileExistsError`` when ``target`` is a file, or a non-empty directory and not
    ``overwrite``."""
    target = os.path.abspath(target)
    if os.path.isfile(target):
        raise FileExistsError(f"output path {target} is a file")
    if os.path.isdir(target) and os.listdir(target) and not overwrite:
        what = "a checkpoint" if holds_checkpoint(target) else "files"
        raise FileExistsError(f"output directory {target} already holds {what}; pass --overwrite")


@contextlib.contextmanager
def atomic_output_dir(target: str, overwrite: bool = False) -> Iterator[str]:
    """Yield a fresh temp directory next to ``target``; on success it replaces ``target``.

    Refuses a ``target`` that is a file, or a non-empty directory (one holding a checkpoint or
    anything else) unless ``overwrite``. On any exception the temp directory is removed, so a
    failed conversion leaves neither partial output nor a changed ``target``.
    """
    target = os.path.abspath(target)
    check_output_dir(target, overwrite)
    parent = os.path.dirname(target)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(target)}.tmp-", dir=parent)
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = None
    if os.path.exists(target):
        old = tempfile.mkdtemp(prefix=f".{os.path.basename(target)}.old-", dir=parent)
        os.rename(target, os.path.join(old, "x"))
    os.rename(tmp, target)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
