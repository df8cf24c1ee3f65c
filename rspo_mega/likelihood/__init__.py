"""Masked-diffusion likelihoods: the mask RNG, ELBO estimators, the trajectory estimator (sampled
rollout steps), the micro-batched parallel runner and the frozen reference model."""

from rspo_mega.likelihood.batch_types import CompletionBatch, MaskedBatch, TrajectoryBatch
from rspo_mega.likelihood.elbo import ElboEstimate, estimate_elbo, sequence_estimates, token_sum
from rspo_mega.likelihood.masks import MaskSampler, count_mask, hash64, mask_generator
from rspo_mega.likelihood.parallel_elbo import ElboRunner, ForwardFn, backward_loss_scale
from rspo_mega.likelihood.reference import BaseReference, ReferenceModel
from rspo_mega.likelihood.trajectory_estimator import (
    TrajectorySampler,
    run_estimator,
    tempered_forward,
    trajectory_sum,
)

__all__ = [
    "CompletionBatch",
    "ElboEstimate",
    "ElboRunner",
    "ForwardFn",
    "MaskSampler",
    "MaskedBatch",
    "BaseReference",
    "ReferenceModel",
    "TrajectoryBatch",
    "TrajectorySampler",
    "backward_loss_scale",
    "count_mask",
    "estimate_elbo",
    "hash64",
    "mask_generator",
    "sequence_estimates",
    "run_estimator",
    "tempered_forward",
    "token_sum",
    "trajectory_sum",
]
