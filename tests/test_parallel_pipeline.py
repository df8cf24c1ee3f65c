"""The micro-batching of megatron's schedules shared by the rollout and the ELBO."""

from __future__ import annotations

import pytest
import torch

from rspo_mega.parallel.pipeline import microbatch_rows


def test_rows_are_cut_in_order_and_the_short_last_one_is_padded_with_its_first_row():
    parts = microbatch_rows(7, 3, pad=True)
    assert [p.index.tolist() for p in parts] == [[0, 1, 2], [3, 4, 5], [6, 6, 6]]
    assert [p.real for p in parts] == [3, 3, 1]
    assert [p.index.tolist() for p in microbatch_rows(7, 3, pad=False)] == [[0, 1, 2], [3, 4, 5], [6]]
    assert [p.index.tolist() for p in microbatch_rows(2, 5, pad=True)] == [[0, 1, 0, 0, 0]]
    assert microbatch_rows(6, 3, pad=True)[-1].index.dtype == torch.long


@pytest.mark.parametrize("rows, size", [(0, 2), (3, 0)])
def test_empty_batches_and_sizes_are_refused(rows, size):
    with pytest.raises(ValueError, match="rows=.* and size=.* must be >= 1"):
        microbatch_rows(rows, size, pad=True)
