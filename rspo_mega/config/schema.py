"""Typed configuration: one dataclass per section of a run's YAML file.

Every field has a type and a default; :mod:`rspo_mega.config.loader` fills them from YAML and
dotted overrides, and :mod:`rspo_mega.config.validate` checks cross-field rules before any process
group or model exists. Units are in the field comments.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional


@dataclass
class FP8Config:
    """Transformer Engine FP8 (GPU only; ignored with the local spec)."""

    enabled: bool = False
    recipe: str = "delayed"  # delayed | tensorwise | mxfp8 | blockwise
    format: str = "hybrid"  # hybrid (E4M3 fwd, E5M2 bwd) | e4m3
    margin: int = 0
    amax_history_len: int = 1024
    amax_compute_algo: str = "max"  # max | most_recent


@dataclass
class ModelConfig:
    """LLaDA geometry. With ``hf_config`` set, geometry is read from that config.json instead."""

    hf_config: Optional[str] = None  # path to an HF LLaDA config.json (or its directory)
    num_layers: int = 4
    hidden_size: int = 128
    ffn_hidden_size: int = 384
    num_attention_heads: int = 4
    num_query_groups: Optional[int] = None  # None = num_attention_heads (MHA)
    vocab_size: int = 512  # true vocabulary (logits are sliced back to it)
    make_vocab_size_divisible_by: int = 128  # padded vocab = multiple of this * tp
    max_position_embeddings: int = 1024  # tokens
    rope_theta: float = 500000.0
    norm_eps: float = 1e-5
    mask_token_id: int = 511
    eos_token_id: int = 510
    pad_token_id: Optional[int] = None  # None = eos_token_id
    bos_token_id: Optional[int] = None
    init_method_std: float = 0.02
    params_dtype: str = "float32"  # float32 | bfloat16
    transformer_impl: str = "auto"  # auto | local | transformer_engine
    fp8: FP8Config = field(default_factory=FP8Config)


@dataclass
class ParallelConfig:
    """Layout: world = tp * pp * cp * dp (dp is derived)."""

    tp: int = 1
    pp: int = 1
    cp: int = 1
    vpp: Optional[int] = None  # virtual pipeline stages per rank (interleaved 1F1B)
    sequence_parallel: bool = False  # GPU (TE) only
    world_size: Optional[int] = None  # expected world size; checked against torchrun when set
    backend: Optional[str] = None  # None = nccl with CUDA, gloo without
    timeout_minutes: float = 30.0  # every collective; a hung peer fails after this


@dataclass
class RolloutConfig:
    """Masked-diffusion sampler (LLaDA generate)."""

    group_size: int = 4  # G completions per prompt
    gen_length: int = 32  # generated tokens
    block_length: int = 32  # semi-autoregressive block, tokens
    steps: int = 32  # denoising steps in total
    eval_steps: Optional[int] = None  # denoising steps for held-out evaluation (None = steps)
    temperature: float = 1.0  # 0 = argmax
    remasking: str = "low_confidence"  # low_confidence | random
    cfg_scale: float = 0.0  # classifier-free guidance scale (0 = off)
    forbid_eos: bool = False
    stop_on_eos_block: bool = True
    micro_batch_size: int = 16  # sequences per sampler forward
    mode: str = "exact"  # exact | threshold (confidence-threshold parallel decoding)
    confidence_threshold: float = 0.9  # for mode=threshold
    # Block KV cache: none (every step runs the whole sequence) | prefix (later steps of a block run
    # the block and the suffix) | dual (the block only). Approximate; see docs/OPTIONS.md.
    cache: str = "none"
    cache_check_rate: float = 0.0  # share of cached steps re-run exactly (rollout/cache_* metrics)


@dataclass
class LikelihoodConfig:
    """Monte-Carlo ELBO estimation."""

    # bernoulli | stratified | coupled | one_step; an SFT run takes an unbiased one (not one_step);
    # trajectory: sampled denoising steps of the rollout (AGRPO), not an ELBO
    mask_scheme: str = "coupled"
    mc_samples: int = 2  # K per completion (coupled: K pairs; trajectory: K sampled steps)
    step_sampling: str = "entropy"  # trajectory: uniform | entropy (importance-weighted) steps
    stratified_steps: bool = True  # trajectory: the K step draws of a completion stratified
    mask_sharing: str = "completion"  # completion (own masks) | group (the G of a prompt share them)
    fresh_masks_per_update: bool = False  # inner updates > 1 draw new masks (RSPO; ref re-scored)
    count_positions: str = "generated"  # generated (whole span) | until_eos
    bernoulli_eps: float = 1e-3  # t ~ U(eps, 1)
    one_step_prompt_mask_prob: float = 0.15
    micro_batch_size: int = 8  # masked sequences per forward
    # True: keep the graphs of this rank's micro-batches and backpropagate once (one forward per
    # masked sequence; activations of all local micro-batches live together). False: a no-grad
    # scoring pass, then forward + backward per micro-batch (activations of one micro-batch, one
    # more forward). Pipeline-parallel runs always take two passes.
    one_pass: bool = True
    offload_reference: bool = False  # keep the reference model in CPU memory between uses (GPU)


@dataclass
class AlgorithmConfig:
    """Loss and advantages."""

    name: str = "rspo"  # rspo | espo | diffu_grpo | agrpo | sft
    lambda_: float = 0.01  # RSPO target scale
    centering: str = "batch"  # batch | group | microbatch | none
    advantage: str = "standardized"  # mean | leave_one_out | standardized
    advantage_eps: float = 1e-4
    inner_updates: int = 1  # mu: optimizer steps per rollout batch
    clip_eps: float = 0.2  # ESPO / diffu-GRPO / AGRPO ratio clip
    kl_beta: float = 0.0  # ESPO k2 / diffu-GRPO and AGRPO k3 coefficient
    # RSPO: bound |A - lambda * dhat| per completion (advantage units); for lambda > 0 a Huber loss
    # on the regression residual with delta = push_clip / lambda. None = the plain squared loss.
    push_clip: Optional[float] = None


@dataclass
class OptimizerConfig:
    """megatron-core optimizer and LR schedule."""

    lr: float = 1e-4  # peak LR of the run's schedule
    min_lr: float = 0.0
    weight_decay: float = 0.0
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_eps: float = 1e-8
    clip_grad: float = 1.0  # global grad-norm clip (0 = off)
    warmup_steps: int = 0
    decay_style: str = "constant"  # constant | linear | cosine
    use_distributed_optimizer: bool = False  # shard optimizer state over DP (ZeRO-1)


@dataclass
class CountdownConfig:
    """Problem size of generated Countdown (``data.task=countdown`` without ``train_path``)."""

    max_number: int = 99  # numbers are drawn from [1, max_number]
    min_target: int = 10
    max_target: int = 100
    min_numbers: int = 3  # numbers per problem
    max_numbers: int = 4


@dataclass
class DataConfig:
    """Prompts and batching."""

    task: str = "sudoku"  # sudoku | countdown | gsm8k | math500
    train_path: Optional[str] = None  # local file (JSONL/JSON/parquet/CSV); None for generators
    test_path: Optional[str] = None
    # the task's logical field -> column of the files, e.g. {prompt: question}; unset fields
    # keep the task's default columns (docs/DATA.md)
    fields: dict[str, str] = field(default_factory=dict)
    json_field: Optional[str] = None  # key holding the records in a {key: [...]} JSON file
    tokenizer: Optional[str] = None  # tokenizer.json or SentencePiece .model; None = built-in
    template: str = "plain"  # plain | llada_chat
    max_prompt_length: int = 64  # tokens
    num_train_examples: int = 2000  # for generated tasks
    num_test_examples: int = 200  # 0 = no held-out evaluation
    seed: int = 1234
    countdown: CountdownConfig = field(default_factory=CountdownConfig)


@dataclass
class CheckpointConfig:
    save_dir: Optional[str] = None
    load_dir: Optional[str] = None  # None = auto-resume from save_dir
    save_interval: int = 0  # steps (0 = only at the end and on preemption signals)
    keep_last: int = 2
    # weights to start from: a converted megatron checkpoint, a trainer iter_*/ or save_dir,
    # or an HF LLaDA directory (converted on the fly; its config.json gives the model)
    init_from: Optional[str] = None
    # at the end of the run, the final checkpoint converted into this HF LLaDA directory
    export_hf: Optional[str] = None


@dataclass
class LoggingConfig:
    output_dir: str = "runs/default"
    log_interval: int = 1  # steps
    tensorboard: bool = True
    progress_bar: bool = True
    level: str = "INFO"


@dataclass
class TrainConfig:
    """Top-level run configuration (one section per dataclass above)."""

    seed: int = 1234
    train_steps: int = 10  # RL steps (SFT steps with algorithm.name=sft)
    global_batch_size: int = 32  # completions per step over all DP ranks (prompts * group_size)
    micro_batch_size: int = 8  # completions per forward/backward micro-batch on one rank
    eval_interval: int = 0  # steps (0 = only before and after)
    non_finite_policy: str = "skip"  # NaN/Inf in gradients: skip the update | abort the run
    model: ModelConfig = field(default_factory=ModelConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    likelihood: LikelihoodConfig = field(default_factory=LikelihoodConfig)
    algorithm: AlgorithmConfig = field(default_factory=AlgorithmConfig)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    data: DataConfig = field(default_factory=DataConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
