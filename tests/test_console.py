"""The console of ``rspo-train`` / ``rspo-eval``: one-line user errors with exit code 2 (through
the real CLI, in subprocesses, also under torchrun), hidden library chatter, the progress bar."""

from __future__ import annotations

import logging
import shlex
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import pytest

from rspo_mega import console
from rspo_mega.setup.hf_start import SHIPPED_DIR
from rspo_mega.training.step_report import StepPostfix
from tests import processes
from tests.distributed import free_port
from tests.training.test_launch import OWN_MODEL, ROOT, TINY, _env

TRAIN = [sys.executable, "-m", "rspo_mega.train"]


def _cli(args: list[str], out: Path, timeout: float = 300) -> subprocess.CompletedProcess:
    """``args`` with the run's outputs under ``out``; fails if anything it started is left."""
    env, run = _env()
    done = subprocess.run([*args, f"logging.output_dir={out}"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout)
    processes.assert_none_left(lambda: processes.marked(processes.RUN_ENV, run), args[2])
    return done


def _one_error_line(done: subprocess.CompletedProcess, prefix: str) -> str:
    """The single ``prefix`` line of a run that exited with 2 and printed no traceback."""
    text = done.stdout + done.stderr
    assert done.returncode == 2, text[-3000:]
    lines = [line for line in text.splitlines() if line.startswith(prefix)]
    assert len(lines) == 1 and "Traceback" not in text and "[rank" not in text, text[-3000:]
    return lines[0]


def test_user_errors_print_one_line_and_exit_2(tmp_path):
    default = ["checkpoint.save_dir=null", "checkpoint.export_hf=null"]
    done = _cli([*TRAIN, "data.train_path=/missing.jsonl", *default], tmp_path / "a")
    assert _one_error_line(done, "rspo-train: ") == \
        "rspo-train: config error: input path not found: data.train_path=/missing.jsonl"

    done = _cli([*TRAIN, "optimizer.lrr=1e-4"], tmp_path / "b")
    line = _one_error_line(done, "rspo-train: ")
    assert line.startswith("rspo-train: config error: ") and "optimizer.lrr" in line, line

    ckpt = tmp_path / "save_dir" / "iter_0000003"  # a checkpoint directory without its files
    ckpt.mkdir(parents=True)
    done = _cli([*TRAIN, *TINY, *OWN_MODEL, f"checkpoint.init_from={ckpt.parent}"], tmp_path / "c")
    assert _one_error_line(done, "rspo-train: ") == (
        f"rspo-train: checkpoint error: checkpoint.init_from={ckpt.parent}: no valid checkpoint "
        "in it")

    hf = Path(shutil.copytree(SHIPPED_DIR / "tiny_sudoku_instruct", tmp_path / "hf"))
    for shard in hf.glob("*.safetensors"):
        shard.unlink()
    done = _cli([*TRAIN, f"checkpoint.init_from={hf}", *default], tmp_path / "d")
    line = _one_error_line(done, "rspo-train: ")
    assert line.startswith("rspo-train: HF directory error: checkpoint.init_from: ") and \
        str(hf) in line and "safetensors" in line, line

    done = _cli([sys.executable, "-m", "rspo_mega.evaluate", *TINY, *OWN_MODEL,
                 f"checkpoint.save_dir={tmp_path / 'empty'}"], tmp_path / "e")
    assert _one_error_line(done, "rspo-eval: ") == (
        f"rspo-eval: checkpoint error: checkpoint.save_dir={tmp_path / 'empty'}: no valid "
        "checkpoint in it")


def test_a_data_file_parse_error_names_the_line_and_debug_adds_the_traceback(tmp_path):
    data = tmp_path / "train.jsonl"
    data.write_text('{"question": "1+1?", "answer": "2"}\n{"question": "2+2?" "answer": "4"}\n')
    args = [*TRAIN, *TINY, *OWN_MODEL, "data.task=gsm8k", f"data.train_path={data}"]
    done = _cli(args, tmp_path / "a")
    assert _one_error_line(done, "rspo-train: ") == (
        f"rspo-train: data file error: dataset file {data}, line 2: Expecting ',' delimiter "
        "(column 21)")
    done = _cli([*args, "--debug"], tmp_path / "b")
    assert done.returncode == 2 and "Traceback (most recent call last)" in done.stderr
    assert done.stderr.strip().splitlines()[-1].startswith("rspo-train: data file error: ")


def test_under_torchrun_one_rank_prints_the_error(tmp_path):
    args = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
            "--master-port", str(free_port()), "-m", "rspo_mega.train", *TINY, *OWN_MODEL,
            "parallel.world_size=2", "data.task=gsm8k", "data.train_path=/missing.jsonl"]
    done = _cli(args, tmp_path)
    text = done.stdout + done.stderr
    assert done.returncode != 0, text[-3000:]
    errors = [line for line in text.splitlines() if "rspo-train: " in line]
    assert errors == ["rspo-train: config error: input path not found: "
                      "data.train_path=/missing.jsonl"], \
        text[-3000:]
    assert "[rank0]:" not in text and "[rank1]:" not in text, text[-3000:]


