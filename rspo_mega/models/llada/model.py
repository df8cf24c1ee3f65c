"""LLaDA on megatron-core: build the (TP/PP-sharded) GPTModel and run it bidirectionally.

Shapes: ``b`` batch, ``s`` tokens, ``h`` hidden, ``V`` padded vocab, ``tp`` tensor-parallel size.
Logits stay vocab-parallel (``[b, s, V/tp]`` per rank) and are **unshifted**: position ``i``
predicts token ``i``. Padded vocab entries (ids >= true vocab) are set to ``-inf``, so no softmax,
argmax or cross entropy over them can ever pick or weigh a padded id.
"""

from __future__ import annotations

import logging
from typing import Any, Optional

import torch
from megatron.core import parallel_state as ps
from megatron.core import tensor_parallel
from megatron.core.models.gpt import GPTModel
from megatron.core.transformer.module import Float16Module

from rspo_mega.config.schema import ModelConfig
from rspo_mega.models.llada.config import padded_vocab_size, transformer_config
from rspo_mega.models.llada.hf_config import resolve_model_config
from rspo_mega.models.llada.spec import llada_layer_spec, resolve_transformer_impl

log = logging.getLogger(__name__)


def build_llada_model(
    cfg: ModelConfig,
    *,
    pre_process: Optional[bool] = None,
    post_process: Optional[bool] = None,
    vp_stage: Optional[int] = None,
    init_weights: bool = True,
) -> torch.nn.Module:
    """This rank's part of an LLaDA model under the current megatron parallel state.

    ``pre_process``/``post_process`` default to first/last pipeline stage (of ``vp_stage`` with
    virtual stages). bf16 models come wrapped in ``Float16Module`` (fp32 logits out).
    ``init_weights=False`` skips random initialisation (the weights will be loaded). With
    ``cfg.hf_config`` set, the geometry comes from that config.json.
    """
    cfg = resolve_model_config(cfg)
    if not ps.model_parallel_is_initialized():
        raise RuntimeError("build_llada_model: initialise megatron parallel state first")
    virtual = ps.get_virtual_pipeline_model_parallel_world_size() is not None
    if pre_process is None:
        pre_process = ps.is_pipeline_first_stage(ignore_virtual=not virtual, vp_stage=vp_stage)
    if post_process is None:
        post_process = ps.is_pipeline_last_stage(ignore_virtual=not virtual, vp_stage=vp_stage)
    impl = resolve_transformer_impl(cfg.transformer_impl)
    config = transformer_config(cfg, impl=impl, perform_initialization=init_weights)
    tp = ps.get_tensor_model_parallel_world_size()
    model = GPTModel(
        config=config,
        transformer_layer_spec=llada_layer_spec(impl),
        vocab_size=padded_vocab_size(cfg, tp),
        max_sequence_length=cfg.max_position_embeddings,
        pre_process=pre_process,
        post_process=post_process,
        parallel_output=True,
        share_embeddings_and_output_weights=False,
        position_embedding_type="rope",
        rotary_percent=1.0,
        rotary_base=cfg.rope_theta,
        vp_stage=vp_stage,
    )
    model.llada_true_vocab_size = cfg.vocab_size  # read by llada_forward to mask padded ids
    model.llada_transformer_impl = impl
    if torch.cuda.is_available():  # the local spec's torch norms and RoPE buffers start on the CPU
        model.cuda(torch.cuda.current_device())
    if config.bf16:
        model = Float16Module(config, model)
    return model


def unwrap_model(model: torch.nn.Module) -> GPTModel:
    """The GPTModel inside DDP / Float16Module wrappers."""
    inner: Any = model
    while not isinstance(inner, GPTModel) and hasattr(inner, "module"):
        inner = inner.module
    if not isinstance(inner, GPTModel):
        raise TypeError(f"not an LLaDA model: {type(model).__name__}")
    return inner


def padding_attention_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """Key-padding mask: ``[b, s]`` (True = real token) -> ``[b, 1, 1, s]`` (True = masked out)."""
    if attention_mask.dim() != 2:
        raise ValueError(f"attention_mask must be [b, s], got shape {tuple(attention_mask.shape)}")
    return (~attention_mask.bool())[:, None, None, :]


