"""The weights a run starts from (``checkpoint.init_from``), checked before any model is built.

``init_from`` takes a converted megatron checkpoint, a trainer checkpoint (``iter_NNNNNNN/``), a
trainer ``save_dir`` (:func:`checkpointing.resolve_model_checkpoint`) or an HF LLaDA directory.
An HF directory gets the converter's checks first (:func:`convert.open_hf_checkpoint`: index,
shards, no pickle, config.json, every tensor's name and shape; :func:`convert.check_layout`: the
run's TP/PP), and its config.json must agree with the run's model section (resolved from it when
the config was loaded: :mod:`rspo_mega.config.hf_start`). Its weights are then converted on the
fly into each rank's chunks (:func:`hf_load.load_hf_weights`); nothing is written to disk.
"""

from __future__ import annotations

import logging
from typing import Callable, Optional

import torch

from rspo_mega.config import TrainConfig
from rspo_mega.config.hf_start import check_model_keys, is_hf_start
from rspo_mega.errors import HFDirectoryError
from rspo_mega.models.llada import load_model
from rspo_mega.models.llada.convert import check_layout, open_hf_checkpoint
from rspo_mega.models.llada.hf_load import load_hf_weights
from rspo_mega.training.checkpointing import resolve_model_checkpoint

log = logging.getLogger(__name__)

Loader = Callable[[list[torch.nn.Module]], None]  # fills a rank's model chunks in place


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
