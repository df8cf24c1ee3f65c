"""Cross-field validation of a :class:`TrainConfig`, run before any process group or model exists.

:func:`validate_config` raises :class:`ConfigError` naming the offending key and returns the
derived layout (:class:`Layout`): data-parallel size, prompts per step, micro-batches per step.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from rspo_mega.config.loader import ConfigError
from rspo_mega.config.schema import (
    AlgorithmConfig,
    CountdownConfig,
    LikelihoodConfig,
    ParallelConfig,
    RolloutConfig,
    TrainConfig,
)
from rspo_mega.rollout.sampler import CACHE_MODES

CHOICES: dict[str, tuple[str, ...]] = {
    "model.params_dtype": ("float32", "bfloat16"),
    "model.transformer_impl": ("auto", "local", "transformer_engine"),
    "model.fp8.recipe": ("delayed", "tensorwise", "mxfp8", "blockwise"),
    "model.fp8.format": ("hybrid", "e4m3"),
    "model.fp8.amax_compute_algo": ("max", "most_recent"),
    "rollout.remasking": ("low_confidence", "random"),
    "rollout.mode": ("exact", "threshold"),
    "rollout.cache": CACHE_MODES,
    "likelihood.mask_scheme": ("bernoulli", "stratified", "coupled", "one_step", "trajectory"),
    "likelihood.step_sampling": ("uniform", "entropy"),
    "likelihood.count_positions": ("generated", "until_eos"),
    "likelihood.mask_sharing": ("completion", "group"),
    "algorithm.name": ("rspo", "espo", "diffu_grpo", "agrpo", "sft"),
    "algorithm.centering": ("batch", "group", "microbatch", "none"),
    "algorithm.advantage": ("mean", "leave_one_out", "standardized"),
    "optimizer.decay_style": ("constant", "linear", "cosine"),
    "data.template": ("plain", "llada_chat"),
    "data.task": ("sudoku", "countdown", "gsm8k", "math500"),
    "non_finite_policy": ("skip", "abort"),
    "logging.level": ("DEBUG", "INFO", "WARNING", "ERROR"),
}

# The likelihood.mask_scheme choices that estimate the ELBO itself: those an SFT run takes.
SFT_MASK_SCHEMES: tuple[str, ...] = ("bernoulli", "stratified", "coupled")

POSITIVE = (
    "train_steps", "global_batch_size", "micro_batch_size",
    "model.num_layers", "model.hidden_size", "model.ffn_hidden_size", "model.num_attention_heads",
    "model.vocab_size", "model.max_position_embeddings", "model.make_vocab_size_divisible_by",
    "parallel.tp", "parallel.pp", "parallel.cp",
    "rollout.group_size", "rollout.gen_length", "rollout.block_length", "rollout.steps",
    "rollout.micro_batch_size", "likelihood.mc_samples", "likelihood.micro_batch_size",
    "algorithm.inner_updates", "data.max_prompt_length",
)


@dataclass(frozen=True)
class Layout:
    """Sizes derived from a valid config."""

    world_size: int
    dp: int
    prompts_per_step: int  # global
    completions_per_rank: int  # per step
    num_microbatches: int  # per rank per step


def _get(cfg: TrainConfig, dotted: str):
    node = cfg
    for part in dotted.split("."):
        node = getattr(node, part)
    return node


def _model_geometry(cfg: TrainConfig) -> dict:
    """Heads, query groups, layers and vocab: from ``model.hf_config`` when set, else the YAML."""
    m = cfg.model
    geo = dict(
        heads=m.num_attention_heads, groups=m.num_query_groups or m.num_attention_heads,
        layers=m.num_layers, vocab=m.vocab_size, hidden=m.hidden_size,
        mask=m.mask_token_id, eos=m.eos_token_id, ctx=m.max_position_embeddings,
    )
    if m.hf_config:
        path = Path(m.hf_config)
        path = path / "config.json" if path.is_dir() else path
        if not path.is_file():
            raise ConfigError(f"model.hf_config: '{path}' does not exist")
        try:
            hf = json.loads(path.read_text())
        except json.JSONDecodeError as exc:
            raise ConfigError(f"model.hf_config: '{path}' is not valid JSON ({exc})") from None
        geo.update(
            heads=hf.get("n_heads", geo["heads"]),
            groups=hf.get("n_kv_heads") or hf.get("n_heads", geo["heads"]),
            layers=hf.get("n_layers", geo["layers"]),
            vocab=hf.get("embedding_size") or hf.get("vocab_size", geo["vocab"]),
            hidden=hf.get("d_model", geo["hidden"]),
            mask=hf.get("mask_token_id", geo["mask"]),
            eos=hf.get("eos_token_id", geo["eos"]),
            ctx=hf.get("max_sequence_length", geo["ctx"]),
        )
    return geo


def _check_section(section: object, prefix: str) -> None:
    """The CHOICES and POSITIVE rules of one section (keys under ``prefix.``)."""
    for key, options in CHOICES.items():
        if key.startswith(prefix + ".") and getattr(section, key[len(prefix) + 1:]) not in options:
            value = getattr(section, key[len(prefix) + 1:])
            raise ConfigError(f"config key '{key}' = {value!r} must be one of {list(options)}")
    for key in POSITIVE:
        if key.startswith(prefix + "."):
            value = getattr(section, key[len(prefix) + 1:])
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"config key '{key}' must be >= 1, got {value!r}")


def check_rollout_cache(ro: RolloutConfig, par: ParallelConfig) -> None:
    """``rollout.cache_check_rate`` and the cache's span lengths under sequence parallelism."""
    if not 0 <= ro.cache_check_rate <= 1:
        raise ConfigError(f"rollout.cache_check_rate must lie in [0, 1], got {ro.cache_check_rate}")
    if ro.cache_check_rate and ro.cache == "none":
        raise ConfigError("rollout.cache_check_rate > 0 measures the block KV cache: it needs "
                          "rollout.cache=prefix or dual")
    if ro.cache != "none" and par.sequence_parallel and ro.block_length % par.tp:
        raise ConfigError(f"rollout.cache={ro.cache} with parallel.sequence_parallel runs spans of "
                          f"rollout.block_length={ro.block_length} tokens, which parallel.tp="
                          f"{par.tp} must divide")


