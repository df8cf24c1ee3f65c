"""A data-parallel split of a batch's completions, for the rollout invariance tests."""

from __future__ import annotations

from typing import Sequence

from rspo_mega.rollout import completion_uid


def split_completions(prompt_uids: Sequence[int], group_size: int, dp_rank: int, dp_size: int,
                      keep_groups: bool = True) -> list[tuple[int, int]]:
    """This rank's ``(prompt index, completion uid)`` pairs: whole prompt groups per rank
    (``keep_groups``) or an even slice of all ``P * G`` completions."""
    pairs = [(i, completion_uid(uid, j)) for i, uid in enumerate(prompt_uids)
             for j in range(group_size)]
    unit, total = (group_size, len(prompt_uids)) if keep_groups else (1, len(pairs))
    assert total % dp_size == 0, f"{total} units do not split over {dp_size} DP ranks"
    per_rank = total // dp_size * unit
    return pairs[dp_rank * per_rank:(dp_rank + 1) * per_rank]
