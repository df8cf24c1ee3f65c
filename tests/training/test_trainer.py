"""The RL trainer end to end: layout-independent loss curves, bad input named before training."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from rspo_mega.config import ConfigError, load_config, validate_config
from tests.distributed import run_distributed

# A tiny run: 1 SFT warm-up step then 1 RSPO step (so both phases are covered), 4 prompts x G=2.
TINY = [
    "model.num_layers=4", "model.hidden_size=64", "model.ffn_hidden_size=128",
    "model.num_attention_heads=4", "model.num_query_groups=2",
    "sft_warmup_steps=1", "train_steps=1", "global_batch_size=8", "micro_batch_size=2",
    "rollout.group_size=2", "rollout.gen_length=32", "rollout.block_length=16", "rollout.steps=8",
    "rollout.temperature=1.0", "rollout.stop_on_eos_block=false",
    "likelihood.mc_samples=1", "likelihood.micro_batch_size=4",
    "data.num_train_examples=64", "data.num_test_examples=0", "optimizer.lr=1e-3",
    "logging.tensorboard=false", "logging.progress_bar=false",
]


def _init_checkpoint(rank: int, world: int, out: str) -> None:
    """Weights every layout starts from (megatron initialises PP stages with different seeds)."""
    from rspo_mega.models.llada import build_llada_model, save_model
    from rspo_mega.parallel import initialize_model_parallel

    cfg = load_config(None, TINY)
    initialize_model_parallel(seed=5)
    save_model(build_llada_model(cfg.model), out)


def _train(rank: int, world: int, out: str, init: str, layouts: list[tuple[int, int]]) -> dict:
    from rspo_mega.training.trainer import Trainer

    losses = {}
    for tp, pp in layouts:
        run_dir = f"{out}/tp{tp}pp{pp}"
        cfg = load_config(None, TINY + [f"parallel.tp={tp}", f"parallel.pp={pp}",
                                        f"checkpoint.init_from={init}",
                                        f"logging.output_dir={run_dir}"])
        trainer = Trainer(cfg, validate_config(cfg, world_size=world))
        trainer.run()
        samples: list = []  # greedy completions of 5 examples, gathered from the DP shards
        examples = [e.example for e in trainer.data.train[:5]]
        trainer.evaluate(examples, samples=samples)
        if rank == 0:
            lines = [json.loads(x) for x in Path(run_dir, "metrics.jsonl").read_text().splitlines()]
            losses[(tp, pp)] = [(d["step"], d["loss"], d.get("reward")) for d in lines if "loss" in d]
            losses[(tp, pp, "samples")] = samples
            losses[(tp, pp, "uids")] = [ex.uid for ex in examples]
    return losses


def test_loss_curve_is_the_same_for_every_layout(tmp_path):
    init = str(tmp_path / "init")
    run_distributed(_init_checkpoint, 1, args=(init,), timeout=120)
    single = run_distributed(_train, 1, args=(str(tmp_path / "w1"), init, [(1, 1)]), timeout=300)
    base = single[0][(1, 1)]
    assert [s for s, _, _ in base] == [1, 2]
    layouts = [(2, 2), (2, 1), (1, 2)]  # DP1, DP2, DP2 on 4 ranks
    multi = run_distributed(_train, 4, args=(str(tmp_path / "w4"), init, layouts), timeout=600)
    for layout in layouts:
        curve = multi[0][layout]
        assert [s for s, _, _ in curve] == [1, 2], layout
        for (_, loss, reward), (_, base_loss, base_reward) in zip(curve, base):
            assert math.isclose(loss, base_loss, rel_tol=1e-4, abs_tol=1e-6), (layout, loss, base_loss)
            assert reward == base_reward, layout  # identical completions, identical rewards
        samples = multi[0][layout + ("samples",)]
        assert [r["uid"] for r in samples] == multi[0][layout + ("uids",)], layout
        assert samples == single[0][(1, 1, "samples")], layout


def test_bad_input_is_named_before_training(tmp_path):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    cfg = load_config(None, TINY + ["data.task=gsm8k", f"data.train_path={empty}",
                                    f"logging.output_dir={tmp_path / 'o'}"])
    from rspo_mega.training.run_data import prepare_run_data

    with pytest.raises(Exception) as err:
        prepare_run_data(cfg)
    assert "empty" in str(err.value) and str(empty) in str(err.value)
    with pytest.raises(ConfigError, match="parallel.world_size=2 but the job was launched with WORLD_SIZE=1"):
        validate_config(load_config(None, ["parallel.world_size=2"]), world_size=1)


def test_non_finite_reward_is_named():
    from rspo_mega.data import Example
    from rspo_mega.training.batches import score

    class NaNTask:
        name = "nan_task"

        def reward(self, text, example):
            return float("nan")

    with pytest.raises(ValueError, match="task 'nan_task' returned a non-finite reward nan for uid 7"):
        score(NaNTask(), ["x"], [Example(7, "p", "a", "nan_task", {})])


def test_too_long_prompts_are_reported_at_once():
    from rspo_mega.data import Example
    from rspo_mega.training.batches import encode_prompts

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


def _adam_state(rank: int, world: int, out: str, init: str, reset: bool) -> list:
    """(moment norm, Adam step) after the warm-up step, after start_rl, after one RL step; RL LR."""
    from rspo_mega.training.trainer import Trainer

    cfg = load_config(None, TINY + [f"checkpoint.init_from={init}", f"logging.output_dir={out}",
                                    f"optimizer.reset_for_rl={reset}"])
    trainer = Trainer(cfg, validate_config(cfg, world_size=world))

    def state() -> tuple[float, int]:
        adam = [s for s in trainer.optimizer.optimizer.state.values() if "exp_avg" in s]
        steps = {int(s["step"]) for s in adam}
        assert len(steps) <= 1, steps
        return sum(float(s["exp_avg_sq"].norm()) for s in adam), (steps.pop() if steps else 0)

    trainer.train_step()  # the SFT warm-up step
    seen = [state()]
    trainer.start_rl()
    seen.append(state())
    trainer.train_step()  # the untrained model earns reward 0: zero advantages, zero gradient
    return seen + [state(), trainer.optimizer.param_groups[0]["lr"]]


@pytest.mark.parametrize("reset", [True, False])
def test_rl_starts_with_fresh_adam_state_after_the_warm_up(tmp_path, reset):
    init = str(tmp_path / "init")
    run_distributed(_init_checkpoint, 1, args=(init,), timeout=120)
    after_sft, at_start, after_rl, lr = run_distributed(
        _adam_state, 1, args=(str(tmp_path / "run"), init, reset), timeout=300)[0]
    assert after_sft[0] > 0 and after_sft[1] == 1
    assert lr == pytest.approx(1e-3)  # the RL schedule (no warm-up in TINY) drives the optimizer
    if reset:  # nothing carried over from the supervised gradients
        assert at_start == (0.0, 0) and after_rl[1] == 1
    else:
        assert at_start == after_sft and after_rl[1] == 2 and after_rl[0] > 0


def _mask_ratios(rank: int, world: int, out: str) -> tuple[list[float], list[float]]:
    """Masked fraction of each masked sequence of one SFT batch, under the SFT and the RL sampler."""
    from rspo_mega.training.trainer import Trainer

    cfg = load_config(None, TINY + [f"logging.output_dir={out}", "likelihood.mask_scheme=bernoulli",
                                    "likelihood.bernoulli_eps=0.9"])
    trainer = Trainer(cfg, validate_config(cfg, world_size=world))
    batch = trainer._sft_batch()[0]

    def ratios(masked) -> list[float]:
        counted = masked.lengths[masked.completion_index].float()
        return (masked.score_mask.sum(1).float() / counted).tolist()

    return ratios(trainer.sft_masks.sample(batch, 0)), ratios(trainer.masks.sample(batch, 0))


def test_sft_steps_keep_an_unbiased_estimator_when_rl_truncates(tmp_path):
    sft, rl = run_distributed(_mask_ratios, 1, args=(str(tmp_path / "run"),), timeout=300)[0]
    assert len(sft) == 2 * len(rl)  # coupled pairs (likelihood.sft_mask_scheme) vs one mask each
    assert min(sft) < 0.5  # light masks too: l ~ U{0..L} and its complement
    assert min(rl) > 0.6  # t ~ U(0.9, 1): only heavy masks


def _eval_denoising_steps(rank: int, world: int, out: str, overrides: list[str]) -> int:
    """Denoising steps the evaluation's decoding ran (the max over its rows)."""
    from rspo_mega.training.trainer import Trainer

    cfg = load_config(None, TINY + [f"logging.output_dir={out}", "data.num_test_examples=4"]
                      + overrides)
    trainer = Trainer(cfg, validate_config(cfg, world_size=world))
    generate, used = trainer.engine.generate, []

    def recording(*args, **kwargs):
        rollout = generate(*args, **kwargs)
        used.append(int(rollout.steps_used.max()))
        return rollout

    trainer.engine.generate = recording
    trainer.evaluate()
    return max(used)


