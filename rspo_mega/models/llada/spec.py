"""Layer specs for LLaDA: megatron-core's GPT layer with bidirectional self-attention.

Two implementations share one checkpoint layout:

* ``local``: megatron-core modules (torch RMSNorm, Column/RowParallelLinear) with torch's fused
  SDPA as the core attention (:class:`~rspo_mega.models.llada.attention.SDPACoreAttention`) and
  a SwiGLU MLP without megatron's extra elementwise pass
  (:class:`~rspo_mega.models.llada.layer.SwiGLUMLP`).
  Used on CPU and whenever Transformer Engine is missing.
* ``transformer_engine``: TE fused LayerNorm+Linear, TE attention, FP8 capable (GPU only).

Both use :class:`~rspo_mega.models.llada.attention.BidirectionalSelfAttention`, whose cached
path (block KV cache, selected queries) runs torch SDPA under either spec, and
:class:`~rspo_mega.models.llada.layer.LLaDATransformerLayer`, whose queries can be restricted to
the positions a consumer reads (the local spec's last layer, see ``LLaDAModel``).

The local spec carries ``sharded_state_dict_keys_map`` (``input_layernorm.`` ->
``self_attention.linear_qkv.layer_norm_``, ``pre_mlp_layernorm.`` -> ``mlp.linear_fc1.layer_norm_``),
so both specs produce the *same* distributed-checkpoint keys: the TE names are canonical.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import logging
from typing import Any, Optional

import torch
from megatron.core.tensor_parallel.layers import ColumnParallelLinear, RowParallelLinear
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.mlp import MLPSubmodules
from megatron.core.transformer.spec_utils import ModuleSpec

from rspo_mega.config.schema import LoRAConfig, TransformerImpl, choices
from rspo_mega.models.llada.attention import BidirectionalSelfAttention, SDPACoreAttention
from rspo_mega.models.llada.layer import LLaDATransformerLayer, SwiGLUMLP

log = logging.getLogger(__name__)

IMPLS = tuple(i for i in choices(TransformerImpl) if i != "auto")  # what "auto" resolves to


def te_available() -> bool:
    """TE's PyTorch modules importable *and* a GPU present (TE is useless, and unsafe, on CPU).

    ``transformer_engine.pytorch`` is what the TE spec uses; the core package alone (its
    framework extension missing or built for another torch) does not count.
    """
    if not torch.cuda.is_available() or importlib.util.find_spec("transformer_engine") is None:
        return False
    try:
        import transformer_engine.pytorch  # noqa: F401
    except Exception as exc:  # noqa: BLE001 - a broken TE install must not crash model building
        log.warning("transformer_engine is installed but fails to import (%s); using local", exc)
        return False
    return True


def resolve_transformer_impl(requested: str) -> str:
    """``auto`` -> ``transformer_engine`` with TE and CUDA, else ``local``; forced values are checked."""
    if requested not in choices(TransformerImpl):
        raise ValueError(f"model.transformer_impl={requested!r}: expected one of "
                         f"{choices(TransformerImpl)}")
    if requested == "auto":
        impl = "transformer_engine" if te_available() else "local"
        log.info("LLaDA layer spec: %s (transformer_impl=auto)", impl)
        return impl
    if requested == "transformer_engine" and not te_available():
        raise RuntimeError("transformer_impl=transformer_engine needs Transformer Engine and a GPU")
    log.info("LLaDA layer spec: %s (forced)", requested)
    return requested


def llada_layer_spec(impl: str, lora: Optional[LoRAConfig] = None) -> ModuleSpec:
    """The transformer-layer spec for ``impl`` (``local`` | ``transformer_engine``), bidirectional;
    with ``lora`` enabled its ``target_modules`` carry adapters
    (:mod:`rspo_mega.models.llada.lora`)."""
    from megatron.core.models.gpt import gpt_layer_specs as specs

    if impl == "local":
        base = specs.get_gpt_layer_local_spec(normalization="RMSNorm")
    elif impl == "transformer_engine":
        base = specs.get_gpt_layer_with_transformer_engine_spec()
    else:
        raise ValueError(f"unknown transformer impl {impl!r}; expected one of {IMPLS}")
    attn = base.submodules.self_attention
    attn_submodules = attn.submodules
    if impl == "local":
        attn_submodules = dataclasses.replace(attn_submodules, core_attention=SDPACoreAttention)
    bidirectional = dataclasses.replace(
        attn,
        module=BidirectionalSelfAttention,
        params={**(attn.params or {}), "attn_mask_type": AttnMaskType.no_mask},
        submodules=attn_submodules,
    )
    mlp = SwiGLUMLP if impl == "local" else base.submodules.mlp  # TE: fused LayerNorm-MLP
    if lora is not None and lora.enabled:
        bidirectional, mlp = _with_adapters(bidirectional, mlp, lora)
    submodules = dataclasses.replace(base.submodules, self_attention=bidirectional, mlp=mlp)
    return dataclasses.replace(base, module=LLaDATransformerLayer, submodules=submodules)


def _with_adapters(attention: ModuleSpec, mlp: Any,
                   lora: LoRAConfig) -> tuple[ModuleSpec, Any]:
    """The attention and MLP specs with LoRA linears at ``lora.target_modules`` (the local MLP:
    a :class:`SwiGLUMLP` whose default linears are those, so megatron builds it as before)."""
    from rspo_mega.models.llada.lora import lora_linear_spec

    def adapted(sub: Any) -> Any:
        return dataclasses.replace(sub, **{t: lora_linear_spec(getattr(sub, t), lora, t)
                                           for t in lora.target_modules if hasattr(sub, t)})

    attention = dataclasses.replace(attention, submodules=adapted(attention.submodules))
    if mlp is SwiGLUMLP:
        linears = adapted(MLPSubmodules(linear_fc1=ColumnParallelLinear,
                                        linear_fc2=RowParallelLinear))
        return attention, type("LoRASwiGLUMLP", (SwiGLUMLP,), {"default_submodules": linears})
    return attention, dataclasses.replace(mlp, submodules=adapted(mlp.submodules))

