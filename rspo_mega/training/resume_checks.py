"""Whether a checkpoint can continue this run (``checkpoint.save_dir`` resumes the same run).

A checkpoint continues a run of the same kind (masked-diffusion SFT or RL), algorithm, task and
model (:func:`check_same_run`); any other is refused, naming what differs and the ways out (a
new run directory, or ``checkpoint.init_from`` for its weights only). A run whose checkpoint is
already at ``train_steps`` is finished (:func:`check_unfinished`). :func:`check_run_dir` applies
these to the newest complete checkpoint before a launch builds anything, from its
``metadata.json`` alone.

A checkpoint whose per-rank state records ``warmup_steps`` > 0 in an RL run comes from a run that
began with SFT steps inside it: its step count mixes SFT and RL steps, so it is refused as well,
with the runs that replace it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Iterable, Optional

from rspo_mega.algorithms import LOSSES
from rspo_mega.config import TrainConfig, config_to_dict
from rspo_mega.errors import UserError
from rspo_mega.training.checkpointing import (
    CheckpointError, CheckpointManager, read_metadata, validate_checkpoint,
)

SFT_RECIPE = "rspo_mega/configs/tiny_sudoku_sft.yaml"
RUN_KEYS = ("algorithm.name", "data.task", "model")  # what makes a checkpoint another run's
DIFFS_SHOWN = 4  # differing keys a message names


class IncompatibleCheckpointError(UserError, ValueError):
    """The saved run config differs from the current one in keys that must match."""

    kind = "checkpoint"


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


def _warmup_message(path: Path, step: int, warmup: int) -> str:
    """What to do with a checkpoint of a run that began with ``warmup`` SFT steps."""
    start = (f"start from its weights with checkpoint.init_from={path} and a new "
             "checkpoint.save_dir")
    if step < warmup:
        return (f"checkpoint {path} stopped at step {step}, inside the {warmup}-step SFT warm-up "
                "its run began with; SFT and RL are separate runs: continue SFT as its own run "
                f"(algorithm.name=sft, e.g. --config {SFT_RECIPE}) or run RL, and {start}")
    return (f"checkpoint {path} is at step {step} of a run that began with a {warmup}-step SFT "
            f"warm-up ({step - warmup} RL steps after it): its step count mixes SFT and RL "
            f"steps, so it cannot be resumed; to continue RL, {start} (the RL reference is then "
            "this policy and the optimizer state starts fresh)")


def check_resumable(path: str | Path, saved_config: Optional[dict], extra: dict,
                    is_rl: bool) -> None:
    """Raise :class:`CheckpointError` saying what to do instead when the checkpoint at ``path``
    (its run config ``saved_config`` and this rank's plain state ``extra``) cannot continue a
    run of this kind (``is_rl``)."""
    path = Path(path)
    name = ((saved_config or {}).get("algorithm") or {}).get("name")
    saved_rl = LOSSES[name].is_rl if name in LOSSES else is_rl
    warmup = int(extra.get("warmup_steps", 0))
    if saved_rl and warmup > 0:
        raise CheckpointError(_warmup_message(path, int(extra["step"]), warmup))
    if saved_rl != is_rl:
        raise CheckpointError(f"checkpoint {path} was saved by {_kind(saved_rl)} run and this is "
                              f"{_kind(is_rl)} run; checkpoint.save_dir resumes the same run: "
                              f"start from its weights with checkpoint.init_from={path} and "
                              "another checkpoint.save_dir")


def check_same_run(path: str | Path, saved_config: Optional[dict], cfg: TrainConfig) -> None:
    """Raise :class:`CheckpointError` when the checkpoint at ``path`` was written by a run of
    another algorithm, task or model than ``cfg`` (naming the keys that differ)."""
    diffs = config_diffs(saved_config or {}, config_to_dict(cfg), RUN_KEYS)
    if not diffs:
        return
    more = f"; and {len(diffs) - DIFFS_SHOWN} more" if len(diffs) > DIFFS_SHOWN else ""
    raise CheckpointError(
        f"checkpoint {path} was written by another run ({'; '.join(diffs[:DIFFS_SHOWN])}{more}); "
        "checkpoint.save_dir resumes the same run: give this run its own logging.output_dir, or "
        f"start from those weights with checkpoint.init_from={path}")


def check_unfinished(path: str | Path, step: int, cfg: TrainConfig) -> None:
    """Raise :class:`CheckpointError` when the checkpoint at ``path`` (of ``step``) already
    ends the run (``train_steps``)."""
    if step >= cfg.train_steps:
        raise CheckpointError(
            f"the run in {cfg.logging.output_dir} is finished: its checkpoint {path} is at step "
            f"{step} of train_steps={cfg.train_steps}; to train it further raise train_steps, "
            "for a new run give it its own logging.output_dir")


def newest_complete(save_dir: str | Path) -> Optional[Path]:
    """The newest checkpoint of ``save_dir`` whose files are all there (sizes checked, contents
    not read), or None. No collective; every rank may call it."""
    for _, path in reversed(CheckpointManager(save_dir).checkpoints()):
        if validate_checkpoint(path, verify_checksums=False) is None:
            return path
    return None


def check_run_dir(cfg: TrainConfig) -> None:
    """Before a launch: refuse to resume the newest complete checkpoint of
    ``checkpoint.save_dir`` when it belongs to another run or ends this one."""
    path = newest_complete(cfg.checkpoint.save_dir) if cfg.checkpoint.save_dir else None
    if path is None:
        return
    meta = read_metadata(path)
    check_resumable(path, meta.get("config"), {}, LOSSES[cfg.algorithm.name].is_rl)
    check_same_run(path, meta.get("config"), cfg)
    check_unfinished(path, int(meta["step"]), cfg)


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


def check_lora_base(path: str | Path, saved: Optional[dict], current: Optional[dict]) -> None:
    """Raise :class:`CheckpointError` when the LoRA checkpoint at ``path`` trained its adapters
    on another base than this run's ``checkpoint.init_from`` (their fingerprints differ). A
    change of ``model.lora`` itself is refused by :func:`check_same_run`."""
    from rspo_mega.models.llada.lora import fingerprint_difference

    if saved is None or current is None:
        return
    diff = fingerprint_difference(saved["fingerprint"], current["fingerprint"])
    if diff is not None:
        raise CheckpointError(
            f"checkpoint {path} trained its LoRA adapters on another base than "
            f"checkpoint.init_from={current['init_from']} ({diff}; it was trained from "
            f"{saved['init_from']}): resume with the base it was trained on")
