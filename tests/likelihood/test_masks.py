"""The mask RNG: purity of the key, layout independence, scheme invariants, config errors."""

from __future__ import annotations

import pytest
import torch

from rspo_mega.config.schema import LikelihoodConfig
from rspo_mega.likelihood import MaskSampler, count_mask, hash64, mask_generator
from rspo_mega.likelihood.masks import stratified_counts
from tests.likelihood._models import TINY, make_completions

MASK, EOS = TINY.mask_token_id, TINY.eos_token_id


def _sampler(scheme: str = "coupled", k: int = 2, seed: int = 42, **kw) -> MaskSampler:
    return MaskSampler(LikelihoodConfig(mask_scheme=scheme, mc_samples=k, **kw), seed, MASK, EOS)


def test_hash64_is_stable_and_key_sensitive():
    assert hash64(1, 2, 3, 4) == hash64(1, 2, 3, 4)
    keys = {hash64(s, i, u, k) for s in range(3) for i in range(3) for u in range(5) for k in (-1, 0, 1)}
    assert len(keys) == 3 * 3 * 5 * 3
    a = torch.rand(4, generator=mask_generator(1, 2, 3, 0))
    assert torch.equal(a, torch.rand(4, generator=mask_generator(1, 2, 3, 0)))


def test_hash64_known_value():
    # Pin the stream: changing the hash silently changes every mask of a resumed run.
    assert hash64(0) == 0x1AC046DDA8E86E2A
    assert hash64(1, 2, 3, 4) == 0xD00E59C7502101C8
    assert hash64(1234, 7, 99, 1) == hash64(1234, 7, 99, 1 + 2**64)  # values are taken mod 2**64


@pytest.mark.parametrize("scheme", ["bernoulli", "stratified", "coupled", "one_step"])
def test_masks_depend_only_on_key(scheme):
    batch, _ = make_completions(8, 4, 5, 9, seed=1)
    s = _sampler(scheme, k=3)
    full = s.sample(batch, iteration=7)
    per = full.num_mc * full.units_per_sample
    torch.manual_seed(123)  # the global RNG must not matter
    for shard in (torch.tensor([5, 1]), torch.tensor([2, 6, 0, 7])):
        part = s.sample(batch.select(shard), iteration=7)
        for j, b in enumerate(shard.tolist()):
            assert torch.equal(part.input_ids[j * per:(j + 1) * per], full.input_ids[b * per:(b + 1) * per])
            assert torch.equal(part.weights[j * per:(j + 1) * per], full.weights[b * per:(b + 1) * per])
    assert not torch.equal(s.sample(batch, iteration=8).input_ids, full.input_ids)


@pytest.mark.parametrize("scheme", ["bernoulli", "stratified", "coupled"])
def test_each_inner_update_has_its_own_masks(scheme):
    batch, _ = make_completions(8, 4, 5, 9, seed=4)
    s = _sampler(scheme, k=2)
    first = s.sample(batch, iteration=3)
    assert torch.equal(s.sample(batch, iteration=3, update=0).input_ids, first.input_ids)
    again = s.sample(batch, iteration=3, update=1)
    assert torch.equal(s.sample(batch, iteration=3, update=1).input_ids, again.input_ids)
    assert not torch.equal(again.input_ids, first.input_ids)
    assert not torch.equal(s.sample(batch, iteration=3, update=2).input_ids, again.input_ids)
    assert not torch.equal(s.sample(batch, iteration=4, update=1).input_ids, again.input_ids)