def test_a_run_console_hides_megatron_info_and_names_its_outputs(tmp_path):
    args = [*TRAIN, *TINY, *OWN_MODEL, "train_steps=2", "data.num_test_examples=4",
            "logging.tensorboard=false", f"checkpoint.save_dir={tmp_path / 'ckpt'}"]
    done = _cli(args, tmp_path)
    text = done.stdout + done.stderr
    assert done.returncode == 0, text[-3000:]
    assert " megatron." not in text and "not installed" not in text, text[-3000:]
    assert "Params for bucket" not in text and "OptimizerConfig" not in text, text[-3000:]
    steps = [line for line in done.stdout.splitlines() if line.startswith("step ")]
    assert [line.split(" | ")[0] for line in steps] == ["step 1/2", "step 2/2"], done.stdout
    lines = done.stdout.strip().splitlines()[len(steps):]
    assert lines[0].startswith("held-out accuracy on 4 examples: "), done.stdout
    names = {line.split()[0]: line.split()[-1] for line in lines[1:]}
    assert names == {"config": str(tmp_path / "config.yaml"),
                     "metrics": str(tmp_path / "metrics.jsonl"),
                     "checkpoint": str(tmp_path / "ckpt" / "iter_0000002"),
                     "curves": str(tmp_path / "curves.png"),
                     "summary": str(tmp_path / "summary.json")}, done.stdout
    assert all(Path(path).exists() for path in names.values())


def test_a_log_file_gets_one_plain_line_per_log_interval(tmp_path):
    """``rspo-train ... > log`` as a batch job writes it: the progress bar (on by default) gives
    way to one line every logging.log_interval steps, without carriage returns."""
    log = tmp_path / "train.log"
    args = [*TRAIN, *TINY, *OWN_MODEL, "logging.progress_bar=true", "train_steps=4",
            "logging.log_interval=2", "data.num_test_examples=4", "eval_interval=2",
            f"logging.output_dir={tmp_path / 'run'}"]
    env, run = _env()
    command = " ".join(shlex.quote(a) for a in args) + f" > {shlex.quote(str(log))}"
    done = subprocess.run(["bash", "-c", command], cwd=ROOT, env=env, stderr=subprocess.PIPE,
                          text=True, timeout=300)
    processes.assert_none_left(lambda: processes.marked(processes.RUN_ENV, run), "rspo-train")
    assert done.returncode == 0, done.stderr[-3000:]
    text = log.read_text()
    assert "\r" not in text and "\r" not in done.stderr, text
    steps = [line for line in text.splitlines() if line.startswith("step ")]
    assert len(steps) == 2, text
    assert steps[0].startswith("step 2/4 | reward ") and " | loss " in steps[0], text
    assert " | held-out " in steps[0] and steps[0].endswith(" tokens/s"), text
    assert steps[1].startswith("step 4/4 | ") and " s/step | " in steps[1], text


def test_every_console_script_is_as_quiet_as_rspo_train(tmp_path):
    """rspo-plan and the converters import megatron-core too: none of its warnings shows."""
    shipped = str(SHIPPED_DIR / "tiny_sudoku_instruct")
    mcore, hf = tmp_path / "mcore", tmp_path / "hf"
    bin_dir = Path(sys.executable).parent
    for args in ([str(bin_dir / "rspo-plan"), "--nodes", "1", "--gpus-per-node", "2"],
                 [sys.executable, "tools/convert_hf_to_mcore.py", "--hf", shipped, "--out",
                  str(mcore)],
                 [sys.executable, "tools/convert_mcore_to_hf.py", "--ckpt", str(mcore), "--out",
                  str(hf)]):
        env, run = _env()
        done = subprocess.run(args, cwd=ROOT, env=env, capture_output=True, text=True,
                              timeout=300)
        processes.assert_none_left(lambda: processes.marked(processes.RUN_ENV, run), args[1])
        text = done.stdout + done.stderr
        assert done.returncode == 0, text[-3000:]
        assert "Warning" not in text and "not installed" not in text, text[-3000:]
        assert " megatron." not in text, text[-3000:]


