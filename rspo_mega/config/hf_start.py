"""``checkpoint.init_from`` naming an HF LLaDA directory: the run's model and tokenizer from it.

:func:`resolve_hf_start` runs when a config is loaded (before validation, any process group or
model), so ``--dry-run``, the saved ``config.yaml`` and every check see the checkpoint's model:

* the ``model`` section takes its geometry and token ids from the directory's ``config.json``
  (parsed by the converter's :func:`hf_config.hf_model_fields`); its other keys (dtype,
  implementation, FP8, vocab divisor) stay the run's;
* a ``model`` key the run sets itself (in its YAML or an override), or the geometry of
  ``model.hf_config`` when that is set, must agree with config.json, else :class:`ConfigError`
  names each key with both values;
* with ``data.tokenizer`` unset the tokenizer is the directory's own (``tokenizer.json`` or a
  SentencePiece ``tokenizer.model``).

The weights are checked and loaded later, before the model is built
(:mod:`rspo_mega.training.init_weights`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Iterable, Optional

from rspo_mega.config.loader import ConfigError
from rspo_mega.config.schema import ModelConfig, TrainConfig

TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model")  # what load_tokenizer looks for in a dir
SHIPPED_PREFIX = "shipped:"  # init_from=shipped:<name>: a checkpoint shipped with the package
SHIPPED_DIR = Path(__file__).resolve().parent.parent / "checkpoints"


def resolve_shipped(cfg: TrainConfig) -> None:
    """``checkpoint.init_from=shipped:<name>`` -> the absolute path of that shipped checkpoint."""
    start = cfg.checkpoint.init_from
    if not start or not start.startswith(SHIPPED_PREFIX):
        return
    name = start[len(SHIPPED_PREFIX):]
    path = SHIPPED_DIR / name
    if not name or not (path / "config.json").is_file():
        shipped = sorted(p.name for p in SHIPPED_DIR.glob("*") if (p / "config.json").is_file())
        raise ConfigError(f"checkpoint.init_from={start}: no shipped checkpoint {name!r} "
                          f"(shipped: {', '.join(shipped) or 'none'})")
    cfg.checkpoint.init_from = str(path)


def is_hf_start(cfg: TrainConfig) -> bool:
    """Whether ``checkpoint.init_from`` names an HF checkpoint directory."""
    from rspo_mega.models.llada.hf_io import looks_like_hf_checkpoint

    return bool(cfg.checkpoint.init_from) and looks_like_hf_checkpoint(cfg.checkpoint.init_from)


def check_model_keys(model: ModelConfig, raw: dict[str, Any], hf_dir: str,
                     given: Optional[Iterable[str]] = None) -> None:
    """Raise :class:`ConfigError` unless ``model`` agrees with the config.json ``raw`` of
    ``hf_dir`` on the keys in ``given`` (every key config.json sets when ``given`` is None or
    ``model.hf_config`` is set: that file's geometry is then compared)."""
    from rspo_mega.models.llada.hf_config import conflicting_fields, resolve_model_config

    source = str(Path(hf_dir) / "config.json")
    try:
        declared = resolve_model_config(model)
    except (OSError, ValueError) as err:
        raise ConfigError(f"model.hf_config: {err}") from None
    keys = None if given is None or model.hf_config else given
    try:
        conflicts = conflicting_fields(declared, raw, source, keys)
    except ValueError as err:
        raise ConfigError(f"checkpoint.init_from: {err}") from None
    if conflicts:
        where = f" (from model.hf_config={model.hf_config})" if model.hf_config else ""
        listed = ", ".join(f"model.{k}={mine!r} (config.json: {theirs!r})"
                           for k, mine, theirs in conflicts)
        raise ConfigError(f"checkpoint.init_from={hf_dir}: its config.json disagrees with the "
                          f"run's model keys{where}: {listed}; drop these keys from the run config "
                          "to take the checkpoint's values")


def resolve_hf_start(cfg: TrainConfig, given: Optional[Iterable[str]] = None) -> None:
    """Take ``cfg.model`` (and ``data.tokenizer`` when unset) from an HF ``checkpoint.init_from``
    in place; nothing happens for other ``init_from`` values. ``given``: the model keys the run
    set itself (None: all of them). ``shipped:<name>`` names a checkpoint of the package."""
    resolve_shipped(cfg)
    if not is_hf_start(cfg):
        return
    from rspo_mega.models.llada.hf_config import model_config_from_hf_dict, read_hf_config

    hf_dir = cfg.checkpoint.init_from
    try:
        raw = read_hf_config(hf_dir)
    except (OSError, ValueError) as err:
        raise ConfigError(f"checkpoint.init_from: {err}") from None
    check_model_keys(cfg.model, raw, hf_dir, given)
    cfg.model = model_config_from_hf_dict(raw, str(Path(hf_dir) / "config.json"), cfg.model)
    if cfg.data.tokenizer is None:
        if not any((Path(hf_dir) / name).is_file() for name in TOKENIZER_FILES):
            raise ConfigError(f"checkpoint.init_from={hf_dir} holds neither "
                              f"{' nor '.join(TOKENIZER_FILES)}; set data.tokenizer")
        cfg.data.tokenizer = hf_dir
