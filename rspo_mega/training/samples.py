"""Samples in the logs: every ``logging.sample_interval`` RL steps, the first
:data:`SAMPLES_PER_LOG` prompts of rank 0's batch, each with its first completion, that
completion's reward and advantage.

They go to ``<output_dir>/samples.jsonl`` (one JSON object per sample: ``step``, ``uid``,
``prompt``, ``completion``, ``reward``, ``advantage``), to the trackers' sample table
(:mod:`rspo_mega.training.trackers`) and, the first of them shortened, as one console line::

    samples of step 50 (runs/x/samples.jsonl): reward 1.00, advantage +0.75: '3.1. ..4. ...' -> '<answer> 3214...'
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from rspo_mega.training.run_data import RunData
from rspo_mega.training.batch_sources import StepBatch
from rspo_mega.training.trackers import Trackers

log = logging.getLogger(__name__)

SAMPLES_FILE = "samples.jsonl"
SAMPLES_PER_LOG = 4  # prompts per logged step, each with its first completion
CONSOLE_CHARS = 60  # of the prompt and of the completion on the console line


def shorten(text: str, width: int = CONSOLE_CHARS) -> str:
    """``text`` on one line (whitespace runs -> one space), cut to ``width`` characters."""
    flat = " ".join(text.split())
    return flat if len(flat) <= width else flat[:width - 3] + "..."


class SampleLog:
    """Rank 0's sample writer (other ranks, and ``sample_interval=0``, write nothing)."""

    def __init__(self, output_dir: str | Path, interval: int, group_size: int, data: RunData,
                 trackers: Trackers, rank: int) -> None:
        self.interval, self.group_size = interval, group_size
        self.data, self.trackers = data, trackers
        self.enabled = rank == 0 and interval > 0
        self.path = Path(output_dir) / SAMPLES_FILE

    def rewind(self, step: int) -> None:
        """Keep the samples of steps up to ``step`` (none for a fresh start, step 0), as
        ``metrics.jsonl`` is rewound when a run resumes."""
        if not self.enabled or not self.path.is_file():
            return
        kept = [line for line in self.path.read_text().splitlines(keepends=True)
                if step and json.loads(line)["step"] <= step]
        tmp = self.path.with_name(f".{self.path.name}.tmp")
        tmp.write_text("".join(kept))
        tmp.replace(self.path)

    def rows(self, step: int, batch: StepBatch) -> list[dict[str, Any]]:
        """The samples of ``step``: the first completion of each of the first prompts."""
        texts = batch.texts
        firsts = range(0, min(len(texts.completions), SAMPLES_PER_LOG * self.group_size),
                       self.group_size)
        return [{"step": step, "uid": int(batch.completions.uids[i]),
                 "prompt": self.data.prompt_message(texts.examples[i]),
                 "completion": texts.completions[i], "reward": float(texts.rewards[i]),
                 "advantage": float(batch.advantages[i])} for i in firsts]

    def log(self, step: int, batch: StepBatch) -> None:
        """Write the samples of ``step`` when ``sample_interval`` divides it."""
        if not self.enabled or step % self.interval or batch.texts is None:
            return
        rows = self.rows(step, batch)
        with open(self.path, "a") as f:
            f.writelines(json.dumps(row) + "\n" for row in rows)
        self.trackers.log_samples(step, rows)
        first = rows[0]
        log.info("samples of step %d (%s): reward %.2f, advantage %+.2f: %r -> %r", step,
                 self.path, first["reward"], first["advantage"], shorten(first["prompt"]),
                 shorten(first["completion"]))
