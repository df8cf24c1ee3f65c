"""RL objectives for masked diffusion LMs: advantages, RSPO, ESPO, diffu-GRPO (ELBO-based), AGRPO
(sampled trajectory steps), diagnostics."""

from rspo_mega.algorithms.agrpo import AGRPOLoss
from rspo_mega.algorithms.advantages import compute_advantages, group_statistics
from rspo_mega.algorithms.base import LossInputs, LossOutput, PolicyLoss
from rspo_mega.algorithms.diagnostics import Metrics
from rspo_mega.algorithms.diffu_grpo import DiffuGRPOLoss
from rspo_mega.algorithms.espo import ESPOLoss
from rspo_mega.algorithms.registry import LOSSES, build_loss, is_rl, needs_reference
from rspo_mega.algorithms.rspo import RSPOLoss, centering_mean
from rspo_mega.algorithms.step import StepResult, loss_backward, loss_coefficients

__all__ = [
    "AGRPOLoss",
    "DiffuGRPOLoss",
    "ESPOLoss",
    "LOSSES",
    "LossInputs",
    "LossOutput",
    "Metrics",
    "PolicyLoss",
    "RSPOLoss",
    "StepResult",
    "build_loss",
    "centering_mean",
    "compute_advantages",
    "group_statistics",
    "is_rl",
    "loss_backward",
    "loss_coefficients",
    "needs_reference",
]
