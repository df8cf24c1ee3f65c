"""The weights a run starts from (``checkpoint.init_from``), checked before any model is built.

``init_from`` takes a converted megatron checkpoint, a trainer checkpoint (``iter_NNNNNNN/``), a
trainer ``save_dir`` (:func:`resolve_model_checkpoint`) or an HF LLaDA directory.
An HF directory gets the converter's checks first (:func:`convert.open_hf_checkpoint`: index,
shards, no pickle, config.json, every tensor's name and shape; :func:`convert.check_layout`: the
run's TP/PP), and its config.json must agree with the run's model section (resolved from it when
the config was set up: :mod:`rspo_mega.setup.hf_start`). Its weights are then converted on the
fly into each rank's chunks (:func:`hf_load.load_hf_weights`); nothing is written to disk.
"""

from __future__ import annotations

import json
import logging
from dataclasses import asdict
from pathlib import Path
from typing import Callable, Optional

import torch

from rspo_mega.config import ConfigError, TrainConfig
from rspo_mega.setup.hf_start import check_model_keys, is_hf_start
from rspo_mega.errors import CheckpointError, HFDirectoryError
from rspo_mega.models.llada import load_model
from rspo_mega.models.llada.convert import check_layout, open_hf_checkpoint
from rspo_mega.models.llada.hf_load import load_hf_weights
from rspo_mega.training.checkpoint.files import METADATA, list_checkpoints, require_valid
from rspo_mega.training.checkpoint.manager import CheckpointManager

log = logging.getLogger(__name__)

Loader = Callable[[list[torch.nn.Module]], None]  # fills a rank's model chunks in place


GEOMETRY = ("num_layers", "hidden_size", "ffn_hidden_size", "num_attention_heads",
            "num_query_groups", "vocab_size")  # model keys that give every tensor its shape


def _stored_model(dist_dir: Path) -> Optional[dict]:
    """The model section a megatron checkpoint records: a trainer checkpoint's in its
    metadata.json, a converted one's in its conversion record; None when it has neither."""
    from rspo_mega.models.llada.convert import CONVERSION_INFO

    for record, read in ((dist_dir.parent / METADATA, lambda d: (d.get("config") or {})
                          .get("model")), (dist_dir / CONVERSION_INFO, lambda d: d.get("model"))):
        if record.is_file():
            try:
                return read(json.loads(record.read_text()))
            except (OSError, ValueError, AttributeError):
                return None
    return None


def _geometry(model: dict) -> dict:
    """The :data:`GEOMETRY` keys of a model section, query groups unset meaning one per head."""
    out = {k: model[k] for k in GEOMETRY if k in model}
    if "num_query_groups" in out and out["num_query_groups"] is None:
        out["num_query_groups"] = model.get("num_attention_heads")
    return out


def check_stored_model(dist_dir: str, cfg: TrainConfig) -> None:
    """Raise :class:`ConfigError` when the megatron checkpoint ``dist_dir`` records a model of
    another shape than the run's (naming each key)."""
    saved = _stored_model(Path(dist_dir))
    if not saved:
        return
    saved, mine = _geometry(saved), _geometry(asdict(cfg.model))
    diffs = [f"model.{k}={mine[k]!r} (checkpoint: {saved[k]!r})" for k in GEOMETRY
             if k in saved and saved[k] != mine[k]]
    if diffs:
        raise ConfigError(f"checkpoint.init_from={cfg.checkpoint.init_from} holds another model "
                          f"than the run's: {', '.join(diffs)}")


def resolve_model_checkpoint(path: str | Path) -> str:
    """The dist-checkpoint directory behind ``checkpoint.init_from``: a converted model
    checkpoint (as is), one trainer checkpoint (``iter_*``: its ``dist/`` after validation) or
    a trainer ``save_dir`` (its newest valid checkpoint's) (collective)."""
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"checkpoint.init_from={path}: no such directory")
    if (path / "dist").is_dir():
        require_valid(path, f"checkpoint.init_from={path}")
        return str(path / "dist")
    if list_checkpoints(path):
        newest = CheckpointManager(path).find_resumable()
        if newest is None:
            raise CheckpointError(f"checkpoint.init_from={path}: no valid checkpoint in it")
        return str(newest / "dist")
    if not (path / ".metadata").is_file():
        raise CheckpointError(
            f"checkpoint.init_from={path} is neither an HF LLaDA directory (config.json and "
            "safetensors), a trainer checkpoint (iter_*/ or the save_dir holding them) nor a "
            "converted megatron checkpoint (.metadata)")
    return str(path)


def prepare_init(cfg: TrainConfig) -> Optional[Loader]:
    """Check ``checkpoint.init_from`` and return the function that loads it into a rank's
    chunks (None without ``init_from``). Raises :class:`HFDirectoryError` (the converter's
    finding: a missing shard, a pickle, a tensor's name or shape) or :class:`CheckpointError`
    for a bad source, :class:`ConfigError` where the run's model keys disagree with it."""
    source = cfg.checkpoint.init_from
    if not source:
        return None
    if not is_hf_start(cfg):
        init_dir = resolve_model_checkpoint(source)
        check_stored_model(init_dir, cfg)

        def load_megatron(chunks: list[torch.nn.Module]) -> None:
            for chunk in chunks:
                load_model(chunk, init_dir)

        return load_megatron
    try:
        reader, raw, model = open_hf_checkpoint(source, cfg.model)
    except (OSError, ValueError, KeyError) as err:
        text = err.args[0] if len(err.args) == 1 and isinstance(err.args[0], str) else str(err)
        raise HFDirectoryError(f"checkpoint.init_from: {text}") from err
    check_model_keys(cfg.model, raw, source)  # every key: this config may not come from a file
    check_layout(model, cfg.parallel.tp, cfg.parallel.pp)

    def load(chunks: list[torch.nn.Module]) -> None:
        reads = sum(load_hf_weights(chunk, reader, model) for chunk in chunks)
        log.info("init_from %s: %d HF tensors converted at tp=%d pp=%d", source, reads,
                 cfg.parallel.tp, cfg.parallel.pp)

    return load
