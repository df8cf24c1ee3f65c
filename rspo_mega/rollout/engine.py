"""The rollout engine: the masked-diffusion sampler on a TP/PP/DP megatron model.

* **DP**: each data-parallel rank generates the completions it is given (the trainer's batch
  split). A completion's uid is :func:`completion_uid` of ``(prompt uid, j)``; its randomness
  depends on that uid (and the step's seed) only, so the split changes nothing.
* **TP**: logits stay vocab-parallel; :class:`VocabShard` samples with collectives.
* **PP**: each denoising step runs the micro-batches through megatron-core's forward-only
  pipeline schedule; the last stage samples and broadcasts the committed tokens to every stage.
* **Block KV cache** (``rollout.cache``): one :class:`BlockKVCache` per ``generate`` call holds
  the K/V of this rank's heads (TP) and layers (PP stage, virtual chunks) for all its rows; a
  cached step passes only the span's activations between stages.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any, Optional

import torch
import torch.distributed as dist

from rspo_mega.config.schema import ModelConfig, RolloutConfig
from rspo_mega.models.llada.forward_context import CacheView
from rspo_mega.models.llada.kv_cache import BlockKVCache
from rspo_mega.parallel.pipeline import forward_only_outputs, microbatch_rows
from rspo_mega.rng import hash64
from rspo_mega.rollout.sampler import (
    CacheCheck,
    CacheStep,
    Rollout,
    SamplerSettings,
    generate,
)
from rspo_mega.rollout.vocab_parallel import VocabShard


def completion_uid(prompt_uid: int, j: int) -> int:
    """Global, layout-independent uid of sample ``j`` of a prompt (63-bit, fits int64)."""
    return hash64(int(prompt_uid), int(j)) >> 1


def _forward(chunk: torch.nn.Module, batch: tuple) -> torch.Tensor:
    """One pipeline micro-batch ``(ids, key padding, positions, cache view)`` through a chunk."""
    from rspo_mega.models.llada import llada_forward

    ids, pad, positions, view = batch
    return llada_forward(chunk, ids, pad, positions=positions, kv_cache=view)


def sampler_settings(model_cfg: ModelConfig, rollout_cfg: RolloutConfig, seed: int,
                     prompt_multiple: int = 1) -> SamplerSettings:
    """Sampler settings: a copy of the ``rollout`` config section, the model's special ids and
    vocabulary, the seed and ``parallel.sequence_multiple``."""
    return SamplerSettings(replace(rollout_cfg), model_cfg.mask_token_id, model_cfg.eos_token_id,
                           model_cfg.vocab_size, seed, prompt_multiple)


class RolloutEngine:
    """Generates completions with an LLaDA model built by ``build_llada_model`` (any TP/PP).

    ``model``: the model, or the list of its virtual-pipeline chunks; ``sequence_multiple``:
    ``parallel.sequence_multiple`` of the layout it was built for.
    """

    def __init__(
        self,
        model: torch.nn.Module | list[torch.nn.Module],
        model_cfg: ModelConfig,
        rollout_cfg: RolloutConfig,
        seed: int,
        sequence_multiple: int = 1,
    ) -> None:
        from megatron.core import parallel_state as ps

        self.chunks = model if isinstance(model, list) else [model]
        self.model_cfg = model_cfg
        self.settings = sampler_settings(model_cfg, rollout_cfg, seed, sequence_multiple)
        self.micro_batch_size = rollout_cfg.micro_batch_size
        self.pp = ps.get_pipeline_model_parallel_world_size()
        self.is_last = ps.is_pipeline_last_stage(ignore_virtual=True)
        tp = ps.get_tensor_model_parallel_world_size()
        from rspo_mega.models.llada import padded_vocab_size

        self.shard = VocabShard.from_parallel_state(
            padded_vocab_size(model_cfg, tp) // tp, model_cfg.vocab_size
        )
        self.device = next(self.chunks[0].parameters()).device
        self.kv_cache: Optional[BlockKVCache] = None  # allocated for one generate() call

    # -- the two callables the sampler needs -------------------------------------------------

    def logits(self, x: torch.Tensor, key_padding: Optional[torch.Tensor],
               positions: torch.Tensor, cache: Optional[CacheStep] = None) -> Optional[torch.Tensor]:
        """Vocab-parallel logits ``[b, m, v]`` at ``positions [b, m]`` on the last stage, else ``None``.

        ``x [b, L]``: the whole sequences, or with ``cache`` the columns from ``cache.lo`` run
        through this rollout's block KV cache (rows ``cache.rows``).
        """
        from rspo_mega.models.llada import llada_forward

        b = x.shape[0]
        rows = list(range(b)) if cache is None else cache.rows
        if self.pp == 1 and len(self.chunks) == 1:  # micro-batches of any size
            n = self.micro_batch_size
            outs = [llada_forward(self.chunks[0], x[i:i + n],
                                  None if key_padding is None else key_padding[i:i + n],
                                  positions=positions[i:i + n],
                                  kv_cache=self._view(cache, rows[i:i + n]))
                    for i in range(0, b, n)]
            return torch.cat(outs)
        # The pipeline needs equal micro-batches: the last is padded with copies of a row, whose
        # outputs are dropped (a copy re-writes its row's cache entry with the same values).
        mbs = min(b, self.micro_batch_size)
        batches = [(x[part.index], None if key_padding is None else key_padding[part.index],
                    positions[part.index], self._view(cache, [rows[i] for i in part.index.tolist()]))
                   for part in microbatch_rows(b, mbs, pad=True)]
        outputs = forward_only_outputs(self.chunks, batches, _forward, seq_length=x.shape[1],
                                       micro_batch_size=mbs)
        return torch.cat(outputs)[:b] if self.is_last else None

    def _view(self, cache: Optional[CacheStep], rows: list[int]) -> Optional[CacheView]:
        if cache is None:
            return None
        if self.kv_cache is None:
            raise RuntimeError("RolloutEngine: a cached step outside generate()")
        return self.kv_cache.view(rows, cache.lo)

    def sync(self, x: torch.Tensor) -> torch.Tensor:
        """The last stage's tokens on every pipeline stage (a broadcast of ``[b, S]`` ids)."""
        if self.pp == 1:
            return x
        from megatron.core import parallel_state as ps

        dist.broadcast(
            x, src=ps.get_pipeline_model_parallel_last_rank(),
            group=ps.get_pipeline_model_parallel_group(),
        )
        return x

    # -- public API ----------------------------------------------------------------------------

    def generate(self, prompts: list[list[int]], uids: list[int], trajectory: bool = False,
                 **overrides: Any) -> Rollout:
        """Completions for this rank's prompts (token lists), one per uid; see ``sampler.generate``.

        ``overrides`` replace ``RolloutConfig`` fields (or ``seed``) for this call
        (:meth:`SamplerSettings.replace`): e.g. ``seed`` (per training step), ``temperature``,
        ``steps``, ``cache`` and ``confidence_threshold`` (evaluation's exact greedy decoding),
        ``cache_refresh_interval`` and ``confidence_threshold``
        (:class:`~rspo_mega.rollout.guard.RolloutGuard`). ``trajectory`` records the rollout's
        :class:`Trajectory` (the same on every pipeline stage).
        """
        settings = self.settings.replace(**overrides)
        ro = settings.rollout
        if ro.cache == "none":
            settings = settings.replace(cache_check_rate=0.0, cache_refresh_interval=0)
        for chunk in self.chunks:
            chunk.eval()
        if ro.cache != "none":
            rows = len(prompts) * (2 if ro.cfg_scale > 0 else 1)
            seq = max(map(len, prompts), default=0) + ro.gen_length
            self.kv_cache = BlockKVCache(self.chunks, rows, seq)
        try:
            rollout = generate(
                self.logits, prompts, uids, settings, shard=self.shard, sync_fn=self.sync,
                device=self.device, record_trajectory=trajectory,
            )
        finally:
            self.kv_cache = None
            for chunk in self.chunks:
                chunk.train()
        if trajectory:
            self._share_trajectory(rollout)
        return self._share_cache_check(rollout, settings)

    def _share_trajectory(self, rollout: Rollout) -> None:
        """The last stage's rollout log-probs and entropies on every pipeline stage."""
        record = rollout.trajectory
        if self.pp == 1:
            return
        from megatron.core import parallel_state as ps

        scores = torch.stack([record.logp, record.entropy]) if self.is_last else \
            torch.empty((2,) + tuple(record.commit_step.shape), dtype=torch.float32)
        scores = scores.to(self.device)
        dist.broadcast(scores, src=ps.get_pipeline_model_parallel_last_rank(),
                       group=ps.get_pipeline_model_parallel_group())
        record.logp, record.entropy = (t.cpu() for t in scores.unbind(0))

    def _share_cache_check(self, rollout: Rollout, settings: SamplerSettings) -> Rollout:
        """The last stage's cache-check counts on every pipeline stage (they log on rank 0)."""
        check = rollout.cache_check
        if self.pp == 1 or not settings.rollout.cache_check_rate:
            return rollout
        from megatron.core import parallel_state as ps

        counts = torch.tensor(check.counts(), dtype=torch.float64, device=self.device)
        dist.broadcast(counts, src=ps.get_pipeline_model_parallel_last_rank(),
                       group=ps.get_pipeline_model_parallel_group())
        rollout.cache_check = CacheCheck.from_counts(counts.tolist())
        return rollout
