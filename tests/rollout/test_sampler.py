"""The production sampler against the plain reference sampler, and its named errors."""

from __future__ import annotations

import pytest
import torch

from rspo_mega.config.schema import RolloutConfig
from rspo_mega.rollout.sampler import SamplerSettings, generate, num_transfer_tokens
from tests.reference.llada_sampler import reference_generate, transfer_schedule

V, MASK, EOS = 37, 36, 35


class ToyBidirectional(torch.nn.Module):
    """Logits depend on the token and on the whole sequence (a stand-in for a dLLM)."""

    def __init__(self, seed: int = 0, d: int = 16) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.emb = torch.randn(V, d, generator=g)
        self.pos = torch.randn(64, d, generator=g) * 0.5
        self.out = torch.randn(d, V, generator=g)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.emb[x] + self.pos[: x.shape[1]]
        h = h + h.mean(dim=1, keepdim=True)
        return torch.tanh(h) @ self.out * 2.0


def at_positions(model):
    """A full-sequence model as the sampler's ``logits_fn``: logits at ``positions [b, m]``."""
    def logits_fn(x, pad, positions, cache=None):
        full = model(x)
        return full.gather(1, positions[..., None].expand(-1, -1, full.shape[-1]))
    return logits_fn


def _settings(**kw) -> SamplerSettings:
    rollout = dict(gen_length=12, block_length=4, steps=6, temperature=0.0,
                   remasking="low_confidence", stop_on_eos_block=False)
    rollout.update(kw)
    return SamplerSettings(RolloutConfig(**rollout), mask_token_id=MASK, eos_token_id=EOS,
                           vocab_size=V, seed=5)


