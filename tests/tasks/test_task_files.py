"""Tasks read local files through the shared loader, with per-task field mappings."""

import json
from pathlib import Path

import pytest

from rspo_mega.data.records import PromptBatchIterator
from rspo_mega.errors import DataFieldError
from rspo_mega.tasks import available_tasks, get_task
from tests.data.record_files import write_rows


def test_registry() -> None:
    assert available_tasks() == ["countdown", "gsm8k", "math500", "sudoku"]
    assert get_task("GSM8K").name == "gsm8k"
    assert get_task("math500", symbolic_timeout_s=3.0).symbolic_timeout_s == 3.0
    with pytest.raises(KeyError, match="unknown task 'mbpp'"):
        get_task("mbpp")


def test_gsm8k_from_jsonl(tmp_path: Path) -> None:
    rows = [{"question": "Tom has 3 apples and buys 15 more. How many?", "answer": "3 + 15 = 18\n#### 18"},
            {"question": "A 1,000 page book...", "answer": "#### 1,000"}]
    path = write_rows(tmp_path / "gsm8k_train.jsonl", rows)
    task = get_task("gsm8k")
    examples = task.load("train", path=path, cache_dir=str(tmp_path / "cache"))
    assert [e.answer for e in examples] == ["18", "1000"]
    assert examples == task.load("train", path=path, cache_dir=str(tmp_path / "cache"))  # stable uids
    assert "Tom has 3 apples" in task.prompt(examples[0]) and "<answer>" in task.prompt(examples[0])
    assert task.reward("<reasoning>3+15</reasoning><answer>18</answer>", examples[0]) == 1.0
    assert task.reward("<answer>1000 pages</answer>", examples[1]) == 1.0
    assert task.load("test", path=path, num_examples=1, cache_dir=str(tmp_path / "cache"))[0].uid != examples[0].uid


def test_field_mapping_and_errors(tmp_path: Path) -> None:
    cache = str(tmp_path / "cache")
    path = write_rows(tmp_path / "renamed.jsonl", [{"q": "1+1?", "a": "#### 2"}])
    task = get_task("gsm8k")
    with pytest.raises(DataFieldError, match=r"renamed\.jsonl.*'question'"):
        task.load("train", path=path, cache_dir=cache)
    assert task.load("train", path=path, fields={"prompt": "q", "answer": "a"}, cache_dir=cache)[0].answer == "2"
    with pytest.raises(KeyError, match="unknown field 'question'"):
        task.load("train", path=path, fields={"question": "q"}, cache_dir=cache)
    bad = write_rows(tmp_path / "bad.jsonl", [{"question": "q", "answer": "no final number"}])
    with pytest.raises(DataFieldError, match=r"bad\.jsonl, row 0: field 'answer'"):
        task.load("train", path=bad, cache_dir=cache)
    with pytest.raises(ValueError, match="docs/DATA.md"):
        task.load("train")
    with pytest.raises(ValueError, match="unknown split 'dev'"):
        task.load("dev", path=path, cache_dir=cache)


@pytest.mark.parametrize("suffix", [".jsonl", ".parquet"])
def test_math500(tmp_path: Path, suffix: str) -> None:
    rows = [{"problem": "Compute 1/2 + 1/4.", "answer": "\\frac{3}{4}", "subject": "Algebra"},
            {"problem": "Solve x^2 = 4 for x > 0.", "answer": "2", "subject": "Algebra"}]
    path = write_rows(tmp_path / f"math500{suffix}", rows)
    task = get_task("math500")
    examples = task.load("test", path=path, cache_dir=str(tmp_path / "cache"))
    assert [e.answer for e in examples] == ["\\frac{3}{4}", "2"]
    assert "\\boxed" in task.prompt(examples[0])
    assert task.reward("<answer>\\boxed{0.75}</answer>", examples[0]) == 1.0
    assert task.reward("<answer>\\boxed{x=2}</answer>", examples[1]) == 1.0


def test_countdown_files(tmp_path: Path) -> None:
    cache = str(tmp_path / "cache")
    jsonl = write_rows(tmp_path / "cd.jsonl", [{"target": 24, "nums": [4, 6, 1]}, {"target": 10, "nums": [2, 5, 7]}])
    csv = write_rows(tmp_path / "cd.csv", [{"target": "24", "nums": "[4, 6, 1]"}])
    task = get_task("countdown")
    from_jsonl = task.load("train", path=jsonl, cache_dir=cache)
    from_csv = task.load("train", path=csv, cache_dir=cache)
    assert from_jsonl[0].meta["numbers"] == from_csv[0].meta["numbers"] == [4, 6, 1]
    assert from_jsonl[0].answer == from_csv[0].answer == 24
    assert task.reward("<answer>4 * 6 * 1</answer>", from_csv[0]) == 1.0


def test_sudoku_csv_as_in_d1(tmp_path: Path) -> None:
    rows = [{"Puzzle": "0140432014020000", "Solution": "2143432114323214"}]
    path = write_rows(tmp_path / "4x4_test_sudoku.csv", rows)
    task = get_task("sudoku")
    example = task.load("test", path=path, cache_dir=str(tmp_path / "cache"))[0]
    assert example.meta["puzzle"] == "0140432014020000" and example.answer == "2143432114323214"
    assert task.reward("<answer>2143432114323214</answer>", example) == 1.0
    clash = write_rows(tmp_path / "clash.jsonl", [{"Puzzle": "3140432014020000", "Solution": "2143432114323214"}])
    with pytest.raises(DataFieldError, match="clash.jsonl, row 0"):
        task.load("test", path=clash, cache_dir=str(tmp_path / "cache"))


def test_generated_tasks_feed_the_batch_iterator() -> None:
    for name in ("countdown", "sudoku"):
        examples = get_task(name).load("train", seed=0, num_examples=64)
        batches = PromptBatchIterator(examples, 16, 1, 4, seed=0)
        assert [len(next(batches)) for _ in range(5)] == [4] * 5
        assert json.loads(json.dumps(batches.state_dict()))["epoch"] == 1