@pytest.mark.parametrize("overrides, steps", [([], 8), (["rollout.eval_steps=2"], 2)])
def test_evaluation_decodes_with_rollout_eval_steps(tmp_path, overrides, steps):
    used = run_distributed(_eval_denoising_steps, 1, args=(str(tmp_path / "run"), overrides),
                           timeout=300)[0]
    assert used == steps


def _cached_step(rank: int, world: int, out: str) -> tuple[dict, list[str]]:
    """Metrics of one RL step with rollout.cache=dual and every cached step checked; the cache
    modes the evaluation's decoding ran with."""
    from rspo_mega.training.trainer import Trainer

    cfg = load_config(None, TINY + [f"logging.output_dir={out}", "sft_warmup_steps=0",
                                    "data.num_test_examples=4", "rollout.cache=dual",
                                    "rollout.cache_check_rate=1.0"])
    trainer = Trainer(cfg, validate_config(cfg, world_size=world))
    trainer.start_rl()
    metrics = trainer.train_step()
    generate, modes = trainer.engine.generate, []

    def recording(*args, **kwargs):
        modes.append(kwargs.get("cache"))
        return generate(*args, **kwargs)

    trainer.engine.generate = recording
    trainer.evaluate()
    return metrics, modes


def test_cached_rollouts_log_their_check_and_evaluation_stays_exact(tmp_path):
    metrics, modes = run_distributed(_cached_step, 1, args=(str(tmp_path / "run"),),
                                     timeout=300)[0]
    assert 0 <= metrics["cache_token_mismatch"] <= 1
    assert metrics["cache_confidence_diff"] >= 0
    assert modes and set(modes) == {"none"}


