"""Run checkpoints: the stateful parts of a run saved atomically, validated, keep-last-N, over
megatron-core dist-checkpointing, and loaded back in one loop.

Layout of one checkpoint (``save_dir/iter_0000010/``, format :data:`~files.FORMAT_VERSION`)::

    dist/                 megatron-core dist-checkpoint of the sharded parts (model, optimizer)
    extra/rank_00000.pt   this rank's plain parts, ``torch.save``: each under its key, the
                          train state's entries (step, has_reference, lora_base) at the top
    metadata.json         written last by rank 0: step, time, world size, layout, config, files

A save goes into ``iter_0000010.tmp-<nonce>/``; after every rank has written its part, rank 0
records the file list (sizes for every file, SHA-256 for small ones) and renames the directory to
its final name (atomic on POSIX). Only then are valid checkpoints beyond the newest ``keep_last``
deleted. A crash at any point leaves either the previous complete checkpoint or a ``*.tmp-*``
directory that :meth:`CheckpointManager.find_resumable` ignores.

A write that fails (disk full, quota, I/O error, on any rank) raises :class:`CheckpointError` on
every rank with the cause, file and rank (:mod:`.failures`), and rank 0 removes the temporary
directory.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
import uuid
from pathlib import Path
from typing import Any, Callable, Mapping, Optional

from rspo_mega.errors import CheckpointError
from rspo_mega.training.checkpoint import failures
from rspo_mega.parallel.ranks import barrier, broadcast, rank, world_size
from rspo_mega.training.checkpoint.files import (
    FORMAT_VERSION, METADATA, TMP_MARK, atomic_write_text, checkpoint_name, file_table, fsync_dir,
    list_checkpoints, make_save_dirs, rank_file, read_metadata, read_rank_state, require_valid,
    save_synced, validate_checkpoint,
)

log = logging.getLogger(__name__)

TRAIN_STATE = "train"  # the part whose entries sit at the top level of a per-rank file
RNG = "rng"  # the part a checkpoint of another world size does not restore
Check = Callable[[Path, dict, dict], None]  # (path, metadata, this rank's plain state) -> raise


class CheckpointManager:
    """Saves, finds and loads the run checkpoints under ``save_dir`` (a shared filesystem).

    Every method is collective: call it on every rank of the default process group.

    Args:
        save_dir: directory holding the ``iter_*`` checkpoints.
        keep_last: complete checkpoints kept after a save (>= 1).
        parts: the stateful parts by key, loaded in this order. A part with
            ``sharded_state_dict(is_loading)`` / ``load_sharded_state_dict`` goes to ``dist/``;
            the others' ``state_dict`` / ``load_state_dict`` to the per-rank file.
        save_interval: :meth:`save` writes where it divides the step (0: only the last step).
        config: the resolved run config (``config_to_dict``), stored in ``metadata.json``.
        check: called with the chosen checkpoint before any part is loaded; raises to refuse it.
    """

    def __init__(self, save_dir: str | Path, keep_last: int = 2,
                 parts: Optional[Mapping[str, Any]] = None, save_interval: int = 0,
                 config: Optional[dict] = None, check: Optional[Check] = None) -> None:
        if keep_last < 1:
            raise ValueError(f"keep_last must be >= 1, got {keep_last}")
        self.save_dir, self.keep_last, self.save_interval = Path(save_dir), keep_last, save_interval
        self.parts, self.config, self.check = dict(parts or {}), config, check

    # -- save ------------------------------------------------------------------------------
    def save(self, step: int, last: bool = False) -> Optional[Path]:
        """Write the checkpoint of ``step`` (optimizer steps done) atomically at the ``last``
        step and where ``save_interval`` divides ``step``; returns its directory, or None.

        Raises:
            CheckpointError: on every rank, naming the cause, the file and the rank, when a
                write fails (e.g. "no space left on device while writing iter_0000012 (...)").
                The temporary directory is removed; earlier checkpoints are untouched.
        """
        if not (last or self.save_interval and step % self.save_interval == 0):
            return None
        me = rank()
        nonce = broadcast(uuid.uuid4().hex[:12] if me == 0 else None)
        final = self.save_dir / checkpoint_name(step)
        tmp = self.save_dir / f"{final.name}{TMP_MARK}{nonce}"
        t0 = time.monotonic()
        self._agree(final, tmp, [] if me else failures.attempt(lambda: make_save_dirs(tmp),
                                                               "directory", 0))
        self._write_shards(final, tmp)
        payload = self._plain_state()  # after the shards: the RNG states as the run goes on
        where = f"extra/{rank_file(me)}"
        self._agree(final, tmp, failures.attempt(lambda: save_synced(payload, tmp / where),
                                                 where, me, tmp))
        published = [] if me else failures.attempt(
            lambda: self._publish(step, tmp, final, nonce), METADATA, 0, tmp)
        self._agree(final, tmp, published)
        if me == 0:
            log.info("checkpoint: saved step %d to %s in %.1f s", step, final,
                     time.monotonic() - t0)
        return final

    def _plain_state(self) -> dict[str, Any]:
        """This rank's per-rank file: each plain part's state under its key, the train state's
        entries at the top level."""
        payload: dict[str, Any] = {}
        for key, part in self.parts.items():
            if key == TRAIN_STATE:
                payload.update(part.state_dict())
            elif not hasattr(part, "sharded_state_dict"):
                payload[key] = part.state_dict()
        return payload

    def _write_shards(self, final: Path, tmp: Path) -> None:
        """dist-checkpointing's collective save of the sharded parts into ``tmp/dist``. torch's
        ``CheckpointException`` is raised on every rank at once, so ranks agree on it; any other
        error is this rank's alone (its peers fail when it exits) and is raised at once."""
        from megatron.core import dist_checkpointing

        sharded: dict[str, Any] = {}
        for part in self.parts.values():
            if hasattr(part, "sharded_state_dict"):
                sharded.update(part.sharded_state_dict())
        try:
            dist_checkpointing.save(sharded, str(tmp / "dist"))
        except failures.CheckpointException as exc:
            self._agree(final, tmp, failures.describe(exc, "dist-checkpoint shards", rank(),
                                                      str(tmp)))
            raise CheckpointError(f"dist-checkpoint save of {final.name} failed: {exc}") from exc
        except Exception as exc:
            found = failures.describe(exc, "dist-checkpoint", rank(), str(tmp))
            raise CheckpointError(failures.failure_message(final.name, found)
                                  + f"; the incomplete {tmp.name} is ignored on resume") from exc

    def _agree(self, final: Path, tmp: Path, found: list[failures.Failure]) -> None:
        """Collective, where every rank arrives (after creating the directory, after the
        per-rank files, after rank 0's publishing step): raise :class:`CheckpointError` on every
        rank if any rank had a failure (after rank 0 removed ``tmp``, naming the newest complete
        checkpoint that remains)."""
        found = failures.all_gather(found)
        if not found:
            return
        note = None
        if rank() == 0:
            shutil.rmtree(tmp, ignore_errors=True)
            complete = [p.name for _, p in list_checkpoints(self.save_dir)
                        if (p / METADATA).is_file()]
            note = (f"the newest complete checkpoint is {complete[-1]}" if complete
                    else "there is no complete checkpoint yet")
        raise CheckpointError(f"{failures.failure_message(final.name, found)}; "
                              f"{broadcast(note)}")

    def _publish(self, step: int, tmp: Path, final: Path, nonce: str) -> None:
        """Rank 0: ``metadata.json``, rename ``tmp`` to ``final``, pruning."""
        meta = {"format_version": FORMAT_VERSION, "step": step, "time": time.time(),
                "world_size": world_size(), "layout": _layout(), "config": self.config,
                "files": file_table(tmp)}
        atomic_write_text(tmp / METADATA, json.dumps(meta, indent=1, default=str))
        old = None
        if final.exists():  # re-saving a step (e.g. after a resume): replace it
            old = self.save_dir / f"{final.name}{TMP_MARK}old-{nonce}"
            os.replace(final, old)
        try:
            os.replace(tmp, final)
        except OSError:
            if old is not None:
                os.replace(old, final)  # the earlier copy of this step stays
            raise
        fsync_dir(self.save_dir)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
        self._prune(step)

    def _prune(self, saved: int) -> None:
        """Delete all but the newest ``keep_last`` valid checkpoints up to the one just saved
        (step ``saved``; rank 0). Invalid ones never count, and those of later steps (left by an
        attempt this run resumed before) are not touched, so the newest valid one stays."""
        complete = [(s, p) for s, p in list_checkpoints(self.save_dir)
                    if s <= saved and validate_checkpoint(p, verify_checksums=False) is None]
        for step, path in complete[: max(0, len(complete) - self.keep_last)]:
            log.info("checkpoint: deleting old checkpoint %s (keep_last=%d)", path, self.keep_last)
            shutil.rmtree(path, ignore_errors=True)

    # -- find / load -----------------------------------------------------------------------
    def find_resumable(self) -> Optional[Path]:
        """The newest valid checkpoint (same answer on every rank), or ``None``.

        Invalid ones are skipped with a warning naming the directory and the reason; leftover
        temporary directories are ignored and removed by rank 0.
        """
        choice: Optional[str] = None
        if rank() == 0:
            self._clean_tmp()
            for _, path in reversed(list_checkpoints(self.save_dir)):
                reason = validate_checkpoint(path)
                if reason is None:
                    choice = str(path)
                    break
                log.warning("checkpoint: skipping invalid checkpoint %s: %s", path, reason)
        choice = broadcast(choice)
        return Path(choice) if choice is not None else None

    def _clean_tmp(self) -> None:
        for p in self.save_dir.glob(f"*{TMP_MARK}*"):
            log.info("checkpoint: removing leftover temporary %s", p)
            shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)

    def load(self, path: Optional[str | Path] = None) -> Optional[Path]:
        """Load every part, in order, from the checkpoint at ``path`` (validated first) or the
        newest valid one; returns its path, or None when ``save_dir`` holds none. ``check``
        sees it before any part is loaded."""
        if path is not None:
            require_valid(Path(path), f"checkpoint {path}")
        path = Path(path) if path is not None else self.find_resumable()
        if path is None:
            return None
        meta = read_metadata(path)
        state = read_rank_state(path, meta)
        if self.check is not None:
            self.check(path, meta, state)
        for key, part in self.parts.items():
            self._load_part(path, key, part, state, meta)
        barrier()
        return path

    def _load_part(self, path: Path, key: str, part: Any, state: dict, meta: dict) -> None:
        """One part from the checkpoint at ``path`` (``state``: this rank's plain state)."""
        if hasattr(part, "sharded_state_dict"):
            from megatron.core import dist_checkpointing

            loaded = dist_checkpointing.load(part.sharded_state_dict(is_loading=True),
                                             str(path / "dist"))
            loaded.pop("content_metadata", None)  # megatron-core's own entry, not model state
            part.load_sharded_state_dict(loaded)
        elif key == TRAIN_STATE:
            part.load_state_dict(state)
        elif key in state:
            part.load_state_dict(state[key])
        elif key == RNG:
            if rank() == 0:
                log.warning("checkpoint: %s was saved with world size %s, now %d: RNG states "
                            "not restored", path, meta["world_size"], world_size())
        else:
            raise CheckpointError(f"checkpoint {path} holds no {key!r} state for rank {rank()}")


def _layout() -> dict[str, int]:
    """The model-parallel sizes (tp, pp, cp, dp) of the run, if megatron's are initialised."""
    from megatron.core import parallel_state as ps

    if not ps.model_parallel_is_initialized():
        return {}
    return {"tp": ps.get_tensor_model_parallel_world_size(),
            "pp": ps.get_pipeline_model_parallel_world_size(),
            "cp": ps.get_context_parallel_world_size(), "dp": ps.get_data_parallel_world_size()}
