"""One tokenizer interface over HF `tokenizer.json` files and SentencePiece `.model` files.

Special ids are looked up by token text (LLaDA names by default) and can be overridden by
config with either a token string or an id. The mask and EOS tokens are required; a missing
one raises `MissingSpecialTokenError` naming the token and the tokenizer file.
"""

from __future__ import annotations

import os
from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from pathlib import Path

from rspo_mega.errors import MissingSpecialTokenError

__all__ = [
    "LLADA_SPECIAL_TOKENS",
    "REQUIRED_SPECIAL_ROLES",
    "Tokenizer",
    "HFTokenizer",
    "SentencePieceTokenizer",
    "load_tokenizer",
]

# role -> token text, as in LLaDA's tokenizer.
LLADA_SPECIAL_TOKENS: dict[str, str] = {
    "bos": "<|startoftext|>",
    "eos": "<|endoftext|>",
    "pad": "<|endoftext|>",
    "mask": "<|mdm_mask|>",
    "start_header": "<|start_header_id|>",
    "end_header": "<|end_header_id|>",
    "eot": "<|eot_id|>",
}
REQUIRED_SPECIAL_ROLES = ("mask", "eos")


class Tokenizer(ABC):
    """encode/decode between text and ids, plus special ids by role.

    `special_ids[role]` is None for optional roles the tokenizer lacks; `special_id(role)`
    raises a named error instead. `pad` falls back to `eos` when absent.
    """

    def __init__(self, path: str | os.PathLike, special_tokens: Mapping[str, str | int] | None = None) -> None:
        self.path = str(path)
        self.special_tokens: dict[str, str] = dict(LLADA_SPECIAL_TOKENS)
        self.special_ids: dict[str, int | None] = {}
        for role, value in (special_tokens or {}).items():
            if role not in self.special_tokens:
                raise KeyError(
                    f"unknown special token role {role!r} in tokenizer overrides; "
                    f"known roles: {sorted(self.special_tokens)}"
                )
            if isinstance(value, int):
                if not 0 <= value < self.vocab_size:
                    raise ValueError(f"special token id {role}={value} outside vocab of size {self.vocab_size}")
                self.special_ids[role] = value
                self.special_tokens[role] = self.id_to_token(value) or f"<id {value}>"
            else:
                self.special_tokens[role] = str(value)
        for role, token in self.special_tokens.items():
            if role not in self.special_ids:
                self.special_ids[role] = self.token_to_id(token)
        if self.special_ids["pad"] is None:
            self.special_ids["pad"] = self.special_ids["eos"]
        for role in REQUIRED_SPECIAL_ROLES:
            self.special_id(role)

    @abstractmethod
    def encode(self, text: str) -> list[int]:
        """Token ids of `text`, without adding BOS/EOS."""

    @abstractmethod
    def decode(self, ids: Sequence[int]) -> str:
        """Text of `ids`, special tokens included as their text."""

    @property
    @abstractmethod
    def vocab_size(self) -> int:
        """Number of ids the tokenizer can produce (added tokens included)."""

    @abstractmethod
    def token_to_id(self, token: str) -> int | None:
        """Id of a single token string, None when it is not in the vocabulary."""

    @abstractmethod
    def id_to_token(self, token_id: int) -> str | None:
        """Token string of an id, None when out of range."""

    def special_id(self, role: str) -> int:
        """Id for a special role; raises MissingSpecialTokenError naming the token."""
        if role not in self.special_ids:
            raise KeyError(f"unknown special token role {role!r}; known roles: {sorted(self.special_ids)}")
        token_id = self.special_ids[role]
        if token_id is None:
            raise MissingSpecialTokenError(
                f"tokenizer {self.path} has no {role} token {self.special_tokens[role]!r}; add it to the "
                f"tokenizer or override special_tokens.{role} in the data config"
            )
        return token_id

    @property
    def mask_id(self) -> int:
        return self.special_id("mask")

    @property
    def eos_id(self) -> int:
        return self.special_id("eos")

    @property
    def pad_id(self) -> int:
        return self.special_id("pad")

    @property
    def bos_id(self) -> int:
        return self.special_id("bos")


