"""Run metrics: ``metrics.jsonl`` + TensorBoard on rank 0, section timers, memory, plots.

    logger = MetricsLogger(cfg.logging.output_dir, tensorboard=cfg.logging.tensorboard)
    timers = Timers()
    with timers("rollout"):
        ...
    logger.log(step, {"reward": r, "loss": loss, **timers.elapsed(reset=True), **memory_stats()})

Every rank may call every method; ranks other than 0 do nothing. ``metrics.jsonl`` holds one JSON
object per logged step (``step``, wall ``time`` in seconds since the epoch, float metrics) and is
appended to, so a resumed run continues the same file; :meth:`MetricsLogger.rewind` first drops
what was logged after the step the run resumes from (and everything for a fresh start), so no
step appears twice. Each record also goes to the run's experiment trackers (``trackers``,
:mod:`rspo_mega.training.trackers`).
"""

from __future__ import annotations

import json
import math
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator, Mapping, Optional, Sequence

import torch
from rspo_mega.parallel.ranks import rank as global_rank

METRICS_FILE = "metrics.jsonl"
# Metrics measured on the wall clock or of the process's memory: they differ between two runs
# that compute the same numbers (a resumed run against an uninterrupted one).
WALL_CLOCK_KEYS = ("time", "step_seconds", "tokens_per_s", "tflops_per_device", "mfu")
WALL_CLOCK_PREFIXES = ("time/", "memory/", "throughput/")


def is_wall_clock(key: str) -> bool:
    """Whether metric ``key`` is a wall-clock or memory figure (see :data:`WALL_CLOCK_KEYS`)."""
    return key in WALL_CLOCK_KEYS or key.startswith(WALL_CLOCK_PREFIXES)
DEFAULT_PLOT_KEYS: tuple[str, ...] = (
    "reward", "accuracy", "loss", "relative_score_mean", "tokens_per_s",
)


def _to_float(value: Any) -> float:
    if isinstance(value, torch.Tensor):
        value = value.detach().float().cpu().item()
    return float(value)


class MetricsLogger:
    """Rank-0 metrics sink: JSON lines and optional TensorBoard scalars.

    Args:
        output_dir: run directory; ``metrics.jsonl`` and ``tensorboard/`` go there.
        tensorboard: write TensorBoard scalars (``torch.utils.tensorboard``).
        rank: this process's global rank (default: from ``torch.distributed``, else 0).
        trackers: experiment trackers that get every record too (``Trackers.log_metrics``).
    """

    def __init__(self, output_dir: str | Path, tensorboard: bool = True,
                 rank: Optional[int] = None, trackers: Any = None) -> None:
        self.rank = global_rank() if rank is None else rank
        self.trackers = trackers
        self.enabled = self.rank == 0
        self.output_dir = Path(output_dir)
        self.path = self.output_dir / METRICS_FILE
        self.tensorboard = tensorboard
        self._file = None
        self._writer = None
        if not self.enabled:
            return
        self.output_dir.mkdir(parents=True, exist_ok=True)
        self._open()

    def _open(self, purge_step: Optional[int] = None) -> None:
        self._file = open(self.path, "a", buffering=1)
        if self.tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self._writer = SummaryWriter(log_dir=str(self.output_dir / "tensorboard"),
                                         purge_step=purge_step)

    def rewind(self, step: int) -> None:
        """Start logging at ``step``: keep the records of steps up to it (none when it is 0, a
        fresh start) and hide later TensorBoard events (``purge_step``)."""
        if not self.enabled:
            return
        self.close()
        kept = [r for r in read_metrics(self.path) if step and r["step"] <= step] \
            if self.path.is_file() else []
        tmp = self.path.with_name(f".{self.path.name}.tmp")
        tmp.write_text("".join(json.dumps(r) + "\n" for r in kept))
        tmp.replace(self.path)
        self._open(purge_step=step + 1 if step else 0)

    def log(self, step: int, metrics: Mapping[str, Any]) -> None:
        """Record ``metrics`` (numbers or 0-d tensors) for ``step``; non-finite values are kept
        in the JSON as ``null`` so the line stays valid JSON."""
        if not self.enabled:
            return
        values = {k: _to_float(v) for k, v in metrics.items()}
        record = {"step": int(step), "time": time.time()}
        record.update({k: (v if math.isfinite(v) else None) for k, v in values.items()})
        self._file.write(json.dumps(record) + "\n")
        if self._writer is not None:
            for k, v in values.items():
                self._writer.add_scalar(k, v, global_step=int(step))
        if self.trackers:
            self.trackers.log_metrics(int(step), values)

    def flush(self) -> None:
        if self._file is not None:
            self._file.flush()
        if self._writer is not None:
            self._writer.flush()

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
        if self._writer is not None:
            self._writer.close()
            self._writer = None

    def __enter__(self) -> "MetricsLogger":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


