"""The rollout guard (``rollout.guard``): keeps cached, threshold-decoded RL rollouts close to
exact ones by steering two settings from the measured mismatch of the block KV cache.

Every RL step re-runs a ``rollout.cache_check_rate`` share of its cached denoising steps exactly
(:class:`~rspo_mega.rollout.sampler.CacheCheck`). From the step's global counts the guard sets the
next step's

* **refresh interval** (``cache_refresh_interval``): halved, down to 1 (every step refreshes:
  the exact sampler's logits), while the share of committed tokens the cache changed exceeds
  ``mismatch_bound``; doubled back, up to the block's steps (a refresh at its first step only),
  once it is below half the bound;
* **confidence threshold** (with ``rollout.confidence_threshold``): moved halfway to 1 while the
  share among the commits above the threshold (those parallel decoding commits early) exceeds the
  bound, and halfway back to the configured one below half of it. Over-confident cached logits
  then commit fewer tokens at once.

The factor of two between raising and relaxing keeps a mismatch near the bound from making the
settings oscillate. The state (both settings) is checkpointed with the run's batches, so a
resume continues bitwise.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Mapping, Optional

from rspo_mega.config.schema import RolloutConfig
from rspo_mega.rollout.sampler import CacheCheck


@dataclass
class RolloutGuard:
    """The settings of the next rollout and the bound they are steered by."""

    mismatch_bound: float
    max_interval: int  # the block's denoising steps: a refresh at its first step only
    base_threshold: Optional[float]  # rollout.confidence_threshold
    refresh_interval: int  # steps of a block between full forwards (1..max_interval)
    threshold: Optional[float]  # the confidence threshold in use (>= base_threshold)

    @classmethod
    def from_config(cls, ro: RolloutConfig) -> Optional["RolloutGuard"]:
        """The guard of ``rollout.guard`` (None when it is off)."""
        if not ro.guard.enabled:
            return None
        steps_per_block = ro.steps // (ro.gen_length // ro.block_length)
        interval = min(ro.cache_refresh_interval or steps_per_block, steps_per_block)
        return cls(ro.guard.mismatch_bound, steps_per_block, ro.confidence_threshold, interval,
                   ro.confidence_threshold)

    def overrides(self) -> dict[str, Any]:
        """Sampler settings of the next rollout (``RolloutEngine.generate`` overrides)."""
        return {"cache_refresh_interval": self.refresh_interval,
                "confidence_threshold": self.threshold}

    def update(self, check: CacheCheck) -> None:
        """Steer both settings from one step's global check counts (nothing checked: no change)."""
        if check.committed:
            self.refresh_interval = self._steer_interval(check.mismatched / check.committed)
        if self.threshold is not None and check.confident:
            self.threshold = self._steer_threshold(check.confident_mismatched / check.confident)

    def _steer_interval(self, mismatch: float) -> int:
        if mismatch > self.mismatch_bound:
            return max(1, self.refresh_interval // 2)
        if mismatch < self.mismatch_bound / 2:
            return min(self.max_interval, self.refresh_interval * 2)
        return self.refresh_interval

    def _steer_threshold(self, mismatch: float) -> float:
        gap, base_gap = 1.0 - self.threshold, 1.0 - self.base_threshold
        if mismatch > self.mismatch_bound:
            return 1.0 - gap / 2
        if mismatch < self.mismatch_bound / 2:
            return 1.0 - min(base_gap, 2 * gap)
        return self.threshold

    def metrics(self) -> dict[str, float]:
        """The settings the step ran with (logged before :meth:`update`)."""
        out = {"guard/refresh_interval": float(self.refresh_interval)}
        if self.threshold is not None:
            out["guard/threshold"] = self.threshold
        return out

    def state_dict(self) -> dict[str, Any]:
        return asdict(self)

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.refresh_interval = int(state["refresh_interval"])
        self.threshold = state["threshold"]
