"""``checkpoint.init_from`` naming an HF LLaDA directory, ``shipped:<name>`` (for ``init_from``
and ``model.hf_config``), and the check of a model section against an HF ``config.json``.

The model section is filled from such a directory when the run's config is set up
(:mod:`rspo_mega.setup.resolve`); the weights are checked and loaded later, before the model is
built (:mod:`rspo_mega.training.checkpoint.init_from`), which compares the config.json with the run's
model section again (:func:`check_model_keys`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Iterable, Optional

from rspo_mega.config.paths import SHIPPED_PREFIX
from rspo_mega.config.schema import ModelConfig, TrainConfig
from rspo_mega.errors import ConfigError
from rspo_mega.models.llada.hf_config import conflicting_fields
from rspo_mega.models.llada.hf_io import looks_like_hf_checkpoint

TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model")  # what load_tokenizer looks for in a dir
SHIPPED_DIR = Path(__file__).resolve().parent.parent / "checkpoints"
SHIPPED_GEOMETRIES = Path(__file__).resolve().parent.parent / "models" / "llada" / "configs"


def shipped_hf_config(value: str) -> str:
    """``model.hf_config``: a path, or ``shipped:<name>`` for a config.json shipped with the
    package (``models/llada/configs/<name>.json``, e.g. ``shipped:llada_8b``)."""
    if not value.startswith(SHIPPED_PREFIX):
        return value
    name = value[len(SHIPPED_PREFIX):]
    path = SHIPPED_GEOMETRIES / f"{name}.json"
    if not name or not path.is_file():
        shipped = sorted(p.stem for p in SHIPPED_GEOMETRIES.glob("*.json"))
        raise ConfigError(f"model.hf_config={value}: no shipped config.json {name!r} "
                          f"(shipped: {', '.join(shipped) or 'none'})")
    return str(path)


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
    return bool(cfg.checkpoint.init_from) and looks_like_hf_checkpoint(cfg.checkpoint.init_from)


def check_model_keys(model: ModelConfig, raw: dict[str, Any], source: str,
                     keys: Optional[Iterable[str]] = None, where: str = "",
                     key: str = "checkpoint.init_from") -> None:
    """Raise :class:`ConfigError` unless ``model`` agrees with the config.json ``raw`` found at
    ``source`` (named by config key ``key``) on ``keys`` (every key config.json sets when None).
    ``where`` says where ``model``'s values came from, for the message."""
    try:
        conflicts = conflicting_fields(model, raw, str(Path(source)), keys)
    except ValueError as err:
        raise ConfigError(f"{key}: {err}") from None
    if conflicts:
        listed = ", ".join(f"model.{k}={mine!r} (config.json: {theirs!r})"
                           for k, mine, theirs in conflicts)
        raise ConfigError(f"{key}={source}: its config.json disagrees with the run's model "
                          f"keys{where}: {listed}; drop these keys from the run config to take "
                          "the checkpoint's values")
