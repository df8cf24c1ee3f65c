"""The one place that knows how HF LLaDA tensors map onto megatron-core's distributed checkpoint.

Megatron keys are the *global* ``torch_dist`` keys (TE names, canonical for both layer specs);
per-layer parameters live under ``decoder.layers.<param>`` with a leading global layer axis.
Transforms (see ``docs``/LLADA_FORMAT.md):

* QKV: per KV group ``g`` the rows ``[q heads of g; k_g; v_g]`` (:func:`qkv_to_mcore`);
* fc1: global ``[gate; up]`` (HF ``ff_proj`` is the gate); megatron's TP sharding of this
  parameter then gives rank r ``[gate_r; up_r]`` (:func:`fc1_to_mcore`);
* vocab: embedding and output rows zero-padded to the padded vocab (:func:`pad_vocab`).

Every transform is a pure reshuffle of rows, so HF -> Megatron -> HF is bit-exact.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterator, Optional

import torch

from rspo_mega.config.schema import ModelConfig

HF_PREFIX = "model.transformer."


@dataclass(frozen=True)
class MCoreParam:
    """One megatron checkpoint tensor and the HF tensors it is built from."""

    key: str  # global torch_dist key (no prefix)
    hf_names: tuple[str, ...]  # HF leaf names ("blocks.{i}." is prepended for per-layer params)
    per_layer: bool
    kind: str  # copy | qkv | fc1 | vocab


PARAMS: tuple[MCoreParam, ...] = (
    MCoreParam("embedding.word_embeddings.weight", ("wte.weight",), False, "vocab"),
    MCoreParam("decoder.layers.self_attention.linear_qkv.layer_norm_weight",
               ("attn_norm.weight",), True, "copy"),
    MCoreParam("decoder.layers.self_attention.linear_qkv.weight",
               ("q_proj.weight", "k_proj.weight", "v_proj.weight"), True, "qkv"),
    MCoreParam("decoder.layers.self_attention.linear_proj.weight", ("attn_out.weight",), True, "copy"),
    MCoreParam("decoder.layers.mlp.linear_fc1.layer_norm_weight", ("ff_norm.weight",), True, "copy"),
    MCoreParam("decoder.layers.mlp.linear_fc1.weight",
               ("ff_proj.weight", "up_proj.weight"), True, "fc1"),
    MCoreParam("decoder.layers.mlp.linear_fc2.weight", ("ff_out.weight",), True, "copy"),
    MCoreParam("decoder.final_layernorm.weight", ("ln_f.weight",), False, "copy"),
    MCoreParam("output_layer.weight", ("ff_out.weight",), False, "vocab"),
)

# Linear layers whose (empty for the local spec) `_extra_state` megatron checkpoints per layer.
EXTRA_STATE_KEYS: tuple[str, ...] = tuple(
    f"decoder.layers.{m}._extra_state"
    for m in ("self_attention.linear_qkv", "self_attention.linear_proj",
              "mlp.linear_fc1", "mlp.linear_fc2")
)


def hf_key(param: MCoreParam, index: int, layer: Optional[int]) -> str:
    """Full HF key of ``param.hf_names[index]`` (of ``layer`` for per-layer params)."""
    block = f"blocks.{layer}." if param.per_layer else ""
    return f"{HF_PREFIX}{block}{param.hf_names[index]}"


def hf_keys(param: MCoreParam, layer: Optional[int]) -> list[str]:
    return [hf_key(param, i, layer) for i in range(len(param.hf_names))]


def _groups(cfg: ModelConfig) -> tuple[int, int, int]:
    """(query heads, KV groups, head dim)."""
    heads = cfg.num_attention_heads
    return heads, cfg.num_query_groups or heads, cfg.hidden_size // heads


def hf_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Every HF tensor of ``cfg`` with its shape (the complete expected key set)."""
    heads, groups, hn = _groups(cfg)
    h, f, v = cfg.hidden_size, cfg.ffn_hidden_size, cfg.vocab_size
    leaf = {
        "wte.weight": (v, h), "ln_f.weight": (h,), "attn_norm.weight": (h,),
        "q_proj.weight": (heads * hn, h), "k_proj.weight": (groups * hn, h),
        "v_proj.weight": (groups * hn, h), "attn_out.weight": (h, heads * hn),
        "ff_norm.weight": (h,), "ff_proj.weight": (f, h), "up_proj.weight": (f, h),
    }
    out: dict[str, tuple[int, ...]] = {}
    for p in PARAMS:
        for layer in range(cfg.num_layers) if p.per_layer else [None]:
            for i, name in enumerate(p.hf_names):
                shape = (v, h) if p.key == "output_layer.weight" else (
                    (h, f) if name == "ff_out.weight" else leaf[name])
                out[hf_key(p, i, layer)] = shape
    return out


