"""``algorithm.name`` -> loss class (the names are ``schema.AlgorithmName``; a test checks that
every name has a class). A loss class declares what a run of it needs (``is_rl``,
``needs_reference(algorithm)``, ``mask_schemes``); the rest of the package asks these
declarations (:func:`is_rl`, :func:`needs_reference`) instead of testing names."""

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


def is_rl(algorithm: AlgorithmConfig) -> bool:
    """Whether ``algorithm.name`` learns from scored rollouts (RL), not from the data (SFT)."""
    return LOSSES[algorithm.name].is_rl


def needs_reference(algorithm: AlgorithmConfig) -> bool:
    """Whether a run of ``algorithm`` scores the reference policy (a frozen copy of the start)."""
    loss = LOSSES[algorithm.name]
    return loss.is_rl and loss.needs_reference(algorithm)


def build_loss(algorithm: AlgorithmConfig, likelihood: LikelihoodConfig, *,
               group: ProcessGroup = None) -> PolicyLoss:
    """The configured loss (the config is checked by :func:`rspo_mega.setup.validate_run`)."""
    try:
        loss = LOSSES[algorithm.name]
    except KeyError:
        raise ValueError(f"algorithm.name={algorithm.name!r}: expected one of "
                         f"{sorted(LOSSES)}") from None
    return loss(algorithm, likelihood, group)
