"""The files of one checkpoint: names, synced and atomic writes, the file table, validation.

Every write that a checkpoint depends on is flushed to disk (``fsync``) before the rename that
publishes it, so a crash or power loss leaves either the old file or the complete new one.
Per-rank files are read with ``torch.load(..., weights_only=True)``: nothing is unpickled.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import uuid
from pathlib import Path
from typing import Any, Optional

import torch

from rspo_mega.errors import CheckpointError
from rspo_mega.parallel.ranks import broadcast, rank, world_size

TMP_MARK = ".tmp-"  # in the name of every temporary file or directory of a save
METADATA = "metadata.json"
FORMAT_VERSION = 1
SMALL_FILE_BYTES = 64 * 2**20  # files up to this size (bytes) get a SHA-256 in metadata.json
ITER_RE = re.compile(r"^iter_(\d{7,})$")


def checkpoint_name(step: int) -> str:
    """Directory name of the checkpoint of ``step``: ``iter_0000010``."""
    return f"iter_{step:07d}"


def rank_file(rank_: int) -> str:
    """The per-rank file of ``rank_`` under ``extra/``: ``rank_00001.pt``."""
    return f"rank_{rank_:05d}.pt"


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


def file_table(root: Path) -> dict[str, dict[str, Any]]:
    """Relative path -> {size (bytes), sha256 for files up to SMALL_FILE_BYTES}."""
    table: dict[str, dict[str, Any]] = {}
    for p in sorted(root.rglob("*")):
        if not p.is_file() or p.name == METADATA and p.parent == root:
            continue
        size = p.stat().st_size
        entry: dict[str, Any] = {"size": size}
        if size <= SMALL_FILE_BYTES:
            entry["sha256"] = sha256_file(p)
        table[str(p.relative_to(root))] = entry
    return table


def validate_checkpoint(path: str | Path, verify_checksums: bool = True) -> Optional[str]:
    """Why the checkpoint at ``path`` cannot be loaded, or ``None`` when it is complete."""
    path = Path(path)
    meta_path = path / METADATA
    if not meta_path.is_file():
        return f"{METADATA} is missing"
    try:
        meta = json.loads(meta_path.read_text())
        files = meta["files"]
        int(meta["step"])
    except (OSError, ValueError, KeyError, TypeError) as exc:
        return f"{METADATA} does not parse ({exc})"
    if not (path / "dist" / ".metadata").is_file():
        return "the dist-checkpoint metadata dist/.metadata is missing"
    for r in range(int(meta.get("world_size", 1))):
        if f"extra/{rank_file(r)}" not in files:
            return f"{METADATA} lists no per-rank file for rank {r}"
    for rel, entry in files.items():
        p = path / rel
        if not p.is_file():
            return f"file {rel} is missing"
        size = p.stat().st_size
        if size != entry["size"]:
            return f"file {rel} has {size} bytes, {entry['size']} were recorded"
        if verify_checksums and "sha256" in entry and sha256_file(p) != entry["sha256"]:
            return f"file {rel} does not match its recorded SHA-256"
    return None


def require_valid(path: Path, what: str) -> None:
    """Raise :class:`CheckpointError` ``"<what> is not loadable: <reason>"`` on every rank when
    the checkpoint at ``path`` is not (rank 0 checks it)."""
    reason = broadcast(validate_checkpoint(path) if rank() == 0 else None)
    if reason is not None:
        raise CheckpointError(f"{what} is not loadable: {reason}")


def read_metadata(path: str | Path) -> dict[str, Any]:
    """The ``metadata.json`` of a checkpoint (step, time, world size, layout, config, files)."""
    return json.loads((Path(path) / METADATA).read_text())


def read_rank_state(path: str | Path, meta: dict[str, Any]) -> dict[str, Any]:
    """This rank's per-rank file of the (validated) checkpoint at ``path`` with metadata
    ``meta``. If the world size changed, rank 0's file without its RNG states (per-rank streams
    do not map onto a new layout)."""
    path, same_world = Path(path), int(meta["world_size"]) == world_size()
    state = torch.load(path / "extra" / rank_file(rank() if same_world else 0),
                       map_location="cpu", weights_only=True)
    if not same_world:
        state.pop("rng", None)
    return state


def list_checkpoints(save_dir: str | Path) -> list[tuple[int, Path]]:
    """(step, path) of every final-named ``iter_*`` directory of ``save_dir``, oldest first (not
    validated)."""
    return sorted((int(m.group(1)), p) for p in Path(save_dir).glob("iter_*")
                  if (m := ITER_RE.match(p.name)) and p.is_dir())
