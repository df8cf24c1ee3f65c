"""Rules between fields of a :class:`TrainConfig`, checked before any process group or model exists.

The rules of one field (choices, ranges) are its type in :mod:`rspo_mega.config.schema`, checked
by the loader. :func:`validate_config` raises :class:`ConfigError` naming the offending keys and
returns the derived layout (:class:`Layout`). It needs the config alone; the rules a loss or a
task declares are checked with these by the run's setup step (:func:`rspo_mega.setup.validate_run`).
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from typing import Optional

from rspo_mega.config.schema import (
    AlgorithmConfig,
    ModelConfig,
    ParallelConfig,
    RolloutConfig,
    TrainConfig,
)
from rspo_mega.errors import ConfigError


@dataclass(frozen=True)
class Layout:
    """Sizes derived from a valid config."""

    world_size: int
    dp: int
    prompts_per_step: int  # global
    completions_per_rank: int  # per step


def query_groups(m: ModelConfig) -> int:
    """The KV groups of ``m`` (``num_query_groups``, or one per head when unset), after checking
    that they divide the heads and the heads the hidden size."""
    heads, groups = m.num_attention_heads, m.num_query_groups or m.num_attention_heads
    if heads % groups:
        raise ConfigError(f"model.num_attention_heads={heads} is not divisible by "
                          f"model.num_query_groups={groups}")
    if m.hidden_size % heads:
        raise ConfigError(f"model.hidden_size={m.hidden_size} is not divisible by "
                          f"model.num_attention_heads={heads}")
    return groups


def check_model(m: ModelConfig, par: ParallelConfig) -> None:
    """Heads, query groups, layers and token ids against each other and the TP/PP layout."""
    heads, groups = m.num_attention_heads, query_groups(m)
    for key, value in (("num_attention_heads", heads), ("num_query_groups", groups)):
        if value % par.tp:
            raise ConfigError(f"model.{key}={value} is not divisible by parallel.tp={par.tp}")
    if par.vpp is not None and par.pp < 2:
        raise ConfigError(f"parallel.vpp={par.vpp} needs parallel.pp >= 2")
    stages = par.pp * (par.vpp or 1)
    if m.num_layers % stages:
        what = f"parallel.pp*parallel.vpp={stages}" if par.vpp else f"parallel.pp={par.pp}"
        raise ConfigError(f"model.num_layers={m.num_layers} is not divisible by {what}")
    for key in ("mask_token_id", "eos_token_id"):
        if getattr(m, key) >= m.vocab_size:
            raise ConfigError(f"model.{key}={getattr(m, key)} lies outside the vocabulary "
                              f"[0, {m.vocab_size})")
    if par.sequence_parallel and par.tp == 1:
        raise ConfigError("parallel.sequence_parallel=true needs parallel.tp > 1")


TE_ONLY_KEYS = ("parallel.sequence_parallel", "model.fp8.enabled")  # the TE layer spec's alone


def check_layer_spec(cfg: TrainConfig, impl: str, keys: tuple[str, ...] = TE_ONLY_KEYS) -> None:
    """What only the Transformer Engine layer spec (GPUs) has (``keys``: sequence parallelism,
    FP8), against the spec ``impl`` the run resolves to on its machine. The local spec (CPUs,
    or ``model.transformer_impl=local``) has neither: a launch (and, for sequence parallelism,
    a plan) for such a machine refuses them."""
    if impl == "transformer_engine":
        return
    where = "model.transformer_impl=local" if cfg.model.transformer_impl == "local" else \
        "a machine without Transformer Engine and a GPU"
    values = {"parallel.sequence_parallel": cfg.parallel.sequence_parallel,
              "model.fp8.enabled": cfg.model.fp8.enabled}
    for key in keys:
        if values[key]:
            raise ConfigError(f"{key}=true needs the Transformer Engine layer spec on GPUs; with "
                              f"{where} the run takes the local spec, which has none: set "
                              f"{key}=false")


LAUNCHED = "the job was launched with WORLD_SIZE={world}"  # where a validated world came from


def data_parallel_size(par: ParallelConfig, world_size: Optional[int],
                       world_source: str = LAUNCHED) -> tuple[int, int]:
    """``(world, dp)``: the launched world (or ``parallel.world_size``) over ``tp * pp``;
    ``world_source`` says where ``world_size`` came from (``{world}`` becomes it), for the error
    when ``parallel.world_size`` names another."""
    model_parallel = par.tp * par.pp
    if par.world_size is not None and world_size is not None and par.world_size != world_size:
        raise ConfigError(f"parallel.world_size={par.world_size} but "
                          f"{world_source.format(world=world_size)}")
    world = world_size if world_size is not None else (par.world_size or model_parallel)
    if world % model_parallel:
        raise ConfigError(f"world size {world} is not divisible by parallel.tp*parallel.pp = "
                          f"{par.tp}*{par.pp} = {model_parallel}")
    return world, world // model_parallel


def check_schedule(gen_length: int, block_length: int, steps: int,
                   steps_key: str = "rollout.steps") -> None:
    """The semi-autoregressive schedule: whole blocks, the same number of steps in each (also
    checked by :func:`rspo_mega.rollout.sampler.generate` for callers without a config)."""
    if min(gen_length, block_length, steps) < 1:
        raise ConfigError(f"rollout.gen_length={gen_length}, rollout.block_length={block_length} "
                          f"and {steps_key}={steps} must be >= 1")
    if gen_length % block_length:
        raise ConfigError(f"rollout.gen_length={gen_length} is not divisible by "
                          f"rollout.block_length={block_length}")
    if steps % (gen_length // block_length):
        raise ConfigError(f"{steps_key}={steps} is not a multiple of the number of blocks "
                          f"{gen_length // block_length} (gen_length / block_length)")


def check_rollout(ro: RolloutConfig, par: ParallelConfig, context: int, prompt: int) -> None:
    """The denoising schedule, the context length and the block KV cache."""
    check_schedule(ro.gen_length, ro.block_length, ro.steps)
    if ro.eval_steps is not None:
        check_schedule(ro.gen_length, ro.block_length, ro.eval_steps, "rollout.eval_steps")
    if prompt + ro.gen_length > context:
        raise ConfigError(f"data.max_prompt_length + rollout.gen_length = {prompt + ro.gen_length}"
                          f" exceeds model.max_position_embeddings={context}")
    if ro.cache_check_rate and ro.cache == "none":
        raise ConfigError("rollout.cache_check_rate > 0 measures the block KV cache: it needs "
                          "rollout.cache=prefix or dual")
    if ro.cache_refresh_interval and ro.cache == "none":
        raise ConfigError("rollout.cache_refresh_interval > 0 needs rollout.cache=prefix or dual")
    if ro.guard.enabled and not ro.cache_check_rate:
        raise ConfigError("rollout.guard.enabled acts on the checked mismatch of cached steps: it "
                          "needs rollout.cache=prefix or dual and rollout.cache_check_rate > 0")
    if par.sequence_parallel and ro.gen_length % par.tp:
        raise ConfigError(f"parallel.sequence_parallel splits each sequence over parallel.tp="
                          f"{par.tp} ranks: rollout.gen_length={ro.gen_length} must be a "
                          "multiple of it (prompts are padded to one)")
    if ro.cache != "none" and par.sequence_parallel and ro.block_length % par.tp:
        raise ConfigError(f"rollout.cache={ro.cache} with parallel.sequence_parallel runs spans of "
                          f"rollout.block_length={ro.block_length} tokens, which parallel.tp="
                          f"{par.tp} must divide")


def check_centering(alg: AlgorithmConfig, completions_per_rank: int) -> None:
    """Micro-batch centering splits a rank's completions into whole chunks."""
    if alg.centering == "microbatch" and completions_per_rank % alg.microbatch_completions:
        raise ConfigError(f"algorithm.centering=microbatch: algorithm.microbatch_completions="
                          f"{alg.microbatch_completions} does not divide a rank's "
                          f"{completions_per_rank} completions per step")


