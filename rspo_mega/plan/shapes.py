"""What the planner knows about a run: the model's per-rank shapes and the step's workload.

:func:`model_shapes` reads the geometry exactly where the model builder does (the resolved
``cfg.model``, then :func:`rspo_mega.models.llada.config.transformer_config` and
:func:`~rspo_mega.models.llada.config.padded_vocab_size`); the parameter count per rank is the
count of the tensors megatron-core allocates for that config (checked against built models in
``tests/test_plan_model.py``). :func:`workload` turns the config and its validated
:class:`~rspo_mega.config.Layout` into the sizes of one RL step on one rank.

Units: sizes are element counts unless a name ends in ``_bytes``.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Optional

from rspo_mega.config import ConfigError, Layout, TrainConfig
from rspo_mega.config.schema import units_per_sample

_BYTES = {"float32": 4, "bfloat16": 2}


@dataclass(frozen=True)
class ModelShapes:
    """Per-rank geometry of the policy under a TP/PP layout (``impl``: the layer spec)."""

    layers: int
    hidden: int
    ffn: int
    heads: int
    groups: int  # query groups (KV heads)
    head_dim: int
    vocab: int  # real ids
    padded_vocab: int
    vocab_columns: int  # real logit columns of the TP rank holding the most of them
    tp: int
    pp: int
    param_bytes: int  # 4 (float32) | 2 (bfloat16)
    impl: str  # local | transformer_engine
    sequence_parallel: bool
    fp8: bool
    lora_rank: int = 0  # model.lora.rank with LoRA on, else 0 (every weight trains)
    lora_targets: tuple[str, ...] = ()  # model.lora.target_modules

    @property
    def layers_per_stage(self) -> int:
        return self.layers // self.pp

    @property
    def vocab_shard(self) -> int:
        """Rows of the embedding / output weight on one TP rank (padded vocab / tp)."""
        return self.padded_vocab // self.tp

    def layer_params(self) -> int:
        """Parameters of one transformer layer on one TP rank (QKV, proj, fc1, fc2, two norms)."""
        qkv = (self.heads + 2 * self.groups) * self.head_dim * self.hidden // self.tp
        proj = self.heads * self.head_dim * self.hidden // self.tp
        mlp = 3 * self.ffn * self.hidden // self.tp  # fc1 [2 ffn / tp, h] (SwiGLU) + fc2
        return qkv + proj + mlp + 2 * self.hidden

    def layer_matmul_params(self) -> int:
        """Weights one token multiplies through in a layer on one TP rank (no norms)."""
        return self.layer_params() - 2 * self.hidden

    def stage_params(self, stage: int) -> int:
        """Parameters on one rank of pipeline stage ``stage`` (embedding first, head last)."""
        n = self.layers_per_stage * self.layer_params()
        if stage == 0:
            n += self.vocab_shard * self.hidden
        if stage == self.pp - 1:
            n += self.vocab_shard * self.hidden + self.hidden  # output layer + final norm
        return n

    def adapter_matrices(self) -> list[int]:
        """Element counts of one layer's LoRA factors on one TP rank, in megatron's parameter
        order (proj, QKV, fc1, fc2; ``A`` then ``B``): a column-parallel base (QKV, fc1) has
        ``A [r, h]`` replicated and ``B [out / tp, r]``, a row-parallel one (proj, fc2)
        ``A [r, in / tp]`` and ``B [h, r]``."""
        r, h, hn = self.lora_rank, self.hidden, self.head_dim
        factors = {"linear_proj": (r * self.heads * hn // self.tp, h * r),
                   "linear_qkv": (r * h, (self.heads + 2 * self.groups) * hn * r // self.tp),
                   "linear_fc1": (r * h, 2 * self.ffn * r // self.tp),
                   "linear_fc2": (r * self.ffn // self.tp, h * r)}
        return [n for t in factors if t in self.lora_targets for n in factors[t]]

    def stage_trainable(self, stage: int) -> int:
        """Trained parameters on one rank of ``stage``: the adapters with LoRA, else all."""
        if not self.lora_rank:
            return self.stage_params(stage)
        return self.layers_per_stage * sum(self.adapter_matrices())

    def total_params(self) -> int:
        """Parameters of the whole model (all ranks of one data-parallel replica, no duplicates)."""
        return sum(self.stage_params(s) for s in range(self.pp)) * self.tp \
            - (self.tp - 1) * (2 * self.layers + 1) * self.hidden  # norms are replicated over TP


def planned_impl(cfg: TrainConfig, kind: str) -> str:
    """The layer spec a run resolves to on ``kind`` hardware (``auto``: TE on GPUs, else local)."""
    if kind == "cpu":
        return "local"
    return "local" if cfg.model.transformer_impl == "local" else "transformer_engine"


def model_shapes(cfg: TrainConfig, impl: str) -> ModelShapes:
    """The policy's shapes under ``cfg.parallel``, read through the model builder's functions."""
    from rspo_mega.models.llada.config import padded_vocab_size, transformer_config
    from rspo_mega.models.llada.logits import true_vocab_columns

    model, par = cfg.model, cfg.parallel
    # The shapes do not depend on sequence parallelism or FP8 (a CPU plan of a TE recipe keeps
    # its geometry); the activations do (sequence parallelism only with the TE spec).
    geometry = model if impl == "transformer_engine" else \
        replace(model, fp8=replace(model.fp8, enabled=False))
    tc = transformer_config(geometry, replace(par, sequence_parallel=False), impl=impl,
                            perform_initialization=False)
    padded = padded_vocab_size(model, par.tp)
    columns = max(true_vocab_columns(model.vocab_size, padded // par.tp, r) for r in range(par.tp))
    return ModelShapes(
        layers=tc.num_layers, hidden=tc.hidden_size, ffn=tc.ffn_hidden_size,
        heads=tc.num_attention_heads, groups=tc.num_query_groups, head_dim=tc.kv_channels,
        vocab=model.vocab_size, padded_vocab=padded, vocab_columns=columns, tp=par.tp, pp=par.pp,
        param_bytes=_BYTES[model.params_dtype], impl=impl,
        sequence_parallel=par.sequence_parallel and impl == "transformer_engine",
        fp8=model.fp8.enabled and impl == "transformer_engine",
        lora_rank=model.lora.rank if model.lora.enabled else 0,
        lora_targets=tuple(model.lora.target_modules) if model.lora.enabled else (),
    )


@dataclass(frozen=True)
class Workload:
    """One RL step on one rank: rollout, ELBO sequences and the update (sizes in rows/tokens)."""

    completions: int  # this rank's completions per step
    prompt_length: int  # tokens of the longest prompt of a batch (left padding to it)
    gen_length: int
    block_length: int
    steps: int  # denoising steps of a rollout (exact schedule: all of them run; 0: SFT, no rollout)
    cfg_doubling: int  # 2 with classifier-free guidance (conditional + unconditional rows)
    rollout_micro_batch: int  # rows per sampler forward
    sampled: bool  # temperature > 0: Gumbel noise is drawn
    cache: str  # none | prefix | dual
    cache_check_rate: float  # share of cached steps also run exactly
    sequences: int  # masked sequences per rank: completions * K * units_per_sample(mask_scheme)
    elbo_micro_batch: int  # masked sequences per forward
    scored_max: int  # most scored positions one ELBO micro-batch can hold (memory)
    scored_mean: float  # expected scored positions per masked sequence (time)
    one_pass: bool  # graphs of all local micro-batches kept, one backward
    inner_updates: int
    reference_passes: int  # reference scorings per step (0: the loss needs no reference)
    old_policy_passes: int  # extra no-grad policy scorings per step (ratio losses, fresh masks)
    offload_reference: bool
    distributed_optimizer: bool
    dp: int

    @property
    def seq_len(self) -> int:
        return self.prompt_length + self.gen_length

    @property
    def rollout_rows(self) -> int:
        return self.completions * self.cfg_doubling

    @property
    def steps_per_block(self) -> int:
        return self.steps // (self.gen_length // self.block_length)

    @property
    def elbo_micro_batches(self) -> int:
        return -(-self.sequences // self.elbo_micro_batch)


def _scored(cfg: TrainConfig, mbs: int) -> tuple[int, float]:
    """(most scored positions in one micro-batch of ``mbs`` sequences, mean per sequence).

    L is the generated span (``count_positions=until_eos`` only shortens it); a trajectory step
    commits ``gen_length / steps`` tokens on average, a block at most. A coupled pair's
    two masks split the span; pairs are consecutive sequences, so a micro-batch holds
    ``ceil(mbs / 2)`` spans at most.
    """
    lik, span = cfg.likelihood, cfg.rollout.gen_length
    if lik.mask_scheme == "coupled":
        return -(-mbs // 2) * span, span / 2
    if lik.mask_scheme == "trajectory":  # a sampled step scores what it committed: <= one block
        return mbs * cfg.rollout.block_length, span / cfg.rollout.steps
    mean = {"bernoulli": (1 + lik.bernoulli_eps) / 2 * span, "stratified": (span + 1) / 2,
            "one_step": float(span)}[lik.mask_scheme]
    return mbs * span, mean


def reference_passes(cfg: TrainConfig) -> int:
    """How often a step scores the reference (fresh masks re-score it for every inner update)."""
    from rspo_mega.algorithms import needs_reference  # megatron-core: after the CLI's warnings

    if not needs_reference(cfg.algorithm):
        return 0
    return cfg.algorithm.inner_updates if cfg.likelihood.fresh_masks_per_update else 1


def old_policy_passes(cfg: TrainConfig) -> int:
    """No-grad policy scorings a step adds: with fresh masks, a ratio loss scores the masks of
    inner updates 1 .. mu-1 under the rollout policy before the first update."""
    from rspo_mega.algorithms import LOSSES, is_rl

    if not is_rl(cfg.algorithm) or not cfg.likelihood.fresh_masks_per_update:
        return 0
    needs_old = LOSSES[cfg.algorithm.name].needs_old_policy
    return cfg.algorithm.inner_updates - 1 if needs_old else 0


def workload(cfg: TrainConfig, layout: Layout, prompt_length: Optional[int] = None) -> Workload:
    """The per-rank sizes of one RL step (``prompt_length`` default: ``data.max_prompt_length``)."""
    ro, lik = cfg.rollout, cfg.likelihood
    plen = cfg.data.max_prompt_length if prompt_length is None else int(prompt_length)
    if plen < 1:
        raise ConfigError(f"prompt length must be >= 1 token, got {plen}")
    from rspo_mega.algorithms import is_rl

    sequences = layout.completions_per_rank * lik.mc_samples * units_per_sample(lik.mask_scheme)
    mbs = min(lik.micro_batch_size, sequences)
    scored_max, scored_mean = _scored(cfg, mbs)
    pipelined = cfg.parallel.pp > 1 or cfg.parallel.vpp is not None
    return Workload(
        completions=layout.completions_per_rank, prompt_length=plen, gen_length=ro.gen_length,
        block_length=ro.block_length, steps=ro.steps if is_rl(cfg.algorithm) else 0,
        cfg_doubling=2 if ro.cfg_scale > 0 else 1,
        rollout_micro_batch=ro.micro_batch_size, sampled=ro.temperature > 0,
        cache=ro.cache, cache_check_rate=ro.cache_check_rate if ro.cache != "none" else 0.0,
        sequences=sequences, elbo_micro_batch=mbs,
        scored_max=scored_max, scored_mean=scored_mean, one_pass=lik.one_pass and not pipelined,
        inner_updates=cfg.algorithm.inner_updates, reference_passes=reference_passes(cfg),
        old_policy_passes=old_policy_passes(cfg),
        offload_reference=lik.offload_reference,
        distributed_optimizer=cfg.optimizer.use_distributed_optimizer, dp=layout.dp,
    )
