"""Bad inputs that used to print a traceback or go wrong silently: each now gives one line
naming the key, the file or the run, with exit code 2, before training starts and without
touching what an earlier run wrote.

Each case runs the entry point in this process (``rspo_mega.train.main``,
``rspo_mega.evaluate.main``) as the console script does; the converters' own mistakes are in
``tests/models/test_convert.py::test_cli_mistakes_are_one_line``.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from rspo_mega.config import config_to_dict
from rspo_mega.setup import load_run_config
from rspo_mega.setup.hf_start import SHIPPED_DIR
from rspo_mega.data.tokenizer_training import train_sentencepiece_tokenizer
from rspo_mega.tasks.corpus import task_corpus
from rspo_mega.config.paths import TINY_DEFAULT
from rspo_mega.training.checkpoint.files import METADATA, checkpoint_name
from tests.training.test_launch import OWN_MODEL
from tests.training.test_trainer import TINY

SHIPPED = SHIPPED_DIR / "tiny_sudoku_instruct"
# the tiny default (shipped start, checkpoints and export in the run directory), made small
DEFAULT = ["train_steps=1", "data.num_test_examples=4", "global_batch_size=8",
           "rollout.micro_batch_size=8", "logging.tensorboard=false"]


def _one_line(capsys, code: int, prog: str = "rspo-train") -> str:
    """The single ``<prog>: `` line of an entry point that returned 2 without a traceback."""
    out, err = capsys.readouterr()
    lines = [line for line in (out + err).splitlines() if line.startswith(f"{prog}: ")]
    assert code == 2 and len(lines) == 1 and "Traceback" not in out + err, out + err
    return lines[0]


def _train(capsys, *args: str) -> str:
    from rspo_mega.train import main

    return _one_line(capsys, main(list(args)))


def fake_checkpoint(save_dir: Path, step: int, config: dict) -> Path:
    """A complete-looking trainer checkpoint of ``step`` recording ``config`` (no tensors:
    the checks before a resume or a start read its metadata only)."""
    path = save_dir / checkpoint_name(step)
    (path / "dist").mkdir(parents=True)
    (path / "dist" / ".metadata").write_bytes(b"")
    (path / "extra").mkdir()
    torch.save({"step": step}, path / "extra" / "rank_00000.pt")
    files = {str(p.relative_to(path)): {"size": p.stat().st_size}
             for p in path.rglob("*") if p.is_file()}
    (path / METADATA).write_text(json.dumps({"step": step, "world_size": 1, "config": config,
                                             "files": files}))
    return path


def _tokenizer(tmp_path: Path, vocab: int, seed: int) -> Path:
    """A SentencePiece tokenizer of ``vocab`` pieces trained on generated task text."""
    prefix = tmp_path / f"tok{vocab}_{seed}"
    train_sentencepiece_tokenizer(task_corpus(num_countdown=400, num_sudoku=50, seed=seed),
                                  prefix, vocab_size=vocab)
    return Path(f"{prefix}.model")


# -- what printed a traceback -----------------------------------------------------------------

def test_init_from_a_directory_that_is_no_checkpoint(tmp_path, capsys):
    empty, other = tmp_path / "empty", tmp_path / "other"
    empty.mkdir()
    other.mkdir()
    (other / "notes.txt").write_text("not a checkpoint")
    for source in (empty, other):
        line = _train(capsys, *DEFAULT, f"checkpoint.init_from={source}",
                      f"logging.output_dir={tmp_path / 'run'}")
        assert line == (f"rspo-train: checkpoint error: checkpoint.init_from={source} is neither "
                        "an HF LLaDA directory (config.json and safetensors), a trainer "
                        "checkpoint (iter_*/ or the save_dir holding them) nor a converted "
                        "megatron checkpoint (.metadata)")


def test_init_from_a_trainer_checkpoint_of_another_model(tmp_path, capsys):
    other = load_run_config(None, TINY + OWN_MODEL + ["model.hidden_size=128"])
    source = fake_checkpoint(tmp_path / "other_run", 4, config_to_dict(other))
    line = _train(capsys, *TINY, *OWN_MODEL, f"checkpoint.init_from={source}",
                  f"logging.output_dir={tmp_path / 'run'}")
    assert line == (f"rspo-train: config error: checkpoint.init_from={source} holds another model "
                    "than the run's: model.hidden_size=64 (checkpoint: 128)")


def test_a_tokenizer_smaller_than_the_model(tmp_path, capsys):
    small = _tokenizer(tmp_path, 384, seed=0)
    line = _train(capsys, *DEFAULT, f"data.tokenizer={small}",
                  f"logging.output_dir={tmp_path / 'run'}")
    assert line == (f"rspo-train: config error: data.tokenizer={small} has 384 ids but "
                    "model.vocab_size=512: the model's ids 384..511 have no token; use the "
                    "tokenizer the model was trained with")


def test_padding_ids_beyond_a_tokenizer_decode_to_nothing(tmp_path):
    """A model may carry fewer than 128 padding rows beyond its tokenizer (LLaDA-8B: 115)."""
    from rspo_mega.data.tokenizer import load_tokenizer
    from rspo_mega.data.tokenizer_ids import check_tokenizer_ids

    path = _tokenizer(tmp_path, 400, seed=0)
    tok = load_tokenizer(path)
    assert tok.decode([5, 450, 6, 511]) == tok.decode([5, 6])
    check_tokenizer_ids(load_run_config(TINY_DEFAULT, [f"data.tokenizer={path}"]), tok)  # 112 padding ids: fine


def test_output_directories_that_cannot_be_written(tmp_path, capsys):
    a_file = tmp_path / "a_file"
    a_file.write_text("")
    for out in ("/proc/rspo_mega_run", str(a_file / "run")):
        line = _train(capsys, *DEFAULT, f"logging.output_dir={out}")
        assert line.startswith(f"rspo-train: config error: logging.output_dir={out}: cannot "
                               "create or write this directory: "), line
    run = tmp_path / "run"
    line = _train(capsys, *DEFAULT, f"logging.output_dir={run}",
                  f"checkpoint.export_hf={a_file / 'hf'}")
    assert line == (f"rspo-train: config error: checkpoint.export_hf={a_file / 'hf'}: its parent "
                    f"{a_file}: it is a file, not a directory")
    line = _train(capsys, *DEFAULT, f"logging.output_dir={run}",
                  "checkpoint.save_dir=/proc/rspo_mega_ckpt")
    assert line.startswith("rspo-train: config error: checkpoint.save_dir=/proc/rspo_mega_ckpt: "
                           "cannot create or write this directory: "), line
    assert not (run / "metrics.jsonl").exists() and not (run / "config.yaml").exists()


def test_a_missing_tokenizer(tmp_path, capsys):
    line = _train(capsys, *DEFAULT, "data.tokenizer=/missing/tokenizer.model",
                  f"logging.output_dir={tmp_path / 'run'}")
    assert line == ("rspo-train: config error: input path not found: "
                    "data.tokenizer=/missing/tokenizer.model")


# -- what went wrong silently -------------------------------------------------------------------

def test_a_tokenizer_of_the_right_size_with_other_ids(tmp_path, capsys):
    other = _tokenizer(tmp_path, 512, seed=7)  # the shipped start's size, trained on other text
    line = _train(capsys, *DEFAULT, f"data.tokenizer={other}",
                  f"logging.output_dir={tmp_path / 'run'}")
    assert line.startswith(f"rspo-train: config error: data.tokenizer={other} is not the "
                           f"tokenizer of checkpoint.init_from={SHIPPED}: "), line
    assert line.endswith("leave data.tokenizer unset to use the checkpoint's"), line
    copy = shutil.copy(SHIPPED / "tokenizer.model", tmp_path / "same.model")  # the same one
    from rspo_mega.train import main

    assert main([*DEFAULT, f"data.tokenizer={copy}", f"logging.output_dir={tmp_path / 'ok'}",
                 "--dry-run"]) == 0


def test_rspo_eval_of_a_save_dir_without_checkpoints(tmp_path, capsys):
    from rspo_mega.evaluate import main

    typo = tmp_path / "runs" / "tiny_sudkou" / "ckpt"
    line = _one_line(capsys, main([*DEFAULT, f"checkpoint.save_dir={typo}"]), "rspo-eval")
    assert line == (f"rspo-eval: checkpoint error: checkpoint.save_dir={typo}: no valid "
                    "checkpoint in it (--start evaluates checkpoint.init_from, the start weights)")


def test_a_dry_run_names_every_missing_input(tmp_path, capsys):
    line = _train(capsys, "--dry-run", *DEFAULT, "data.task=gsm8k",
                  "data.train_path=/data/gsm8k/train.jsonl", "checkpoint.init_from=/ckpt/llada",
                  f"logging.output_dir={tmp_path / 'run'}")
    assert line == ("rspo-train: config error: input paths not found: "
                    "data.train_path=/data/gsm8k/train.jsonl, checkpoint.init_from=/ckpt/llada")
    assert not (tmp_path / "run").exists()  # a dry run writes nothing


def test_a_resume_of_another_runs_checkpoint_or_of_a_finished_run(tmp_path, capsys):
    run = tmp_path / "run"
    rspo = load_run_config(TINY_DEFAULT, DEFAULT + [f"logging.output_dir={run}"])
    saved = fake_checkpoint(run / "ckpt", 1, config_to_dict(rspo))
    (run / "config.yaml").write_text("the earlier run's\n")
    line = _train(capsys, *DEFAULT, "algorithm.name=espo", f"logging.output_dir={run}")
    assert line == (f"rspo-train: checkpoint error: checkpoint {saved} was written by another run "
                    "(algorithm.name: 'rspo' -> 'espo'); checkpoint.save_dir resumes the same "
                    "run: give this run its own logging.output_dir, or start from those weights "
                    f"with checkpoint.init_from={saved}")
    line = _train(capsys, *DEFAULT, f"logging.output_dir={run}")
    assert line == (f"rspo-train: checkpoint error: the run in {run} is finished: its checkpoint "
                    f"{saved} is at step 1 of train_steps=1; to train it further raise "
                    "train_steps, for a new run give it its own logging.output_dir")
    assert (run / "config.yaml").read_text() == "the earlier run's\n"


# -- also ---------------------------------------------------------------------------------------

def test_a_failing_run_keeps_the_earlier_config(tmp_path, capsys):
    """A data file error found while the trainer is built: config.yaml stays the earlier run's."""
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.yaml").write_text("the earlier run's\n")
    bad = tmp_path / "train.jsonl"
    bad.write_text('{"question": "1+1?", "answer": "2"}\n{"question": \n')
    line = _train(capsys, *TINY, *OWN_MODEL, "data.task=gsm8k", f"data.train_path={bad}",
                  f"logging.output_dir={run}")
    assert line.startswith(f"rspo-train: data file error: dataset file {bad}, line 2: "), line
    assert (run / "config.yaml").read_text() == "the earlier run's\n"