def check_trajectory(cfg: TrainConfig) -> None:
    """The trajectory estimator (AGRPO's: which losses take it is their declaration): the rollout
    must be a policy the training forward can score (sampled at T > 0, no guidance), with at
    least K denoising steps."""
    lik, ro = cfg.likelihood, cfg.rollout
    if lik.mask_scheme != "trajectory":
        return
    if ro.temperature <= 0:
        raise ConfigError("algorithm.name=agrpo scores the rollout policy softmax(logits / T): it "
                          f"needs rollout.temperature > 0, got {ro.temperature}")
    if ro.cfg_scale > 0:
        raise ConfigError(f"algorithm.name=agrpo: rollout.cfg_scale={ro.cfg_scale} samples from "
                          "guided logits the training forward does not compute; set it to 0")
    if lik.mc_samples > ro.steps:
        raise ConfigError(f"likelihood.mc_samples={lik.mc_samples} sampled steps per completion "
                          f"exceed the rollout's rollout.steps={ro.steps} denoising steps")
    if lik.mask_sharing != "completion":
        raise ConfigError(f"likelihood.mask_sharing={lik.mask_sharing!r}: every completion has "
                          "its own trajectory, so its steps cannot be shared; set 'completion'")
    if lik.count_positions != "generated":
        raise ConfigError(f"likelihood.count_positions={lik.count_positions!r}: the trajectory "
                          "estimator counts the steps up to the last non-EOS commit itself; set "
                          "'generated'")


