"""Typed configuration: one dataclass per section of a run's YAML file.

Every field has a type, a default and a comment (``docs/CONFIG.md`` is generated from them by
``tools/gen_config_doc.py``). The allowed values of a field live in its type: a ``Literal`` lists
its choices, a :class:`Bounds` annotation its numeric range. :mod:`rspo_mega.config.loader`
checks both while it fills the dataclasses from YAML and dotted overrides;
:mod:`rspo_mega.config.validate` checks the rules between fields. Units are in the comments.
"""

from __future__ import annotations

import re
import typing
from dataclasses import dataclass, field
from typing import Annotated, Literal, Optional


@dataclass(frozen=True)
class Bounds:
    """The closed (or, with ``*_open``, open) interval a numeric field must lie in."""

    low: Optional[float] = None
    high: Optional[float] = None
    low_open: bool = False
    high_open: bool = False

    def holds(self, value: float) -> bool:
        if self.low is not None and (value <= self.low if self.low_open else value < self.low):
            return False
        return self.high is None or (value < self.high if self.high_open else value <= self.high)

    def describe(self) -> str:
        """``>= 1``, ``> 0`` or ``in [0, 1)``."""
        if self.high is None:
            return f"{'>' if self.low_open else '>='} {self.low:g}"
        left, right = "(" if self.low_open else "[", ")" if self.high_open else "]"
        return f"in {left}{self.low:g}, {self.high:g}{right}"


IMPORT_PATH = re.compile(r"[A-Za-z_][\w]*(\.[A-Za-z_][\w]*)*:[A-Za-z_][\w]*")


@dataclass(frozen=True)
class NameOrImportPath:
    """A string field naming one of ``names``, a name of the entry-point group ``group`` (an
    installed package's), or an import path ``module.path:ClassName``."""

    names: tuple[str, ...]
    group: str

    def holds(self, value: str) -> bool:
        return value in self.names or bool(IMPORT_PATH.fullmatch(value)) or \
            value in entry_point_names(self.group)

    def describe(self) -> str:
        return (f"one of {list(self.names)}, an entry point of group '{self.group}' or an "
                "import path module.path:ClassName")


def entry_point_names(group: str) -> tuple[str, ...]:
    """Names installed packages register in the entry-point group ``group``."""
    from importlib.metadata import entry_points

    return tuple(sorted(ep.name for ep in entry_points(group=group)))


PositiveInt = Annotated[int, Bounds(1)]
NonNegative = Annotated[float, Bounds(0)]
Positive = Annotated[float, Bounds(0, low_open=True)]
Probability = Annotated[float, Bounds(0, 1)]

# Choices used by code outside the loader as well (their one home).
AlgorithmName = Literal["rspo", "espo", "diffu_grpo", "agrpo", "sft"]
ElboMaskScheme = Literal["bernoulli", "stratified", "coupled"]  # unbiased ELBO estimators
MaskedSequenceScheme = Literal[ElboMaskScheme, "one_step"]  # one_step: diffu-GRPO's biased one
MaskScheme = Literal[MaskedSequenceScheme, "trajectory"]  # trajectory: AGRPO's rollout steps
StepSampling = Literal["uniform", "entropy"]  # how AGRPO picks a completion's sampled steps
Centering = Literal["batch", "group", "microbatch", "none"]
Advantage = Literal["mean", "leave_one_out", "standardized"]
TransformerImpl = Literal["auto", "local", "transformer_engine"]
RolloutCache = Literal["none", "prefix", "dual"]
Remasking = Literal["low_confidence", "random"]
CountPositions = Literal["generated", "until_eos"]
NonFinitePolicy = Literal["skip", "abort"]
BUILTIN_TASKS = ("sudoku", "countdown", "gsm8k", "math500")
TASK_ENTRY_POINTS = "rspo_mega.tasks"  # entry-point group of tasks other packages install
TaskName = Annotated[str, NameOrImportPath(BUILTIN_TASKS, TASK_ENTRY_POINTS)]
TemplateName = Literal["plain", "llada_chat"]
SudokuReasoning = Literal["none", "rows_columns"]
LoRATarget = Literal["linear_qkv", "linear_proj", "linear_fc1", "linear_fc2"]  # megatron's names


def units_per_sample(scheme: str) -> int:
    """Masked sequences per MC sample of ``scheme``: 2 for a coupled pair, else 1."""
    return 2 if scheme == "coupled" else 1


def choices(literal: object) -> tuple[str, ...]:
    """The values of a ``Literal`` type, e.g. ``choices(MaskScheme)``."""
    return typing.get_args(literal)