def _mask_draws(rank: int, world: int, out: str, fresh: bool) -> tuple[list, int]:
    """(iteration, update) of every mask draw and the reference scorings of one RL step, mu=2."""
    from rspo_mega.training.trainer import Trainer

    cfg = load_config(None, TINY + [f"logging.output_dir={out}", "sft_warmup_steps=0",
                                    "algorithm.inner_updates=2",
                                    f"likelihood.fresh_masks_per_update={fresh}"])
    trainer = Trainer(cfg, validate_config(cfg, world_size=world))
    trainer.start_rl()
    draws, scorings = [], []
    sample, logprobs = trainer.masks.sample, trainer.reference.logprobs

    def recording_sample(batch, iteration, update=0):
        draws.append((iteration, update))
        return sample(batch, iteration, update)

    def recording_logprobs(runner, masked):
        scorings.append(masked.input_ids.clone())
        return logprobs(runner, masked)

    trainer.masks.sample, trainer.reference.logprobs = recording_sample, recording_logprobs
    trainer.train_step()
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


def _warmup_on_target(rank: int, world: int, out: str, accuracies: list[float]) -> dict:
    """A run whose holdout checks (every 2 warm-up steps, at most 6) report `accuracies`."""
    from rspo_mega.training.trainer import Trainer

    cfg = load_config(None, TINY + [
        f"logging.output_dir={out}", "sft_warmup_steps=6", "sft_warmup_target_accuracy=0.5",
        "sft_warmup_holdout=8", "sft_warmup_check_interval=2", "train_steps=2",
        f"checkpoint.save_dir={out}/ckpt", "checkpoint.save_interval=1", "checkpoint.keep_last=9"])
    trainer = Trainer(cfg, validate_config(cfg, world_size=world))
    evaluate, checked = trainer.evaluate, []

    def scripted(examples=None, temperature=0.0):
        assert examples is trainer.warmup_holdout
        checked.append(trainer.step)
        result = evaluate(examples, temperature)  # the real decoding runs; its figure is replaced
        return {**result, "eval/accuracy": accuracies[len(checked) - 1]}

    trainer.evaluate = scripted
    held = {ex.uid for ex in trainer.warmup_holdout}
    trained = {ex.uid for ex in trainer.rl_iterator.examples} | {
        ex.uid for ex in trainer.sft_iterator.examples}
    trainer.run()
    lines = [json.loads(x) for x in Path(out, "metrics.jsonl").read_text().splitlines()]
    resumed = Trainer(cfg, validate_config(cfg, world_size=world))  # from the last checkpoint
    resumed.resume()
    return {
        "checked": checked, "held": len(held), "overlap": len(held & trained), "trained": len(trained),
        "phases": [d["phase_sft"] for d in lines if "phase_sft" in d],
        "holdout_acc": [d["warmup/holdout_accuracy"] for d in lines if "warmup/holdout_accuracy" in d],
        "resumed": (resumed.step, resumed.warmup_steps, resumed.total_steps),
    }