def check_likelihood(lik: LikelihoodConfig) -> None:
    """Rules of the ``likelihood`` section alone (also for estimators built outside a run)."""
    _check_section(lik, "likelihood")
    if not 0 <= lik.bernoulli_eps < 1:
        raise ConfigError(f"likelihood.bernoulli_eps must lie in [0, 1), got {lik.bernoulli_eps}")
    if not 0 <= lik.one_step_prompt_mask_prob <= 1:
        raise ConfigError(
            f"likelihood.one_step_prompt_mask_prob must lie in [0, 1], got "
            f"{lik.one_step_prompt_mask_prob}"
        )


def check_sft_likelihood(alg: AlgorithmConfig, lik: LikelihoodConfig) -> None:
    """An SFT run maximises the ELBO itself: an estimator of it (``SFT_MASK_SCHEMES``; bernoulli
    is biased by O(``likelihood.bernoulli_eps``) only), each example with its own masks (it has
    no group of completions to share them)."""
    if alg.name != "sft":
        return
    if lik.mask_scheme not in SFT_MASK_SCHEMES:
        raise ConfigError(f"likelihood.mask_scheme={lik.mask_scheme!r} does not estimate the ELBO "
                          "an SFT run (algorithm.name=sft) maximises: use one of "
                          f"{list(SFT_MASK_SCHEMES)}")
    if lik.mask_sharing != "completion":
        raise ConfigError(f"likelihood.mask_sharing={lik.mask_sharing!r} shares masks among the "
                          "completions of a prompt; an SFT run (algorithm.name=sft) has one target "
                          "per prompt: set likelihood.mask_sharing=completion")


