"""Run checkpoints: atomic, validated, keep-last-N, over megatron-core dist-checkpointing.

Layout of one checkpoint (``save_dir/iter_0000010/``)::

    dist/                 megatron-core dist-checkpoint (model + optimizer shards, ``.metadata``)
    extra/rank_00000.pt   per-rank plain state (step, RNG states, data position), ``torch.save``
    metadata.json         written last by rank 0: step, time, world size, layout, file list

A save goes into ``iter_0000010.tmp-<nonce>/``; after every rank has written its part, rank 0
records the file list (sizes for every file, SHA-256 for small ones) and renames the directory to
its final name (atomic on POSIX). Only then are valid checkpoints
beyond the newest ``keep_last`` deleted. A crash at any point leaves either the previous complete
checkpoint or a ``*.tmp-*`` directory that :meth:`CheckpointManager.find_resumable` ignores.

A write that fails (disk full, quota, I/O error, on any rank) raises :class:`CheckpointError` on
every rank with the cause, file and rank (:mod:`rspo_mega.training.save_failures`): the ranks
gather their failures where all of them arrive (after creating the directory, after the
per-rank files, after rank 0's publishing step; torch's ``CheckpointException`` from the
dist-checkpoint write is already collective), and rank 0 removes the temporary directory.

Per-rank files are read with ``torch.load(..., weights_only=True)``: nothing is unpickled.
"""

from __future__ import annotations

import json
import logging
import os
import random
import re
import shutil
import time
import uuid
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch
import torch.distributed as dist

from rspo_mega.errors import CheckpointError  # noqa: F401 - raised here, caught by callers
from rspo_mega.training import save_failures
from rspo_mega.training.checkpoint_files import (  # noqa: F401 - atomic_write_text is public here
    TMP_MARK as _TMP_MARK, atomic_write_text, fsync_dir, make_save_dirs, save_synced, sha256_file,
)

log = logging.getLogger(__name__)

_ITER_RE = re.compile(r"^iter_(\d{7,})$")
METADATA = "metadata.json"
SMALL_FILE_BYTES = 64 * 2**20  # files up to this size (bytes) get a SHA-256 in metadata.json
FORMAT_VERSION = 1


# ------------------------------------------------------------------------------------------
# Helpers: ranks, RNG, files
# ------------------------------------------------------------------------------------------
def _dist() -> bool:
    return dist.is_available() and dist.is_initialized()


def _rank() -> int:
    return dist.get_rank() if _dist() else 0


def _world() -> int:
    return dist.get_world_size() if _dist() else 1


def _barrier() -> None:
    if _dist():
        dist.barrier()


def _broadcast(obj: Any) -> Any:
    """Rank 0's ``obj`` on every rank."""
    if not _dist() or _world() == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def checkpoint_name(step: int) -> str:
    """Directory name of the checkpoint of ``step``: ``iter_0000010``."""
    return f"iter_{step:07d}"


