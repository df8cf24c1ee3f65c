"""Timing helpers shared by the benchmarks: one timed call, and runs interleaved so that a drift
of the machine slows every contender alike."""

from __future__ import annotations

import time
from typing import Any, Callable

import torch


def timed(fn: Callable[[], Any]) -> tuple[float, Any]:
    """(wall seconds, result) of ``fn()``; on a GPU the device is synchronised around it."""
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    out = fn()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return time.perf_counter() - t0, out


def interleaved(runs: dict[str, Callable[[], Any]], repeats: int) -> tuple[dict, dict]:
    """Each run ``repeats`` times, in turn: (seconds of every repeat per run, the first output
    per run)."""
    times: dict[str, list[float]] = {name: [] for name in runs}
    outs: dict[str, Any] = {}
    for _ in range(repeats):
        for name, fn in runs.items():
            seconds, result = timed(fn)
            times[name].append(seconds)
            outs.setdefault(name, result)
    return times, outs
