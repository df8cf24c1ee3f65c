"""Experiment trackers on rank 0: Weights & Biases (``logging.wandb``) and MLflow (``logging.mlflow``).

    trackers = Trackers.open(cfg, rank)          # none on other ranks or when none is enabled
    trackers.log_metrics(step, {"reward": 0.5})  # every record MetricsLogger writes
    trackers.log_samples(step, rows)             # the sample table (rspo_mega.training.samples)
    trackers.finish(run_dir, "finished")         # curves.png and summary.json as artifacts

A tracker run gets the resolved config (W&B: the run's config; MLflow: one parameter per dotted
key) when it is created. Its id is kept in ``<output_dir>/trackers.json``, so a run restarted in
the same directory (after preemption) continues the same tracker runs, as ``metrics.jsonl`` is
continued. A run that ends without :meth:`Trackers.finish` (an exception, ``sys.exit``) ends its
tracker runs as failed when the process exits. The packages are optional extras (``pip install -e '.[wandb]'`` / ``'.[mlflow]'``);
:func:`rspo_mega.config.validate.check_logging` names a missing one before the run starts, and a
tracker that cannot be opened (no W&B login, an unreachable MLflow server) is a
:class:`ConfigError` naming its section, raised before any model is built.
"""

from __future__ import annotations

import atexit
import json
import logging
import os
import time
from pathlib import Path
from typing import Any, Iterator, Mapping, Optional, Protocol

from rspo_mega.config import ConfigError, TrainConfig, config_to_dict
from rspo_mega.config.schema import MLflowConfig, WandbConfig

log = logging.getLogger(__name__)

RUN_IDS_FILE = "trackers.json"  # tracker -> run id, in logging.output_dir
ARTIFACTS = ("curves.png", "summary.json")  # uploaded at the end of a finished run
STATUSES = ("finished", "preempted", "failed")
SAMPLES_TABLE = "samples"  # the W&B key and MLflow table file (samples.json) of the samples
_MLFLOW_BATCH = {"metrics": 1000, "params": 100}  # MlflowClient.log_batch's limits per call


class Tracker(Protocol):
    """One tracker run (rank 0)."""

    name: str
    run_id: str

    def log_metrics(self, step: int, values: Mapping[str, float]) -> None: ...

    def log_samples(self, step: int, rows: list[dict[str, Any]]) -> None: ...

    def finish(self, artifacts: list[Path], status: str) -> None: ...


def _first_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return f"{type(err).__name__}: {text[0] if text else ''}"


class WandbTracker:
    """A W&B run; ``mode=offline`` writes it under ``<output_dir>/wandb`` for ``wandb sync``."""

    name = "wandb"

    def __init__(self, cfg: WandbConfig, run_dir: Path, config: dict, run_id: Optional[str]):
        import wandb

        self._wandb = wandb
        try:
            self.run = wandb.init(
                project=cfg.project, entity=cfg.entity, name=cfg.name or run_dir.name,
                tags=cfg.tags or None, mode=cfg.mode, dir=str(run_dir), config=config,
                id=run_id, resume="allow" if run_id else None,
                settings=wandb.Settings(console="off", silent=True))
        except Exception as err:  # noqa: BLE001 - login, network, bad project: the user's to fix
            raise ConfigError(f"logging.wandb: cannot start the W&B run: {_first_line(err)}") \
                from err
        self.run_id = self.run.id

    def log_metrics(self, step: int, values: Mapping[str, float]) -> None:
        self.run.log(dict(values), step=step)

    def log_samples(self, step: int, rows: list[dict[str, Any]]) -> None:
        columns = list(rows[0])
        table = self._wandb.Table(columns=columns, data=[[r[c] for c in columns] for r in rows])
        self.run.log({SAMPLES_TABLE: table}, step=step)

    def finish(self, artifacts: list[Path], status: str) -> None:
        if artifacts:
            outputs = self._wandb.Artifact(f"{self.run.id}-outputs", type="run_outputs")
            for path in artifacts:
                outputs.add_file(str(path))
            self.run.log_artifact(outputs)
        if status == "preempted":
            self.run.mark_preempting()
        self.run.finish(exit_code={"finished": 0, "preempted": 143, "failed": 1}[status])
        self._wandb.teardown()  # ends W&B's service process now, not at interpreter exit


