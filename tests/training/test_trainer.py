"""The trainer end to end: layout-independent SFT and RL curves, RL from an SFT run, bad input
and old checkpoints named before training."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from rspo_mega.config import ConfigError
from rspo_mega.setup import load_run_config, validate_run
from tests.distributed import run_distributed

# A tiny run: 1 RSPO step, 4 prompts x G=2 (with SFT, 1 step of 8 examples).
TINY = [
    "model.num_layers=4", "model.hidden_size=64", "model.ffn_hidden_size=128",
    "model.num_attention_heads=4", "model.num_query_groups=2",
    "train_steps=1", "global_batch_size=8", "rollout.group_size=2", "rollout.gen_length=32",
    "rollout.block_length=16", "rollout.steps=8",
    "rollout.temperature=1.0", "rollout.stop_on_eos_block=false",
    "likelihood.mc_samples=1", "likelihood.micro_batch_size=4",
    "data.num_train_examples=64", "data.num_test_examples=0", "optimizer.lr=1e-3",
    "logging.tensorboard=false", "logging.progress_bar=false",
    "checkpoint.save_dir=null", "checkpoint.export_hf=null",  # tests that save set their own
]
SFT = ["algorithm.name=sft"]  # TINY's likelihood (coupled, own masks) is an SFT run's


def _curve(run_dir: str) -> list[tuple]:
    lines = [json.loads(x) for x in Path(run_dir, "metrics.jsonl").read_text().splitlines()]
    return [(d["step"], d["loss"], d.get("reward")) for d in lines if "loss" in d]


def _init_checkpoint(rank: int, world: int, out: str) -> None:
    """Weights every layout starts from (megatron initialises PP stages with different seeds)."""
    from rspo_mega.models.llada import build_llada_model, save_model
    from rspo_mega.parallel import initialize_model_parallel

    cfg = load_run_config(None, TINY)
    initialize_model_parallel(seed=5)
    save_model(build_llada_model(cfg.model), out)


def _train(rank: int, world: int, out: str, init: str, layouts: list[tuple[int, int]]) -> dict:
    """Per layout: a 2-step SFT run from ``init``, then a 1-step RL run from its save_dir."""
    from rspo_mega.training.trainer import Trainer

    losses = {}
    for tp, pp in layouts:
        run_dir = f"{out}/tp{tp}pp{pp}"
        layout = [f"parallel.tp={tp}", f"parallel.pp={pp}"]
        sft = load_run_config(None, TINY + SFT + layout + [
            "train_steps=2", f"checkpoint.init_from={init}", f"logging.output_dir={run_dir}/sft",
            f"checkpoint.save_dir={run_dir}/sft/ckpt"])
        Trainer(sft, validate_run(sft, world_size=world)).run()
        cfg = load_run_config(None, TINY + layout + [f"checkpoint.init_from={run_dir}/sft/ckpt",
                                                 f"logging.output_dir={run_dir}/rl"])
        trainer = Trainer(cfg, validate_run(cfg, world_size=world))
        trainer.run()
        samples: list = []  # greedy completions of 5 examples, gathered from the DP shards
        examples = [e.example for e in trainer.data.train[:5]]
        trainer.evaluator.evaluate(examples, samples=samples)
        if rank == 0:
            losses[(tp, pp)] = _curve(f"{run_dir}/sft") + _curve(f"{run_dir}/rl")
            losses[(tp, pp, "samples")] = samples
            losses[(tp, pp, "uids")] = [ex.uid for ex in examples]
    return losses


def test_loss_curve_is_the_same_for_every_layout(tmp_path):
    init = str(tmp_path / "init")
    run_distributed(_init_checkpoint, 1, args=(init,), timeout=120)
    single = run_distributed(_train, 1, args=(str(tmp_path / "w1"), init, [(1, 1)]), timeout=300)
    base = single[0][(1, 1)]
    assert [s for s, _, _ in base] == [1, 2, 1]  # SFT steps 1-2, then RL step 1
    layouts = [(2, 2), (2, 1), (1, 2)]  # DP1, DP2, DP2 on 4 ranks
    multi = run_distributed(_train, 4, args=(str(tmp_path / "w4"), init, layouts), timeout=600)
    for layout in layouts:
        curve = multi[0][layout]
        assert [s for s, _, _ in curve] == [1, 2, 1], layout
        for (_, loss, reward), (_, base_loss, base_reward) in zip(curve, base):
            assert math.isclose(loss, base_loss, rel_tol=1e-4, abs_tol=1e-6), (layout, loss, base_loss)
            assert reward == base_reward, layout  # identical completions, identical rewards
        samples = multi[0][layout + ("samples",)]
        assert [r["uid"] for r in samples] == multi[0][layout + ("uids",)], layout
        assert samples == single[0][(1, 1, "samples")], layout


def test_bad_input_is_named_before_training(tmp_path):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    cfg = load_run_config(None, TINY + ["data.task=gsm8k", f"data.train_path={empty}",
                                    f"logging.output_dir={tmp_path / 'o'}"])
    from rspo_mega.training.run_data import prepare_run_data

    with pytest.raises(Exception) as err:
        prepare_run_data(cfg)
    assert "empty" in str(err.value) and str(empty) in str(err.value)
    with pytest.raises(ConfigError, match="parallel.world_size=2 but the job was launched with WORLD_SIZE=1"):
        validate_run(load_run_config(None, ["parallel.world_size=2"]), world_size=1)


def test_non_finite_reward_is_named():
    from rspo_mega.data import Example
    from rspo_mega.training.completion_batches import score

    class NaNTask:
        name = "nan_task"

        def reward(self, text, example):
            return float("nan")

    with pytest.raises(ValueError, match="task 'nan_task' returned a non-finite reward nan for uid 7"):
        score(NaNTask(), ["x"], [Example(7, "p", "a", "nan_task", {})])


def test_too_long_prompts_are_reported_at_once():
    from rspo_mega.data import Example
    from rspo_mega.tasks.prompts import encode_prompts

    class Tok:
        special_ids = {}

        def encode(self, text):
            return list(range(len(text)))

    from rspo_mega.data.templates import get_template
    from rspo_mega.tasks import get_task

    task = get_task("sudoku")
    examples = [Example(i, "x" * (5 + 10 * i), "a", "sudoku", {}) for i in range(3)]
    with pytest.raises(ValueError, match=r"2 of 3 sudoku prompts exceed data.max_prompt_length=10"):
        encode_prompts(examples, task, get_template("plain"), Tok(), 10)


def _rl_from_sft(rank: int, world: int, out: str) -> dict:
    """A 1-step SFT run, then an RL run from its save_dir (weights only) and one resuming it."""
    from rspo_mega.errors import CheckpointError
    from rspo_mega.training.trainer import Trainer

    sft = load_run_config(None, TINY + SFT + [f"logging.output_dir={out}/sft",
                                          f"checkpoint.save_dir={out}/sft/ckpt"])
    sft_trainer = Trainer(sft, validate_run(sft, world_size=world))
    sft_trainer.run()
    trained = [p.detach().clone() for c in sft_trainer.policy.model for p in c.parameters()]
    rl = load_run_config(None, TINY + [f"checkpoint.init_from={out}/sft/ckpt",
                                   f"logging.output_dir={out}/rl"])
    trainer = Trainer(rl, validate_run(rl, world_size=world))
    start = [p.detach() for c in trainer.policy.model for p in c.parameters()]
    adam = [s for s in trainer.policy.optimizer.optimizer.state.values() if "exp_avg" in s]
    trainer.run()
    wrong = load_run_config(None, TINY + [f"checkpoint.save_dir={out}/sft/ckpt",
                                      f"logging.output_dir={out}/wrong"])
    try:
        Trainer(wrong, validate_run(wrong, world_size=world)).resume()
        refused = ""
    except CheckpointError as err:
        refused = str(err)
    return {"same_weights": all(torch.equal(a, b) for a, b in zip(trained, start)),
            "adam_states": len(adam), "step": trainer.step, "refused": refused,
            "has_reference": trainer.policy.reference is not None}


def test_rl_starts_from_an_sft_run_with_its_weights_only(tmp_path):
    got = run_distributed(_rl_from_sft, 1, args=(str(tmp_path),), timeout=300)[0]
    assert got["same_weights"] and got["adam_states"] == 0  # fresh optimizer state
    assert got["step"] == 1 and got["has_reference"]
    assert "was saved by an SFT (algorithm.name=sft) run and this is an RL run" in got["refused"]
    assert f"checkpoint.init_from={tmp_path}/sft/ckpt/iter_0000001" in got["refused"]


class _RecordingEngine:
    """A rollout engine that records the keyword arguments and rollout of each ``generate``."""

    def __init__(self, engine) -> None:
        self.engine, self.calls = engine, []

    def __getattr__(self, name: str):
        return getattr(self.engine, name)

    def generate(self, *args, **kwargs):
        rollout = self.engine.generate(*args, **kwargs)
        self.calls.append((kwargs, rollout))
        return rollout


def _evaluate_recorded(trainer) -> list[tuple[dict, object]]:
    """The ``generate`` calls of an evaluation like the trainer's (its engine, data, steps)."""
    from rspo_mega.training.evaluator import Evaluator

    engine = _RecordingEngine(trainer.evaluator.engine)
    Evaluator(engine, trainer.data, trainer.evaluator.steps).evaluate()
    return engine.calls