def mcore_shape(param: MCoreParam, cfg: ModelConfig, padded_vocab: int) -> tuple[int, ...]:
    """Global shape of one layer's (or the global) megatron tensor, without the layer axis."""
    heads, groups, hn = _groups(cfg)
    h, f = cfg.hidden_size, cfg.ffn_hidden_size
    return {
        "embedding.word_embeddings.weight": (padded_vocab, h),
        "decoder.layers.self_attention.linear_qkv.layer_norm_weight": (h,),
        "decoder.layers.self_attention.linear_qkv.weight": ((heads + 2 * groups) * hn, h),
        "decoder.layers.self_attention.linear_proj.weight": (h, heads * hn),
        "decoder.layers.mlp.linear_fc1.layer_norm_weight": (h,),
        "decoder.layers.mlp.linear_fc1.weight": (2 * f, h),
        "decoder.layers.mlp.linear_fc2.weight": (h, f),
        "decoder.final_layernorm.weight": (h,),
        "output_layer.weight": (padded_vocab, h),
    }[param.key]


def qkv_to_mcore(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int, groups: int
                 ) -> torch.Tensor:
    """HF ``q [np*hn, H]``, ``k/v [ng*hn, H]`` -> megatron ``[(np + 2 ng) * hn, H]`` group-major."""
    hn, hidden = k.shape[0] // groups, q.shape[1]
    per = heads // groups
    return torch.cat(
        [q.reshape(groups, per * hn, hidden), k.reshape(groups, hn, hidden),
         v.reshape(groups, hn, hidden)], dim=1,
    ).reshape(-1, hidden)


def qkv_from_mcore(qkv: torch.Tensor, heads: int, groups: int
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Inverse of :func:`qkv_to_mcore`."""
    hidden = qkv.shape[1]
    hn = qkv.shape[0] // (heads + 2 * groups)
    per = heads // groups
    q, k, v = qkv.reshape(groups, (per + 2) * hn, hidden).split([per * hn, hn, hn], dim=1)
    return (q.reshape(-1, hidden).contiguous(), k.reshape(-1, hidden).contiguous(),
            v.reshape(-1, hidden).contiguous())


def fc1_to_mcore(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """Global megatron fc1 ``[gate; up]`` (``[2F, H]``); TP rank r then holds ``[gate_r; up_r]``."""
    return torch.cat([gate, up], dim=0)


def fc1_from_mcore(fc1: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    gate, up = fc1.chunk(2, dim=0)
    return gate.contiguous(), up.contiguous()


def pad_vocab(weight: torch.Tensor, padded_vocab: int) -> torch.Tensor:
    """Zero rows appended up to ``padded_vocab`` (``[V, H]`` -> ``[Vp, H]``)."""
    extra = padded_vocab - weight.shape[0]
    if extra < 0:
        raise ValueError(f"vocab {weight.shape[0]} exceeds padded vocab {padded_vocab}")
    if extra == 0:
        return weight
    return torch.cat([weight, weight.new_zeros(extra, *weight.shape[1:])], dim=0)


def to_mcore(param: MCoreParam, sources: list[torch.Tensor], cfg: ModelConfig,
             padded_vocab: int) -> torch.Tensor:
    """Build one megatron tensor (one layer's slice for per-layer params) from its HF sources."""
    heads, groups, _ = _groups(cfg)
    if param.kind == "qkv":
        return qkv_to_mcore(*sources, heads=heads, groups=groups)
    if param.kind == "fc1":
        return fc1_to_mcore(*sources)
    if param.kind == "vocab":
        return pad_vocab(sources[0], padded_vocab)
    return sources[0]


def from_mcore(param: MCoreParam, tensor: torch.Tensor, cfg: ModelConfig,
               layer: Optional[int]) -> Iterator[tuple[str, torch.Tensor]]:
    """HF ``(key, tensor)`` pairs recovered from one megatron tensor (padded vocab rows dropped)."""
    heads, groups, _ = _groups(cfg)
    if param.kind == "qkv":
        parts: tuple[torch.Tensor, ...] = qkv_from_mcore(tensor, heads, groups)
    elif param.kind == "fc1":
        parts = fc1_from_mcore(tensor)
    elif param.kind == "vocab":
        parts = (tensor[: cfg.vocab_size].contiguous(),)
    else:
        parts = (tensor,)
    for i, part in enumerate(parts):
        yield hf_key(param, i, layer), part


def layer_indices(param: MCoreParam, cfg: ModelConfig) -> list[Optional[int]]:
    return list(range(cfg.num_layers)) if param.per_layer else [None]


def check_key_sets(expected: set[str], found: set[str], source: str,
                   limit: Optional[int] = 5) -> None:
    """Raise ``KeyError`` naming missing, then unexpected tensors of ``source`` (the first
    ``limit`` names; ``None`` lists all)."""
    for what, keys in (("missing", expected - found), ("unexpected", found - expected)):
        if keys:
            names = sorted(keys)
            more = " ..." if limit is not None and len(names) > limit else ""
            raise KeyError(f"{source}: {what} tensor(s) {names[:limit]}{more}")


def check_hf_shapes(cfg: ModelConfig, shape_of: Callable[[str], tuple[int, ...]],
                    keys: set[str], source: str) -> None:
    """Raise naming the key on a missing, extra or wrongly shaped HF tensor."""
    expected = hf_shapes(cfg)
    check_key_sets(set(expected), keys, source)
    for key, shape in expected.items():
        got = tuple(shape_of(key))
        if got != shape:
            raise ValueError(f"{source}: tensor {key} has shape {list(got)}, expected {list(shape)}")
