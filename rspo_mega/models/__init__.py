"""Model families on megatron-core (currently :mod:`rspo_mega.models.llada`)."""