def _eval_denoising_steps(rank: int, world: int, out: str, overrides: list[str]) -> int:
    """Denoising steps the evaluation's decoding ran (the max over its rows)."""
    from rspo_mega.training.trainer import Trainer

    cfg = load_run_config(None, TINY + [f"logging.output_dir={out}", "data.num_test_examples=4"]
                      + overrides)
    trainer = Trainer(cfg, validate_run(cfg, world_size=world))
    return max(int(rollout.steps_used.max()) for _, rollout in _evaluate_recorded(trainer))


@pytest.mark.parametrize("overrides, steps", [([], 8), (["rollout.eval_steps=2"], 2)])
def test_evaluation_decodes_with_rollout_eval_steps(tmp_path, overrides, steps):
    used = run_distributed(_eval_denoising_steps, 1, args=(str(tmp_path / "run"), overrides),
                           timeout=300)[0]
    assert used == steps


def _cached_step(rank: int, world: int, out: str) -> tuple[dict, list[str], dict]:
    """Metrics of one RL step with rollout.cache=dual, threshold decoding, every cached step
    checked and the guard on; the cache modes the evaluation's decoding ran with; the batches'
    checkpoint state."""
    from rspo_mega.training.trainer import Trainer

    cfg = load_run_config(None, TINY + [f"logging.output_dir={out}",
                                    "data.num_test_examples=4", "rollout.cache=dual",
                                    "rollout.cache_check_rate=1.0",
                                    "rollout.cache_refresh_interval=2",
                                    "rollout.confidence_threshold=0.5", "model.init_method_std=0.5",
                                    "rollout.guard.enabled=true"])
    trainer = Trainer(cfg, validate_run(cfg, world_size=world))
    trainer.start_rl()
    metrics = trainer.train_step()
    modes = [kwargs.get("cache") for kwargs, _ in _evaluate_recorded(trainer)]
    return metrics, modes, trainer.batches.state_dict()


