import json
from pathlib import Path

import pytest

from rspo_mega.data.example import Example, make_uid
from rspo_mega.data.records import PromptBatchIterator, read_records, shard_examples
from rspo_mega.errors import DataFieldError
from tests.data.record_files import write_rows

ROWS = [{"question": f"What is {i} + 1?", "answer": f"{i} + 1 = {i + 1}\n#### {i + 1}"} for i in range(23)]


def _examples(n: int) -> list[Example]:
    return [Example(make_uid("t", "train", "x", i), f"p{i}", i, "t", {}) for i in range(n)]


@pytest.mark.parametrize("suffix", [".jsonl", ".json", ".parquet", ".csv"])
def test_read_records_all_formats(tmp_path: Path, suffix: str) -> None:
    path = write_rows(tmp_path / f"gsm8k{suffix}", ROWS)
    records = read_records(path, ["question", "answer"], cache_dir=str(tmp_path / "cache"))
    assert records == ROWS


def test_json_field_and_csv_keeps_leading_zeros(tmp_path: Path) -> None:
    path = tmp_path / "wrapped.json"
    path.write_text(json.dumps({"data": ROWS[:3]}))
    assert read_records(path, ["question"], json_field="data", cache_dir=str(tmp_path / "c")) == [
        {"question": r["question"]} for r in ROWS[:3]
    ]
    grid = write_rows(tmp_path / "sudoku.csv", [{"Puzzle": "0140432014020000", "Solution": "2143432114323214"}])
    assert read_records(grid, ["Puzzle"], cache_dir=str(tmp_path / "c"))[0]["Puzzle"] == "0140432014020000"


def test_errors_name_file_and_field(tmp_path: Path) -> None:
    cache = str(tmp_path / "cache")
    with pytest.raises(FileNotFoundError, match="nope.jsonl"):
        read_records(tmp_path / "nope.jsonl", ["question"], cache_dir=cache)
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    with pytest.raises(ValueError, match="empty.jsonl.*empty"):
        read_records(empty, ["question"], cache_dir=cache)
    empty_list = tmp_path / "empty_list.json"
    empty_list.write_text("[]")
    with pytest.raises(ValueError, match="empty_list.json"):
        read_records(empty_list, ["question"], cache_dir=cache)
    path = write_rows(tmp_path / "rows.jsonl", ROWS)
    with pytest.raises(DataFieldError, match=r"rows\.jsonl.*'problem'"):
        read_records(path, ["problem"], cache_dir=cache)
    csv_path = write_rows(tmp_path / "rows.csv", ROWS)
    with pytest.raises(DataFieldError, match=r"rows\.csv has no field 'problem'"):
        read_records(csv_path, ["problem", "answer"], cache_dir=cache)
    blank_rows = [{"question": "q", "answer": "#### 1"}, {"question": " ", "answer": "2"}]
    blank = write_rows(tmp_path / "blank.jsonl", blank_rows)
    with pytest.raises(DataFieldError, match=r"blank\.jsonl, row 1: field 'question'"):
        read_records(blank, ["question", "answer"], cache_dir=cache)
    text = tmp_path / "rows.txt"
    text.write_text("question\n")
    with pytest.raises(ValueError, match="unsupported dataset file type '.txt'"):
        read_records(text, ["question"], cache_dir=cache)


@pytest.mark.parametrize("dp_size", [1, 2, 3])
def test_shard_examples_covers_each_example_once(dp_size: int) -> None:
    examples = _examples(23)
    shards = [shard_examples(examples, rank, dp_size) for rank in range(dp_size)]
    uids = [e.uid for shard in shards for e in shard]
    assert sorted(uids) == sorted(e.uid for e in examples)
    assert max(map(len, shards)) - min(map(len, shards)) <= 1


