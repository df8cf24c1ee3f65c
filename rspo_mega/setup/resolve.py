"""The model section resolved once, right after the config is loaded (before validation, any
process group or model), so ``--dry-run``, the saved ``config.yaml`` and every consumer (model
builder, sampler, mask sampler, planner) read the same ``cfg.model``.

Hub ids ``hf:ORG/NAME[@REVISION]`` in ``model.hf_config``, ``checkpoint.init_from`` and
``data.tokenizer`` first become their snapshot directories in the HF cache
(:mod:`rspo_mega.setup.hub`). Sources, each filling what the earlier ones leave unset and
agreeing with what they set:

1. the ``model`` keys the run sets itself (its YAML or overrides);
2. ``model.hf_config``: geometry and token ids of that HF ``config.json`` (``shipped:<name>``: one
   shipped with the package, e.g. ``shipped:llada_8b``);
3. ``checkpoint.init_from`` naming an HF LLaDA directory (``shipped:<name>`` first becomes the
   shipped checkpoint's path): its ``config.json`` likewise, and its tokenizer becomes
   ``data.tokenizer`` when that is unset;
4. the tokenizer, for the vocabulary and special ids: ``data.tokenizer`` (loaded here), else the
   built-in one, whose ids are fixed by construction
   (:func:`rspo_mega.data.tokenizer_training.builtin_model_fields`; it is trained later, and
   :mod:`rspo_mega.training.run_data` checks it against the model section with the same rule,
   :func:`rspo_mega.data.tokenizer_ids.check_tokenizer_ids`).

A disagreement raises :class:`ConfigError` naming each key with both values.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any, Iterable

from rspo_mega.config.schema import ModelConfig, TrainConfig
from rspo_mega.data.tokenizer import load_tokenizer
from rspo_mega.data.tokenizer_ids import TOKEN_KEYS, tokenizer_model_fields
from rspo_mega.data.tokenizer_training import builtin_model_fields
from rspo_mega.errors import ConfigError
from rspo_mega.models.llada.hf_config import RUN_CHOSEN_FIELDS, hf_model_fields, read_hf_config
from rspo_mega.setup.hf_start import (
    TOKENIZER_FILES, check_model_keys, is_hf_start, resolve_shipped, shipped_hf_config,
)
from rspo_mega.setup.hub import HUB_FILES, HUB_PREFIX, resolve_hub_id


def _read_hf(key: str, path: str) -> dict[str, Any]:
    try:
        return read_hf_config(path)
    except (OSError, ValueError) as err:
        raise ConfigError(f"{key}: {err}") from None


def _apply_hf(model: ModelConfig, key: str, path: str, given: set[str],
              where: str) -> ModelConfig:
    """``model`` with the fields of the config.json at ``path`` (config key ``key``), after
    checking it agrees with ``model`` on the keys in ``given`` (the run's own values of the
    run-chosen fields stay); adds those fields to ``given``."""
    raw = _read_hf(key, path)
    check_model_keys(model, raw, path, given, where, key)
    config_json = str(Path(path) / "config.json") if Path(path).is_dir() else path
    try:
        fields = hf_model_fields(raw, config_json)
    except ValueError as err:
        raise ConfigError(f"{key}: {err}") from None
    fields = {k: v for k, v in fields.items() if not (k in RUN_CHOSEN_FIELDS and k in given)}
    given |= set(fields)
    return replace(model, **fields)


def _tokenizer_fields(cfg: TrainConfig) -> dict[str, Any]:
    """The vocabulary size and special ids of the run's tokenizer."""
    if cfg.data.tokenizer is None:
        return builtin_model_fields()
    try:
        tok = load_tokenizer(cfg.data.tokenizer)
    except (OSError, ValueError) as err:
        raise ConfigError(f"data.tokenizer={cfg.data.tokenizer}: {err}") from None
    return tokenizer_model_fields(tok)


def resolve_hub_ids(cfg: TrainConfig) -> None:
    """Replace each hub id among the keys of :data:`HUB_FILES` by its snapshot directory."""
    for key in HUB_FILES:
        section, name = key.split(".")
        value = getattr(getattr(cfg, section), name)
        if isinstance(value, str) and value.startswith(HUB_PREFIX):
            try:
                setattr(getattr(cfg, section), name, resolve_hub_id(key, value))
            except ValueError as err:
                raise ConfigError(str(err)) from None


def resolve_model(cfg: TrainConfig, given: Iterable[str] = ()) -> None:
    """Fill ``cfg.model`` (and ``data.tokenizer`` of an HF start) in place from the sources of
    the module docstring; ``given``: the model keys the run set itself."""
    given = set(given)
    resolve_hub_ids(cfg)
    resolve_shipped(cfg)
    where = ""
    if cfg.model.hf_config:
        path = shipped_hf_config(cfg.model.hf_config)
        cfg.model = _apply_hf(cfg.model, "model.hf_config", path, given, where)
        where = f" (from model.hf_config={cfg.model.hf_config})"
    if is_hf_start(cfg):
        hf_dir = cfg.checkpoint.init_from
        cfg.model = _apply_hf(cfg.model, "checkpoint.init_from", hf_dir, given, where)
        if cfg.data.tokenizer is None:
            if not any((Path(hf_dir) / name).is_file() for name in TOKENIZER_FILES):
                raise ConfigError(f"checkpoint.init_from={hf_dir} holds neither "
                                  f"{' nor '.join(TOKENIZER_FILES)}; set data.tokenizer")
            cfg.data.tokenizer = hf_dir
    if not set(TOKEN_KEYS) <= given:
        tokens = _tokenizer_fields(cfg)
        cfg.model = replace(cfg.model, **{k: v for k, v in tokens.items() if k not in given})
