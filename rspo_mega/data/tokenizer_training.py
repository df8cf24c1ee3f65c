"""Train a small SentencePiece tokenizer for the tiny default model on task text (the corpus:
:func:`rspo_mega.tasks.corpus.task_corpus`).

LLaDA's special tokens become user-defined symbols, so they keep single ids; byte
fallback makes every string encodable; identity normalisation keeps round trips exact.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from pathlib import Path

from rspo_mega.data.tokenizer import LLADA_SPECIAL_TOKENS

__all__ = ["BUILTIN_VOCAB", "builtin_model_fields", "train_sentencepiece_tokenizer"]

BUILTIN_VOCAB = 512  # pieces of the built-in tokenizer (an upper bound: hard_vocab_limit is off)


def builtin_model_fields() -> dict[str, int | None]:
    """The model's vocabulary size and special ids for the built-in tokenizer, known before it is
    trained: unk is id 0 and LLaDA's special tokens follow in order, one id per distinct token."""
    ids = {token: i + 1 for i, token in enumerate(dict.fromkeys(LLADA_SPECIAL_TOKENS.values()))}
    return dict(vocab_size=BUILTIN_VOCAB, mask_token_id=ids[LLADA_SPECIAL_TOKENS["mask"]],
                eos_token_id=ids[LLADA_SPECIAL_TOKENS["eos"]],
                pad_token_id=ids[LLADA_SPECIAL_TOKENS["pad"]],
                bos_token_id=ids[LLADA_SPECIAL_TOKENS["bos"]])


# Fixed trainer options: byte fallback, no normalisation, digits split, only unk as a control id.
_TRAINER_OPTIONS: dict[str, object] = dict(
    byte_fallback=True,
    character_coverage=1.0,
    normalization_rule_name="identity",
    remove_extra_whitespaces=False,
    add_dummy_prefix=False,
    split_digits=True,
    allow_whitespace_only_pieces=True,
    hard_vocab_limit=False,
    unk_id=0,
    bos_id=-1,
    eos_id=-1,
    pad_id=-1,
)


def _special_symbols(
    documents: list[str], vocab_size: int, special_tokens: Sequence[str] | None
) -> list[str]:
    """The user-defined symbols (deduplicated, in order), after checking `vocab_size` holds them,
    unk, the 256 byte pieces and every distinct character of `documents`."""
    specials = list(dict.fromkeys(special_tokens if special_tokens is not None else LLADA_SPECIAL_TOKENS.values()))
    # unk + user-defined symbols + 256 byte pieces + every distinct character (coverage 1.0)
    minimum = 1 + len(specials) + 256 + len(set().union(*documents))
    if vocab_size < minimum:
        raise ValueError(
            f"vocab_size={vocab_size} too small for this corpus: unk, {len(specials)} special tokens, "
            f"256 byte pieces and its characters need at least {minimum}"
        )
    return specials


def train_sentencepiece_tokenizer(
    documents: Iterable[str],
    model_prefix: str | os.PathLike,
    *,
    vocab_size: int = 512,
    model_type: str = "bpe",
    special_tokens: Sequence[str] | None = None,
    num_threads: int = 1,
) -> Path:
    """Train and write `<model_prefix>.model` / `.vocab`; returns the .model path.

    Args:
        documents: training text; newlines inside a document are kept (as byte pieces).
        vocab_size: upper bound (hard_vocab_limit off); at least unk + specials + 256 byte
            pieces + the corpus' distinct characters.
        special_tokens: user-defined symbols; default: LLaDA's special tokens.
    """
    import sentencepiece

    documents = list(documents)
    specials = _special_symbols(documents, vocab_size, special_tokens)
    model_prefix = Path(model_prefix)
    model_prefix.parent.mkdir(parents=True, exist_ok=True)
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(documents),
        model_prefix=str(model_prefix),
        vocab_size=vocab_size,
        model_type=model_type,
        user_defined_symbols=specials,
        **_TRAINER_OPTIONS,
        num_threads=num_threads,
        minloglevel=2,
    )
    return model_prefix.with_name(model_prefix.name + ".model")