def algorithm_titles() -> dict[str, str]:
    """Each ``algorithm.name`` with the name its paper gives it: the last word in capitals
    (``rspo`` -> RSPO, ``diffu_grpo`` -> diffu-GRPO)."""
    return {name: "-".join([*name.split("_")[:-1], name.split("_")[-1].upper()])
            for name in choices(AlgorithmName)}


@dataclass
class FP8Config:
    """Transformer Engine FP8 (GPU only; ignored with the local spec)."""

    enabled: bool = False  # FP8 GEMMs (transformer_impl=transformer_engine on a GPU)
    recipe: Literal["delayed", "tensorwise", "mxfp8", "blockwise"] = "delayed"  # TE scaling
    format: Literal["hybrid", "e4m3"] = "hybrid"  # hybrid: E4M3 forward, E5M2 backward
    margin: int = 0  # scaling margin (powers of 2)
    amax_history_len: PositiveInt = 1024  # steps of amax history (delayed recipe)
    amax_compute_algo: Literal["max", "most_recent"] = "max"  # amax from the history


@dataclass
class LoRAConfig:
    """LoRA adapters on the tensor-parallel linears; the base weights stay frozen and are the RL
    reference (docs/OPTIONS.md)."""

    enabled: bool = False  # train adapters only (the start's weights are the base)
    rank: PositiveInt = 16  # r: inner width of each adapter
    alpha: Positive = 32.0  # the update is scaled by alpha / rank
    dropout: Annotated[float, Bounds(0, 1, high_open=True)] = 0.0  # on the adapter's input
    # which linears get adapters: the attention's fused QKV and output projection, the MLP's
    # fused gate/up projection and down projection (HF: q/k/v_proj, attn_out, ff_proj/up_proj,
    # ff_out)
    target_modules: list[LoRATarget] = field(
        default_factory=lambda: ["linear_qkv", "linear_proj", "linear_fc1", "linear_fc2"])


@dataclass
class ModelConfig:
    """LLaDA geometry and token ids. The loader fills them from ``hf_config`` or an HF
    ``checkpoint.init_from`` (config.json) and from the tokenizer, keeping the keys a run sets
    itself (which must then agree with those sources)."""

    # HF LLaDA config.json (or its directory, or a hub id hf:ORG/NAME[@REVISION]) giving the
    # geometry
    hf_config: Optional[str] = None
    num_layers: PositiveInt = 4  # transformer layers
    hidden_size: PositiveInt = 128  # model width
    ffn_hidden_size: PositiveInt = 384  # SwiGLU inner width
    num_attention_heads: PositiveInt = 4  # query heads
    num_query_groups: Optional[PositiveInt] = None  # null = num_attention_heads (MHA)
    vocab_size: PositiveInt = 512  # true vocabulary (logits are sliced back to it); tokenizer's
    make_vocab_size_divisible_by: PositiveInt = 128  # padded vocab = multiple of this * tp
    max_position_embeddings: PositiveInt = 1024  # tokens
    rope_theta: Positive = 500000.0  # RoPE base
    norm_eps: Positive = 1e-5  # RMSNorm epsilon
    mask_token_id: Annotated[int, Bounds(0)] = 511  # unset in the run: the tokenizer's
    eos_token_id: Annotated[int, Bounds(0)] = 510  # unset in the run: the tokenizer's
    pad_token_id: Optional[int] = None  # null = eos_token_id
    bos_token_id: Optional[int] = None  # null = the model has none
    init_method_std: Positive = 0.02  # std of the random initialisation
    params_dtype: Literal["float32", "bfloat16"] = "float32"  # parameter dtype
    transformer_impl: TransformerImpl = "auto"  # auto: transformer_engine with TE and a GPU
    fp8: FP8Config = field(default_factory=FP8Config)
    lora: LoRAConfig = field(default_factory=LoRAConfig)


@dataclass
class ParallelConfig:
    """Layout: world = tp * pp * dp (dp is derived)."""

    tp: PositiveInt = 1  # tensor-parallel size
    pp: PositiveInt = 1  # pipeline-parallel stages
    vpp: Optional[PositiveInt] = None  # virtual pipeline stages per rank (interleaved 1F1B)
    sequence_parallel: bool = False  # GPU (TE) only
    world_size: Optional[PositiveInt] = None  # expected world size; checked against torchrun
    backend: Optional[Literal["nccl", "gloo"]] = None  # null = nccl with CUDA, gloo without
    timeout_minutes: Positive = 30.0  # every collective; a hung peer fails after this
    # end of the run (final evaluation and save): how long a rank waits for the others at each
    # phase before it fails naming the phase and the ranks that did not arrive
    end_of_run_timeout_minutes: Positive = 5.0

    @property
    def sequence_multiple(self) -> int:
        """What a sequence's length must be a multiple of: TP under sequence parallelism (its
        activations are split along the sequence between the TP ranks), else 1."""
        return self.tp if self.sequence_parallel else 1


