"""The block KV cache on the parallel LLaDA model.

* Mechanism: right after a refresh (a full forward that writes every K/V), a cached forward of any
  span (the block, or the block and the suffix) gives the exact forward's logits (fp32, 1e-5), in
  every layout, with left padding, GQA and non-consecutive cache rows.
* Completions with the cache on are the same tokens for every TP/PP/DP layout (T=0 and T=1), with
  threshold decoding (rows leave the batch), guidance (own cache rows for the unconditional copy).
* The exactness check counts what it should; bad settings are named.
"""

from __future__ import annotations

import re

import pytest
import torch
import torch.distributed as dist

from rspo_mega.config.schema import ModelConfig, RolloutConfig
from tests.distributed import run_distributed

MODEL = dict(num_layers=4, hidden_size=64, ffn_hidden_size=128, num_attention_heads=4,
             num_query_groups=2, vocab_size=203, mask_token_id=202, eos_token_id=201,
             max_position_embeddings=64, init_method_std=0.2)
LAYOUTS = [(1, 1), (2, 1), (1, 2), (2, 2)]  # (tp, pp); DP is what remains of the 4 ranks
SPANS = [(9, 13), (9, 21), (17, 21)]  # (lo, hi) columns of a 21-token sequence


def _engine(ckpt: str, tp: int, pp: int, rcfg: RolloutConfig):
    from rspo_mega.models.llada import build_llada_model, load_model
    from rspo_mega.parallel import initialize_model_parallel
    from rspo_mega.rollout.engine import RolloutEngine

    initialize_model_parallel(tp=tp, pp=pp, seed=3)
    model = build_llada_model(ModelConfig(**MODEL), init_weights=False)
    load_model(model, ckpt)
    model.eval()
    return RolloutEngine(model, ModelConfig(**MODEL), rcfg, seed=9)


def _mechanism(rank: int, world: int, ckpt: str) -> dict:
    from rspo_mega.models.llada import build_llada_model, save_model
    from rspo_mega.models.llada.kv_cache import BlockKVCache
    from rspo_mega.parallel import initialize_model_parallel
    from rspo_mega.rollout.sampler import CacheStep

    initialize_model_parallel(seed=3)
    save_model(build_llada_model(ModelConfig(**MODEL)), ckpt)
    g = torch.Generator().manual_seed(4)
    x = torch.randint(0, 200, (3, 21), generator=g)
    pad = torch.ones(3, 21, dtype=torch.bool)
    pad[1, :5] = False  # a left-padded row
    rows = [4, 0, 2]  # cache rows: not consecutive, not in order
    out: dict = {}
    for tp, pp in LAYOUTS:
        engine = _engine(ckpt, tp, pp, RolloutConfig(micro_batch_size=2))
        engine.kv_cache = BlockKVCache(engine.chunks, 5, 21)
        out[(tp, pp, "shape")] = tuple(engine.kv_cache.kv.shape)
        all_pos = torch.arange(21).expand(3, 21)
        with torch.no_grad():
            exact = engine.logits(x, pad, all_pos)
            refresh = engine.logits(x, pad, all_pos, CacheStep(rows, 0))
            spans = [engine.logits(x[:, lo:hi], pad, all_pos[:, :hi - lo], CacheStep(rows, lo))
                     for lo, hi in SPANS]
        if exact is not None:
            out[(tp, pp)] = [float((refresh - exact).abs().max())] + [
                float((got - exact[:, lo:hi]).abs().max()) for got, (lo, hi) in zip(spans, SPANS)]
    return out


def test_a_cached_forward_after_a_refresh_is_the_exact_forward(tmp_path):
    results = run_distributed(_mechanism, 4, args=(str(tmp_path / "ckpt"),), timeout=300)
    for tp, pp in LAYOUTS:
        errors = [e for r in results if (tp, pp) in r for e in r[(tp, pp)]]
        assert errors and max(errors) < 1e-5, (tp, pp, errors)
        # [layers of the stage, K/V, rows, positions, KV heads of the rank, head dim]
        assert results[0][(tp, pp, "shape")] == (4 // pp, 2, 5, 21, 2 // tp, 16)


def _prompts(n: int) -> tuple[list[list[int]], list[int]]:
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(0, 200, (3 + i % 4,), generator=g).tolist() for i in range(n)]
    return prompts, [1000 + i for i in range(n)]


