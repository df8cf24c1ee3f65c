"""YAML files and dotted command-line overrides -> typed :class:`TrainConfig`.

``load_config("run.yaml", ["parallel.tp=2", "algorithm.lambda_=0.01"])`` reads the file with
``yaml.safe_load``, applies each override (values parsed as YAML scalars), and converts the result
into the dataclasses of :mod:`rspo_mega.config.schema`, checking every key and type on the way.
Errors are :class:`ConfigError` and name the dotted key (with a did-you-mean for unknown keys).
Loading reads no other file: filling the model section from HF directories and the tokenizer is
the run's setup step (:func:`rspo_mega.setup.load_run_config`).
"""

from __future__ import annotations

import dataclasses
import difflib
import re
import types
import typing
from pathlib import Path
from typing import Annotated, Any, Iterable, Literal, Optional, Union

import yaml

from rspo_mega.config.paths import resolve_run_paths
from rspo_mega.config.schema import Bounds, NameOrImportPath, TrainConfig
from rspo_mega.errors import ConfigError

_SCIENTIFIC = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+")


_SFT_RUN = ("run SFT as its own run (algorithm.name=sft, e.g. --config "
            "rspo_mega/configs/tiny_sudoku_sft.yaml) and start RL from it with "
            "checkpoint.init_from")
# Keys that no longer exist, refused with where their setting went: the in-run SFT warm-up, and
# keys that were read nowhere or did something else than their name said.
REMOVED_KEYS: dict[str, str] = {
    "micro_batch_size": ("it only set the chunk of algorithm.centering=microbatch, now "
                         "algorithm.microbatch_completions; the forward micro-batches are "
                         "likelihood.micro_batch_size (ELBO) and rollout.micro_batch_size "
                         "(sampler)"),
    "checkpoint.load_dir": ("it was read nowhere: a run resumes from the newest valid checkpoint "
                            "in checkpoint.save_dir, and starts from other weights with "
                            "checkpoint.init_from"),
    "parallel.cp": ("context parallelism is not supported (the ELBO's masks span the whole "
                    "sequence); a layout is parallel.tp * parallel.pp * data parallel"),
    "rollout.mode": ("set rollout.confidence_threshold instead: null is the exact schedule "
                     "(mode=exact), a value in (0, 1] threshold decoding (mode=threshold)"),
    "sft_warmup_steps": _SFT_RUN,
    "sft_warmup_target_accuracy": _SFT_RUN,
    "sft_warmup_min_steps": _SFT_RUN,
    "sft_warmup_check_interval": _SFT_RUN,
    "sft_warmup_holdout": _SFT_RUN,
    "optimizer.sft_lr": "an SFT run's learning rate is its optimizer.lr; " + _SFT_RUN,
    "optimizer.reset_for_rl": ("an RL run from checkpoint.init_from loads the weights only, so "
                               "its Adam moments start fresh; " + _SFT_RUN),
    "likelihood.sft_mask_scheme": ("an SFT run (algorithm.name=sft) estimates its ELBO with "
                                   "likelihood.mask_scheme; " + _SFT_RUN),
}


def _suggest(key: str, options: Iterable[str]) -> str:
    close = difflib.get_close_matches(key, list(options), n=1, cutoff=0.6)
    return f" (did you mean '{close[0]}'?)" if close else ""


def _unknown_key(dotted: str, key: str, options: Iterable[str]) -> ConfigError:
    """The error for a key the schema lacks: why, for a removed key, else a did-you-mean."""
    if dotted in REMOVED_KEYS:
        return ConfigError(f"config key '{dotted}' was removed: {REMOVED_KEYS[dotted]}")
    return ConfigError(f"unknown config key '{dotted}'{_suggest(key, options)}")


