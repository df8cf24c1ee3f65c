"""Masked-diffusion likelihoods: the mask RNG, ELBO estimators, the micro-batched parallel runner
and the frozen reference model."""

from rspo_mega.likelihood.batch import CompletionBatch, MaskedBatch
from rspo_mega.likelihood.elbo import ElboEstimate, estimate_elbo, sequence_estimates, token_average
from rspo_mega.likelihood.masks import MaskSampler, count_mask, hash64, mask_generator
from rspo_mega.likelihood.parallel_elbo import ElboRunner, ForwardFn, backward_loss_scale
from rspo_mega.likelihood.reference import ReferenceModel

__all__ = [
    "CompletionBatch",
    "ElboEstimate",
    "ElboRunner",
    "ForwardFn",
    "MaskSampler",
    "MaskedBatch",
    "ReferenceModel",
    "backward_loss_scale",
    "count_mask",
    "estimate_elbo",
    "hash64",
    "mask_generator",
    "sequence_estimates",
    "token_average",
]