CASES = [  # (cache, temperature, threshold, cfg_scale)
    ("dual", 0.0, None, 0.0), ("prefix", 1.0, None, 0.0), ("dual", 1.0, 0.05, 0.0),
    ("dual", 1.0, None, 1.5)]


def _completions(rank: int, world: int, ckpt: str) -> dict:
    from megatron.core import parallel_state as ps

    from rspo_mega.models.llada import build_llada_model, save_model
    from rspo_mega.parallel import initialize_model_parallel
    from tests.rollout.dp_split import split_completions

    initialize_model_parallel(seed=3)
    save_model(build_llada_model(ModelConfig(**MODEL)), ckpt)
    prompts, prompt_uids = _prompts(4)
    out: dict = {}
    for cache, temperature, threshold, cfg_scale in CASES:
        rcfg = RolloutConfig(gen_length=12, block_length=4, steps=9, temperature=temperature,
                             micro_batch_size=3, stop_on_eos_block=False, cfg_scale=cfg_scale,
                             confidence_threshold=threshold, cache=cache,
                             cache_check_rate=1.0)
        for tp, pp in LAYOUTS:
            engine = _engine(ckpt, tp, pp, rcfg)
            mine = split_completions(prompt_uids, 2, ps.get_data_parallel_rank(),
                                      ps.get_data_parallel_world_size())
            rollout = engine.generate([prompts[i] for i, _ in mine], [u for _, u in mine])
            local = {uid: rollout.completion_ids[j] for j, (_, uid) in enumerate(mine)}
            gathered: list = [None] * world
            dist.all_gather_object(gathered, local)
            out[(cache, temperature, threshold, cfg_scale, tp, pp)] = {
                k: v for part in gathered for k, v in part.items()}
            out[("steps", cache, threshold, tp, pp)] = rollout.steps_used.tolist()
            out[("check", cache, temperature, threshold, cfg_scale, tp, pp)] = rollout.cache_check
    return out


def test_cached_completions_do_not_depend_on_the_layout(tmp_path):
    results = run_distributed(_completions, 4, args=(str(tmp_path / "ckpt"),), timeout=600)
    for case in CASES:
        base = results[0][case + (1, 1)]
        assert len(base) == 8
        for tp, pp in LAYOUTS:
            for r in results:
                got = r[case + (tp, pp)]
                assert got.keys() == base.keys()
                assert all(torch.equal(got[u], base[u]) for u in base), (case, tp, pp)
                check = r[("check",) + case + (tp, pp)]
                # every cached step was checked (rate 1); the counts reach every pipeline stage
                assert check.steps > 0 and check.committed > 0, (case, tp, pp, check)
    # the random model's stale K/V change some commits, and the check sees it
    assert any(r[("check",) + case + (1, 1)].mismatched > 0 for r in results for case in CASES)
    threshold_steps = {n for r in results for n in r[("steps", "dual", 0.05, 1, 1)]}
    assert len(threshold_steps) > 1  # rows finished their blocks early and left the batch


def _positionwise(x: torch.Tensor, pad, positions: torch.Tensor, cache) -> torch.Tensor:
    """Logits of each column from its own token and true column only: a cache cannot go stale."""
    g = torch.Generator().manual_seed(7)
    emb, pos = torch.randn(203, 203, generator=g), torch.randn(64, 203, generator=g)
    lo = 0 if cache is None else cache.lo
    cols = positions + lo
    return emb[x.gather(1, positions)] + pos[cols]