class MLflowTracker:
    """An MLflow run through ``MlflowClient`` (no process-global active run)."""

    name = "mlflow"

    def __init__(self, cfg: MLflowConfig, run_dir: Path, config: dict, run_id: Optional[str]):
        if cfg.tracking_uri and cfg.tracking_uri.startswith("file:"):
            # a file store the run names itself is wanted: recent MLflow refuses one unless told
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
        os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
        from mlflow.tracking import MlflowClient

        try:
            self.client = MlflowClient(tracking_uri=cfg.tracking_uri)
            self.run_id = run_id or self._create(cfg, run_dir, config)
            if run_id:
                self.client.update_run(run_id, status="RUNNING")
        except Exception as err:  # noqa: BLE001 - bad URI, server down: the user's to fix
            uri = cfg.tracking_uri or "MLflow's default"
            raise ConfigError(f"logging.mlflow: cannot start a run at tracking URI {uri}: "
                              f"{_first_line(err)}") from err

    def _create(self, cfg: MLflowConfig, run_dir: Path, config: dict) -> str:
        """A new run in ``cfg.experiment`` (created when missing) with the config's parameters."""
        from mlflow.entities import Param

        found = self.client.get_experiment_by_name(cfg.experiment)
        experiment = found.experiment_id if found else self.client.create_experiment(cfg.experiment)
        run = self.client.create_run(experiment, run_name=cfg.run_name or run_dir.name,
                                     tags=dict(cfg.tags))
        params = [Param(k, v) for k, v in flat_params(config).items()]
        for chunk in _chunks(params, _MLFLOW_BATCH["params"]):
            self.client.log_batch(run.info.run_id, params=chunk)
        return run.info.run_id

    def log_metrics(self, step: int, values: Mapping[str, float]) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        metrics = [Metric(k, float(v), now, step) for k, v in values.items()]
        for chunk in _chunks(metrics, _MLFLOW_BATCH["metrics"]):
            self.client.log_batch(self.run_id, metrics=chunk)

    def log_samples(self, step: int, rows: list[dict[str, Any]]) -> None:
        columns = {c: [r[c] for r in rows] for c in rows[0]}
        self.client.log_table(self.run_id, data=columns, artifact_file=f"{SAMPLES_TABLE}.json")

    def finish(self, artifacts: list[Path], status: str) -> None:
        for path in artifacts:
            self.client.log_artifact(self.run_id, str(path))
        final = {"finished": "FINISHED", "preempted": "KILLED", "failed": "FAILED"}[status]
        self.client.set_terminated(self.run_id, status=final)


def flat_params(config: Mapping[str, Any], prefix: str = "") -> dict[str, str]:
    """Nested config dicts -> ``{"section.key": value}`` as text (strings as they are, other
    values as JSON: ``null``, ``true``, ``[..]``)."""
    out: dict[str, str] = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping) and value:
            out.update(flat_params(value, f"{name}."))
        else:
            out[name] = value if isinstance(value, str) else json.dumps(value)
    return out


def _chunks(items: list, size: int) -> Iterator[list]:
    for start in range(0, len(items), size):
        yield items[start:start + size]


class Trackers:
    """The run's open trackers (none on ranks other than 0); every method is a no-op without."""

    def __init__(self, trackers: list[Tracker], run_dir: Optional[Path] = None) -> None:
        self.trackers, self.run_dir = trackers, run_dir
        if trackers:
            atexit.register(self._end_failed)

    @classmethod
    def open(cls, cfg: TrainConfig, rank: int) -> "Trackers":
        """Start (or, with ``trackers.json``, resume) the enabled trackers' runs on rank 0."""
        sections = [(s, c) for s, c in ((WandbTracker, cfg.logging.wandb),
                                        (MLflowTracker, cfg.logging.mlflow)) if c.enabled]
        if rank != 0 or not sections:
            return cls([])
        run_dir = Path(cfg.logging.output_dir)
        run_dir.mkdir(parents=True, exist_ok=True)
        ids_file = run_dir / RUN_IDS_FILE
        ids = json.loads(ids_file.read_text()) if ids_file.is_file() else {}
        config = config_to_dict(cfg)
        opened = [kind(section, run_dir, config, ids.get(kind.name)) for kind, section in sections]
        ids.update({t.name: t.run_id for t in opened})
        ids_file.write_text(json.dumps(ids, indent=1) + "\n")
        for t in opened:
            log.info("%s: run %s", t.name, t.run_id)
        return cls(opened, run_dir)

    def __bool__(self) -> bool:
        return bool(self.trackers)

    def log_metrics(self, step: int, values: Mapping[str, float]) -> None:
        for t in self.trackers:
            t.log_metrics(step, values)

    def log_samples(self, step: int, rows: list[dict[str, Any]]) -> None:
        for t in self.trackers:
            t.log_samples(step, rows)

    def finish(self, run_dir: str | Path, status: str) -> None:
        """Upload :data:`ARTIFACTS` found in ``run_dir`` (a finished run only) and end each
        tracker run with ``status`` (one of :data:`STATUSES`); later calls do nothing."""
        if status not in STATUSES:
            raise ValueError(f"tracker status {status!r} must be one of {STATUSES}")
        found = [Path(run_dir) / n for n in ARTIFACTS if (Path(run_dir) / n).is_file()]
        artifacts = found if status == "finished" else []
        for t in self.trackers:
            t.finish(artifacts, status)
        self.trackers = []
        atexit.unregister(self._end_failed)

    def _end_failed(self) -> None:
        """At exit: end the runs a failed run left open."""
        if self.trackers:
            self.finish(self.run_dir, "failed")
