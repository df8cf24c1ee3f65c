"""``parallel.sequence_parallel``: it reaches the model's TransformerConfig, sequences are padded
to a multiple of TP, the planner's activations follow it, and the machines without the TE layer
spec refuse it (a launch on a CPU, a plan for CPUs) with one line naming the key."""

from __future__ import annotations

import pytest
import torch

from rspo_mega.config import ConfigError
from rspo_mega.setup import load_run_config, validate_run
from rspo_mega.plan import Hardware, plan_run
from rspo_mega.rollout.sampler import left_pad
from tests.distributed import run_distributed
from tests.test_plan import SMALL, TWO_GPUS
from tests.training.test_launch import OWN_MODEL
from tests.training.test_trainer import TINY

SP = ["parallel.sequence_parallel=true"]


def _build_with_sequence_parallel(rank: int, world: int) -> str:
    """The error transformer_config raises on a CPU for a model built with sequence
    parallelism: proof that build_chunks passed the flag down."""
    from rspo_mega.parallel import initialize_model_parallel
    from rspo_mega.training.builder import build_chunks

    initialize_model_parallel(tp=2)
    cfg = load_run_config(None, TINY + ["parallel.tp=2", *SP])
    try:
        build_chunks(cfg)
    except ValueError as err:
        return str(err)
    return "built"


def test_the_flag_reaches_the_model():
    errors = run_distributed(_build_with_sequence_parallel, world_size=2, timeout=120)
    assert errors == ["sequence_parallel needs the transformer_engine implementation on a GPU"] * 2


def test_sequences_are_padded_to_a_multiple_of_tp():
    ids, lengths = left_pad([[5, 6, 7], [8]], pad_id=0, multiple=2)
    assert ids.tolist() == [[0, 5, 6, 7], [0, 0, 0, 8]] and lengths.tolist() == [3, 1]
    ids, _ = left_pad([[5, 6, 7], [8]], pad_id=0, multiple=4)
    assert ids.shape == (2, 4)
    assert left_pad([[5, 6, 7]], pad_id=0)[0].shape == (1, 3)
    cfg = load_run_config(None, TINY + ["parallel.tp=2", *SP])
    assert cfg.parallel.sequence_multiple == 2
    assert load_run_config(None, TINY + ["parallel.tp=2"]).parallel.sequence_multiple == 1
    with pytest.raises(ConfigError, match=r"rollout.gen_length=33 must be a multiple of it"):
        validate_run(load_run_config(None, TINY + ["parallel.tp=2", *SP, "rollout.gen_length=33",
                                                  "rollout.block_length=33"]), world_size=2)


def test_the_plan_divides_activations_by_tp_and_a_cpu_plan_refuses():
    gpu, sp = plan_run(load_run_config(None, SMALL), TWO_GPUS), plan_run(load_run_config(None, SMALL + SP),
                                                                      TWO_GPUS)
    assert sp.shapes.sequence_parallel and not gpu.shapes.sequence_parallel
    assert sp.stages[0].peak_phase()[1] < gpu.stages[0].peak_phase()[1]
    cpus = Hardware(kind="cpu", gpus_per_node=2, memory_gib=64.0)
    with pytest.raises(ConfigError, match=r"^parallel.sequence_parallel=true needs the "
                                          r"Transformer Engine layer spec on GPUs; with a machine "
                                          r"without Transformer Engine and a GPU"):
        plan_run(load_run_config(None, SMALL + SP), cpus)


def test_a_launch_on_a_cpu_refuses_it_in_one_line(monkeypatch, capsys, tmp_path):
    from rspo_mega.train import main

    monkeypatch.setenv("WORLD_SIZE", "2")  # as torchrun --nproc-per-node 2 sets it
    args = TINY + OWN_MODEL + ["parallel.tp=2", *SP, f"logging.output_dir={tmp_path}"]
    assert main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["rspo-train: config error: parallel.sequence_parallel=true needs the "
                   "Transformer Engine layer spec on GPUs; with a machine without Transformer "
                   "Engine and a GPU the run takes the local spec, which has none: set "
                   "parallel.sequence_parallel=false"], err
    assert not (tmp_path / "config.yaml").exists()
    assert not torch.distributed.is_initialized()