@pytest.mark.parametrize("accuracies, warmup", [([0.1, 0.6], 4), ([0.1, 0.2, 0.3], 6)])
def test_warm_up_ends_on_its_holdout_accuracy(tmp_path, accuracies, warmup):
    got = run_distributed(_warmup_on_target, 1, args=(str(tmp_path / "run"), accuracies),
                          timeout=300)[0]
    assert got["checked"] == [2, 4, 6][:len(accuracies)]
    assert got["holdout_acc"] == accuracies
    assert got["held"] == 8 and got["trained"] == 64 - 8 and got["overlap"] == 0
    assert got["phases"] == [1.0] * warmup + [0.0, 0.0]  # then the 2 RL steps
    assert got["resumed"] == (warmup + 2, warmup, warmup + 2)


def test_warm_up_target_is_validated():
    with pytest.raises(ConfigError, match="sft_warmup_target_accuracy"):
        validate_config(load_config(None, TINY + ["sft_warmup_target_accuracy=1.5"]))
    with pytest.raises(ConfigError, match="sft_warmup_steps >= 1"):
        validate_config(load_config(None, TINY + ["sft_warmup_target_accuracy=0.1",
                                                  "sft_warmup_steps=0"]))
    with pytest.raises(ConfigError, match="sft_warmup_check_interval"):
        validate_config(load_config(None, TINY + ["sft_warmup_target_accuracy=0.1",
                                                  "sft_warmup_check_interval=0"]))


def test_warm_up_holdout_is_chosen_by_uid_not_order():
    from rspo_mega.tasks import get_task
    from rspo_mega.training.run_data import split_warmup_holdout

    examples = get_task("sudoku").load("train", seed=3, num_examples=40)
    train, held = split_warmup_holdout(examples, 8)
    train_r, held_r = split_warmup_holdout(examples[::-1], 8)
    assert len(held) == 8 and len(train) == 32 and not {e.uid for e in held} & {e.uid for e in train}
    assert {e.uid for e in held} == {e.uid for e in held_r}
    assert [e.uid for e in train] == [e.uid for e in examples if e not in held]  # order kept
    with pytest.raises(ConfigError, match="sft_warmup_holdout=40"):
        split_warmup_holdout(examples, 40)