@dataclass
class RolloutGuardConfig:
    """Adaptive control of cached RL rollouts from their checked mismatch (docs/OPTIONS.md)."""

    # after every RL step, from its checked cached steps (needs rollout.cache_check_rate > 0):
    # halve the refresh interval while the checked mismatch exceeds mismatch_bound, double it back
    # below half of it; with rollout.confidence_threshold, move the threshold halfway to 1 while
    # the mismatch among the commits above it exceeds the bound, halfway back below half of it
    enabled: bool = False
    # share of the checked commits the cache may change (rollout/cache_token_mismatch); RL on
    # the multi-block recipe checks 2-15% per step: 0.05 acts on the high ones (docs/OPTIONS.md)
    mismatch_bound: Annotated[float, Bounds(0, 1, low_open=True)] = 0.05


@dataclass
class RolloutConfig:
    """Masked-diffusion sampler (LLaDA generate)."""

    group_size: PositiveInt = 4  # G completions per prompt
    gen_length: PositiveInt = 32  # generated tokens
    block_length: PositiveInt = 32  # semi-autoregressive block, tokens
    steps: PositiveInt = 32  # denoising steps in total
    eval_steps: Optional[PositiveInt] = None  # denoising steps of held-out evaluation (null: steps)
    temperature: NonNegative = 1.0  # 0 = argmax
    remasking: Remasking = "low_confidence"  # commit order: most confident first, or random
    cfg_scale: float = 0.0  # classifier-free guidance scale (0 = off)
    forbid_eos: bool = False  # never sample EOS
    stop_on_eos_block: bool = True  # a row whose block is all EOS ends (EOS fills the rest)
    micro_batch_size: PositiveInt = 16  # sequences per sampler forward
    # null: the exact schedule; else each step also commits every masked token of the block whose
    # confidence exceeds this (parallel decoding: blocks finish in fewer steps)
    confidence_threshold: Optional[Annotated[float, Bounds(0, 1, low_open=True)]] = None
    # Block KV cache: none (every step runs the whole sequence) | prefix (later steps of a block run
    # the block and the suffix) | dual (the block only). Approximate; see docs/OPTIONS.md.
    cache: RolloutCache = "none"
    cache_check_rate: Probability = 0.0  # share of cached steps re-run exactly (rollout/cache_*)
    # A full forward (cache refresh) every N steps of a block; 0: at its first step only.
    cache_refresh_interval: Annotated[int, Bounds(0)] = 0
    guard: RolloutGuardConfig = field(default_factory=RolloutGuardConfig)


@dataclass
class LikelihoodConfig:
    """Monte-Carlo ELBO estimation."""

    # an SFT run takes an unbiased one (not one_step); trajectory: sampled denoising steps of the
    # rollout (AGRPO), not an ELBO
    mask_scheme: MaskScheme = "coupled"
    mc_samples: PositiveInt = 2  # K per completion (coupled: K pairs; trajectory: K sampled steps)
    # trajectory: uniform | entropy (importance-weighted) choice of the sampled steps
    step_sampling: StepSampling = "entropy"
    stratified_steps: bool = True  # trajectory: the K step draws of a completion stratified
    # completion: each completion its own masks | group: the G of a prompt share them
    mask_sharing: Literal["completion", "group"] = "completion"
    fresh_masks_per_update: bool = False  # new masks per inner update (ref, old policy re-score)
    count_positions: CountPositions = "generated"  # generated: whole span | until_eos
    bernoulli_eps: Annotated[float, Bounds(0, 1, high_open=True)] = 1e-3  # t ~ U(eps, 1)
    one_step_prompt_mask_prob: Probability = 0.15  # one_step: share of prompt tokens masked
    micro_batch_size: PositiveInt = 8  # masked sequences per forward
    # True: keep the graphs of this rank's micro-batches and backpropagate once (one forward per
    # masked sequence; activations of all local micro-batches live together). False: a no-grad
    # scoring pass, then forward + backward per micro-batch (activations of one micro-batch, one
    # more forward). Pipeline-parallel runs always take two passes.
    one_pass: bool = True
    offload_reference: bool = False  # keep the reference model in CPU memory between uses (GPU)


