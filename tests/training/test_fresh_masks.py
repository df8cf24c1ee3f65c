"""Fresh masks per inner update for the ratio losses (ESPO, diffu-GRPO), as their trainers run
them: every update draws its own masks, the rollout ("old") policy scores them before the first
update and the reference re-scores them; the draws and both scorings are the same on every
TP/PP/DP layout, and a single inner update reproduces the fixed-mask numbers."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from rspo_mega.setup import load_run_config, validate_run
from tests.distributed import run_distributed
from tests.training.test_trainer import TINY, _init_checkpoint

RATIO = {
    "espo": ["algorithm.name=espo", "likelihood.mask_scheme=coupled", "likelihood.mc_samples=2",
             "algorithm.advantage=leave_one_out", "algorithm.kl_beta=0.01",
             "algorithm.clip_eps=0.2"],
    "diffu_grpo": ["algorithm.name=diffu_grpo", "likelihood.mask_scheme=one_step",
                   "algorithm.kl_beta=0.04", "algorithm.clip_eps=0.5",
                   "algorithm.advantage=standardized"],
}


def _rows(masked, uids, tensor):
    """{uid: rows [K*U, S] of ``tensor``} (``None`` off the last pipeline stage)."""
    per = masked.num_sequences // masked.num_completions
    return {int(u): None if tensor is None else tensor[i * per:(i + 1) * per].clone()
            for i, u in enumerate(uids.tolist())}


def _recorded_step(rank: int, world: int, out: str, init: str, layouts: list, name: str,
                   mu: int) -> dict:
    """Per layout ``(tp, pp, fresh)``, one RL step of ``name`` with ``mu`` inner updates (fresh
    masks per update or not): for every update, each completion's masked inputs, old-policy and
    reference log-probs (by uid, gathered from all ranks), and the step's metrics."""
    import rspo_mega.training.update_loop as update_loop
    from rspo_mega.training.metrics import Timers
    from rspo_mega.training.trainer import Trainer

    real = update_loop.loss_backward
    found = {}
    for tp, pp, fresh in layouts:
        cfg = load_run_config(None, TINY + RATIO[name] + [
            f"parallel.tp={tp}", f"parallel.pp={pp}", f"checkpoint.init_from={init}",
            f"logging.output_dir={out}/{name}_tp{tp}pp{pp}{fresh}", f"algorithm.inner_updates={mu}",
            f"likelihood.fresh_masks_per_update={str(fresh).lower()}"])
        trainer = Trainer(cfg, validate_run(cfg, world_size=world))
        trainer.start_rl()
        batch = trainer.batches.next_batch(trainer.step, Timers())
        # the tiny random start solves nothing (all advantages 0): give every completion a
        # non-zero advantage of its uid, so that the updates move the policy on every layout
        batch = dataclasses.replace(batch, advantages=torch.sin(batch.completions.uids.float()))
        calls: list = []

        def recording(loss, runner, policy, masked, *args, ref_logp=None, old_logp=None):
            uids = batch.completions.uids
            calls.append({"inputs": _rows(masked, uids, masked.input_ids),
                          "ref": _rows(masked, uids, ref_logp),
                          "old": _rows(masked, uids, old_logp)})
            return real(loss, runner, policy, masked, *args, ref_logp=ref_logp, old_logp=old_logp)

        update_loop.loss_backward = recording
        try:
            metrics = trainer.updates.run(batch, trainer.step, Timers(),
                                          reference=trainer.policy.reference)
        finally:
            update_loop.loss_backward = real
        gathered: list = [None] * world
        torch.distributed.all_gather_object(gathered, calls)
        merged = []
        for j in range(mu):
            update = {key: {} for key in ("inputs", "ref", "old")}
            for rank_calls in gathered:
                for key, rows in rank_calls[j].items():
                    update[key].update({u: r for u, r in rows.items() if r is not None})
            merged.append(update)
        found[(tp, pp, fresh)] = (merged, metrics)
    return found if rank == 0 else None


@pytest.fixture(scope="module")
def init(tmp_path_factory) -> str:
    path = str(tmp_path_factory.mktemp("fresh") / "init")
    run_distributed(_init_checkpoint, 1, args=(path,), timeout=120)
    return path


def _equal_rows(a: dict, b: dict, tol: float = 0.0) -> bool:
    return a.keys() == b.keys() and all(
        torch.equal(a[u], b[u]) if tol == 0 else torch.allclose(a[u], b[u], rtol=tol, atol=tol)
        for u in a)


@pytest.mark.parametrize("name", ["espo", "diffu_grpo"])
def test_each_update_draws_masks_scored_by_the_rollout_policy(tmp_path, init, name):
    (updates, metrics), = run_distributed(
        _recorded_step, 1, args=(str(tmp_path), init, [(1, 1, True)], name, 3),
        timeout=300)[0].values()
    assert updates[0]["old"] == {}  # update 0: the policy's own pass is the old policy's
    for j in (1, 2):
        previous, this = updates[j - 1]["inputs"], updates[j]["inputs"]
        changed = sum(not torch.equal(previous[u], this[u]) for u in this)
        assert changed >= len(this) // 2, (name, j, changed)  # a new draw for most completions
        # the first step's old policy is the start, the frozen reference: same log-probs exactly
        assert updates[j]["old"].keys() == this.keys()
        assert _equal_rows(updates[j]["old"], updates[j]["ref"], tol=1e-6), (name, j)
    ratio = metrics[f"{name}/ratio_mean"]
    assert ratio != pytest.approx(1.0, abs=1e-7)  # the last update's policy moved off the old


def test_draws_and_old_logprobs_are_the_same_on_every_layout(tmp_path, init):
    single = run_distributed(_recorded_step, 1, args=(str(tmp_path / "w1"), init,
                                                      [(1, 1, True)], "espo", 2),
                             timeout=300)[0][(1, 1, True)]
    layouts = [(1, 1, True), (2, 1, True), (1, 2, True)]  # DP2, TP2, PP2
    multi = run_distributed(_recorded_step, 2, args=(str(tmp_path / "w2"), init, layouts, "espo",
                                                     2), timeout=600)[0]
    for layout, (updates, metrics) in multi.items():
        for j, update in enumerate(updates):
            assert _equal_rows(update["inputs"], single[0][j]["inputs"]), (layout, j)
            for key in ("ref", "old"):
                assert _equal_rows(update[key], single[0][j][key], tol=1e-5), (layout, j, key)
        assert metrics["loss"] == pytest.approx(single[1]["loss"], rel=1e-5, abs=1e-7), layout


def test_one_inner_update_reproduces_the_fixed_mask_numbers(tmp_path, init):
    runs = run_distributed(_recorded_step, 1, args=(
        str(tmp_path), init, [(1, 1, False), (1, 1, True)], "espo", 1), timeout=300)[0]
    (fixed, fixed_metrics), (fresh, fresh_metrics) = runs[(1, 1, False)], runs[(1, 1, True)]
    assert _equal_rows(fixed[0]["inputs"], fresh[0]["inputs"])
    assert fixed_metrics == fresh_metrics
