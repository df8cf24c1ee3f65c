import pickle

import pytest

from rspo_mega.data.example import Example, check_unique_uids, make_uid


def test_uid_is_pinned_across_processes_and_versions() -> None:
    # The rollout seeds randomness by uid and checkpoints reference it: the scheme must not drift.
    assert make_uid("gsm8k", "train", "gsm8k_train.jsonl", 0) == 3167402628195557252
    assert make_uid("countdown", "test", "seed=0", 7) == 650721670698615298


def test_uid_range_and_distinctness() -> None:
    uids = {make_uid(task, split, "src", i) for task in ("a", "b") for split in ("train", "test") for i in range(5000)}
    assert len(uids) == 20_000
    assert all(0 <= uid < 2**63 for uid in uids)


def test_check_unique_uids_and_pickling() -> None:
    example = Example(uid=1, prompt="p", answer=3, task="t", meta={"numbers": [1, 2]})
    assert pickle.loads(pickle.dumps(example)) == example
    check_unique_uids([example, Example(2, "q", 4, "t")])
    with pytest.raises(ValueError, match="duplicate example uid 1"):
        check_unique_uids([example, Example(1, "q", 4, "u")])
