"""Experiment trackers, samples and FLOP throughput in the logs, offline: MLflow with a local file
store read back with its client, Weights & Biases in offline mode with its run file decoded.

The end-to-end test launches ``rspo-train`` under torchrun on 2 ranks as users do and compares
what each tracker holds with ``metrics.jsonl``, ``samples.jsonl`` and ``summary.json``."""

from __future__ import annotations

import importlib.util
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

from rspo_mega.config import ConfigError, config_to_dict
from rspo_mega.setup import load_run_config, validate_run
from rspo_mega.training.trackers import RUN_IDS_FILE, Trackers, flat_params
from tests.distributed import free_port
from tests.training.test_launch import OWN_MODEL, ROOT, TINY, _env
from tests import processes

needs_trackers = pytest.mark.skipif(
    importlib.util.find_spec("wandb") is None or importlib.util.find_spec("mlflow") is None,
    reason="the wandb and mlflow packages are not installed: pip install -e '.[wandb,mlflow]'")


@pytest.fixture(autouse=True)
def _mlflow_file_store(monkeypatch):
    """MLflow 3 refuses a file store unless told (the tracker tells it for a file: URI)."""
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")


OFFLINE = ["logging.wandb.enabled=true", "logging.wandb.mode=offline",
           "logging.wandb.project=rspo-test", "logging.wandb.tags=[tiny, ci]",
           "logging.mlflow.enabled=true", "logging.mlflow.experiment=rspo-test",
           "logging.mlflow.tags.team=infra"]


def _wandb_env(monkeypatch, root: Path) -> None:
    """W&B's cache, data and settings folders under ``root`` (nothing written to $HOME)."""
    for name in ("WANDB_CACHE_DIR", "WANDB_DATA_DIR", "WANDB_CONFIG_DIR"):
        monkeypatch.setenv(name, str(root / name.lower()))


def wandb_records(run_dir: Path) -> list:
    """The records of the one offline W&B run under ``run_dir/wandb``: its ``run-<id>.wandb``
    file is a LevelDB-style log (a 7-byte header, then 32 KiB blocks of chunks with a 7-byte
    header: CRC, little-endian length, type 1 full / 2 first / 3 middle / 4 last) of protobuf
    ``Record`` messages."""
    from wandb.proto import wandb_internal_pb2 as pb

    files = sorted(run_dir.glob("wandb/offline-run-*/run-*.wandb"))
    assert len(files) == 1, files
    data, block = files[0].read_bytes(), 32768
    assert data[:4] == b":W&B", data[:7]
    records, pending, pos = [], b"", 7
    while pos + 7 <= len(data):
        if block - pos % block < 7:
            pos += block - pos % block  # a block's tail too short for a chunk header is padding
            continue
        length, kind = int.from_bytes(data[pos + 4:pos + 6], "little"), data[pos + 6]
        pending += data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):
            record = pb.Record()
            record.ParseFromString(pending)
            records.append(record)
            pending = b""
    return records


def wandb_history(records: list) -> dict[int, dict[str, float]]:
    """Step -> the scalars logged at it (W&B's own ``_``-keys and tables left out)."""
    out: dict[int, dict[str, float]] = {}
    for r in records:
        if r.WhichOneof("record_type") != "history":
            continue
        items = {"/".join(i.nested_key) or i.key: json.loads(i.value_json) for i in r.history.item}
        step = items.pop("_step")
        out.setdefault(int(step), {}).update(
            {k: v for k, v in items.items() if not k.startswith(("_", "samples"))})
    return out


def _mlflow_run(uri: str, experiment: str):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    runs = client.search_runs([client.get_experiment_by_name(experiment).experiment_id])
    assert len(runs) == 1, [r.info.run_id for r in runs]
    return client, runs[0]