def check_trajectory(cfg: TrainConfig) -> None:
    """AGRPO and the trajectory estimator go together; the rollout must be a policy the training
    forward can score (sampled at T > 0, no guidance), with at least K denoising steps."""
    alg, lik, ro = cfg.algorithm, cfg.likelihood, cfg.rollout
    if (alg.name == "agrpo") != (lik.mask_scheme == "trajectory"):
        raise ConfigError(f"algorithm.name={alg.name!r} with likelihood.mask_scheme="
                          f"{lik.mask_scheme!r}: algorithm.name=agrpo takes likelihood."
                          "mask_scheme=trajectory, and only it does (the other losses score ELBOs)")
    if alg.name != "agrpo":
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


def check_countdown(cd: CountdownConfig) -> None:
    """The generated-Countdown section, checked by the task's own constructor (whatever the
    task, so a bad section in a shared YAML is found at once)."""
    from rspo_mega.tasks.countdown import CountdownTask

    try:
        CountdownTask(**dataclasses.asdict(cd))
    except ValueError as err:
        raise ConfigError(f"data.countdown: {err}") from None


def check_algorithm(alg: AlgorithmConfig) -> None:
    """Rules of the ``algorithm`` section alone (also for losses built outside a run)."""
    _check_section(alg, "algorithm")
    if alg.lambda_ < 0:
        raise ConfigError(f"algorithm.lambda_ must be >= 0, got {alg.lambda_}")
    if alg.advantage_eps < 0:
        raise ConfigError(f"algorithm.advantage_eps must be >= 0, got {alg.advantage_eps}")
    if alg.clip_eps <= 0:
        raise ConfigError(f"algorithm.clip_eps must be > 0, got {alg.clip_eps}")
    if alg.kl_beta < 0:
        raise ConfigError(f"algorithm.kl_beta must be >= 0, got {alg.kl_beta}")
    if alg.push_clip is not None and alg.push_clip <= 0:
        raise ConfigError(f"algorithm.push_clip must be > 0 (or null), got {alg.push_clip}")