@dataclass
class AlgorithmConfig:
    """Loss and advantages."""

    name: AlgorithmName = "rspo"  # the loss (docs/OPTIONS.md)
    lambda_: NonNegative = 0.01  # RSPO target scale
    centering: Centering = "batch"  # RSPO: scope of the relative-score mean
    # centering=microbatch: completions per centering chunk (consecutive completions of a rank)
    microbatch_completions: PositiveInt = 8
    advantage: Advantage = "standardized"  # group-relative advantage of a reward
    advantage_eps: NonNegative = 1e-4  # added to the group std (standardized)
    inner_updates: PositiveInt = 1  # mu: optimizer steps per rollout batch
    clip_eps: Positive = 0.2  # ESPO / diffu-GRPO / AGRPO ratio clip
    kl_beta: NonNegative = 0.0  # ESPO k2 / diffu-GRPO and AGRPO k3 coefficient
    # RSPO: bound |A - lambda * dhat| per completion (advantage units); for lambda > 0 a Huber loss
    # on the regression residual with delta = push_clip / lambda. null = the plain squared loss.
    push_clip: Optional[Positive] = None


@dataclass
class OptimizerConfig:
    """megatron-core optimizer and LR schedule."""

    lr: Positive = 1e-4  # peak LR of the run's schedule
    min_lr: NonNegative = 0.0  # LR at the end of a linear/cosine decay
    weight_decay: NonNegative = 0.0  # weight-decay coefficient
    adam_beta1: Annotated[float, Bounds(0, 1, high_open=True)] = 0.9  # first-moment decay
    adam_beta2: Annotated[float, Bounds(0, 1, high_open=True)] = 0.999  # second-moment decay
    adam_eps: Positive = 1e-8  # added to the root of the second moment
    clip_grad: NonNegative = 1.0  # global grad-norm clip (0 = off)
    warmup_steps: Annotated[int, Bounds(0)] = 0  # optimizer steps of linear warm-up from 0
    decay_style: Literal["constant", "linear", "cosine"] = "constant"  # LR after the warm-up
    use_distributed_optimizer: bool = False  # shard optimizer state over DP (ZeRO-1)


@dataclass
class CountdownConfig:
    """Problem size of generated Countdown (``data.task=countdown`` without ``train_path``)."""

    max_number: PositiveInt = 99  # numbers are drawn from [1, max_number]
    min_target: PositiveInt = 10  # smallest target
    max_target: PositiveInt = 100  # largest target
    min_numbers: PositiveInt = 3  # numbers per problem, at least
    max_numbers: PositiveInt = 4  # numbers per problem, at most


@dataclass
class SudokuConfig:
    """Response format of ``data.task=sudoku``."""

    # what the SFT target reasons before the 16-digit answer: nothing (28 tokens), or the solved
    # grid by rows then by columns (99 tokens; the multi-block recipe tiny_sudoku_long)
    reasoning: SudokuReasoning = "none"


@dataclass
class DataConfig:
    """Prompts and batching."""

    # prompts, reward and answer format: a built-in task, or a task class of one's own as
    # module.path:ClassName or an entry point of group rspo_mega.tasks (docs/DATA.md)
    task: TaskName = "sudoku"
    train_path: Optional[str] = None  # local file (JSONL/JSON/parquet/CSV); null for generators
    test_path: Optional[str] = None  # held-out file; null: generated (generator tasks) or none
    validation_path: Optional[str] = None  # validation file (model selection, evaluated as val/)
    # the task's logical field -> column of the files, e.g. {prompt: question}; unset fields
    # keep the task's default columns (docs/DATA.md)
    fields: dict[str, str] = field(default_factory=dict)
    json_field: Optional[str] = None  # key holding the records in a {key: [...]} JSON file
    # tokenizer.json or SentencePiece .model (a file, its directory or a hub id
    # hf:ORG/NAME[@REVISION]); null = built-in
    tokenizer: Optional[str] = None
    template: TemplateName = "plain"  # prompt text as is, or LLaDA's chat template
    max_prompt_length: PositiveInt = 64  # tokens
    num_train_examples: PositiveInt = 2000  # for generated tasks
    num_test_examples: Annotated[int, Bounds(0)] = 200  # 0 = no held-out evaluation
    # generated tasks: validation examples from problems held out of train (sudoku: 10% of the
    # grids, next to the test grids), evaluated like the test set as val/; 0 = none
    num_validation_examples: Annotated[int, Bounds(0)] = 0
    seed: int = 1234  # generated splits and shuffling
    countdown: CountdownConfig = field(default_factory=CountdownConfig)
    sudoku: SudokuConfig = field(default_factory=SudokuConfig)


