"""The trajectory estimator (AGRPO): unbiased by enumeration over the steps, keyed draws, and its
bad settings named.

Trajectories come from the production sampler on a float64 toy model (exact and threshold
decoding, random and low-confidence remasking, EOS blocks filled by ``stop_on_eos_block``). The
exact sum over a completion's counted steps is computed from states rebuilt here; the
estimator's expectation enumerates the step distribution ``q`` and builds each step's inputs and
weights with the library's own code.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

from rspo_mega.config import ConfigError
from rspo_mega.setup import load_run_config, validate_run
from rspo_mega.config.schema import AlgorithmConfig, LikelihoodConfig
from rspo_mega.likelihood import MaskSampler, TrajectorySampler, trajectory_sum
from rspo_mega.likelihood.trajectory_estimator import (
    counted_steps,
    draw_steps,
    step_probabilities,
    step_uniforms,
)
from rspo_mega.rollout.sampler import generate
from rspo_mega.training.completion_batches import completion_batch
from tests.rollout.test_sampler import EOS, MASK, ToyBidirectional, _settings, at_positions

PROMPTS = [[1, 2, 3], [4, 5], [6, 7, 8, 9], [3, 3]]
UIDS = [11, 12, 13, 14]


def _toy64(seed: int = 0, eos_bias: float = 0.0):
    """The sampler tests' toy model in float64, with ``eos_bias`` added to the EOS logit."""
    model = ToyBidirectional(seed)
    model.emb, model.pos, model.out = (t.double() for t in (model.emb, model.pos, model.out))
    bias = torch.zeros(model.out.shape[1], dtype=torch.float64)
    bias[EOS] = eos_bias
    return lambda x: model(x) + bias


def _rollout(model, **kw):
    return _rollout_and_steps(model, **kw)[0]


def _rollout_and_steps(model, **kw):
    """The completion batch with its record, and the steps each row ran ``[B]``."""
    s = _settings(temperature=1.0, **kw)
    rollout = generate(at_positions(model), PROMPTS, UIDS, s, record_trajectory=True)
    return completion_batch(rollout, UIDS, [0, 0, 1, 1]), rollout.steps_used


