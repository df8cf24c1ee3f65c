"""The check ``rspo-train`` runs before it builds anything: does every rank's plan fit?

:func:`check_before_launch` plans the run on the hardware it was launched on
(:func:`rspo_mega.plan.hardware.detect`: the GPU's memory, or the host's shared by the node's
ranks) and returns why it cannot fit, naming the stage, the phase, its largest parts and the
config changes that would fit, e.g. ``pp stage 0 needs 91.2 GiB of 80.0 (policy passes:
optimizer states 48.0, ...): set likelihood.offload_reference=true or parallel.pp=2``. It
creates no process group and touches no model.
"""

from __future__ import annotations

from typing import Any, Optional

from rspo_mega.config import Layout, TrainConfig
from rspo_mega.plan.hardware import GIB, Hardware, detect
from rspo_mega.plan.planner import Plan, fixes, plan_run
from rspo_mega.plan.tables import PHASE_TITLES


def _value(v: Any) -> str:
    """A value as a dotted override writes it."""
    if isinstance(v, bool):
        return "true" if v else "false"
    return "null" if v is None else str(v)


def _changes(changes: dict[str, Any]) -> str:
    return " and ".join(f"{k}={_value(v)}" for k, v in changes.items())


def refusal(plan: Plan, prompt_length: Optional[int] = None) -> Optional[str]:
    """Why ``plan`` does not fit (its fullest stage) and the changes that would; None if it fits."""
    over = plan.over()
    if not over:
        return None
    stage = max(over, key=lambda s: s.peak_phase()[1])
    phase, peak = stage.peak_phase()
    parts = ", ".join(f"{k} {v / GIB:.1f}" for k, v in stage.largest_parts(phase))
    where = f"pp stage {stage.stage} needs {peak / GIB:.1f} GiB of " \
            f"{plan.hardware.memory_gib:.1f} ({PHASE_TITLES[phase]}: {parts})"
    found = fixes(plan, prompt_length)
    if found:
        joined = [_changes(c) for c, _ in found]
        if any(len(c) > 1 for c, _ in found):
            joined = [f"({j})" for j in joined]
        return f"{where}: set " + " or ".join(joined)
    return f"{where}: no single or paired change of the memory options fits; add ranks"


def check_before_launch(cfg: TrainConfig, layout: Layout,
                        hardware: Optional[Hardware] = None) -> Optional[str]:
    """The refusal of :func:`refusal` for this launch (``hardware``: detected when None)."""
    hw = hardware or detect(layout.world_size)
    return refusal(plan_run(cfg, hw))