class HFTokenizer(Tokenizer):
    """A `tokenizers` library `tokenizer.json` (e.g. LLaDA-8B's)."""

    def __init__(self, path: str | os.PathLike, special_tokens: Mapping[str, str | int] | None = None) -> None:
        from tokenizers import Tokenizer as RustTokenizer

        try:
            self._tokenizer = RustTokenizer.from_file(str(path))
        except Exception as err:  # the Rust side raises a bare Exception
            raise ValueError(f"could not load tokenizer file {path}: {err}") from err
        super().__init__(path, special_tokens)

    def encode(self, text: str) -> list[int]:
        return self._tokenizer.encode(text, add_special_tokens=False).ids

    def decode(self, ids: Sequence[int]) -> str:
        return self._tokenizer.decode(list(ids), skip_special_tokens=False)

    @property
    def vocab_size(self) -> int:
        return self._tokenizer.get_vocab_size(with_added_tokens=True)

    def token_to_id(self, token: str) -> int | None:
        return self._tokenizer.token_to_id(token)

    def id_to_token(self, token_id: int) -> str | None:
        return self._tokenizer.id_to_token(token_id)


class SentencePieceTokenizer(Tokenizer):
    """A SentencePiece `.model` (e.g. from `train_sentencepiece_tokenizer`)."""

    def __init__(self, path: str | os.PathLike, special_tokens: Mapping[str, str | int] | None = None) -> None:
        import sentencepiece

        try:
            self._processor = sentencepiece.SentencePieceProcessor(model_file=str(path))
        except (OSError, RuntimeError) as err:
            raise ValueError(f"could not load SentencePiece model {path}: {err}") from err
        super().__init__(path, special_tokens)

    def encode(self, text: str) -> list[int]:
        return self._processor.encode(text, out_type=int)

    def decode(self, ids: Sequence[int]) -> str:
        """Text of ``ids``; ids beyond the vocabulary (a model's padding rows) decode to nothing,
        as in HF tokenizers."""
        size = self.vocab_size
        return self._processor.decode([int(i) for i in ids if 0 <= int(i) < size])

    @property
    def vocab_size(self) -> int:
        return self._processor.get_piece_size()

    def token_to_id(self, token: str) -> int | None:
        token_id = self._processor.piece_to_id(token)
        unk = self._processor.unk_id()
        if token_id == unk and self._processor.id_to_piece(unk) != token:
            return None
        return token_id

    def id_to_token(self, token_id: int) -> str | None:
        if not 0 <= token_id < self.vocab_size:
            return None
        return self._processor.id_to_piece(token_id)


def load_tokenizer(path: str | os.PathLike, special_tokens: Mapping[str, str | int] | None = None) -> Tokenizer:
    """Load `tokenizer.json` (HF) or `*.model` (SentencePiece); a directory is searched for either.

    special_tokens: role -> token text or id overrides, e.g. {"mask": "<mask>", "pad": 0}.
    """
    path = Path(path)
    if path.is_dir():
        candidates = [path / "tokenizer.json", path / "tokenizer.model"]
        found = next((c for c in candidates if c.is_file()), None)
        if found is None:
            raise FileNotFoundError(f"tokenizer directory {path} has neither tokenizer.json nor tokenizer.model")
        path = found
    if not path.is_file():
        raise FileNotFoundError(f"tokenizer file not found: {path}")
    if path.suffix == ".json":
        return HFTokenizer(path, special_tokens)
    if path.suffix == ".model":
        return SentencePieceTokenizer(path, special_tokens)
    raise ValueError(f"unknown tokenizer file type {path.suffix!r} for {path}; expected .json or .model")
