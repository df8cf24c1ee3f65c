"""``ModelConfig`` -> megatron-core ``TransformerConfig`` for LLaDA (one builder for everything).

LLaDA is a pre-norm LLaMA-style decoder used bidirectionally: RMSNorm, SwiGLU MLP (gate first),
no biases, RoPE (non-interleaved), untied output layer. The vocabulary is padded explicitly to a
multiple of ``make_vocab_size_divisible_by * tp`` (:func:`padded_vocab_size`).
"""

from __future__ import annotations

from typing import Any, Optional

import torch
import torch.nn.functional as F
from megatron.core.transformer.transformer_config import TransformerConfig

from rspo_mega.config.schema import ModelConfig, ParallelConfig
from rspo_mega.config.validate import query_groups

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def params_dtype(cfg: ModelConfig) -> torch.dtype:
    """torch dtype of the parameters (``float32`` | ``bfloat16``)."""
    try:
        return _DTYPES[cfg.params_dtype]
    except KeyError:
        raise ValueError(
            f"model.params_dtype={cfg.params_dtype!r}: expected one of {sorted(_DTYPES)}"
        ) from None


def padded_vocab_size(cfg: ModelConfig, tp: int) -> int:
    """Smallest multiple of ``make_vocab_size_divisible_by * tp`` that holds ``cfg.vocab_size``."""
    if cfg.vocab_size < 1 or tp < 1 or cfg.make_vocab_size_divisible_by < 1:
        raise ValueError(
            f"bad vocab padding inputs: vocab_size={cfg.vocab_size}, tp={tp}, "
            f"make_vocab_size_divisible_by={cfg.make_vocab_size_divisible_by}"
        )
    multiple = cfg.make_vocab_size_divisible_by * tp
    return -(-cfg.vocab_size // multiple) * multiple


def _layout(parallel: Optional[ParallelConfig],
            sequence_parallel: bool) -> tuple[int, int, Optional[int], bool]:
    """(tp, pp, vpp, sequence_parallel): from ``parallel``, or megatron's live parallel state
    and ``sequence_parallel``."""
    if parallel is not None:
        return parallel.tp, parallel.pp, parallel.vpp, parallel.sequence_parallel
    from megatron.core import parallel_state as ps

    if not ps.model_parallel_is_initialized():
        return 1, 1, None, sequence_parallel
    return (
        ps.get_tensor_model_parallel_world_size(),
        ps.get_pipeline_model_parallel_world_size(),
        ps.get_virtual_pipeline_model_parallel_world_size(),
        sequence_parallel,
    )


def _fp8_fields(cfg: ModelConfig, impl: str) -> dict[str, Any]:
    """FP8 recipe fields (empty when ``model.fp8`` is off); FP8 needs the TE implementation."""
    if not cfg.fp8.enabled:
        return {}
    if impl != "transformer_engine":
        raise ValueError("model.fp8.enabled needs transformer_impl=transformer_engine (and a GPU)")
    return {
        "fp8": cfg.fp8.format,
        "fp8_recipe": cfg.fp8.recipe,
        "fp8_margin": cfg.fp8.margin,
        "fp8_amax_history_len": cfg.fp8.amax_history_len,
        "fp8_amax_compute_algo": cfg.fp8.amax_compute_algo,
    }


def _architecture_fields(cfg: ModelConfig, groups: int) -> dict[str, Any]:
    """The LLaDA block: geometry, RMSNorm, SwiGLU, no biases, no dropout."""
    return dict(
        num_layers=cfg.num_layers,
        hidden_size=cfg.hidden_size,
        ffn_hidden_size=cfg.ffn_hidden_size,
        num_attention_heads=cfg.num_attention_heads,
        num_query_groups=groups,
        kv_channels=cfg.hidden_size // cfg.num_attention_heads,
        normalization="RMSNorm",
        layernorm_epsilon=cfg.norm_eps,
        gated_linear_unit=True,
        activation_func=F.silu,
        add_bias_linear=False,
        add_qkv_bias=False,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        init_method_std=cfg.init_method_std,
    )


def _runtime_fields(
    layout: tuple[int, int, Optional[int], bool], dtype: torch.dtype, on_gpu: bool, fused: bool
) -> dict[str, Any]:
    """Parallel layout, dtypes, initialisation device and fusion switches."""
    tp, pp, vpp, sequence_parallel = layout
    return dict(
        tensor_model_parallel_size=tp,
        pipeline_model_parallel_size=pp,
        virtual_pipeline_model_parallel_size=vpp,
        sequence_parallel=sequence_parallel,
        params_dtype=dtype,
        bf16=dtype == torch.bfloat16,
        pipeline_dtype=dtype,
        use_cpu_initialization=not on_gpu,
        bias_activation_fusion=fused,
        bias_dropout_fusion=fused,
        apply_rope_fusion=fused,
        masked_softmax_fusion=False,
        persist_layer_norm=False,
        gradient_accumulation_fusion=False,
    )


def transformer_config(
    cfg: ModelConfig,
    parallel: Optional[ParallelConfig] = None,
    impl: str = "local",
    sequence_parallel: bool = False,
    **overrides: Any,
) -> TransformerConfig:
    """The megatron-core config of an LLaDA model.

    ``parallel`` gives TP/PP/VPP and sequence parallelism (default: the initialised megatron
    parallel state, with ``sequence_parallel``; TE on a GPU only). ``impl`` is the
    resolved layer implementation (see :func:`spec.resolve_transformer_impl`): fusions are only
    enabled with TE on a GPU; on CPU every fusion is off and weights are initialised on the CPU.
    ``overrides`` are passed to ``TransformerConfig`` last (e.g. ``perform_initialization=False``).
    """
    layout = _layout(parallel, sequence_parallel)
    dtype = params_dtype(cfg)
    on_gpu = torch.cuda.is_available()
    fused = on_gpu and impl == "transformer_engine"
    if layout[3] and not fused:
        raise ValueError("sequence_parallel needs the transformer_engine implementation on a GPU")
    groups = query_groups(cfg)
    kwargs: dict[str, Any] = dict(
        **_architecture_fields(cfg, groups),
        **_runtime_fields(layout, dtype, on_gpu, fused),
        **_fp8_fields(cfg, impl),
    )
    kwargs.update(overrides)
    return TransformerConfig(**kwargs)
