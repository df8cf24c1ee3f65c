"""The rollout guard: synthetic mismatch makes it refresh the cache more often and raise the
confidence threshold; low mismatch relaxes both back to the configured settings; its state
round-trips; bad settings are named."""

from __future__ import annotations

import re

import pytest
import torch

from rspo_mega.config.schema import ModelConfig, RolloutConfig, RolloutGuardConfig
from rspo_mega.rollout.guard import RolloutGuard
from rspo_mega.rollout.sampler import CacheCheck

MODEL = dict(vocab_size=203, mask_token_id=202, eos_token_id=201, max_position_embeddings=64)
# 16 denoising steps per block: the refresh interval can take the values 16, 8, 4, 2, 1
ROLLOUT = dict(gen_length=32, block_length=16, steps=32, temperature=1.0, cache="dual",
               cache_check_rate=1.0, confidence_threshold=0.9, stop_on_eos_block=False,
               guard=RolloutGuardConfig(enabled=True, mismatch_bound=0.1))


def _check(mismatch: float, confident_mismatch: float = 0.0) -> CacheCheck:
    """Counts of 1000 checked commits, 100 of them above the threshold."""
    return CacheCheck(steps=10, committed=1000, mismatched=round(1000 * mismatch),
                      confident=100, confident_mismatched=round(100 * confident_mismatch))


def test_mismatch_above_the_bound_halves_the_interval_and_below_half_doubles_it():
    guard = RolloutGuard.from_config(RolloutConfig(**ROLLOUT))
    assert guard.refresh_interval == 16  # a refresh at each block's first step only
    seen = []
    for mismatch in [0.3] * 5 + [0.07] + [0.02] * 5:
        guard.update(_check(mismatch))
        seen.append(guard.refresh_interval)
    # 0.3 > bound: 8, 4, 2, 1, 1 (every step refreshes); 0.07 in [bound/2, bound]: holds;
    # 0.02 < bound/2: 2, 4, 8, 16, 16
    assert seen == [8, 4, 2, 1, 1, 1, 2, 4, 8, 16, 16]


def test_confident_mismatch_raises_the_threshold_and_relaxes_it_to_the_configured_one():
    guard = RolloutGuard.from_config(RolloutConfig(**ROLLOUT))
    seen = []
    for mismatch in [0.5, 0.5, 0.08, 0.0, 0.0, 0.0]:
        guard.update(_check(0.0, confident_mismatch=mismatch))
        seen.append(guard.threshold)
    assert seen == pytest.approx([0.95, 0.975, 0.975, 0.95, 0.9, 0.9])


def test_nothing_checked_changes_nothing():
    guard = RolloutGuard.from_config(RolloutConfig(**ROLLOUT))
    guard.update(CacheCheck())
    assert (guard.refresh_interval, guard.threshold) == (16, 0.9)
    no_threshold = RolloutGuard.from_config(RolloutConfig(**{**ROLLOUT,
                                                            "confidence_threshold": None}))
    no_threshold.update(_check(0.0, confident_mismatch=1.0))
    assert no_threshold.threshold is None and "guard/threshold" not in no_threshold.metrics()


def test_the_guard_is_off_by_default_and_starts_at_the_configured_interval():
    assert RolloutGuard.from_config(RolloutConfig()) is None
    guard = RolloutGuard.from_config(RolloutConfig(**ROLLOUT, cache_refresh_interval=4))
    assert guard.refresh_interval == 4 and guard.max_interval == 16


def test_the_state_round_trips():
    guard = RolloutGuard.from_config(RolloutConfig(**ROLLOUT))
    guard.update(_check(0.5, confident_mismatch=0.5))
    other = RolloutGuard.from_config(RolloutConfig(**ROLLOUT))
    other.load_state_dict(guard.state_dict())
    assert other == guard and other.overrides() == {"cache_refresh_interval": 8,
                                                    "confidence_threshold": pytest.approx(0.95)}


def _stale(x: torch.Tensor, pad, positions: torch.Tensor, cache) -> torch.Tensor:
    """Logits from each column's token and position, plus noise on cached steps: a cache that
    goes stale (synthetic mismatch)."""
    g = torch.Generator().manual_seed(7)
    emb, pos = torch.randn(203, 203, generator=g), torch.randn(64, 203, generator=g)
    lo = 0 if cache is None else cache.lo
    logits = emb[x.gather(1, positions)] + pos[positions + lo]
    if cache is not None and lo > 0:
        logits = logits + 3 * torch.randn(logits.shape, generator=torch.Generator().manual_seed(lo))
    return logits


def test_synthetic_mismatch_in_rollouts_makes_the_guard_refresh():
    """Rollouts through a cache whose logits differ from the exact ones: the guard halves the
    refresh interval after each, so the next rollout runs more full forwards, until every step
    refreshes and nothing is cached any more."""
    from rspo_mega.rollout.engine import sampler_settings
    from rspo_mega.rollout.sampler import generate

    base = sampler_settings(ModelConfig(**MODEL), RolloutConfig(**ROLLOUT), seed=3)
    guard = RolloutGuard.from_config(RolloutConfig(**ROLLOUT))
    refreshes, cached = [], []
    for _ in range(6):
        starts: list[int] = []

        def recording(x, pad, positions, cache):
            starts.append(-1 if cache is None else cache.lo)
            return _stale(x, pad, positions, cache)

        settings = base.replace(**guard.overrides())
        rollout = generate(recording, [[1, 2, 3], [4, 5, 6]], [5, 6], settings)
        refreshes.append(starts.count(0))
        cached.append(sum(lo > 0 for lo in starts))
        guard.update(rollout.cache_check)
    assert refreshes == [2, 4, 8, 16, 32, 32]  # 2 blocks x (16 / interval)
    assert cached[0] > 0 and cached[-1] == 0


@pytest.mark.parametrize("override, message", [
    (["rollout.guard.enabled=true"], "rollout.guard.enabled acts on the checked mismatch"),
    (["rollout.cache=dual", "rollout.guard.enabled=true"], "rollout.cache_check_rate > 0"),
    (["rollout.guard.mismatch_bound=0"], "'rollout.guard.mismatch_bound' must be in (0, 1]"),
])
def test_bad_guard_settings_are_named(override, message):
    from rspo_mega.config import ConfigError
    from rspo_mega.setup import load_run_config, validate_run

    with pytest.raises(ConfigError, match=re.escape(message)):
        validate_run(load_run_config(None, override))