def mask_padded_vocab(logits_vp: torch.Tensor, true_vocab_size: int) -> torch.Tensor:
    """Set entries of this TP rank's logit shard whose global id is >= ``true_vocab_size`` to -inf.

    ``logits_vp``: ``[..., V/tp]``. Returns the input untouched when the shard holds no padding.
    """
    shard = logits_vp.size(-1)
    start = ps.get_tensor_model_parallel_rank() * shard
    valid = true_vocab_size - start
    if valid >= shard:
        return logits_vp
    ids = torch.arange(shard, device=logits_vp.device)
    return logits_vp.masked_fill(ids >= valid, float("-inf"))


def vocab_parallel_log_probs(logits_vp: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Per-token log-probabilities ``[b, s]`` (float32) of ``labels`` from vocab-parallel logits.

    ``logits_vp``: ``[b, s, V/tp]`` (padded ids already -inf). Equals
    ``-vocab_parallel_cross_entropy`` (no label smoothing); the vocab is never gathered, and the
    caller's logits are left unchanged (megatron's kernel works in place, so fp32 input is copied).
    """
    logits = logits_vp.float()
    if logits.data_ptr() == logits_vp.data_ptr():
        logits = logits.clone()
    return -tensor_parallel.vocab_parallel_cross_entropy(logits, labels)


def real_tokens_first(attention_mask: torch.Tensor) -> Optional[torch.Tensor]:
    """Per-row rotation that moves each row's real tokens to the front, or None if none is needed.

    ``attention_mask``: ``[b, s]`` bool, True = real token, each row's real tokens contiguous
    (left padding, as prompts are padded). Returns ``shift [b]``: row ``i`` rotated left by
    ``shift[i]`` starts with its real tokens. Transformer Engine's fused attention reads a padding
    mask as per-row lengths (real tokens first), so left-padded rows must be rotated for it; with
    RoPE the scores depend only on relative positions, so the real tokens' outputs do not change.
    """
    mask = attention_mask.bool()
    shift = mask.int().argmax(dim=1)  # first real token of each row
    pos = torch.arange(mask.shape[1], device=mask.device)
    span = (pos >= shift[:, None]) & (pos < (shift + mask.sum(dim=1))[:, None])
    holed, shifted = torch.stack([(span != mask).any(), shift.any()]).tolist()  # one host sync
    if not shifted and not holed:
        return None  # real tokens already come first in every row
    if holed:
        raise ValueError("attention_mask: with transformer_impl=transformer_engine each row's real "
                         "tokens must be contiguous (padding only before and after them)")
    return shift


def _rotate(x: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """Rotate each row of ``x [b, s, ...]`` left by ``shift[row]`` along the sequence."""
    s = x.shape[1]
    index = (torch.arange(s, device=x.device)[None, :] + shift[:, None]) % s  # [b, s]
    return x.gather(1, index.reshape(index.shape + (1,) * (x.dim() - 2)).expand(x.shape))


def llada_forward(
    model: torch.nn.Module,
    input_ids: torch.Tensor,
    attention_mask: Optional[torch.Tensor] = None,
    labels: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """One bidirectional forward of an LLaDA model built by :func:`build_llada_model`.

    ``input_ids``: ``[b, s]``; ``attention_mask``: ``[b, s]`` bool, True = real token (None = no
    padding, no mask tensor at all). On the last pipeline stage returns float32 vocab-parallel
    logits ``[b, s, V/tp]`` with padded ids at -inf, or, with ``labels`` ``[b, s]``, per-token
    log-probs ``[b, s]``. On other stages returns the hidden states ``[s, b, h]``.
    """
    inner = unwrap_model(model)
    b, s = input_ids.shape
    shift = None
    if attention_mask is not None and inner.llada_transformer_impl == "transformer_engine":
        shift = real_tokens_first(attention_mask)
    if shift is not None:  # every stage sees the same rotated rows; the last one rotates back
        input_ids, attention_mask = _rotate(input_ids, shift), _rotate(attention_mask, shift)
    position_ids = torch.arange(s, device=input_ids.device).unsqueeze(0).expand(b, s)
    mask = None if attention_mask is None else padding_attention_mask(attention_mask)
    out = model(input_ids=input_ids, position_ids=position_ids, attention_mask=mask)
    if not inner.post_process:
        return out
    if shift is not None:
        out = _rotate(out, (s - shift) % s)  # logits [b, s, V/tp] back to the caller's order
    logits = mask_padded_vocab(out.float(), inner.llada_true_vocab_size)
    if labels is None:
        return logits
    if labels.shape != (b, s):
        raise ValueError(f"labels shape {tuple(labels.shape)} != input_ids shape {(b, s)}")
    return -tensor_parallel.vocab_parallel_cross_entropy(logits, labels)
