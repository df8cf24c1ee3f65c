"""Samples in the logs: which rows, when, the console line, and the file rewound on resume. (A
real run's samples under torchrun, and in the trackers, are checked in ``test_trackers.py``.)"""

from __future__ import annotations

import json
import logging
from types import SimpleNamespace

import torch

from rspo_mega.data import Example
from rspo_mega.training.samples import SAMPLES_FILE, SampleLog
from rspo_mega.training.batch_sources import RolloutTexts, StepBatch
from rspo_mega.training.trackers import Trackers


class _Data:
    def prompt_message(self, example: Example) -> str:
        return f"solve {example.prompt}"


def _batch(prompts: int, group: int) -> StepBatch:
    rows = prompts * group
    examples = [Example(100 + i // group, f"p{i // group}", "a", "t", {}) for i in range(rows)]
    texts = RolloutTexts(examples, [f"<answer>{i}</answer>" for i in range(rows)],
                         torch.arange(rows, dtype=torch.float32) / rows)
    completions = SimpleNamespace(uids=torch.tensor([e.uid for e in examples]))
    return StepBatch(completions, torch.linspace(-1, 1, rows), prompts, {}, texts)


class _Tables(Trackers):
    def __init__(self) -> None:
        super().__init__([])
        self.tables: list = []

    def log_samples(self, step, rows):
        self.tables.append((step, rows))


def test_every_interval_the_first_completion_of_the_first_prompts(tmp_path, caplog):
    trackers = _Tables()
    samples = SampleLog(tmp_path, 2, 3, _Data(), trackers, rank=0)
    batch = _batch(prompts=6, group=3)
    with caplog.at_level(logging.INFO, logger="rspo_mega.training.samples"):
        for step in (1, 2, 3, 4):
            samples.log(step, batch)
    rows = [json.loads(x) for x in (tmp_path / SAMPLES_FILE).read_text().splitlines()]
    assert [r["step"] for r in rows] == [2] * 4 + [4] * 4
    first = rows[:4]
    assert [r["uid"] for r in first] == [100, 101, 102, 103]
    assert [r["completion"] for r in first] == [f"<answer>{i}</answer>" for i in (0, 3, 6, 9)]
    assert [r["prompt"] for r in first] == ["solve p0", "solve p1", "solve p2", "solve p3"]
    assert [r["reward"] for r in first] == [float(batch.texts.rewards[i]) for i in (0, 3, 6, 9)]
    assert [r["advantage"] for r in first] == [float(batch.advantages[i]) for i in (0, 3, 6, 9)]
    assert [step for step, _ in trackers.tables] == [2, 4] and trackers.tables[0][1] == first
    lines = [r.getMessage() for r in caplog.records]
    assert lines == [f"samples of step {s} ({tmp_path / SAMPLES_FILE}): reward 0.00, advantage "
                     f"-1.00: 'solve p0' -> '<answer>0</answer>'" for s in (2, 4)]


def test_other_ranks_and_interval_0_write_nothing_and_resume_rewinds(tmp_path):
    batch = _batch(prompts=2, group=2)
    SampleLog(tmp_path, 1, 2, _Data(), Trackers([]), rank=1).log(1, batch)
    SampleLog(tmp_path, 0, 2, _Data(), Trackers([]), rank=0).log(1, batch)
    assert not (tmp_path / SAMPLES_FILE).exists()
    samples = SampleLog(tmp_path, 1, 2, _Data(), Trackers([]), rank=0)
    for step in (1, 2, 3):
        samples.log(step, batch)
    samples.rewind(2)  # resumed from the checkpoint of step 2: step 3 runs again
    assert [json.loads(x)["step"] for x in (tmp_path / SAMPLES_FILE).read_text().splitlines()] \
        == [1, 1, 2, 2]
    samples.rewind(0)  # a fresh start in the same directory
    assert (tmp_path / SAMPLES_FILE).read_text() == ""