@pytest.mark.parametrize("scheme", ["stratified", "coupled"])
def test_group_mask_sharing_gives_a_group_one_set_of_masks(scheme):
    batch, _ = make_completions(8, 4, 5, 9, seed=3)  # groups {0..3}, {4..7}, all of length 9
    own = _sampler(scheme, k=2).sample(batch, iteration=4)
    shared = _sampler(scheme, k=2, mask_sharing="group").sample(batch, iteration=4)
    per = shared.num_mc * shared.units_per_sample
    rows = lambda t, b: t[b * per:(b + 1) * per]  # noqa: E731
    for b in range(8):
        first = 4 * (b // 4)
        assert torch.equal(rows(shared.score_mask, b), rows(shared.score_mask, first))
        assert torch.equal(rows(shared.weights, b), rows(shared.weights, first))
    assert not torch.equal(rows(shared.score_mask, 0), rows(shared.score_mask, 4))
    assert not all(torch.equal(rows(own.score_mask, b), rows(own.score_mask, 0)) for b in range(1, 4))
    # the key is the global group id, so a shard of the batch sees the same masks
    part = _sampler(scheme, k=2, mask_sharing="group").sample(batch.select(torch.tensor([6, 1])), 4)
    assert torch.equal(part.score_mask[:per], rows(shared.score_mask, 6))
    assert torch.equal(part.score_mask[per:], rows(shared.score_mask, 1))


def test_state_dict_round_trip_reproduces_masks():
    batch, _ = make_completions(4, 2, 5, 9, seed=2)
    a = _sampler(seed=11)
    ref = a.sample(batch, iteration=3)
    b = _sampler(seed=999)
    b.load_state_dict(a.state_dict())
    torch.manual_seed(0)
    torch.rand(100)
    assert torch.equal(b.sample(batch, iteration=3).input_ids, ref.input_ids)
    with pytest.raises(ValueError, match="hash"):
        b.load_state_dict({"seed": 1, "hash": "python"})


def test_resume_with_other_mask_settings_warns_with_the_keys(caplog):
    saved = _sampler("coupled", k=2).state_dict()
    _sampler("coupled", k=2).load_state_dict(saved)
    assert "mask stream" not in caplog.text
    _sampler("stratified", k=4, mask_sharing="group", fresh_masks_per_update=True
             ).load_state_dict(saved)
    for key in ("likelihood.mask_scheme", "likelihood.mask_sharing", "likelihood.mc_samples",
                "likelihood.fresh_masks_per_update"):
        assert key in caplog.text


@pytest.mark.parametrize("scheme", ["bernoulli", "stratified", "coupled"])
def test_prompt_and_padding_never_masked(scheme):
    batch, _ = make_completions(6, 3, 5, 9, seed=3)
    batch.attention_mask[0, :2] = False  # left padding
    m = _sampler(scheme, k=4).sample(batch, iteration=1)
    rows = m.completion_index
    outside = ~batch.completion_mask[rows] | ~batch.attention_mask[rows]
    assert torch.equal(m.input_ids[outside], m.labels[outside])
    assert not m.score_mask[outside].any()
    assert torch.equal(m.score_mask, m.input_ids == MASK)


def test_coupled_pairs_are_complements_and_weighted():
    batch, _ = make_completions(5, 5, 4, 8, seed=4)
    m = _sampler("coupled", k=3).sample(batch, iteration=0)
    assert m.num_sequences == 5 * 3 * 2 and m.units_per_sample == 2
    s = m.score_mask.view(5, 3, 2, -1)
    counted = m.count_mask[:, None, :].expand(5, 3, -1)
    assert torch.equal(s[:, :, 0] ^ s[:, :, 1], counted) and not (s[:, :, 0] & s[:, :, 1]).any()
    w = m.weights.view(5, 3, 2, -1)
    length = m.lengths.view(5, 1, 1).double()
    for half in (0, 1):
        cnt = s[:, :, half].sum(-1).double()
        expect = torch.where(cnt > 0, (length[..., 0] + 1) / (2 * cnt.clamp(min=1)), 0.0)
        got = w[:, :, half].max(-1).values.double()
        assert torch.allclose(got, expect, atol=1e-6)


def test_stratified_counts_cover_range_uniformly():
    for length in range(1, 8):
        for k in range(1, 6):
            for j in range(k):
                seen = sorted(stratified_counts(length, k, u)[j] for u in range(length))
                assert seen == list(range(1, length + 1))


def test_one_step_masks_whole_completion_and_some_prompt():
    batch, _ = make_completions(64, 4, 20, 6, seed=5)
    m = _sampler("one_step", k=2, one_step_prompt_mask_prob=0.15).sample(batch, iteration=2)
    rows = m.completion_index
    comp = batch.completion_mask[rows]
    assert (m.input_ids[comp] == MASK).all() and torch.equal(m.score_mask, comp)
    frac = (m.input_ids[~comp] == MASK).float().mean().item()
    assert 0.11 < frac < 0.19
    assert (m.weights[comp] == 1).all()


def test_until_eos_counts_first_eos_and_hides_the_rest():
    batch, _ = make_completions(3, 3, 4, 8, seed=6)
    batch.input_ids[0, 4:] = torch.tensor([1, 2, EOS, 3, EOS, EOS, EOS, EOS])
    batch.input_ids[1, 4:] = torch.tensor([1, 2, 3, 4, 5, 6, 7, 8])
    counted = count_mask(batch, "until_eos", EOS)
    assert counted[0].nonzero().flatten().tolist() == [4, 5, 6]
    assert counted[1].sum() == 8
    m = _sampler("coupled", k=1, count_positions="until_eos").sample(batch, iteration=0)
    assert m.lengths[0] == 3 and not m.attention_mask[0, 7:].any()
    assert m.attention_mask[0, :7].all()


@pytest.mark.parametrize("field,value,key", [
    ("mc_samples", 0, "likelihood.mc_samples"),
    ("mask_scheme", "gaussian", "likelihood.mask_scheme"),
    ("count_positions", "all", "likelihood.count_positions"),
    ("mask_sharing", "prompt", "likelihood.mask_sharing"),
    ("bernoulli_eps", 1.0, "likelihood.bernoulli_eps"),
    ("one_step_prompt_mask_prob", 1.5, "likelihood.one_step_prompt_mask_prob"),
    ("micro_batch_size", 0, "likelihood.micro_batch_size"),
])
def test_bad_likelihood_config_names_the_key(field, value, key):
    from rspo_mega.config import ConfigError
    from rspo_mega.setup import run_config_from_dict

    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        run_config_from_dict({"likelihood": {field: value}})


def test_odd_coupled_k_is_fine_because_k_counts_pairs():
    batch, _ = make_completions(2, 2, 4, 6, seed=7)
    assert _sampler("coupled", k=3).sample(batch, 0).num_sequences == 2 * 3 * 2


def test_empty_completion_is_rejected_with_the_key():
    batch, _ = make_completions(2, 2, 4, 6, seed=8)
    batch.completion_mask[1] = False
    with pytest.raises(ValueError, match=r"likelihood\.count_positions"):
        _sampler().sample(batch, 0)
