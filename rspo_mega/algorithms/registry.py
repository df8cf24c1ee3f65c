"""``algorithm.name`` -> loss class (the names are ``schema.AlgorithmName``; a test checks that
every name has a class)."""

from __future__ import annotations

from rspo_mega.algorithms.agrpo import AGRPOLoss
from rspo_mega.algorithms.base import PolicyLoss
from rspo_mega.algorithms.diffu_grpo import DiffuGRPOLoss
from rspo_mega.algorithms.espo import ESPOLoss
from rspo_mega.algorithms.rspo import RSPOLoss
from rspo_mega.algorithms.sft import SFTLoss
from rspo_mega.config.schema import AlgorithmConfig, LikelihoodConfig
from rspo_mega.parallel.reductions import ProcessGroup

LOSSES: dict[str, type[PolicyLoss]] = {
    "rspo": RSPOLoss, "espo": ESPOLoss, "diffu_grpo": DiffuGRPOLoss, "agrpo": AGRPOLoss,
    "sft": SFTLoss,
}


def build_loss(algorithm: AlgorithmConfig, likelihood: LikelihoodConfig, *,
               group: ProcessGroup = None) -> PolicyLoss:
    """The configured loss (the config is checked by ``validate_config``)."""
    try:
        loss = LOSSES[algorithm.name]
    except KeyError:
        raise ValueError(f"algorithm.name={algorithm.name!r}: expected one of "
                         f"{sorted(LOSSES)}") from None
    return loss(algorithm, likelihood, group)