def _logp(model, ids: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """``log softmax(model(ids))[labels]`` at every position ``[N, S]`` (float64)."""
    lp = torch.log_softmax(model(ids).double(), dim=-1)
    return lp.gather(-1, labels.unsqueeze(-1)).squeeze(-1)


def _exact_sums(model, batch) -> torch.Tensor:
    """Per completion: sum over its counted steps t of the log-probs, given the state before t,
    of the tokens step t committed (states rebuilt here from the record)."""
    out = []
    for b in range(batch.size):
        gen = batch.completion_mask[b]
        total = counted_steps(batch.commit_step[b, gen], batch.input_ids[b, gen], EOS)
        acc = torch.zeros((), dtype=torch.float64)
        for t in range(total):
            visible = batch.commit_step[b] < t
            state = torch.where(visible, batch.input_ids[b], torch.full_like(batch.input_ids[b], MASK))
            lp = _logp(model, state[None], batch.input_ids[b][None])[0]
            acc = acc + lp[batch.commit_step[b] == t].sum()
        out.append(acc)
    return torch.stack(out)


def _expectation(model, batch, sampler: TrajectorySampler) -> torch.Tensor:
    """``E_q[estimate]``, enumerating every step of every completion with its probability."""
    totals, probs = [], []
    for b in range(batch.size):
        gen = batch.completion_mask[b]
        commit, tokens = batch.commit_step[b, gen], batch.input_ids[b, gen]
        totals.append(counted_steps(commit, tokens, EOS))
        probs.append(step_probabilities(commit, batch.commit_entropy[b, gen], totals[-1],
                                        sampler.cfg.step_sampling))
    expect = torch.zeros(batch.size, dtype=torch.float64)
    for t in range(max(totals)):
        rows = [b for b in range(batch.size) if t < totals[b]]
        sub = batch.select(torch.tensor(rows))
        weights = torch.stack([1.0 / probs[b][t:t + 1] for b in rows])
        masked = sampler.at_steps(sub, torch.tensor([totals[b] for b in rows]),
                                  torch.full((len(rows), 1), t), weights)
        est = trajectory_sum(_logp(model, masked.input_ids, masked.labels), masked)
        expect[rows] += torch.stack([probs[b][t] for b in rows]) * est
    return expect


@pytest.mark.parametrize("scheme", ["uniform", "entropy"])
@pytest.mark.parametrize("kw", [dict(), dict(confidence_threshold=0.3, remasking="random"),
                                dict(stop_on_eos_block=True, block_length=3, steps=8)])
def test_expectation_over_steps_is_the_full_sum(scheme, kw):
    model = _toy64(eos_bias=17.0 if kw.get("stop_on_eos_block") else 0.0)  # EOS blocks: filled
    batch, steps_used = _rollout_and_steps(model, **kw)
    sampler = TrajectorySampler(LikelihoodConfig(mask_scheme="trajectory", step_sampling=scheme,
                                                 mc_samples=3), 7, MASK, EOS)
    exact = _exact_sums(model, batch)
    assert torch.allclose(_expectation(model, batch, sampler), exact, rtol=0, atol=1e-10)
    drawn = sampler.sample(batch, iteration=2)  # the sampled batch: states of counted steps only
    assert bool((drawn.sampled_steps < drawn.steps[:, None]).all())
    assert bool((drawn.score_mask.sum(1) > 0).all())  # every step commits something
    for n, (b, t) in enumerate(zip(drawn.completion_index.tolist(),
                                   drawn.sampled_steps.flatten().tolist())):
        gen = batch.completion_mask[b]
        q = step_probabilities(batch.commit_step[b, gen], batch.commit_entropy[b, gen],
                               int(drawn.steps[b]), scheme)
        assert torch.allclose(drawn.weights[n][drawn.score_mask[n]], 1.0 / q[t], rtol=1e-15)
    if kw.get("stop_on_eos_block"):  # some positions were filled, not committed by a step
        filled = batch.commit_step == steps_used[:, None]
        assert bool(filled.any()) and bool((batch.input_ids[filled] == EOS).all())


def test_draws_follow_the_step_distribution_and_are_keyed():
    probs = torch.tensor([0.1, 0.0, 0.25, 0.65], dtype=torch.float64)
    grid = (torch.arange(100000, dtype=torch.float64) + 0.5) / 100000
    freq = torch.bincount(draw_steps(probs, grid), minlength=4).double() / grid.numel()
    assert torch.allclose(freq, probs, atol=1e-4)
    u = step_uniforms((1, 2, 3, 0), 8, stratified=True)
    assert sorted((u * 8).floor().long().tolist()) == list(range(8))  # one draw per stratum
    assert torch.equal(u, step_uniforms((1, 2, 3, 0), 8, stratified=True))
    assert not torch.equal(u, step_uniforms((1, 2, 4, 0), 8, stratified=True))
    model = _toy64()
    batch = _rollout(model)
    sampler = TrajectorySampler(LikelihoodConfig(mask_scheme="trajectory", mc_samples=4), 7, MASK, EOS)
    full = sampler.sample(batch, iteration=5)
    part = sampler.sample(batch.select(torch.tensor([2, 0])), iteration=5)
    assert torch.equal(part.sampled_steps, full.sampled_steps[[2, 0]])  # batch-independent
    assert torch.equal(part.input_ids, full.input_ids.view(4, 4, -1)[[2, 0]].flatten(0, 1))
    again = sampler.sample(batch, iteration=6)
    assert not torch.equal(again.sampled_steps, full.sampled_steps)
    assert torch.allclose(full.rollout_logp[full.score_mask],
                          batch.commit_logp.repeat_interleave(4, 0)[full.score_mask])


RL = ["algorithm.name=agrpo", "likelihood.mask_scheme=trajectory", "rollout.steps=8",
      "rollout.gen_length=32", "rollout.block_length=16", "checkpoint.init_from=null",
      "checkpoint.save_dir=null", "checkpoint.export_hf=null"]


@pytest.mark.parametrize("extra, message", [
    (["likelihood.mc_samples=9"], "likelihood.mc_samples=9 sampled steps per completion exceed"),
    (["likelihood.mask_scheme=coupled"], "algorithm.name=agrpo takes likelihood.mask_scheme"),
    (["algorithm.name=rspo"], "algorithm.name='rspo' with likelihood.mask_scheme='trajectory'"),
    (["algorithm.name=sft"], "algorithm.name='sft' with likelihood.mask_scheme='trajectory'"),
    (["rollout.temperature=0"], "needs rollout.temperature > 0"),
    (["rollout.cfg_scale=1.5"], "rollout.cfg_scale=1.5"),
    (["likelihood.mask_sharing=group"], "likelihood.mask_sharing='group'"),
    (["likelihood.count_positions=until_eos"], "likelihood.count_positions='until_eos'"),
    (["likelihood.step_sampling=linear"], "likelihood.step_sampling"),
])
def test_bad_settings_are_named(extra, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(".", r"\.")):
        validate_run(load_run_config(None, RL + extra))  # choices: the loader; the rest: validate


def test_bad_inputs_are_named():
    from rspo_mega.algorithms import LossInputs, build_loss

    lik = LikelihoodConfig(mask_scheme="trajectory", mc_samples=2)
    with pytest.raises(ValueError, match="needs likelihood.mask_scheme='trajectory'"):
        TrajectorySampler(LikelihoodConfig(), 1, MASK, EOS)
    batch = _rollout(_toy64())
    with pytest.raises(ValueError, match=r"the mask sampler draws one of .* TrajectorySampler"):
        MaskSampler(lik, 1, MASK, EOS).sample(batch, iteration=0)
    bare = dataclasses.replace(batch, commit_step=None, commit_logp=None, commit_entropy=None)
    with pytest.raises(ValueError, match="needs the rollout's trajectory record"):
        TrajectorySampler(lik, 1, MASK, EOS).sample(bare, iteration=0)
    no_entropy = dataclasses.replace(batch, commit_entropy=None)
    with pytest.raises(ValueError, match="needs the rollout's entropies"):
        TrajectorySampler(lik, 1, MASK, EOS).sample(no_entropy, iteration=0)
    with pytest.raises(ValueError, match="needs likelihood.mask_scheme='trajectory'"):
        build_loss(AlgorithmConfig(name="agrpo"), LikelihoodConfig())
    elbo = MaskSampler(LikelihoodConfig(), 1, MASK, EOS).sample(bare, iteration=0)
    loss = build_loss(AlgorithmConfig(name="agrpo"), lik)
    with pytest.raises(ValueError, match="needs a TrajectoryBatch"):
        loss(LossInputs(elbo, torch.zeros(elbo.weights.shape), torch.zeros(4),
                        bare.group_ids, 2))
