"""Memory and step-time plans of a run on a cluster layout (``rspo-plan``, ``rspo-train``'s check).

The plan reads the resolved config and the model builder's own shape functions
(:mod:`rspo_mega.plan.shapes`), counts the tensors of each phase of an RL step per pipeline
stage (:mod:`rspo_mega.plan.memory`, :mod:`rspo_mega.plan.activations`) and estimates each
phase's time (:mod:`rspo_mega.plan.timing`). See ``docs/PLANNING.md``.
"""

from rspo_mega.plan.hardware import Hardware, detect
from rspo_mega.plan.launch import check_before_launch, refusal
from rspo_mega.plan.planner import Plan, fixes, plan_run, search, with_overrides

__all__ = ["Hardware", "Plan", "check_before_launch", "detect", "fixes", "plan_run", "refusal",
           "search", "with_overrides"]
