"""A run's setup step, above the packages a config names (models, data, tasks, algorithms) and
below those that run it (plan, training, the entry points).

:func:`load_run_config` loads the config (:func:`rspo_mega.config.load_config`'s rules: YAML,
overrides, types) and fills the model section from the files it names: hub ids, shipped configs
and checkpoints, HF directories and the tokenizer (:mod:`rspo_mega.setup.resolve`).
:func:`validate_run` checks the config's rules between fields and the rules its loss and task
declare (:mod:`rspo_mega.setup.rules`)."""

from __future__ import annotations

from pathlib import Path
from typing import Iterable, Optional

from rspo_mega.config.loader import config_from_dict, merge_overrides, read_config_file
from rspo_mega.config.schema import TrainConfig
from rspo_mega.setup.resolve import resolve_model
from rspo_mega.setup.rules import validate_run

__all__ = ["load_run_config", "run_config_from_dict", "validate_run"]


def run_config_from_dict(data: Optional[dict], overrides: Iterable[str] = ()) -> TrainConfig:
    """:func:`rspo_mega.config.config_from_dict`, then the model section filled from the files
    the config names, where the run does not set its keys itself (keys it sets must agree)."""
    merged = merge_overrides(data, overrides)
    cfg = config_from_dict(merged)
    resolve_model(cfg, given=set(merged.get("model") or ()))
    return cfg


def load_run_config(path: Optional[str | Path] = None,
                    overrides: Iterable[str] = ()) -> TrainConfig:
    """The run config of the YAML file ``path`` (None: all defaults) with dotted overrides,
    its model section filled (:func:`run_config_from_dict`)."""
    return run_config_from_dict(read_config_file(path), overrides)