class Timers:
    """Wall-clock seconds per named section, accumulated until read with ``reset=True``.

    ``synchronize=True`` waits for queued CUDA work at section boundaries so GPU time is
    attributed to the right section (costs a sync; off by default).
    """

    def __init__(self, synchronize: bool = False) -> None:
        self.synchronize = synchronize and torch.cuda.is_available()
        self._totals: dict[str, float] = {}

    @contextmanager
    def __call__(self, name: str) -> Iterator[None]:
        if self.synchronize:
            torch.cuda.synchronize()
        start = time.perf_counter()
        try:
            yield
        finally:
            if self.synchronize:
                torch.cuda.synchronize()
            self._totals[name] = self._totals.get(name, 0.0) + time.perf_counter() - start

    def elapsed(self, reset: bool = False, prefix: str = "time/") -> dict[str, float]:
        """``{prefix + section: seconds}``; ``reset`` starts every section from zero."""
        out = {f"{prefix}{k}": v for k, v in self._totals.items()}
        if reset:
            self._totals.clear()
        return out


def memory_stats(prefix: str = "memory/") -> dict[str, float]:
    """Resident set size of this process (GiB) and, with CUDA, peak allocated memory (GiB)."""
    import psutil

    out = {f"{prefix}rss_gib": psutil.Process().memory_info().rss / 2**30}
    if torch.cuda.is_available():
        out[f"{prefix}cuda_max_allocated_gib"] = torch.cuda.max_memory_allocated() / 2**30
    return out


def read_metrics(jsonl_path: str | Path) -> list[dict[str, Any]]:
    """Records of a ``metrics.jsonl`` (a torn last line from a killed run is skipped)."""
    records = []
    for line in Path(jsonl_path).read_text().splitlines():
        line = line.strip()
        if not line:
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return records


def plot_metrics(
    jsonl_path: str | Path, out_png: str | Path, keys: Sequence[str] = DEFAULT_PLOT_KEYS
) -> list[str]:
    """One panel per metric in ``keys`` (against step) into ``out_png``; returns the keys
    plotted. Keys absent from the file are skipped; raises ``ValueError`` if none is present."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = read_metrics(jsonl_path)
    present = [k for k in keys if any(r.get(k) is not None for r in records)]
    if not present:
        raise ValueError(f"none of {list(keys)} appear in {jsonl_path}")
    fig, axes = plt.subplots(len(present), 1, figsize=(7, 2.4 * len(present)), sharex=True,
                             squeeze=False)
    for ax, key in zip(axes[:, 0], present):
        pts = [(r["step"], r[key]) for r in records if r.get(key) is not None]
        ax.plot([s for s, _ in pts], [v for _, v in pts], marker="." if len(pts) < 50 else None)
        ax.set_ylabel(key)
        ax.grid(alpha=0.3)
    axes[-1, 0].set_xlabel("step")
    fig.suptitle(Path(jsonl_path).parent.name or str(jsonl_path))
    fig.tight_layout()
    Path(out_png).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out_png, dpi=110)
    plt.close(fig)
    return present