def _run_both(settings: SamplerSettings, prompts: torch.Tensor):
    s = settings.rollout
    model = ToyBidirectional()
    b, plen = prompts.shape
    total = plen + s.gen_length
    g = torch.Generator().manual_seed(11)
    noise = torch.rand(s.steps, b, total, V, generator=g, dtype=torch.float64)
    remask = torch.rand(s.steps, b, total, generator=g, dtype=torch.float64)
    uids = list(range(100, 100 + b))

    def noise_fn(uid, step, n, vocab):
        lo = plen + (step // settings.steps_per_block) * s.block_length
        return noise[step, uid - 100, lo:lo + n, :vocab]

    ref = reference_generate(
        model, prompts, s.steps, s.gen_length, s.block_length, s.temperature, s.remasking, MASK,
        cfg_scale=s.cfg_scale, noise=lambda st, *_: noise[st], remask_noise=lambda st, *_: remask[st],
    )
    import rspo_mega.rollout.sampler as sampler

    original = sampler.keyed_uniforms
    if s.remasking == "random":  # feed the reference's remasking draws to the production sampler
        def keyed(seed, uid, step, stream, shape):
            lo = plen + (step // settings.steps_per_block) * s.block_length
            return remask[step, uid - 100, lo:lo + shape[0]]
        sampler.keyed_uniforms = keyed
    try:
        out = generate(at_positions(model), prompts.tolist(), uids, settings, noise_fn=noise_fn)
    finally:
        sampler.keyed_uniforms = original
    return ref[:, plen:], out


@pytest.mark.parametrize(
    "kw",
    [
        dict(temperature=0.0),
        dict(temperature=1.0),
        dict(temperature=0.7, remasking="random"),
        dict(temperature=1.0, cfg_scale=1.5),
        dict(temperature=0.0, steps=12, block_length=12, gen_length=12),
        dict(temperature=1.0, steps=24, block_length=4, gen_length=12),  # steps > tokens: k=0 steps
    ],
)
def test_identical_to_reference(kw):
    s = _settings(**kw)
    prompts = torch.randint(0, 30, (3, 5), generator=torch.Generator().manual_seed(3))
    ref, out = _run_both(s, prompts)
    assert torch.equal(out.completion_ids, ref)
    assert (out.completion_ids != MASK).all()
    assert out.steps_used.tolist() == [min(s.rollout.steps, s.rollout.gen_length)] * 3  # steps with nothing to commit are skipped
    assert len(out.step_seconds) >= s.num_blocks


def test_keyed_noise_is_per_uid_not_per_batch():
    """A row's draws depend on its uid only: same completion in any batch of equal-length prompts."""
    model = ToyBidirectional(seed=1)
    s = _settings(temperature=1.0, remasking="random")
    a, b, c = [1, 2, 3, 4], [5, 6, 7, 8], [9, 10, 11, 12]
    run = lambda prompts, uids: generate(at_positions(model), prompts, uids, s).completion_ids
    alone = run([a], [7])
    assert torch.equal(run([a, b], [7, 8])[0], alone[0])
    assert torch.equal(run([c, a, b], [9, 7, 8])[1], alone[0])
    assert not torch.equal(run([a], [8])[0], alone[0])  # another uid, other draws


def test_left_padding_and_key_padding_mask():
    seen = []

    def logits(x, pad, positions, cache=None):
        seen.append(pad)
        return at_positions(ToyBidirectional())(x, pad, positions, cache)

    out = generate(logits, [[1, 2, 3, 4], [5, 6, 7]], [0, 1], _settings())
    assert out.prompt_lengths.tolist() == [4, 3]
    assert out.prompt_ids[1].tolist() == [EOS, 5, 6, 7]
    assert seen[0][1, 0].item() is False and seen[0][1, 1:].all() and seen[0][0].all()
    generate(logits, [[1, 2], [3, 4]], [0, 1], _settings())
    assert seen[-1] is None  # no padding -> no mask tensor at all


def test_logits_are_asked_for_the_blocks_masked_positions_only():
    """Each call reads the current block's still-masked positions, masked first, in order."""
    s = _settings(gen_length=8, block_length=4, steps=4)
    calls = []

    def logits(x, pad, positions, cache=None):
        calls.append((x.clone(), positions.clone()))
        return at_positions(ToyBidirectional())(x, pad, positions, cache)

    generate(logits, [[1, 2, 3], [4, 5, 6]], [0, 1], s)
    assert len(calls) == 4  # 2 blocks x 2 steps, both rows live in each
    for x, positions in calls:
        for row in range(2):
            masked = (x[row] == MASK).nonzero().squeeze(1)
            block = masked[masked < positions[row].min() + 4][:positions.shape[1]]
            assert positions[row].tolist() == block.tolist()
    assert [c[1].shape[1] for c in calls] == [4, 2, 4, 2]  # 2 commits per step


def test_forbid_eos_and_stop_on_eos_block():
    class EosLover(torch.nn.Module):
        def forward(self, x):
            logits = torch.zeros(*x.shape, V)
            logits[..., EOS] = 10.0
            logits[..., 3] = 5.0
            return logits

    m = EosLover()
    free = generate(at_positions(m), [[1, 2]], [0], _settings(stop_on_eos_block=True))
    assert free.completion_ids.eq(EOS).all()
    assert free.steps_used.item() == 2  # first block all EOS -> row stops, 2 of 6 steps used
    assert free.completion_lengths.item() == 1
    banned = generate(at_positions(m), [[1, 2]], [0], _settings(forbid_eos=True))
    assert banned.completion_ids.eq(3).all()
    assert banned.completion_lengths.item() == 12


def test_threshold_mode_commits_confident_tokens_early():
    class Confident(torch.nn.Module):
        def forward(self, x):
            logits = torch.zeros(*x.shape, V)
            logits[..., 4] = 20.0
            return logits

    m = Confident()
    exact = generate(at_positions(m), [[1]], [0], _settings())
    fast = generate(at_positions(m), [[1]], [0], _settings(confidence_threshold=0.9))
    assert torch.equal(exact.completion_ids, fast.completion_ids)
    assert exact.steps_used.item() == 6 and fast.steps_used.item() == 3  # one step per block


def test_threshold_rows_that_finish_early_skip_the_model_call():
    """Rows whose block is decoded leave the batch; each row still decodes as it would alone."""
    model = ToyBidirectional(seed=2)
    s = _settings(temperature=1.0, confidence_threshold=0.3)
    prompts = [[i, i + 1, i + 2, i + 3] for i in range(0, 24, 4)]
    uids = list(range(40, 46))
    batch_rows: list[int] = []

    def logits(x, pad, positions, cache=None):
        batch_rows.append(x.shape[0])
        return at_positions(model)(x, pad, positions)

    out = generate(logits, prompts, uids, s)
    used = out.steps_used.tolist()
    assert len(set(used)) > 1  # rows finished after different numbers of model calls
    assert min(batch_rows) < len(prompts)  # finished rows were left out of later calls
    assert sum(batch_rows) == sum(used)  # each row took part in exactly its own steps
    for row, (prompt, uid) in enumerate(zip(prompts, uids)):
        alone = generate(at_positions(model), [prompt], [uid], s)
        assert torch.equal(out.completion_ids[row], alone.completion_ids[0]), row
        assert used[row] == alone.steps_used.item()


def test_transfer_schedule_matches_reference():
    masked = torch.tensor([7, 8, 3, 0])
    ref = transfer_schedule(torch.arange(8).unsqueeze(0) < masked.unsqueeze(1), 4)
    assert torch.equal(num_transfer_tokens(masked, 4), ref)
    assert num_transfer_tokens(masked, 4).sum(1).tolist() == [7, 8, 3, 0]


@pytest.mark.parametrize(
    "kw, message",
    [
        (dict(gen_length=10, block_length=4), "rollout.gen_length=10 is not divisible by rollout.block_length=4"),
        (dict(steps=5), "rollout.steps=5 is not a multiple of the number of blocks 3"),
        (dict(remasking="entropy"), "rollout.remasking='entropy'"),
    ],
)
def test_bad_settings_are_named(kw, message):
    """What generate() checks itself, for callers without a config (validate_config checks the
    rest of the rollout section)."""
    with pytest.raises(ValueError) as err:
        generate(at_positions(ToyBidirectional()), [[1, 2]], [0], _settings(**kw))
    assert message in str(err.value)


def test_empty_prompt_and_uid_mismatch():
    m = ToyBidirectional()
    with pytest.raises(ValueError, match="at least one token"):
        generate(at_positions(m), [[]], [0], _settings())
    with pytest.raises(ValueError, match="2 prompts but 1 uids"):
        generate(at_positions(m), [[1], [2]], [0], _settings())


def test_argmax_confidence_from_the_row_max_equals_the_chosen_probability():
    """At T=0 the sampler takes the confidence from the argmax's row max (no gather): it must
    equal ``softmax[argmax]`` bitwise, ties must go to the lowest id, and -inf (forbidden) ids
    must not count."""
    from rspo_mega.rollout.vocab_parallel import VocabShard

    g = torch.Generator().manual_seed(3)
    logits = torch.randn(9, V, generator=g) * 4
    logits[0, [5, 7]] = logits[0].max() + 1.0  # a tie: id 5 wins
    logits[1, EOS] = float("-inf")
    shard = VocabShard(0, V, V)
    top, ids = shard.max_and_argmax(logits)
    assert int(ids[0]) == 5
    assert torch.equal(ids, logits.argmax(-1)) and torch.equal(top, logits.max(-1).values)
    expected = torch.softmax(logits.double(), -1).gather(1, ids[:, None]).squeeze(1)
    assert torch.equal(shard.top_prob(logits, top), shard.chosen_prob(logits, ids))
    assert torch.allclose(shard.top_prob(logits, top), expected, rtol=1e-12, atol=0)