def test_library_warnings_and_info_wait_for_debug(monkeypatch, caplog):
    monkeypatch.setattr(warnings, "showwarning", warnings.showwarning)
    monkeypatch.setattr(console, "_held", [])
    monkeypatch.setattr(console, "_configured", False)
    shown = []
    monkeypatch.setattr(warnings, "showwarning", lambda *a, **k: shown.append(a[0]))
    console.hide_library_warnings()
    megatron_file = f"{Path(sys.prefix)}/site-packages/megatron/core/optimizer/__init__.py"
    warnings.showwarning(UserWarning("Transformer Engine and Apex are not installed."),
                         UserWarning, megatron_file, 24)
    warnings.showwarning(UserWarning("policy: check this"), UserWarning, megatron_file, 30)
    warnings.showwarning(UserWarning("not installed"), UserWarning, "/work/run.py", 1)
    assert [str(w) for w in shown] == ["policy: check this", "not installed"]
    assert len(console._held) == 1 and "Apex are not installed" in console._held[0]
    for level, megatron_level in (("INFO", logging.WARNING), ("DEBUG", logging.DEBUG),
                                  ("ERROR", logging.ERROR)):
        with caplog.at_level(logging.DEBUG):
            console.setup_logging(level)
        assert logging.getLogger("megatron").level == megatron_level
    assert any("Apex are not installed" in r.getMessage() and r.levelno == logging.DEBUG
               for r in caplog.records) and console._held == []
    logging.getLogger("megatron").setLevel(logging.NOTSET)


@pytest.mark.parametrize("kind,metrics,expected", [
    ("rl", {"reward": 0.25, "accuracy": 0.5, "loss": 1e-6}, {"reward": "0.250", "solved": "50%"}),
    ("sft", {"loss": 1.5, "grad_norm": 2.0}, {"loss": "1.5000"}),
])
def test_the_progress_bar_shows_the_run_kinds_own_metrics(kind, metrics, expected):
    postfix = StepPostfix(kind)
    assert postfix(metrics) == expected
    assert postfix({**metrics, "eval/accuracy": 0.3125}) == {**expected, "held-out": "31.2%"}
    assert postfix(metrics) == {**expected, "held-out": "31.2%"}  # until the next evaluation


def test_a_rank_still_alive_after_the_grace_reports_its_own_error(monkeypatch, capsys):
    from rspo_mega.errors import DataFileNotFoundError

    error = DataFileNotFoundError("dataset file not found: /node-local/train.jsonl")
    monkeypatch.setattr(console, "PEER_GRACE_S", 0.0)
    monkeypatch.setenv("RANK", "3")
    assert console.report_user_error("rspo-train", error) == 2
    assert capsys.readouterr().err == \
        "rspo-train: data file error (rank 3): dataset file not found: /node-local/train.jsonl\n"
    monkeypatch.setenv("RANK", "0")
    assert console.run_entry_point("rspo-eval", lambda: (_ for _ in ()).throw(error)) == 2
    assert capsys.readouterr().err == \
        "rspo-eval: data file error: dataset file not found: /node-local/train.jsonl\n"
    with pytest.raises(ZeroDivisionError):  # a bug keeps its traceback
        console.run_entry_point("rspo-eval", lambda: 1 // 0)


def test_ctrl_c_before_the_training_loop_is_one_line(monkeypatch, capsys):
    """Ctrl-C while a run starts or evaluates (the loop's own handler saves first)."""
    def interrupted() -> int:
        raise KeyboardInterrupt

    monkeypatch.setenv("RANK", "0")
    assert console.run_entry_point("rspo-train", interrupted) == 130
    assert capsys.readouterr().err == "\nrspo-train: interrupted\n"
    monkeypatch.setenv("RANK", "1")
    assert console.run_entry_point("rspo-train", interrupted) == 130
    assert capsys.readouterr().err == ""


def test_help_names_every_algorithm(capsys):
    from rspo_mega.train import parse_args

    with pytest.raises(SystemExit):
        parse_args(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    for name in ("rspo (RSPO)", "espo (ESPO)", "diffu_grpo (diffu-GRPO)", "agrpo (AGRPO)",
                 "sft (SFT)"):
        assert name in text