@needs_trackers
def test_trackers_record_scalars_samples_config_and_artifacts(tmp_path, monkeypatch):
    _wandb_env(monkeypatch, tmp_path)
    run_dir, uri = tmp_path / "run", f"file:{tmp_path / 'mlruns'}"
    cfg = load_run_config(None, OFFLINE + [f"logging.output_dir={run_dir}",
                                       f"logging.mlflow.tracking_uri={uri}"])
    assert Trackers.open(cfg, rank=1).trackers == []  # ranks other than 0 open none
    trackers = Trackers.open(cfg, rank=0)
    ids = json.loads((run_dir / RUN_IDS_FILE).read_text())
    assert set(ids) == {"wandb", "mlflow"}
    trackers.log_metrics(1, {"reward": 0.25, "time/rollout": 1.5})
    trackers.log_metrics(2, {"reward": 0.5, "loss": float("nan")})
    rows = [{"step": 2, "uid": 7, "prompt": "1 2", "completion": "<answer>x", "reward": 0.5,
             "advantage": -0.25}]
    trackers.log_samples(2, rows)
    (run_dir / "summary.json").write_text('{"final": {}}\n')
    (run_dir / "curves.png").write_bytes(b"\x89PNG not a real picture")
    trackers.finish(run_dir, "finished")

    client, run = _mlflow_run(uri, "rspo-test")
    assert run.info.run_id == ids["mlflow"] and run.info.status == "FINISHED"
    assert run.info.run_name == "run" and run.data.tags["team"] == "infra"
    assert run.data.params == flat_params(config_to_dict(cfg))
    assert run.data.params["algorithm.name"] == "rspo" and run.data.params["seed"] == "1234"
    assert [(m.step, m.value) for m in client.get_metric_history(run.info.run_id, "reward")] == \
        [(1, 0.25), (2, 0.5)]
    assert math.isnan(client.get_metric_history(run.info.run_id, "loss")[0].value)
    assert {a.path for a in client.list_artifacts(run.info.run_id)} == \
        {"curves.png", "summary.json", "samples.json"}
    table = json.loads(Path(client.download_artifacts(run.info.run_id, "samples.json",
                                                      str(tmp_path))).read_text())
    assert table["columns"] == list(rows[0]) and table["data"] == [list(rows[0].values())]

    records = wandb_records(run_dir)
    runs = [r.run for r in records if r.WhichOneof("record_type") == "run"]
    assert runs[0].run_id == ids["wandb"] and runs[0].project == "rspo-test"
    assert runs[0].display_name == "run" and list(runs[0].tags) == ["tiny", "ci"]
    config = {i.key: json.loads(i.value_json) for i in runs[0].config.update}
    assert config["algorithm"]["name"] == "rspo" and config["logging"]["wandb"]["mode"] == "offline"
    history = wandb_history(records)
    assert history[1] == {"reward": 0.25, "time/rollout": 1.5}
    assert history[2]["reward"] == 0.5 and math.isnan(history[2]["loss"])
    artifacts = {r.artifact.type: sorted(e.path for e in r.artifact.manifest.contents)
                 for r in records if r.WhichOneof("record_type") == "artifact"}
    assert artifacts["run_outputs"] == ["curves.png", "summary.json"]
    assert artifacts["run_table"] == ["samples.table.json"]
    assert [r.exit.exit_code for r in records if r.WhichOneof("record_type") == "exit"] == [0]


@needs_trackers
def test_a_restarted_run_continues_its_tracker_runs(tmp_path, monkeypatch):
    _wandb_env(monkeypatch, tmp_path)
    run_dir, uri = tmp_path / "run", f"file:{tmp_path / 'mlruns'}"
    cfg = load_run_config(None, ["logging.mlflow.enabled=true", f"logging.output_dir={run_dir}",
                             f"logging.mlflow.tracking_uri={uri}"])
    first = Trackers.open(cfg, rank=0)
    first.log_metrics(1, {"reward": 0.1})
    first.finish(run_dir, "preempted")
    _, run = _mlflow_run(uri, "rspo_mega")
    assert run.info.status == "KILLED"
    second = Trackers.open(cfg, rank=0)  # the restart, same output_dir
    assert second.trackers[0].run_id == run.info.run_id
    second.log_metrics(2, {"reward": 0.2})
    second.finish(run_dir, "finished")
    client, run = _mlflow_run(uri, "rspo_mega")
    assert run.info.status == "FINISHED"
    assert [m.value for m in client.get_metric_history(run.info.run_id, "reward")] == [0.1, 0.2]


def test_a_tracker_asked_for_but_not_installed_is_one_line(tmp_path, monkeypatch, capsys):
    import importlib.util

    from rspo_mega.train import main

    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name in ("wandb", "mlflow") else find_spec(name, *a))
    for section in ("wandb", "mlflow"):
        code = main(["--dry-run", f"logging.{section}.enabled=true",
                     f"logging.output_dir={tmp_path}"])
        err = capsys.readouterr().err.strip().splitlines()
        assert code == 2 and err == [
            f"rspo-train: config error: logging.{section}.enabled=true needs the '{section}' "
            f"package, which is not installed: pip install -e '.[{section}]'"]
    assert not (tmp_path / "config.yaml").exists()  # refused before anything was written


@needs_trackers
def test_an_unreachable_tracker_is_a_config_error(tmp_path, monkeypatch):
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "2")
    cfg = load_run_config(None, ["logging.mlflow.enabled=true", f"logging.output_dir={tmp_path}",
                             f"logging.mlflow.tracking_uri=http://127.0.0.1:{free_port()}"])
    with pytest.raises(ConfigError, match=r"^logging\.mlflow: cannot start a run at tracking "
                                          r"URI http://127\.0\.0\.1:\d+: "):
        Trackers.open(cfg, rank=0)


def test_samples_need_an_rl_run():
    cfg = load_run_config(None, ["algorithm.name=sft", "logging.sample_interval=5"])
    with pytest.raises(ConfigError, match=r"logging\.sample_interval logs RL completions"):
        validate_run(cfg)


