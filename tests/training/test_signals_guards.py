"""Preemption flag agreed across ranks; NaN/Inf guard agreed across ranks."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import pytest
import torch

from rspo_mega.training.guards import NonFiniteError, check_finite, grad_tensors
from rspo_mega.training.signals import (PREEMPTED_FILE_ENV, PREEMPTION_EXIT_CODE,
                                         PreemptionHandler, preemption_exit_code)
from tests.distributed import run_distributed


def _body(rank: int, world_size: int) -> dict:
    out: dict = {}
    previous = signal.getsignal(signal.SIGTERM)
    with PreemptionHandler() as handler:
        out["before"] = handler.should_stop()
        if rank == 1:
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(0.05)  # the handler runs between bytecodes of the main thread
        out["received"] = handler.received
        out["stop"] = handler.should_stop()
    out["restored"] = signal.getsignal(signal.SIGTERM) is previous

    finite = {"w": torch.ones(3), "b": torch.zeros(2)}
    out["ok"] = bool(check_finite(finite, step=5))
    bad = dict(finite)
    if rank == 1:
        bad["decoder.layers.0.mlp.weight"] = torch.tensor([1.0, float("nan"), float("inf")])
    result = check_finite(bad, step=6, policy="skip")
    out["skip_ok"] = bool(result)
    out["offenders"] = result.offenders
    try:
        check_finite(bad, step=7, policy="abort")
        out["abort"] = None
    except NonFiniteError as exc:
        out["abort"] = str(exc)
    return out


def test_preemption_and_nonfinite_agree_across_ranks() -> None:
    results = run_distributed(_body, world_size=2, timeout=90)
    for rank, res in enumerate(results):
        assert res["before"] is False
        assert res["received"] is (rank == 1)
        assert res["stop"] is True, f"rank {rank} did not see the stop"
        assert res["restored"]
        assert res["ok"] is True
        assert res["skip_ok"] is False
        assert res["offenders"] == [(1, "decoder.layers.0.mlp.weight", 1, 1)]
        assert "step 7" in res["abort"] and "rank(s) [1]" in res["abort"]
        assert "decoder.layers.0.mlp.weight" in res["abort"]


def test_preemption_single_process_usr1() -> None:
    previous = signal.getsignal(signal.SIGUSR1)
    with PreemptionHandler() as handler:
        assert not handler.should_stop()
        os.kill(os.getpid(), signal.SIGUSR1)
        time.sleep(0.05)
        assert handler.should_stop() and handler.signal_name == "SIGUSR1"
    assert signal.getsignal(signal.SIGUSR1) is previous


def test_check_finite_grads_single_process() -> None:
    model = torch.nn.Linear(3, 2)
    model(torch.ones(1, 3)).sum().backward()
    assert check_finite(grad_tensors(model), step=0)
    model.weight.grad[0, 0] = float("inf")
    res = check_finite(grad_tensors(model), step=1)
    assert not res and res.offenders == [(0, "weight", 0, 1)]
    with pytest.raises(NonFiniteError, match="weight"):
        check_finite(grad_tensors(model), step=1, policy="abort")
    with pytest.raises(ValueError):
        check_finite({}, step=0, policy="ignore")


def test_preemption_stop_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    stop = tmp_path / "stop-123"
    monkeypatch.setenv("RSPO_STOP_FILE", str(stop))
    with PreemptionHandler() as handler:
        assert not handler.should_stop()
        stop.touch()
        assert handler.should_stop() and handler.signal_name == "stop file"


def test_preemption_exit_code_and_marker(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Without a marker file the stopped run exits 143; with one, rank 0 writes the step into
    it and every rank exits 0; a marker that cannot be written makes rank 0 exit 143."""
    monkeypatch.delenv(PREEMPTED_FILE_ENV, raising=False)
    assert preemption_exit_code(7, rank=0) == PREEMPTION_EXIT_CODE == 143
    marker = tmp_path / "job.preempted"
    monkeypatch.setenv(PREEMPTED_FILE_ENV, str(marker))
    assert preemption_exit_code(7, rank=1) == 0 and not marker.exists()
    assert preemption_exit_code(7, rank=0) == 0
    assert marker.read_text() == "preempted at step 7\n" and list(tmp_path.iterdir()) == [marker]
    monkeypatch.setenv(PREEMPTED_FILE_ENV, str(tmp_path / "missing" / "job.preempted"))
    assert preemption_exit_code(7, rank=0) == PREEMPTION_EXIT_CODE