@pytest.mark.parametrize("dp_size", [1, 2, 3])
def test_every_example_once_per_epoch_across_ranks(dp_size: int) -> None:
    examples = _examples(24)
    global_batch = 6
    iterators = [PromptBatchIterator(examples, global_batch, r, dp_size, seed=11) for r in range(dp_size)]
    for epoch in range(3):
        seen = []
        for _ in range(len(examples) // global_batch):
            batches = [next(it) for it in iterators]
            assert all(len(b) == global_batch // dp_size for b in batches)
            seen.extend(e.uid for b in batches for e in b)
        assert sorted(seen) == sorted(e.uid for e in examples), f"epoch {epoch}"
        assert all(it.epoch == epoch + 1 and it.index == 0 for it in iterators)


def test_wrap_straddles_epochs_without_dropping() -> None:
    examples = _examples(10)
    iterator = PromptBatchIterator(examples, 4, 0, 1, seed=0)
    stream = [e.uid for _ in range(5) for e in next(iterator)]  # 20 = two full epochs
    assert sorted(stream[:10]) == sorted(stream[10:]) == sorted(e.uid for e in examples)
    assert stream[:10] != stream[10:]  # reshuffled per epoch
    assert (iterator.epoch, iterator.index, iterator.consumed_prompts) == (2, 0, 20)


def test_order_depends_on_seed_and_is_deterministic() -> None:
    examples = _examples(50)
    a = [e.uid for e in next(PromptBatchIterator(examples, 50, 0, 1, seed=1))]
    b = [e.uid for e in next(PromptBatchIterator(examples, 50, 0, 1, seed=1))]
    c = [e.uid for e in next(PromptBatchIterator(examples, 50, 0, 1, seed=2))]
    unshuffled = [e.uid for e in next(PromptBatchIterator(examples, 50, 0, 1, shuffle=False))]
    assert a == b != c and unshuffled == [e.uid for e in examples]


@pytest.mark.parametrize("resume_dp_size", [1, 2, 3])
def test_resume_continues_at_the_same_example(resume_dp_size: int) -> None:
    examples = _examples(17)
    reference = PromptBatchIterator(examples, 6, 0, 1, seed=4)
    for _ in range(4):  # 24 examples: into the second epoch
        next(reference)
    state = json.loads(json.dumps(reference.state_dict()))  # survives a checkpoint round trip
    expected = [e.uid for _ in range(5) for e in next(reference)]

    resumed = [PromptBatchIterator(examples, 6, r, resume_dp_size, seed=4) for r in range(resume_dp_size)]
    for it in resumed:
        it.load_state_dict(state)
    # Ranks hold contiguous blocks of each global batch, so rank order rebuilds the global order.
    got = [e.uid for _ in range(5) for it in resumed for e in next(it)]
    assert got == expected


def test_load_state_dict_rejects_a_changed_dataset() -> None:
    state = PromptBatchIterator(_examples(12), 4, 0, 1, seed=0).state_dict()
    with pytest.raises(ValueError, match="num_examples"):
        PromptBatchIterator(_examples(13), 4, 0, 1, seed=0).load_state_dict(state)
    with pytest.raises(ValueError, match="seed"):
        PromptBatchIterator(_examples(12), 4, 0, 1, seed=1).load_state_dict(state)
    with pytest.raises(KeyError, match="index"):
        PromptBatchIterator(_examples(12), 4, 0, 1, seed=0).load_state_dict({"epoch": 0})


def test_iterator_argument_errors() -> None:
    examples = _examples(8)
    with pytest.raises(ValueError, match="divisible"):
        PromptBatchIterator(examples, 5, 0, 2)
    with pytest.raises(ValueError, match="dp_rank"):
        PromptBatchIterator(examples, 4, 2, 2)
    with pytest.raises(ValueError, match="fewer than global_batch_prompts"):
        PromptBatchIterator(examples, 16, 0, 1)
    with pytest.raises(ValueError, match="duplicate example uid"):
        PromptBatchIterator(examples + examples[:1], 4, 0, 1)