def test_tags_are_a_list_of_strings():
    assert load_run_config(None, ["logging.wandb.tags=[a, b]"]).logging.wandb.tags == ["a", "b"]
    with pytest.raises(ConfigError, match=r"'logging\.wandb\.tags' must be a list, got 'a'"):
        load_run_config(None, ["logging.wandb.tags=a"])


# -- the product: rspo-train under torchrun, 2 data-parallel ranks ------------------------------

STEPS = 3


def _torchrun(out: Path, uri: str, home: Path) -> subprocess.CompletedProcess:
    env, run = _env()
    for name in ("WANDB_CACHE_DIR", "WANDB_DATA_DIR", "WANDB_CONFIG_DIR"):
        env[name] = str(home / name.lower())
    args = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
            "--master-port", str(free_port()), "-m", "rspo_mega.train", *TINY, *OWN_MODEL,
            "parallel.world_size=2", f"train_steps={STEPS}", "data.num_test_examples=4",
            "logging.sample_interval=2", "logging.peak_tflops=0.5", *OFFLINE,
            f"logging.mlflow.tracking_uri={uri}", f"logging.output_dir={out}"]
    done = subprocess.run(args, cwd=ROOT, env=env, capture_output=True, text=True, timeout=400)
    processes.assert_none_left(lambda: processes.marked(processes.RUN_ENV, run), "torchrun")
    return done


@needs_trackers
@pytest.mark.timeout(450)
def test_a_run_logs_everything_to_both_trackers_from_rank_0(tmp_path):
    out, uri = tmp_path / "run", f"file:{tmp_path / 'mlruns'}"
    done = _torchrun(out, uri, tmp_path)
    text = done.stdout + done.stderr
    assert done.returncode == 0, text[-4000:]
    records = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in records if "loss" in r]
    assert [r["step"] for r in steps] == list(range(1, STEPS + 1))

    # FLOP throughput: every step, consistent with its own time, in the summary
    for r in steps:
        flops = sum(r[f"model_tflop/{p}"] for p in ("rollout", "policy", "reference"))
        assert r["model_tflop/rollout"] > 0 and r["model_tflop/policy"] > 0
        assert r["tflops_per_device"] == pytest.approx(flops / r["step_seconds"] / 2, rel=1e-9)
        assert r["mfu"] == pytest.approx(r["tflops_per_device"] / 0.5, rel=1e-9)
    summary = json.loads((out / "summary.json").read_text())["final"]
    total = sum(r[f"model_tflop/{p}"] for r in steps for p in ("rollout", "policy", "reference"))
    assert summary["throughput/tflops_per_device"] == pytest.approx(
        total / sum(r["step_seconds"] for r in steps) / 2, rel=1e-6)
    assert summary["throughput/peak_tflops"] == 0.5

    # samples: step 2 only, rank 0's 2 prompts (of 4), each its first completion
    samples = [json.loads(x) for x in (out / "samples.jsonl").read_text().splitlines()]
    assert [s["step"] for s in samples] == [2, 2]
    assert set(samples[0]) == {"step", "uid", "prompt", "completion", "reward", "advantage"}
    lines = [x for x in text.splitlines() if "samples of step" in x]
    assert len(lines) == 1 and f"samples of step 2 ({out / 'samples.jsonl'}): reward " in lines[0]

    # MLflow: one run holding every scalar of metrics.jsonl at its step, samples and artifacts
    client, run = _mlflow_run(uri, "rspo-test")
    assert run.info.status == "FINISHED"
    for key in {k for r in records for k in r} - {"step", "time"}:
        logged = {(r["step"], "nan" if r[key] is None else r[key]) for r in records if key in r}
        history = {(m.step, "nan" if math.isnan(m.value) else m.value)
                   for m in client.get_metric_history(run.info.run_id, key)}
        assert history == logged, key
    assert {a.path for a in client.list_artifacts(run.info.run_id)} == \
        {"curves.png", "summary.json", "samples.json"}
    table = json.loads(Path(client.download_artifacts(run.info.run_id, "samples.json",
                                                      str(tmp_path))).read_text())
    assert [dict(zip(table["columns"], row)) for row in table["data"]] == samples
    assert run.data.params["parallel.world_size"] == "2"

    # W&B: one offline run (rank 0's) with the same scalars, the table and the artifacts
    wandb = wandb_records(out)
    history = wandb_history(wandb)
    for r in steps:
        assert history[r["step"]]["reward"] == r["reward"]
        assert set(r) - {"step", "time"} <= set(history[r["step"]])
    artifacts = {r.artifact.type: sorted(e.path for e in r.artifact.manifest.contents)
                 for r in wandb if r.WhichOneof("record_type") == "artifact"}
    assert artifacts["run_outputs"] == ["curves.png", "summary.json"]
    assert artifacts["run_table"] == ["samples.table.json"]
