"""``algorithm.name`` -> loss class."""

from __future__ import annotations

from typing import Optional

from rspo_mega.algorithms.agrpo import AGRPOLoss
from rspo_mega.algorithms.base import PolicyLoss
from rspo_mega.algorithms.diffu_grpo import DiffuGRPOLoss
from rspo_mega.algorithms.espo import ESPOLoss
from rspo_mega.algorithms.rspo import RSPOLoss
from rspo_mega.algorithms.sft import SFTLoss
from rspo_mega.config.schema import AlgorithmConfig, LikelihoodConfig
from rspo_mega.parallel.reductions import ProcessGroup

LOSSES = {"rspo": RSPOLoss, "espo": ESPOLoss, "diffu_grpo": DiffuGRPOLoss, "agrpo": AGRPOLoss,
          "sft": SFTLoss}


def build_loss(algorithm: AlgorithmConfig, likelihood: LikelihoodConfig, *,
               group: ProcessGroup = None,
               microbatch_completions: Optional[int] = None) -> PolicyLoss:
    """The configured loss. ``microbatch_completions`` is used by RSPO's ``microbatch`` centering."""
    if algorithm.name not in LOSSES:
        raise ValueError(f"algorithm.name={algorithm.name!r}: expected one of {sorted(LOSSES)}")
    if algorithm.name == "rspo":
        return RSPOLoss(algorithm, likelihood, group, microbatch_completions=microbatch_completions)
    return LOSSES[algorithm.name](algorithm, likelihood, group)