def test_metrics_rewind_to_the_resumed_step(tmp_path):
    from rspo_mega.training.metrics import MetricsLogger, read_metrics

    with MetricsLogger(tmp_path, tensorboard=False, rank=0) as logger:
        logger.log(0, {"before/eval/accuracy": 0.25})
        for step in range(1, 6):
            logger.log(step, {"loss": float(step)})
    with MetricsLogger(tmp_path, tensorboard=False, rank=0) as logger:
        logger.rewind(3)  # resumed from the checkpoint of step 3: steps 4 and 5 are redone
        logger.log(4, {"loss": 4.5})
    assert [r["step"] for r in read_metrics(tmp_path / "metrics.jsonl")] == [0, 1, 2, 3, 4]
    with MetricsLogger(tmp_path, tensorboard=False, rank=0) as logger:
        logger.rewind(0)  # a fresh start
    assert read_metrics(tmp_path / "metrics.jsonl") == []


@pytest.mark.parametrize("keep_last", [1, 2])
def test_rotation_keeps_the_newest_valid_checkpoint(tmp_path, keep_last):
    """iter_27 valid, iter_30 corrupt (the resume skipped it): the save of step 28 deletes
    neither 28 nor, with keep_last=2, 27; iter_30 stays until step 30 is saved again."""
    from tests.distributed import run_distributed

    run_distributed(_save_after_a_corrupt_checkpoint, world_size=2, args=(str(tmp_path),
                                                                            keep_last))
    left = sorted(p.name for p in tmp_path.glob("iter_*"))
    kept = ["iter_0000027"] if keep_last == 2 else []
    assert left == kept + ["iter_0000028", "iter_0000030"], left


def _save_after_a_corrupt_checkpoint(rank: int, world: int, save_dir: str, keep_last: int):
    import torch.distributed as dist

    from rspo_mega.parallel import initialize_model_parallel
    from rspo_mega.training.checkpoint.files import validate_checkpoint
    from tests.training.checkpoint_parts import manager, save
    from tests.training.test_checkpointing import _tiny_gpt

    initialize_model_parallel(tp=2)
    model = _tiny_gpt(0)
    for step in (27, 30):
        save(save_dir, step, model.sharded_state_dict())
    later = manager(save_dir, model.sharded_state_dict(), keep_last=keep_last)
    if rank == 0:
        shard = max((Path(save_dir) / "iter_0000030" / "dist").glob("*.distcp"),
                    key=lambda p: p.stat().st_size)
        shard.write_bytes(shard.read_bytes()[:10])  # truncated
        assert validate_checkpoint(Path(save_dir) / "iter_0000030") is not None
    dist.barrier()
    assert later.find_resumable().name == "iter_0000027"
    later.save(28, last=True)
    assert later.find_resumable().name == "iter_0000028"
