"""A run's data from the config: file field mappings, JSON record keys, generator options and
SFT targets, prepared before any model exists."""

from __future__ import annotations

import json

import pytest

from rspo_mega.config import ConfigError
from rspo_mega.setup import load_run_config, validate_run
from rspo_mega.training.run_data import prepare_run_data


def _cfg(tmp_path, *overrides: str):
    cfg = load_run_config(None, [f"logging.output_dir={tmp_path / 'run'}", *overrides])
    validate_run(cfg, world_size=1)
    return cfg


def test_field_mapping_and_json_field_reach_the_files(tmp_path):
    rows = [{"q": f"What is {i} + {i}?", "a": f"It is {2 * i}.\n#### {2 * i}"} for i in range(1, 6)]
    train = tmp_path / "train.json"
    train.write_text(json.dumps({"data": rows}))
    test = tmp_path / "test.json"
    test.write_text(json.dumps({"data": rows[:2]}))
    cfg = _cfg(tmp_path, "data.task=gsm8k", f"data.train_path={train}", f"data.test_path={test}",
               "data.fields.prompt=q", "data.fields.answer=a", "data.json_field=data",
               "data.max_prompt_length=128", "model.max_position_embeddings=256")
    data = prepare_run_data(cfg)
    assert [e.example.prompt for e in data.train] == [r["q"] for r in rows]
    assert [e.answer for e in data.test] == ["2", "4"]
    target = data.tokenizer.decode(data.sft_target(data.test[1]))
    assert data.task.reward(target, data.test[1]) == 1.0


def test_missing_column_names_the_column_and_file(tmp_path):
    train = tmp_path / "train.jsonl"
    train.write_text(json.dumps({"question": "1 + 1?", "answer": "#### 2"}) + "\n")
    cfg = _cfg(tmp_path, "data.task=gsm8k", f"data.train_path={train}", "data.fields.prompt=q",
               "data.max_prompt_length=128", "model.max_position_embeddings=256")
    with pytest.raises(ValueError, match="'q'") as err:
        prepare_run_data(cfg)
    assert str(train) in str(err.value)


def test_unknown_field_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match=r"data.fields: unknown field\(s\) \['question'\] for task 'gsm8k'"):
        _cfg(tmp_path, "data.task=gsm8k", "data.fields.question=q")
    with pytest.raises(ConfigError, match="'data.fields' must be a mapping of strings to strings"):
        load_run_config(None, ["data.fields=[q]"])


def test_countdown_options_and_sft_target(tmp_path):
    cfg = _cfg(tmp_path, "data.task=countdown", "data.countdown.max_number=9",
               "data.countdown.min_target=1", "data.countdown.max_target=30",
               "data.countdown.max_numbers=3", "data.num_train_examples=50",
               "data.num_test_examples=5")
    data = prepare_run_data(cfg)
    for encoded in data.train:
        ex = encoded.example
        assert len(ex.meta["numbers"]) == 3 and max(ex.meta["numbers"]) <= 9 and ex.answer <= 30
        # the SFT target is the solution expression, not the bare target number
        target = data.tokenizer.decode(data.sft_target(ex))
        assert data.task.reward(target, ex) == 1.0, target


def test_sudoku_reasoning_reaches_the_sft_target(tmp_path):
    cfg = _cfg(tmp_path, "data.sudoku.reasoning=rows_columns", "data.num_train_examples=20",
               "data.num_test_examples=2", "rollout.gen_length=128", "rollout.block_length=32",
               "rollout.steps=64", "model.max_position_embeddings=256")
    data = prepare_run_data(cfg)
    ex = data.test[0]
    target = data.tokenizer.decode(data.sft_target(ex))
    assert target == data.task.reference_response(ex) and "<reasoning>\nrows:" in target
    assert data.task.reward(target, ex) == 1.0
    assert len(data.sft_target(ex)) > 96  # into the fourth 32-token block


def test_a_validation_split_leaves_train_and_is_disjoint_from_test(tmp_path):
    cfg = _cfg(tmp_path, "data.num_train_examples=400", "data.num_test_examples=60",
               "data.num_validation_examples=50")
    data = prepare_run_data(cfg)
    train = {e.example.answer for e in data.train}
    validation, test = {e.answer for e in data.validation}, {e.answer for e in data.test}
    assert len(data.validation) == 50 and data.held_out
    assert not validation & train and not validation & test and not train & test
    without = prepare_run_data(_cfg(tmp_path, "data.num_train_examples=400",
                                    "data.num_test_examples=60"))
    assert without.validation == [] and [e.answer for e in without.test] == \
        [e.answer for e in data.test]


def test_a_validation_file_is_read(tmp_path):
    rows = [{"question": f"What is {i} + {i}?", "answer": f"#### {2 * i}"} for i in range(1, 4)]
    for name in ("train", "val"):
        (tmp_path / f"{name}.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    cfg = _cfg(tmp_path, "data.task=gsm8k", f"data.train_path={tmp_path / 'train.jsonl'}",
               f"data.validation_path={tmp_path / 'val.jsonl'}", "data.max_prompt_length=128",
               "model.max_position_embeddings=256")
    data = prepare_run_data(cfg)
    assert [e.answer for e in data.validation] == ["2", "4", "6"] and data.test == []
