"""Whether a checkpoint can continue this run (``checkpoint.save_dir`` resumes the same run).

A checkpoint continues a run of the same kind (masked-diffusion SFT or RL), algorithm, task and
model (:func:`check_same_run`); any other is refused, naming what differs and the ways out (a
new run directory, or ``checkpoint.init_from`` for its weights only). So is one of a run that
began with SFT steps inside it (``sft_warmup_steps`` in its config): its step count mixes SFT and
RL steps. A run whose checkpoint is already at ``train_steps`` is finished
(:func:`check_unfinished`). :func:`check_run_dir` applies these to the newest complete checkpoint
before a launch builds anything, from its ``metadata.json`` alone.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Iterable, Optional

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


def check_resumable(path: str | Path, saved_config: Optional[dict], is_rl: bool) -> None:
    """Raise :class:`CheckpointError` saying what to do instead when the checkpoint at ``path``
    (its run config ``saved_config``) cannot continue a run of this kind (``is_rl``)."""
    saved_config = saved_config or {}
    name = (saved_config.get("algorithm") or {}).get("name")
    saved_rl = is_rl if name is None else name != "sft"
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
    for _, path in reversed(list_checkpoints(save_dir)):
        if validate_checkpoint(path, verify_checksums=False) is None:
            return path
    return None


def check_run(path: Path, meta: dict, cfg: TrainConfig) -> None:
    """Raise :class:`CheckpointError` when the checkpoint at ``path`` (its ``metadata.json``
    ``meta``) belongs to another kind of run or another run, or ends this one."""
    check_resumable(path, meta.get("config"), cfg.algorithm.name != "sft")
    check_same_run(path, meta.get("config"), cfg)  # layouts may change: checkpoints reshard
    check_unfinished(path, int(meta["step"]), cfg)


def check_run_dir(cfg: TrainConfig) -> None:
    """Before a launch: refuse to resume the newest complete checkpoint of
    ``checkpoint.save_dir`` when it belongs to another run or ends this one."""
    path = newest_complete(cfg.checkpoint.save_dir) if cfg.checkpoint.save_dir else None
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


def resume_check(cfg: TrainConfig, lora_base: Optional[dict]) -> Callable[[Path, dict, dict], None]:
    """The manager's check before resuming the run ``cfg``: :func:`check_run`, and for LoRA
    :func:`check_lora_base` against this run's base record ``lora_base``."""
    def check(path: Path, meta: dict, state: dict) -> None:
        check_run(path, meta, cfg)
        check_lora_base(path, state.get("lora_base"), lora_base)

    return check
