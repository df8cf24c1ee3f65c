"""Masked-diffusion rollout: the LLaDA sampler and its engine on the TP/PP/DP model."""

from rspo_mega.rollout.engine import RolloutEngine, completion_uid, sampler_settings
from rspo_mega.rollout.sampler import Rollout, SamplerSettings, generate
from rspo_mega.rollout.vocab_parallel import VocabShard, gumbel_max

__all__ = [
    "Rollout", "RolloutEngine", "SamplerSettings", "VocabShard", "completion_uid", "generate",
    "gumbel_max", "sampler_settings",
]