def check_lora(cfg: TrainConfig) -> None:
    """``model.lora``: distinct targets; adapter dropout only where one forward gives both the
    log-probs and the gradient (one pass, no pipeline), so the loss sees the graph it scores;
    a base to train on (``checkpoint.init_from``: resume checks it, the export merges into it)."""
    lora = cfg.model.lora
    if not lora.enabled:
        return
    targets = lora.target_modules
    if not targets or len(set(targets)) != len(targets):
        raise ConfigError(f"model.lora.target_modules={targets} must name each linear once, "
                          "at least one")
    if lora.dropout > 0 and (cfg.parallel.pp > 1 or not cfg.likelihood.one_pass):
        raise ConfigError(f"model.lora.dropout={lora.dropout} needs likelihood.one_pass=true and "
                          "parallel.pp=1 (a second forward would draw other dropout masks)")
    if not cfg.checkpoint.init_from:
        raise ConfigError("model.lora.enabled=true trains adapters on the weights of "
                          "checkpoint.init_from: set it (an HF directory or a checkpoint)")


# logging section of a tracker -> (the module it imports, the pip extra that installs it)
TRACKER_PACKAGES = {"wandb": ("wandb", "wandb"), "mlflow": ("mlflow", "mlflow")}


def check_logging(cfg: TrainConfig) -> None:
    """Each enabled tracker's package is installed."""
    for section, (module, extra) in TRACKER_PACKAGES.items():
        if getattr(cfg.logging, section).enabled and importlib.util.find_spec(module) is None:
            raise ConfigError(f"logging.{section}.enabled=true needs the '{module}' package, "
                              f"which is not installed: pip install -e '.[{extra}]'")


def validate_config(cfg: TrainConfig, world_size: Optional[int] = None,
                    world_source: str = LAUNCHED) -> Layout:
    """Check every rule between fields; ``world_size`` is the launched world (torchrun) if known
    (``world_source``: where it came from, see :func:`data_parallel_size`)."""
    par, ro = cfg.parallel, cfg.rollout
    check_model(cfg.model, par)
    world, dp = data_parallel_size(par, world_size, world_source)
    if cfg.global_batch_size % ro.group_size:
        raise ConfigError(f"rollout.group_size={ro.group_size} does not divide "
                          f"global_batch_size={cfg.global_batch_size}")
    if cfg.global_batch_size % dp:
        raise ConfigError(f"global_batch_size={cfg.global_batch_size} is not divisible by the "
                          f"data-parallel size {dp}")
    per_rank = cfg.global_batch_size // dp
    check_rollout(ro, par, cfg.model.max_position_embeddings, cfg.data.max_prompt_length)
    check_trajectory(cfg)
    check_centering(cfg.algorithm, per_rank)
    check_lora(cfg)
    if cfg.checkpoint.export_hf and not cfg.checkpoint.save_dir:
        raise ConfigError("checkpoint.export_hf converts the run's final checkpoint: it needs "
                          "checkpoint.save_dir (or set checkpoint.export_hf=null)")
    check_logging(cfg)
    return Layout(world_size=world, dp=dp, prompts_per_step=cfg.global_batch_size // ro.group_size,
                  completions_per_rank=per_rank)
