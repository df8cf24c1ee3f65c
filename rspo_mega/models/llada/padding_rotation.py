"""Left-padded rows for Transformer Engine's fused attention: each row rotated so its real tokens
come first.

TE's fused attention reads a ``padding`` mask as per-row lengths (real tokens first), while
prompts are left-padded. :func:`real_tokens_first_rows` rotates every row of a batch left by its
padding, the same on every pipeline stage, and maps the caller's ``positions`` into the rotated
rows, so the head still reads the caller's positions. With RoPE the attention scores depend only
on relative positions, so the real tokens' outputs do not change (up to rounding); the padding
now after them is masked out as before.

Shapes: ``b`` batch, ``s`` tokens, ``m`` positions per row, ``n`` flat positions.
"""

from __future__ import annotations

from typing import Optional

import torch


def real_tokens_first(attention_mask: torch.Tensor) -> Optional[torch.Tensor]:
    """Per-row rotation that moves each row's real tokens to the front, or None if none is needed.

    ``attention_mask``: ``[b, s]`` bool, True = real token, each row's real tokens contiguous
    (left padding, as prompts are padded). Returns ``shift [b]``: row ``i`` rotated left by
    ``shift[i]`` starts with its real tokens.
    """
    mask = attention_mask.bool()
    shift = mask.int().argmax(dim=1)  # first real token of each row
    pos = torch.arange(mask.shape[1], device=mask.device)
    span = (pos >= shift[:, None]) & (pos < (shift + mask.sum(dim=1))[:, None])
    holed, shifted = torch.stack([(span != mask).any(), shift.any()]).tolist()  # one host sync
    if not shifted and not holed:
        return None  # real tokens already come first in every row
    if holed:
        raise ValueError("attention_mask: with transformer_impl=transformer_engine each row's real "
                         "tokens must be contiguous (padding only before and after them)")
    return shift


def rotate_rows(x: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """Rotate each row of ``x [b, s, ...]`` left by ``shift[row]`` along the sequence."""
    s = x.shape[1]
    index = (torch.arange(s, device=x.device)[None, :] + shift[:, None]) % s  # [b, s]
    return x.gather(1, index.reshape(index.shape + (1,) * (x.dim() - 2)).expand(x.shape))


def rotated_positions(positions: Optional[torch.Tensor], shift: torch.Tensor, b: int,
                      s: int) -> torch.Tensor:
    """Caller positions (``[b, m]``, flat ``[n]`` or None = all) in rows rotated left by ``shift``."""
    if positions is None:
        positions = torch.arange(s, device=shift.device).expand(b, s)
    if positions.dim() == 2:
        return (positions - shift[:, None]) % s
    row = positions // s
    return row * s + (positions - row * s - shift[row]) % s


def real_tokens_first_rows(
    input_ids: torch.Tensor, attention_mask: torch.Tensor, labels: Optional[torch.Tensor],
    positions: Optional[torch.Tensor],
) -> tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor], Optional[torch.Tensor]]:
    """The inputs with each row rotated so its real tokens come first (Transformer Engine's
    padding mask), ``positions`` mapped into the rotated rows; unchanged when no row needs it."""
    shift = real_tokens_first(attention_mask)
    if shift is None:
        return input_ids, attention_mask, labels, positions
    b, s = input_ids.shape  # every stage sees the same rotated rows; the head reads caller order
    input_ids, attention_mask = rotate_rows(input_ids, shift), rotate_rows(attention_mask, shift)
    if labels is not None:
        labels = rotate_rows(labels, shift)
    return input_ids, attention_mask, labels, rotated_positions(positions, shift, b, s)