def validate_config(cfg: TrainConfig, world_size: Optional[int] = None) -> Layout:
    """Check every cross-field rule; ``world_size`` is the launched world (torchrun) if known."""
    for key, options in CHOICES.items():
        value = _get(cfg, key)
        if value not in options:
            raise ConfigError(f"config key '{key}' = {value!r} must be one of {list(options)}")
    for key in POSITIVE:
        if _get(cfg, key) < 1:
            raise ConfigError(f"config key '{key}' must be >= 1, got {_get(cfg, key)}")

    par, geo = cfg.parallel, _model_geometry(cfg)
    if geo["heads"] % geo["groups"]:
        raise ConfigError(
            f"model.num_attention_heads={geo['heads']} is not divisible by "
            f"model.num_query_groups={geo['groups']}"
        )
    if geo["hidden"] % geo["heads"]:
        raise ConfigError(
            f"model.hidden_size={geo['hidden']} is not divisible by "
            f"model.num_attention_heads={geo['heads']}"
        )
    if geo["heads"] % par.tp:
        raise ConfigError(
            f"model.num_attention_heads={geo['heads']} is not divisible by parallel.tp={par.tp}"
        )
    if geo["groups"] % par.tp:
        raise ConfigError(
            f"model.num_query_groups={geo['groups']} is not divisible by parallel.tp={par.tp}"
        )
    stages = par.pp * (par.vpp or 1)
    if par.vpp is not None and (par.vpp < 1 or par.pp < 2):
        raise ConfigError(f"parallel.vpp={par.vpp} needs parallel.pp >= 2 and vpp >= 1")
    if geo["layers"] % stages:
        what = f"parallel.pp*parallel.vpp={stages}" if par.vpp else f"parallel.pp={par.pp}"
        raise ConfigError(f"model.num_layers={geo['layers']} is not divisible by {what}")
    if not 0 <= geo["mask"] < geo["vocab"]:
        raise ConfigError(
            f"model.mask_token_id={geo['mask']} lies outside the vocabulary [0, {geo['vocab']})"
        )
    if not 0 <= geo["eos"] < geo["vocab"]:
        raise ConfigError(
            f"model.eos_token_id={geo['eos']} lies outside the vocabulary [0, {geo['vocab']})"
        )
    if par.sequence_parallel and par.tp == 1:
        raise ConfigError("parallel.sequence_parallel=true needs parallel.tp > 1")

    model_parallel = par.tp * par.pp * par.cp
    if par.world_size is not None and world_size is not None and par.world_size != world_size:
        raise ConfigError(
            f"parallel.world_size={par.world_size} but the job was launched with "
            f"WORLD_SIZE={world_size}"
        )
    world = world_size if world_size is not None else (par.world_size or model_parallel)
    if world % model_parallel:
        raise ConfigError(
            f"world size {world} is not divisible by parallel.tp*parallel.pp*parallel.cp = "
            f"{par.tp}*{par.pp}*{par.cp} = {model_parallel}"
        )
    dp = world // model_parallel

    ro = cfg.rollout
    if cfg.global_batch_size % ro.group_size:
        raise ConfigError(
            f"rollout.group_size={ro.group_size} does not divide "
            f"global_batch_size={cfg.global_batch_size}"
        )
    if cfg.global_batch_size % (dp * cfg.micro_batch_size):
        raise ConfigError(
            f"global_batch_size={cfg.global_batch_size} is not divisible by data-parallel size "
            f"{dp} * micro_batch_size={cfg.micro_batch_size}"
        )
    if ro.gen_length % ro.block_length:
        raise ConfigError(
            f"rollout.gen_length={ro.gen_length} is not divisible by "
            f"rollout.block_length={ro.block_length}"
        )
    blocks = ro.gen_length // ro.block_length
    for key, steps in (("rollout.steps", ro.steps), ("rollout.eval_steps", ro.eval_steps)):
        if steps is not None and (steps < 1 or steps % blocks):
            raise ConfigError(
                f"{key}={steps} is not a positive multiple of the number of blocks "
                f"{blocks} (gen_length / block_length)"
            )
    if ro.temperature < 0:
        raise ConfigError(f"rollout.temperature must be >= 0, got {ro.temperature}")
    if cfg.data.max_prompt_length + ro.gen_length > geo["ctx"]:
        raise ConfigError(
            f"data.max_prompt_length + rollout.gen_length = "
            f"{cfg.data.max_prompt_length + ro.gen_length} exceeds "
            f"model.max_position_embeddings={geo['ctx']}"
        )
    check_rollout_cache(ro, par)
    check_likelihood(cfg.likelihood)
    check_algorithm(cfg.algorithm)
    if cfg.optimizer.lr <= 0:
        raise ConfigError(f"optimizer.lr must be > 0, got {cfg.optimizer.lr}")
    check_sft_likelihood(cfg.algorithm, cfg.likelihood)
    check_trajectory(cfg)
    if cfg.checkpoint.export_hf and not cfg.checkpoint.save_dir:
        raise ConfigError("checkpoint.export_hf converts the run's final checkpoint: it needs "
                          "checkpoint.save_dir")
    if cfg.checkpoint.keep_last < 1:
        raise ConfigError(f"checkpoint.keep_last must be >= 1, got {cfg.checkpoint.keep_last}")
    check_countdown(cfg.data.countdown)
    from rspo_mega.tasks import TASKS  # the registry knows each task's logical fields

    known = TASKS[cfg.data.task].default_fields
    unknown = sorted(set(cfg.data.fields) - set(known))
    if unknown:
        raise ConfigError(f"data.fields: unknown field(s) {unknown} for task {cfg.data.task!r}; "
                          f"its fields are {sorted(known)}")

    per_rank = cfg.global_batch_size // dp
    return Layout(
        world_size=world,
        dp=dp,
        prompts_per_step=cfg.global_batch_size // ro.group_size,
        completions_per_rank=per_rank,
        num_microbatches=per_rank // cfg.micro_batch_size,
    )
