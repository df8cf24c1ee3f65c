"""The rule between a tokenizer and the model section: the vocabulary size and special ids.

The run's setup fills the model section from the tokenizer (:func:`tokenizer_model_fields`,
:mod:`rspo_mega.setup.resolve`), and the run checks the tokenizer it trains or loads against it
(:func:`check_tokenizer_ids`, :mod:`rspo_mega.training.run_data`).
"""

from __future__ import annotations

from typing import Optional

from rspo_mega.config.schema import TrainConfig
from rspo_mega.data.tokenizer import Tokenizer
from rspo_mega.errors import ConfigError

# the model keys a tokenizer fixes
TOKEN_KEYS = ("vocab_size", "mask_token_id", "eos_token_id", "pad_token_id", "bos_token_id")
PADDING_ROWS = 128  # model ids beyond the tokenizer's that may be padding (LLaDA-8B has 115)


def tokenizer_model_fields(tok: Tokenizer) -> dict[str, Optional[int]]:
    """The model keys of :data:`TOKEN_KEYS` as ``tok`` fixes them."""
    return dict(vocab_size=tok.vocab_size, mask_token_id=tok.mask_id, eos_token_id=tok.eos_id,
                pad_token_id=tok.pad_id, bos_token_id=tok.special_ids.get("bos"))


def check_tokenizer_ids(cfg: TrainConfig, tok: Tokenizer) -> None:
    """Raise :class:`ConfigError` unless ``tok`` fits the model section: its size (the model may
    carry fewer than :data:`PADDING_ROWS` padding ids beyond it, which decode to nothing) and
    its mask and EOS ids."""
    m, name = cfg.model, cfg.data.tokenizer or f"built-in ({tok.path})"
    if tok.vocab_size > m.vocab_size:
        raise ConfigError(f"model.vocab_size={m.vocab_size} is smaller than the tokenizer's "
                          f"vocabulary ({tok.vocab_size}, {name})")
    if m.vocab_size - tok.vocab_size >= PADDING_ROWS:
        raise ConfigError(f"data.tokenizer={name} has {tok.vocab_size} ids but model.vocab_size="
                          f"{m.vocab_size}: the model's ids {tok.vocab_size}..{m.vocab_size - 1} "
                          "have no token; use the tokenizer the model was trained with")
    fields = tokenizer_model_fields(tok)
    for key in ("mask_token_id", "eos_token_id"):
        if getattr(m, key) != fields[key]:
            raise ConfigError(f"model.{key}={getattr(m, key)} but the tokenizer {name} says "
                              f"{fields[key]}")
