"""The files a run reads and the directories it writes, checked before anything is built.

* :func:`check_inputs`: every input path the config names exists (the data files, the
  tokenizer, ``checkpoint.init_from``, ``model.hf_config``); one :class:`ConfigError` names each
  missing one. ``rspo-train --dry-run`` runs it too, so a login node finds a recipe's
  placeholders before the job queues.
* :func:`check_outputs`: the run directory (``logging.output_dir``), ``checkpoint.save_dir`` and
  the parent of ``checkpoint.export_hf`` (and of ``checkpoint.export_peft`` with LoRA) exist or
  can be created, and a file can be written in
  each (so a read-only or misspelled path fails at the start, not at the first save or after
  training). It creates those directories.
* :func:`resolve_run_paths`: ``{output_dir}`` in ``checkpoint.save_dir``, ``export_hf`` and
  ``export_peft`` (their defaults) becomes ``logging.output_dir``; the loader applies it.
"""

from __future__ import annotations

import os
import socket
from pathlib import Path
from typing import Optional

from rspo_mega.config.schema import TrainConfig
from rspo_mega.errors import ConfigError


SHIPPED_PREFIX = "shipped:"  # init_from / hf_config = shipped:<name>: shipped with the package
# the run config of rspo-train, rspo-eval and rspo-plan without --config: the tiny Sudoku run
TINY_DEFAULT = Path(__file__).resolve().parent.parent / "configs" / "tiny_sudoku.yaml"


def input_paths(cfg: TrainConfig) -> dict[str, Optional[str]]:
    """The config keys naming files or directories the run reads, with their values."""
    hf_config = cfg.model.hf_config
    return {
        "data.train_path": cfg.data.train_path,
        "data.test_path": cfg.data.test_path,
        "data.tokenizer": cfg.data.tokenizer,
        "checkpoint.init_from": cfg.checkpoint.init_from,
        "model.hf_config": None if hf_config and hf_config.startswith(SHIPPED_PREFIX) else hf_config,
    }


def missing_inputs(cfg: TrainConfig) -> list[str]:
    """``key=path`` of every configured input path that does not exist."""
    return [f"{key}={path}" for key, path in input_paths(cfg).items()
            if path and not os.path.exists(path)]


def check_inputs(cfg: TrainConfig) -> None:
    """Raise :class:`ConfigError` naming every input path that does not exist."""
    missing = missing_inputs(cfg)
    if missing:
        raise ConfigError(f"input path{'s' if len(missing) > 1 else ''} not found: "
                          f"{', '.join(missing)}")


def _unwritable(path: Path) -> Optional[str]:
    """Why ``path`` cannot be a directory the run writes into, or None after creating it (and
    its parents) and writing and removing a file in it."""
    if path.exists() and not path.is_dir():
        return "it is a file, not a directory"
    probe = path / f".rspo_mega_write_check.{socket.gethostname()}.{os.getpid()}"
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as err:
        return f"cannot create or write this directory: {err.strerror or err}"
    return None


def check_outputs(cfg: TrainConfig) -> None:
    """Raise :class:`ConfigError` naming the first output location the run cannot write."""
    dirs = {"logging.output_dir": cfg.logging.output_dir, "checkpoint.save_dir":
            cfg.checkpoint.save_dir}
    for key, path in dirs.items():
        why = _unwritable(Path(path)) if path else None
        if why:
            raise ConfigError(f"{key}={path}: {why}")
    exports = {"checkpoint.export_hf": cfg.checkpoint.export_hf}
    if cfg.model.lora.enabled and cfg.checkpoint.export_hf:
        exports["checkpoint.export_peft"] = cfg.checkpoint.export_peft
    for key, export in exports.items():
        if not export:
            continue
        if Path(export).exists() and not Path(export).is_dir():
            raise ConfigError(f"{key}={export}: it is a file, not a directory")
        parent = Path(export).absolute().parent
        why = _unwritable(parent)
        if why:
            raise ConfigError(f"{key}={export}: its parent {parent}: {why}")


OUTPUT_DIR = "{output_dir}"  # in checkpoint.save_dir / export_hf: the run's logging.output_dir


def resolve_run_paths(cfg: TrainConfig) -> None:
    """Replace :data:`OUTPUT_DIR` in the checkpoint paths by ``logging.output_dir`` (in place)."""
    ck, out = cfg.checkpoint, cfg.logging.output_dir.rstrip("/") or "/"
    if ck.save_dir:
        ck.save_dir = ck.save_dir.replace(OUTPUT_DIR, out)
    if ck.export_hf:
        ck.export_hf = ck.export_hf.replace(OUTPUT_DIR, out)
    if ck.export_peft:
        ck.export_peft = ck.export_peft.replace(OUTPUT_DIR, out)