def test_cached_rollouts_log_their_check_and_the_guard_and_evaluation_stays_exact(tmp_path):
    metrics, modes, state = run_distributed(_cached_step, 1, args=(str(tmp_path / "run"),),
                                            timeout=300)[0]
    assert 0 <= metrics["cache_token_mismatch"] <= 1
    assert metrics["cache_confidence_diff"] >= 0
    assert 0 <= metrics["cache_confident_mismatch"] <= 1
    # the step ran with the configured settings; the guard's next ones are checkpointed
    assert metrics["guard/refresh_interval"] == 2 and metrics["guard/threshold"] == 0.5
    assert state["rollout_guard"]["refresh_interval"] in (1, 2, 4)
    assert modes and set(modes) == {"none"}


def _mask_draws(rank: int, world: int, out: str, fresh: bool) -> tuple[list, int]:
    """(iteration, update) of every mask draw and the reference scorings of one RL step, mu=2."""
    from rspo_mega.training.metrics import Timers
    from rspo_mega.training.trainer import Trainer
    from rspo_mega.models.llada import llada_forward
    from rspo_mega.training.update_loop import UpdateLoop

    cfg = load_run_config(None, TINY + [f"logging.output_dir={out}",
                                    "algorithm.inner_updates=2",
                                    f"likelihood.fresh_masks_per_update={fresh}"])
    trainer = Trainer(cfg, validate_run(cfg, world_size=world))
    trainer.start_rl()
    draws, scorings = [], []
    masks, reference = trainer.updates.masks, trainer.policy.reference

    class RecordingMasks:
        def sample(self, batch, iteration, update=0):
            draws.append((iteration, update))
            return masks.sample(batch, iteration, update)

    class RecordingReference:
        def logprobs(self, runner, masked):
            scorings.append(masked.input_ids.clone())
            return reference.logprobs(runner, masked)

    loop = UpdateLoop(trainer.policy, cfg, RecordingMasks(), llada_forward,
                      trainer.updates.updates_per_step)
    batch = trainer.batches.next_batch(trainer.step, Timers())
    loop.run(batch, trainer.step, Timers(), reference=RecordingReference())
    distinct = len({tuple(ids.flatten().tolist()) for ids in scorings})
    return draws, len(scorings), distinct


@pytest.mark.parametrize("fresh", [False, True])
def test_fresh_masks_per_update_rescore_the_reference(tmp_path, fresh):
    draws, scorings, distinct = run_distributed(
        _mask_draws, 1, args=(str(tmp_path / "run"), fresh), timeout=300)[0]
    if fresh:  # a new draw per inner update, each scored by the reference
        assert draws == [(0, 0), (0, 1)] and scorings == 2 and distinct == 2
    else:  # both updates reuse the step's masks and reference log-probs
        assert draws == [(0, 0)] and scorings == 1