def _unwrap_optional(tp: Any) -> tuple[Any, bool]:
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1 and len(typing.get_args(tp)) == 2:
            return args[0], True
    return tp, False


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Check ``value`` against the annotation ``tp``; ints are accepted where floats are expected."""
    tp, optional = _unwrap_optional(tp)
    if value is None:
        if optional:
            return None
        raise ConfigError(f"config key '{key}' must not be null (expected {type_name(tp)})")
    origin = typing.get_origin(tp)
    if origin is Annotated:
        return _coerce_annotated(value, tp, key)
    if origin is Literal:
        return _check_literal(value, tp, key)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"config key '{key}' must be a mapping, got {type(value).__name__}")
        return _build(tp, value, key)
    if origin is dict:  # dict[str, str]: a free mapping, e.g. data.fields
        if not isinstance(value, dict) or not all(
                isinstance(k, str) and isinstance(v, str) for k, v in value.items()):
            raise ConfigError(f"config key '{key}' must be a mapping of strings to strings, "
                              f"got {value!r}")
        return dict(value)
    if origin is list:  # list[T]: each item checked as T, e.g. model.lora.target_modules
        if not isinstance(value, list):
            raise ConfigError(f"config key '{key}' must be a list, got {value!r}")
        (item,) = typing.get_args(tp)
        return [_coerce(v, item, f"{key}[{i}]") for i, v in enumerate(value)]
    return _coerce_scalar(value, tp, key)


def _coerce_annotated(value: Any, tp: Any, key: str) -> Any:
    """``value`` coerced to the base of ``Annotated[base, *rules]``, then every ``Bounds`` checked."""
    base, *rules = typing.get_args(tp)
    value = _coerce(value, base, key)
    for rule in rules:
        if isinstance(rule, (Bounds, NameOrImportPath)) and not rule.holds(value):
            near = _suggest(value, rule.names) if isinstance(rule, NameOrImportPath) else ""
            raise ConfigError(f"config key '{key}' must be {rule.describe()}, got {value!r}{near}")
    return value


def _check_literal(value: Any, tp: Any, key: str) -> Any:
    """``value`` unchanged when it is one of the ``Literal`` options (did-you-mean otherwise)."""
    options = typing.get_args(tp)
    if value not in options:
        near = _suggest(str(value), options) if isinstance(value, str) else ""
        raise ConfigError(f"config key '{key}' = {value!r} must be one of "
                          f"{list(options)}{near}")
    return value


def _coerce_scalar(value: Any, tp: Any, key: str) -> Any:
    """A ``bool`` / ``int`` / ``float`` / ``str`` value checked (a float also from an int or from
    a ``'3e-6'`` string); any other type is unsupported."""
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"config key '{key}' must be a bool, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"config key '{key}' must be an int, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, str) and _SCIENTIFIC.fullmatch(value.strip()):
            return float(value)  # YAML 1.1 reads '3e-6' (no dot) as a string
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"config key '{key}' must be a float, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"config key '{key}' must be a string, got {value!r}")
        return value
    raise ConfigError(f"config key '{key}': unsupported field type {tp!r}")


def type_name(tp: Any) -> str:
    """A field type as the docs and errors write it: ``int``, ``'a' | 'b'``, ``int (>= 1)``."""
    tp, optional = _unwrap_optional(tp)
    origin = typing.get_origin(tp)
    if origin is Annotated:
        base, *rules = typing.get_args(tp)
        name = type_name(base) + "".join(f" ({r.describe()})" for r in rules
                                         if isinstance(r, (Bounds, NameOrImportPath)))
    elif origin is Literal:
        name = " | ".join(repr(v) for v in typing.get_args(tp))
    elif origin is dict:
        name = "mapping of str to str"
    elif origin is list:
        name = f"list of {type_name(typing.get_args(tp)[0])}"
    else:
        name = getattr(tp, "__name__", str(tp))
    return f"{name} or null" if optional else name


def field_types(cls: type) -> dict[str, Any]:
    """The annotations of a schema dataclass, ``Annotated`` rules included."""
    return typing.get_type_hints(cls, include_extras=True)


def _build(cls: type, data: dict, prefix: str = "") -> Any:
    hints = field_types(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in data.items():
        dotted = f"{prefix}.{key}" if prefix else str(key)
        if key not in names:
            raise _unknown_key(dotted, str(key), names)
        kwargs[key] = _coerce(value, hints[key], dotted)
    return cls(**kwargs)


def _parse_override(item: str) -> tuple[list[str], Any]:
    if "=" not in item:
        raise ConfigError(f"override {item!r} must look like 'section.key=value'")
    key, raw = item.split("=", 1)
    key = key.strip()
    if not key or any(not part for part in key.split(".")):
        raise ConfigError(f"override {item!r} has an empty key")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as exc:
        raise ConfigError(f"override '{key}': value {raw!r} is not valid YAML ({exc})") from None
    return key.split("."), value


def _check_path(cls: type, parts: list[str]) -> None:
    """Reject an override whose dotted path does not exist, before it is merged."""
    node: Any = cls
    for i, part in enumerate(parts):
        dotted = ".".join(parts[: i + 1])
        if typing.get_origin(node) is dict and i == len(parts) - 1:
            return  # one entry of a free mapping, e.g. data.fields.prompt=question
        if not dataclasses.is_dataclass(node):
            raise ConfigError(f"override '{'.'.join(parts)}': '{'.'.join(parts[:i])}' is not a section")
        fields = {f.name: f for f in dataclasses.fields(node)}
        if part not in fields:
            raise _unknown_key(dotted, part, fields)
        node = _unwrap_optional(field_types(node)[part])[0]


def apply_overrides(data: dict, overrides: Iterable[str]) -> dict:
    """Merge ``a.b.c=value`` overrides into a nested dict (a copy); paths are checked first."""
    merged = yaml.safe_load(yaml.safe_dump(data)) or {}
    for item in overrides:
        parts, value = _parse_override(item)
        _check_path(TrainConfig, parts)
        node = merged
        for part in parts[:-1]:
            child = node.get(part)
            if child is None:
                child = node[part] = {}
            node = child
        node[parts[-1]] = value
    return merged


def merge_overrides(data: Optional[dict], overrides: Iterable[str] = ()) -> dict:
    """The nested dict of a config (None: all defaults) with dotted overrides merged in."""
    data = data or {}
    if not isinstance(data, dict):
        raise ConfigError(f"the top level of a config must be a mapping, got {type(data).__name__}")
    return apply_overrides(data, overrides)


def config_from_dict(data: Optional[dict], overrides: Iterable[str] = ()) -> TrainConfig:
    """Build a :class:`TrainConfig` from a nested dict plus dotted overrides, every key and type
    checked; ``{output_dir}`` in the checkpoint paths becomes ``logging.output_dir``."""
    cfg = _build(TrainConfig, merge_overrides(data, overrides))
    resolve_run_paths(cfg)
    return cfg


def read_config_file(path: Optional[str | Path]) -> dict:
    """The nested dict of the YAML file ``path`` (None: empty, all defaults)."""
    if path is None:
        return {}
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"config file '{p}' does not exist")
    try:
        return yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"config file '{p}' is not valid YAML: {exc}") from None


def load_config(path: Optional[str | Path] = None, overrides: Iterable[str] = ()) -> TrainConfig:
    """Load ``path`` (YAML; None = all defaults) and apply overrides; no file but ``path`` is
    read, and the rules between fields are :func:`rspo_mega.config.validate_config`'s."""
    return config_from_dict(read_config_file(path), overrides)


def config_to_dict(cfg: Any) -> dict:
    """The resolved config as plain nested dicts (what is printed and saved with a run)."""
    return dataclasses.asdict(cfg)


def dump_config(cfg: Any) -> str:
    """YAML text of the resolved config, keys in declaration order."""
    return yaml.safe_dump(config_to_dict(cfg), sort_keys=False)


def save_config(cfg: Any, directory: str | Path, name: str = "config.yaml") -> Path:
    """Write the resolved config into ``directory`` atomically; returns the file path."""
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    tmp = d / f".{name}.tmp"
    tmp.write_text(dump_config(cfg))
    tmp.replace(d / name)
    return d / name
