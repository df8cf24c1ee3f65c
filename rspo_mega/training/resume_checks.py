"""Whether a checkpoint can continue this run (``checkpoint.save_dir`` resumes the same run).

A run is either masked-diffusion SFT (``algorithm.name=sft``) or RL; each saves its own data
position and mask-sampler state, so a checkpoint of the other kind is refused, and
``checkpoint.init_from`` (its weights only) is named as the way to start from it. A checkpoint
whose per-rank state records ``warmup_steps`` > 0 in an RL run comes from a run that began with
SFT steps inside it: its step count mixes SFT and RL steps, so it is refused as well, with the
runs that replace it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

from rspo_mega.training.checkpointing import CheckpointError

SFT_RECIPE = "rspo_mega/configs/tiny_sudoku_sft.yaml"


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
    saved_rl = is_rl if name is None else name != "sft"
    warmup = int(extra.get("warmup_steps", 0))
    if saved_rl and warmup > 0:
        raise CheckpointError(_warmup_message(path, int(extra["step"]), warmup))
    if saved_rl != is_rl:
        raise CheckpointError(f"checkpoint {path} was saved by {_kind(saved_rl)} run and this is "
                              f"{_kind(is_rl)} run; checkpoint.save_dir resumes the same run: "
                              f"start from its weights with checkpoint.init_from={path} and "
                              "another checkpoint.save_dir")