@dataclass
class CheckpointConfig:
    """Saving, resuming (from ``save_dir``), the start weights and the HF export."""

    # iter_*/ checkpoints ({output_dir}: logging.output_dir); a restart resumes from the newest
    # valid one; null: no checkpoints
    save_dir: Optional[str] = "{output_dir}/ckpt"
    save_interval: Annotated[int, Bounds(0)] = 0  # steps (0 = at the end and on preemption)
    keep_last: PositiveInt = 2  # complete checkpoints kept
    # weights to start from: a converted megatron checkpoint, a trainer iter_*/ or save_dir,
    # an HF LLaDA directory (converted on the fly; its config.json gives the model), a hub id
    # hf:ORG/NAME[@REVISION] (that directory in the HF cache) or shipped:<name> (a checkpoint
    # shipped with the package)
    init_from: Optional[str] = None
    # at the end of the run, the final checkpoint converted into this HF LLaDA directory
    # ({output_dir}: logging.output_dir); null: no export
    export_hf: Optional[str] = "{output_dir}/hf"
    # a LoRA run's export also writes its adapters alone here in the PEFT format
    # (adapter_config.json, adapter_model.safetensors; {output_dir}: logging.output_dir);
    # export_hf holds them merged into the base. null: none; unused without model.lora
    export_peft: Optional[str] = "{output_dir}/hf_adapter"


@dataclass
class WandbConfig:
    """Weights & Biases (``pip install -e '.[wandb]'``): from rank 0, every logged scalar, the
    resolved config, the sample tables and, at the end, curves.png and summary.json."""

    enabled: bool = False  # send the run to W&B (needs the wandb package)
    project: str = "rspo_mega"  # W&B project
    entity: Optional[str] = None  # team or user; null: the API key's default entity
    name: Optional[str] = None  # run name; null: the name of logging.output_dir
    tags: list[str] = field(default_factory=list)  # run tags
    mode: Literal["online", "offline"] = "online"  # offline: run files only (wandb sync later)


@dataclass
class MLflowConfig:
    """MLflow (``pip install -e '.[mlflow]'``): from rank 0, every logged scalar, the resolved
    config as parameters, the sample tables and, at the end, curves.png and summary.json."""

    enabled: bool = False  # send the run to MLflow (needs the mlflow package)
    tracking_uri: Optional[str] = None  # e.g. http://host:5000 or file:/path; null: MLflow's own
    experiment: str = "rspo_mega"  # experiment name (created when missing)
    run_name: Optional[str] = None  # null: the name of logging.output_dir
    tags: dict[str, str] = field(default_factory=dict)  # run tags (key: value)


@dataclass
class LoggingConfig:
    """Run directory, metrics, console and experiment trackers."""

    # the run's directory: config.yaml, metrics.jsonl, TensorBoard, summary, built-in tokenizer,
    # and by default its checkpoints and HF export
    output_dir: str = "runs/default"
    log_interval: PositiveInt = 1  # steps
    tensorboard: bool = True  # TensorBoard events in output_dir
    # a progress bar when stdout and stderr are terminals (rank 0); else, or when false, one plain
    # line on stdout every log_interval steps
    progress_bar: bool = True
    level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"  # DEBUG adds megatron-core's INFO and warnings
    # RL steps between logged samples (a few prompts, each with a completion, its reward and
    # advantage) to samples.jsonl, the trackers and one console line; 0 = none
    sample_interval: Annotated[int, Bounds(0)] = 0
    # per-device peak dense TFLOP/s that MFU is measured against; null: the GPU's bf16 peak when
    # its name is known (rspo_mega/plan/hardware.py), else no MFU
    peak_tflops: Optional[Positive] = None
    wandb: WandbConfig = field(default_factory=WandbConfig)
    mlflow: MLflowConfig = field(default_factory=MLflowConfig)


@dataclass
class TrainConfig:
    """Top-level run configuration (one section per dataclass above)."""

    seed: int = 1234  # run seed: initialisation, rollouts and masks (data.seed: the data)
    train_steps: PositiveInt = 10  # RL steps (SFT steps with algorithm.name=sft)
    global_batch_size: PositiveInt = 32  # completions per step over all DP ranks (prompts * G)
    eval_interval: Annotated[int, Bounds(0)] = 0  # steps (0 = only before and after)
    non_finite_policy: NonFinitePolicy = "skip"  # NaN/Inf in gradients: skip the update, or abort
    model: ModelConfig = field(default_factory=ModelConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    likelihood: LikelihoodConfig = field(default_factory=LikelihoodConfig)
    algorithm: AlgorithmConfig = field(default_factory=AlgorithmConfig)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    data: DataConfig = field(default_factory=DataConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
