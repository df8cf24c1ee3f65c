"""The TE left-padding rotation: rows rotated so their real tokens come first, the caller's
positions mapped into the rotated rows, holes refused."""

from __future__ import annotations

import pytest
import torch

from rspo_mega.models.llada.padding_rotation import (
    real_tokens_first,
    real_tokens_first_rows,
    rotate_rows,
    rotated_positions,
)


def _mask(pads: list[int], s: int) -> torch.Tensor:
    return torch.arange(s)[None, :] >= torch.tensor(pads)[:, None]


def test_left_padded_rows_start_with_their_real_tokens():
    ids = torch.arange(12).reshape(2, 6)
    mask = _mask([2, 0], 6)
    shift = real_tokens_first(mask)
    assert shift.tolist() == [2, 0]
    rotated = rotate_rows(ids, shift)
    assert rotated.tolist() == [[2, 3, 4, 5, 0, 1], [6, 7, 8, 9, 10, 11]]
    assert rotate_rows(mask, shift).tolist()[0] == [True] * 4 + [False] * 2


def test_positions_follow_their_tokens_into_the_rotated_rows():
    ids = torch.arange(12).reshape(2, 6)
    shift = torch.tensor([2, 1])
    rotated = rotate_rows(ids, shift)
    pos = torch.tensor([[2, 5], [0, 4]])
    moved = rotated_positions(pos, shift, 2, 6)
    assert torch.equal(rotated.gather(1, moved), ids.gather(1, pos))
    flat = torch.tensor([3, 7, 11])
    assert torch.equal(rotated.reshape(-1)[rotated_positions(flat, shift, 2, 6)],
                       ids.reshape(-1)[flat])
    assert torch.equal(rotated.gather(1, rotated_positions(None, shift, 2, 6)), ids)


def test_rows_needing_no_rotation_are_returned_as_they_are():
    ids, labels = torch.arange(12).reshape(2, 6), torch.ones(2, 6, dtype=torch.long)
    mask = _mask([0, 0], 6)
    mask[1, 4:] = False  # right padding: real tokens already first
    assert real_tokens_first(mask) is None
    out = real_tokens_first_rows(ids, mask, labels, None)
    assert out[0] is ids and out[1] is mask and out[2] is labels and out[3] is None


def test_a_row_with_a_hole_is_refused():
    mask = _mask([1, 0], 6)
    mask[1, 3] = False
    with pytest.raises(ValueError, match="real tokens must be contiguous"):
        real_tokens_first(mask)
