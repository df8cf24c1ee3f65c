"""rspo_mega: Megatron-core RL for masked diffusion language models (RSPO, ESPO, diffu-GRPO)."""

__version__ = "0.1.0"
