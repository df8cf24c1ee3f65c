"""Checkpoint parts for the manager's tests: a fixed sharded state dict and plain values."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional


class ShardedPart:
    """Saves ``sharded`` (a dist-checkpoint state dict); what a load returned lands in
    ``loaded``."""

    def __init__(self, sharded: dict) -> None:
        self.sharded, self.loaded = sharded, None

    def sharded_state_dict(self, is_loading: bool = False) -> dict:
        return self.sharded

    def load_sharded_state_dict(self, state: dict) -> None:
        self.loaded = state


class PlainPart:
    """One plain value in the per-rank file."""

    def __init__(self, value: Any = None) -> None:
        self.value = value

    def state_dict(self) -> dict:
        return {"value": self.value}

    def load_state_dict(self, state: dict) -> None:
        self.value = state["value"]


def manager(save_dir: str | Path, sharded: dict, keep_last: int = 2,
            config: Optional[dict] = None, **plain: Any):
    """A manager of one sharded part (``"state"``) and the ``plain`` values by key."""
    from rspo_mega.training.checkpoint.manager import CheckpointManager

    parts = {"state": ShardedPart(sharded), **{k: PlainPart(v) for k, v in plain.items()}}
    return CheckpointManager(save_dir, keep_last, parts, config=config)


def save(save_dir: str | Path, step: int, sharded: dict, keep_last: int = 2,
         config: Optional[dict] = None, **plain: Any) -> Path:
    """Save the checkpoint of ``step`` holding ``sharded`` and the ``plain`` values."""
    return manager(save_dir, sharded, keep_last, config, **plain).save(step, last=True)


def load(save_dir: str | Path, path: Optional[Path], sharded: dict,
         *keys: str) -> tuple[Optional[Path], dict, dict]:
    """Load ``path`` (None: the newest valid one) into ``sharded`` and the plain ``keys``:
    (path loaded, the sharded state, {key: value})."""
    m = manager(save_dir, sharded, **{k: None for k in keys})
    loaded = m.load(path)
    return loaded, m.parts["state"].loaded, {k: m.parts[k].value for k in keys}