def capture_rng_state() -> dict[str, Any]:
    """Python, NumPy, torch CPU (and CUDA, and megatron tracker) RNG states of this rank.

    Only tensors, ints, floats, strings, lists and dicts: loadable with ``weights_only=True``.
    """
    version, internal, gauss = random.getstate()
    np_state = np.random.get_state()
    state: dict[str, Any] = {
        "python": {"version": version, "state": list(internal), "gauss": gauss},
        "numpy": {
            "kind": np_state[0], "keys": torch.from_numpy(np_state[1].astype(np.int64)),
            "pos": int(np_state[2]), "has_gauss": int(np_state[3]), "gauss": float(np_state[4]),
        },
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = [s.cpu() for s in torch.cuda.get_rng_state_all()]
    try:
        from megatron.core import tensor_parallel

        tracker = tensor_parallel.get_cuda_rng_tracker()
        if tracker.get_states():
            state["megatron_tracker"] = {k: v.clone() for k, v in tracker.get_states().items()}
    except (ImportError, RuntimeError):
        pass
    return state


def restore_rng_state(state: dict[str, Any]) -> None:
    """Inverse of :func:`capture_rng_state`: continues every random stream bit for bit."""
    py = state["python"]
    random.setstate((py["version"], tuple(py["state"]), py["gauss"]))
    npy = state["numpy"]
    np.random.set_state((
        npy["kind"], npy["keys"].numpy().astype(np.uint32), npy["pos"], npy["has_gauss"],
        npy["gauss"],
    ))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    if "megatron_tracker" in state:
        from megatron.core import tensor_parallel

        tensor_parallel.get_cuda_rng_tracker().set_states(state["megatron_tracker"])


def _file_table(root: Path) -> dict[str, dict[str, Any]]:
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
    for rank in range(int(meta.get("world_size", 1))):
        if f"extra/{_rank_file(rank)}" not in files:
            return f"{METADATA} lists no per-rank file for rank {rank}"
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


def read_metadata(path: str | Path) -> dict[str, Any]:
    """The ``metadata.json`` of a checkpoint (step, time, world size, layout, config, files)."""
    return json.loads((Path(path) / METADATA).read_text())


def _rank_file(rank: int) -> str:
    return f"rank_{rank:05d}.pt"


def _layout() -> dict[str, int]:
    try:
        from megatron.core import parallel_state as ps

        if ps.model_parallel_is_initialized():
            return {
                "tp": ps.get_tensor_model_parallel_world_size(),
                "pp": ps.get_pipeline_model_parallel_world_size(),
                "cp": ps.get_context_parallel_world_size(),
                "dp": ps.get_data_parallel_world_size(),
            }
    except ImportError:
        pass
    return {}


# ------------------------------------------------------------------------------------------
# Manager
# ------------------------------------------------------------------------------------------
class CheckpointManager:
    """Saves, finds and loads the run checkpoints under ``save_dir`` (a shared filesystem).

    Every method is collective: call it on every rank of the default process group.

    Args:
        save_dir: directory holding the ``iter_*`` checkpoints.
        keep_last: complete checkpoints kept after a save (>= 1).
    """

    def __init__(self, save_dir: str | Path, keep_last: int = 2) -> None:
        if keep_last < 1:
            raise ValueError(f"keep_last must be >= 1, got {keep_last}")
        self.save_dir = Path(save_dir)
        self.keep_last = keep_last

    # -- listing ---------------------------------------------------------------------------
    def checkpoints(self) -> list[tuple[int, Path]]:
        """(step, path) of every final-named ``iter_*`` directory, oldest first (not validated)."""
        if not self.save_dir.is_dir():
            return []
        found = []
        for p in self.save_dir.iterdir():
            m = _ITER_RE.match(p.name)
            if m and p.is_dir():
                found.append((int(m.group(1)), p))
        return sorted(found)

    def _clean_tmp(self) -> None:
        if _rank() != 0 or not self.save_dir.is_dir():
            return
        for p in self.save_dir.iterdir():
            if _TMP_MARK in p.name:
                log.info("checkpoint: removing leftover temporary %s", p)
                shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)

    # -- save ------------------------------------------------------------------------------
    def save(
        self,
        step: int,
        sharded_state_dict: dict,
        extra: Optional[dict] = None,
        config: Optional[dict] = None,
    ) -> Path:
        """Write the checkpoint of ``step`` atomically; returns its final directory.

        Args:
            step: training step (optimizer steps done).
            sharded_state_dict: model (+ optimizer) sharded state dict for dist-checkpointing.
            extra: this rank's plain state (ints, floats, strings, lists, dicts, tensors).
            config: the resolved run config (``config_to_dict``), stored in ``metadata.json``.
            This rank's RNG states are added to ``extra`` under ``"rng"``.

        Raises:
            CheckpointError: on every rank, naming the cause, the file and the rank, when a
                write fails (e.g. "no space left on device while writing iter_0000012 (...)").
                The temporary directory is removed; earlier checkpoints are untouched.
        """
        rank = _rank()
        nonce = _broadcast(uuid.uuid4().hex[:12] if rank == 0 else None)
        final = self.save_dir / checkpoint_name(step)
        tmp = self.save_dir / f"{final.name}{_TMP_MARK}{nonce}"
        t0 = time.monotonic()
        self._agree(final, tmp, [] if rank else save_failures.attempt(lambda: make_save_dirs(tmp), "directory", 0))
        self._write_shards(final, tmp, sharded_state_dict)
        payload = dict(extra or {})
        payload["_step"] = step
        payload["rng"] = capture_rng_state()
        rank_file = f"extra/{_rank_file(rank)}"
        self._agree(final, tmp, save_failures.attempt(lambda: save_synced(payload, tmp / rank_file),
                                         rank_file, rank, tmp))
        published = [] if rank else save_failures.attempt(
            lambda: self._publish(step, tmp, final, nonce, config), METADATA, 0, tmp)
        self._agree(final, tmp, published)
        if rank == 0:
            log.info("checkpoint: saved step %d to %s in %.1f s", step, final,
                     time.monotonic() - t0)
        return final

    def _write_shards(self, final: Path, tmp: Path, sharded_state_dict: dict) -> None:
        """dist-checkpointing's collective save into ``tmp/dist``. torch's ``CheckpointException``
        is raised on every rank at once, so ranks agree on it; any other error is this rank's
        alone (its peers fail when it exits) and is raised at once, without collectives."""
        from megatron.core import dist_checkpointing

        try:
            dist_checkpointing.save(sharded_state_dict, str(tmp / "dist"))
        except save_failures.CheckpointException as exc:
            self._agree(final, tmp, save_failures.describe(exc, "dist-checkpoint shards", _rank(),
                                                           str(tmp)))
            raise CheckpointError(f"dist-checkpoint save of {final.name} failed: {exc}") from exc
        except Exception as exc:
            failures = save_failures.describe(exc, "dist-checkpoint", _rank(), str(tmp))
            raise CheckpointError(
                save_failures.failure_message(final.name, failures)
                + f"; the incomplete {tmp.name} is ignored on resume"
            ) from exc

    def _agree(self, final: Path, tmp: Path, failures: list[save_failures.Failure]) -> None:
        """Collective: raise :class:`CheckpointError` on every rank if any rank had a failure
        (after rank 0 removed ``tmp``, naming the newest complete checkpoint that remains)."""
        failures = save_failures.all_gather(failures)
        if not failures:
            return
        note = None
        if _rank() == 0:
            shutil.rmtree(tmp, ignore_errors=True)
            complete = [p.name for _, p in self.checkpoints() if (p / METADATA).is_file()]
            note = (f"the newest complete checkpoint is {complete[-1]}" if complete
                    else "there is no complete checkpoint yet")
        note = _broadcast(note)
        raise CheckpointError(f"{save_failures.failure_message(final.name, failures)}; {note}")

    def _publish(self, step: int, tmp: Path, final: Path, nonce: str,
                 config: Optional[dict]) -> None:
        """Rank 0: ``metadata.json``, rename ``tmp`` to ``final``, pruning."""
        meta = {
            "format_version": FORMAT_VERSION, "step": step, "time": time.time(),
            "world_size": _world(), "layout": _layout(), "config": config,
            "files": _file_table(tmp),
        }
        atomic_write_text(tmp / METADATA, json.dumps(meta, indent=1, default=str))
        old = None
        if final.exists():  # re-saving a step (e.g. after a resume): replace it
            old = self.save_dir / f"{final.name}{_TMP_MARK}old-{nonce}"
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
        complete = [(s, p) for s, p in self.checkpoints()
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
        if _rank() == 0:
            self._clean_tmp()
            for step, path in reversed(self.checkpoints()):
                reason = validate_checkpoint(path)
                if reason is None:
                    choice = str(path)
                    break
                log.warning("checkpoint: skipping invalid checkpoint %s: %s", path, reason)
        choice = _broadcast(choice)
        return Path(choice) if choice is not None else None

    def load(self, path: str | Path, sharded_state_dict: dict) -> tuple[dict, dict]:
        """Load ``(state_dict, extra)`` from the checkpoint at ``path`` after validating it.

        ``extra`` is this rank's saved plain state (with ``"rng"`` for
        :func:`restore_rng_state`). If the world size changed, rank 0's file is returned
        without its RNG states (per-rank streams do not map onto a new layout).
        """
        from megatron.core import dist_checkpointing

        path = Path(path)
        reason = _broadcast(validate_checkpoint(path) if _rank() == 0 else None)
        if reason is not None:
            raise CheckpointError(f"checkpoint {path} is not loadable: {reason}")
        state_dict = dist_checkpointing.load(sharded_state_dict, str(path / "dist"))
        state_dict.pop("content_metadata", None)  # megatron-core's own entry, not model state
        extra = load_extra_state(path)
        _barrier()
        return state_dict, extra


def load_extra_state(path: str | Path) -> dict:
    """This rank's plain saved state of a (validated) checkpoint, without its sharded tensors.

    If the world size changed, rank 0's file is returned without its RNG states (per-rank
    streams do not map onto a new layout).
    """
    path = Path(path)
    meta = read_metadata(path)
    rank = _rank()
    same_world = int(meta["world_size"]) == _world()
    rank_path = path / "extra" / _rank_file(rank if same_world else 0)
    extra = torch.load(rank_path, map_location="cpu", weights_only=True)
    if not same_world:
        extra.pop("rng", None)
        if rank == 0:
            log.warning(
                "checkpoint: %s was saved with world size %s, now %d: RNG states not restored",
                path, meta["world_size"], _world(),
            )
    return extra


def resolve_model_checkpoint(path: str | Path) -> str:
    """The dist-checkpoint directory behind ``checkpoint.init_from``.

    Accepts a converted model checkpoint (returned as is), one trainer checkpoint (``iter_*``:
    its ``dist/`` after validation) or a trainer ``save_dir`` (its newest valid checkpoint).
    """
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"checkpoint.init_from={path}: no such directory")
    if (path / "dist").is_dir():
        reason = _broadcast(validate_checkpoint(path) if _rank() == 0 else None)
        if reason is not None:
            raise CheckpointError(f"checkpoint.init_from={path} is not loadable: {reason}")
        return str(path / "dist")
    manager = CheckpointManager(path)
    if manager.checkpoints():
        newest = manager.find_resumable()
        if newest is None:
            raise CheckpointError(f"checkpoint.init_from={path}: no valid checkpoint in it")
        return str(newest / "dist")
    if not (path / ".metadata").is_file():
        raise CheckpointError(
            f"checkpoint.init_from={path} is neither an HF LLaDA directory (config.json and "
            "safetensors), a trainer checkpoint (iter_*/ or the save_dir holding them) nor a "
            "converted megatron checkpoint (.metadata)")
    return str(path)