@pytest.mark.parametrize("cache", ["prefix", "dual"])
def test_the_check_counts_no_mismatch_where_the_cache_is_exact(cache):
    from rspo_mega.rollout.engine import sampler_settings
    from rspo_mega.rollout.sampler import generate

    prompts = [[1, 2, 3], [4, 5]]
    rcfg = dict(gen_length=12, block_length=4, steps=12, temperature=1.0, stop_on_eos_block=False)
    settings = lambda **kw: sampler_settings(ModelConfig(**MODEL), RolloutConfig(**rcfg, **kw), 3)
    exact = generate(_positionwise, prompts, [5, 6], settings())
    cached = generate(_positionwise, prompts, [5, 6], settings(cache=cache, cache_check_rate=0.5))
    assert torch.equal(exact.completion_ids, cached.completion_ids)
    # 3 blocks x 3 cached steps; rate 0.5 checks every second one
    assert cached.cache_check.steps == 4 and cached.cache_check.committed == 4 * 2
    assert cached.cache_check.mismatched == 0 and cached.cache_check.confidence_diff < 1e-12


@pytest.mark.parametrize("interval, pattern", [(0, [0, 1, 1, 1]), (2, [0, 1, 0, 1]), (1, [0] * 4)])
def test_the_cache_is_refreshed_every_interval_steps(interval, pattern):
    """Per block of 4 steps: the full forwards (refreshes, from column 0) and the cached spans."""
    from rspo_mega.rollout.engine import sampler_settings
    from rspo_mega.rollout.sampler import generate

    starts: list[int] = []

    def recording(x, pad, positions, cache):
        starts.append(cache.lo)
        return _positionwise(x, pad, positions, cache)

    rcfg = RolloutConfig(gen_length=8, block_length=4, steps=8, stop_on_eos_block=False,
                         cache="dual", cache_refresh_interval=interval)
    generate(recording, [[1, 2, 3]], [5], sampler_settings(ModelConfig(**MODEL), rcfg, 3))
    assert [lo > 0 for lo in starts] == [bool(p) for p in pattern * 2]
    assert set(starts) == ({0, 3, 7} if interval != 1 else {0})  # dual spans start at the block


def test_the_check_counts():
    from rspo_mega.rollout.sampler import CacheCheck

    check = CacheCheck()
    commit = torch.tensor([[True, True, False]])
    check.add(commit, torch.tensor([[1, 2, 3]]), torch.tensor([[0.5, 0.9, 0.1]]),
              torch.tensor([[1, 4, 4]]), torch.tensor([[0.25, 0.9, 0.7]]), threshold=0.8)
    assert (check.steps, check.committed, check.mismatched) == (1, 2, 1)
    assert check.confidence_diff == pytest.approx(0.25)
    assert (check.confident, check.confident_mismatched) == (1, 1)  # the 0.9 commit differs
    assert CacheCheck.from_counts(check.counts()) == check
    check.add(commit, torch.tensor([[1, 2, 3]]), torch.tensor([[0.5, 0.9, 0.1]]),
              torch.tensor([[1, 4, 4]]), torch.tensor([[0.25, 0.9, 0.7]]), threshold=None)
    assert (check.committed, check.confident) == (4, 1)  # no threshold: none counted confident


@pytest.mark.parametrize("override, message", [
    (["rollout.cache=full"], "'rollout.cache' = 'full' must be one of ['none', 'prefix', 'dual']"),
    (["rollout.cache_check_rate=0.5"], "needs rollout.cache=prefix or dual"),
    (["rollout.cache=dual", "rollout.cache_check_rate=2.0"],
     "'rollout.cache_check_rate' must be in [0, 1], got 2.0"),
    (["rollout.cache_refresh_interval=2"], "rollout.cache_refresh_interval > 0 needs rollout.cache"),
    (["rollout.cache=dual", "rollout.cache_refresh_interval=-1"],
     "'rollout.cache_refresh_interval' must be"),
])
def test_bad_cache_settings_are_named(override, message):
    from rspo_mega.config import ConfigError
    from rspo_mega.setup import load_run_config, validate_run

    with pytest.raises(ConfigError, match=re.escape(message)):
        validate_run(load_run_config(None, override))
