"""Whether a checkpoint can continue this run (``checkpoint.save_dir`` resumes the same run).

A checkpoint continues a run of the same kind (masked-diffusion SFT or RL, and no SFT steps
inside an RL run), algorithm, task and model, that has not reached ``train_steps``
(:func:`check_run`); any other is refused, naming what differs and the ways out (a new run
directory, or ``checkpoint.init_from`` for its weights only). :func:`check_run_dir` applies this
to the newest complete checkpoint before a launch builds anything, from its ``metadata.json``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Iterable, Optional

from rspo_mega.algorithms import LOSSES, is_rl as is_rl_run
from rspo_mega.config import TrainConfig, config_to_dict
from rspo_mega.errors import CheckpointError, IncompatibleCheckpointError
from rspo_mega.training.checkpoint.files import list_checkpoints, read_metadata, validate_checkpoint

RUN_KEYS = ("algorithm.name", "data.task", "model")  # what makes a checkpoint another run's
DIFFS_SHOWN = 4  # differing keys a message names


def _flatten(d: Any, prefix: str = "") -> dict[str, Any]:
    if not isinstance(d, dict):
        return {prefix: d}
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}.{k}" if prefix else str(k)
        out.update(_flatten(v, key) if isinstance(v, dict) and v else {key: v})
    return out


def _entries(config: dict, dotted: str) -> dict[str, Any]:
    """The flattened entries of ``config`` under the dotted key ``dotted`` (none if absent)."""
    node: Any = config
    for part in dotted.split("."):
        if not isinstance(node, dict) or part not in node:
            return {}
        node = node[part]
    return _flatten(node, dotted)


def config_diffs(saved_config: dict, current_config: dict, keys: Iterable[str]) -> list[str]:
    """``key: old -> new`` for every dotted key under ``keys`` (sections or single keys) whose
    value differs between the saved and the current config."""
    diffs = []
    for section in keys:
        old, new = _entries(saved_config, section), _entries(current_config, section)
        for key in sorted(set(old) | set(new)):
            a, b = old.get(key, "<absent>"), new.get(key, "<absent>")
            if a != b:
                diffs.append(f"{key}: {a!r} -> {b!r}")
    return diffs


def check_compatible(saved_config: dict, current_config: dict,
                     keys: Iterable[str] = ("model",)) -> None:
    """Raise :class:`IncompatibleCheckpointError` listing ``key: old -> new`` for every dotted
    key under the sections ``keys`` whose value differs between the saved and current config."""
    diffs = config_diffs(saved_config, current_config, keys)
    if diffs:
        raise IncompatibleCheckpointError(
            "cannot resume: the checkpoint was saved with a different configuration in "
            f"{list(keys)}: " + "; ".join(diffs))


def _kind(is_rl: bool) -> str:
    return "an RL" if is_rl else "an SFT (algorithm.name=sft)"


def check_kind(path: str | Path, saved_config: dict, is_rl: bool) -> None:
    """Raise :class:`CheckpointError` saying what to do instead when the checkpoint at ``path``
    (its run config ``saved_config``) comes from another kind of run than this (``is_rl``) or
    from one with SFT steps inside it."""
    name = (saved_config.get("algorithm") or {}).get("name")
    saved_rl = LOSSES[name].is_rl if name in LOSSES else is_rl
    warmup = int(saved_config.get("sft_warmup_steps") or 0)
    if saved_rl and warmup > 0:
        raise CheckpointError(
            f"checkpoint {path} comes from a run that began with {warmup} SFT steps inside it "
            "(sft_warmup_steps): its step count mixes SFT and RL steps, so it cannot be resumed; "
            f"start from its weights with checkpoint.init_from={path} and a new "
            "checkpoint.save_dir")
    if saved_rl != is_rl:
        raise CheckpointError(f"checkpoint {path} was saved by {_kind(saved_rl)} run and this is "
                              f"{_kind(is_rl)} run; checkpoint.save_dir resumes the same run: "
                              f"start from its weights with checkpoint.init_from={path} and "
                              "another checkpoint.save_dir")


def check_run(path: str | Path, meta: dict, cfg: TrainConfig) -> None:
    """Raise :class:`CheckpointError` when the checkpoint at ``path`` (its ``metadata.json``
    ``meta``) cannot continue the run ``cfg``: another kind of run (:func:`check_kind`),
    another algorithm, task or model (layouts may change: checkpoints reshard), or one that
    already reached ``train_steps``."""
    saved = meta.get("config") or {}
    check_kind(path, saved, is_rl_run(cfg.algorithm))
    diffs = config_diffs(saved, config_to_dict(cfg), RUN_KEYS)
    if diffs:
        more = f"; and {len(diffs) - DIFFS_SHOWN} more" if len(diffs) > DIFFS_SHOWN else ""
        raise CheckpointError(
            f"checkpoint {path} was written by another run ({'; '.join(diffs[:DIFFS_SHOWN])}"
            f"{more}); checkpoint.save_dir resumes the same run: give this run its own "
            f"logging.output_dir, or start from those weights with checkpoint.init_from={path}")
    step = int(meta["step"])
    if step >= cfg.train_steps:
        raise CheckpointError(
            f"the run in {cfg.logging.output_dir} is finished: its checkpoint {path} is at step "
            f"{step} of train_steps={cfg.train_steps}; to train it further raise train_steps, "
            "for a new run give it its own logging.output_dir")


def check_run_dir(cfg: TrainConfig) -> None:
    """Before a launch: refuse to resume the newest complete checkpoint of
    ``checkpoint.save_dir`` (files all there, contents not read; no collective) when it
    belongs to another run or ends this one."""
    found = reversed(list_checkpoints(cfg.checkpoint.save_dir)) if cfg.checkpoint.save_dir else []
    path = next((p for _, p in found if validate_checkpoint(p, verify_checksums=False) is None),
                None)
    if path is not None:
        check_run(path, read_metadata(path), cfg)


def lora_base_record(cfg: TrainConfig, chunks: list) -> Optional[dict]:
    """What a LoRA run's checkpoints record of the base its adapters train on (collective):
    ``checkpoint.init_from`` and the base weights' fingerprint
    (:func:`lora.base_fingerprint`); ``None`` without LoRA."""
    if not cfg.model.lora.enabled:
        return None
    from rspo_mega.models.llada import unwrap_model
    from rspo_mega.models.llada.lora import base_fingerprint

    return {"init_from": cfg.checkpoint.init_from,
            "fingerprint": base_fingerprint([unwrap_model(c) for c in chunks])}


def check_resume(path: Path, meta: dict, state: dict, cfg: TrainConfig,
                 lora_base: Optional[dict]) -> None:
    """The manager's check before resuming the run ``cfg`` from the checkpoint at ``path``
    (``meta``: its metadata, ``state``: this rank's plain state): :func:`check_run`; with LoRA,
    raise :class:`CheckpointError` when its adapters trained on another base than this run's
    (``lora_base``: ``checkpoint.init_from`` and the base's fingerprint)."""
    from rspo_mega.models.llada.lora import fingerprint_difference

    check_run(path, meta, cfg)
    saved = state.get("lora_base")
    if saved is None or lora_base is None:
        return
    diff = fingerprint_difference(saved["fingerprint"], lora_base["fingerprint"])
    if diff is not None:
        raise CheckpointError(
            f"checkpoint {path} trained its LoRA adapters on another base than "
            f"checkpoint.init_from={lora_base['init_from']} ({diff}; it was trained from "
            f"{saved['init_from']}): resume with the base it was trained on")