def _as_warm_up_checkpoint(ckpt: Path, step: int, warmup: int) -> None:
    """Rewrite the checkpoint ``ckpt`` into the state of a run that began with ``warmup`` SFT
    steps inside it and saved at ``step``: ``warmup_steps`` and both phases' data positions and
    mask states in its per-rank file, ``sft_warmup_steps`` in its config; checksums updated."""
    from rspo_mega.training.checkpoint.files import sha256_file

    rank_file = ckpt / "extra" / "rank_00000.pt"
    extra = torch.load(rank_file, weights_only=True)
    extra.update(step=step, warmup_steps=warmup, sft_iterator=extra["rl_iterator"],
                 sft_masks=extra["masks"])
    torch.save(extra, rank_file)
    meta = json.loads((ckpt / "metadata.json").read_text())
    meta["config"]["sft_warmup_steps"] = warmup
    meta["files"]["extra/rank_00000.pt"] = {"size": rank_file.stat().st_size,
                                            "sha256": sha256_file(rank_file)}
    (ckpt / "metadata.json").write_text(json.dumps(meta))


def _resume_warm_up(rank: int, world: int, out: str, cases: list[tuple[int, int]]) -> list:
    """Resume a copy of a 1-step RL checkpoint rewritten per (step, warmup) case: the step
    resumed at, or the error."""
    import shutil

    from rspo_mega.errors import CheckpointError
    from rspo_mega.training.trainer import Trainer

    cfg = load_run_config(None, TINY + [f"logging.output_dir={out}", f"checkpoint.save_dir={out}/ckpt"])
    Trainer(cfg, validate_run(cfg, world_size=world)).run()
    got = []
    for i, (step, warmup) in enumerate(cases):
        save_dir = Path(out, f"case{i}")
        shutil.copytree(Path(out, "ckpt"), save_dir)
        _as_warm_up_checkpoint(save_dir / "iter_0000001", step, warmup)
        again = load_run_config(None, TINY + [f"logging.output_dir={out}",
                                          f"checkpoint.save_dir={save_dir}", "train_steps=9"])
        trainer = Trainer(again, validate_run(again, world_size=world))
        try:
            got.append(trainer.step if trainer.resume() else None)
        except CheckpointError as err:
            got.append(str(err))
    return got


def test_checkpoints_of_runs_with_an_in_run_warm_up_get_a_clear_message(tmp_path):
    cases = [(1, 0), (2, 5), (7, 5)]  # no warm-up; saved inside it; 2 RL steps after it
    no_warmup, inside, after = run_distributed(_resume_warm_up, 1, args=(str(tmp_path),
                                                                          cases), timeout=300)[0]
    assert no_warmup == 1
    for case, message in ((1, inside), (2, after)):
        ckpt = tmp_path / f"case{case}" / "iter_0000001"
        assert (f"checkpoint {ckpt} comes from a run that began with 5 SFT steps inside it "
                "(sft_warmup_steps): its step count mixes SFT and RL steps") in message
        assert f"checkpoint.init_from={ckpt} and a new checkpoint.save_dir" in message


def _logged_lrs(rank: int, world: int, out: str, overrides: list[str]) -> list[float]:
    """The ``lr`` of every logged step of a 4-step SFT run."""
    from rspo_mega.training.trainer import Trainer

    cfg = load_run_config(None, TINY + SFT + ["train_steps=4", f"logging.output_dir={out}"] + overrides)
    Trainer(cfg, validate_run(cfg, world_size=world)).run()
    rows = [json.loads(x) for x in Path(out, "metrics.jsonl").read_text().splitlines()]
    return [d["lr"] for d in rows if "lr" in d]


def test_the_learning_rate_comes_from_the_schedule(tmp_path):
    # linear warm-up over 2 updates to optimizer.lr=1e-3, then linear decay to min_lr over the
    # 4 updates of the run; each step logs the rate set for its next update
    lrs = run_distributed(_logged_lrs, 1, args=(str(tmp_path / "run"), [
        "optimizer.warmup_steps=2", "optimizer.decay_style=linear", "optimizer.min_lr=1e-4"]),
        timeout=300)[0]
    expected = [5e-4, 1e-3, 1e-3 - 0.9e-3 / 2, 1e-4]
    assert len(lrs) == 4, lrs
    assert all(math.isclose(a, b, rel_tol=1e-6) for a, b in zip(lrs, expected)), lrs
