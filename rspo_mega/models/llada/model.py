"""LLaDA on megatron-core: build the (TP/PP-sharded) GPTModel and run it bidirectionally.

Shapes: ``b`` batch, ``s`` tokens, ``m`` selected positions per row, ``h`` hidden, ``v`` this TP
rank's real vocab columns (see :mod:`rspo_mega.models.llada.logits`). Logits stay vocab-parallel
and are **unshifted**: position ``i`` predicts token ``i``. :class:`LLaDAModel` is megatron's
``GPTModel`` whose head runs the output layer only on the positions a consumer reads (the
current block in the sampler, the scored positions in the ELBO) and only over real vocab ids.
"""

from __future__ import annotations

import logging
from typing import Any, Optional

import torch
from megatron.core import parallel_state as ps
from megatron.core import tensor_parallel
from megatron.core.models.gpt import GPTModel
from megatron.core.transformer.module import Float16Module
from torch import Tensor

from rspo_mega.config.schema import ModelConfig
from rspo_mega.models.llada import lora
from rspo_mega.models.llada.config import padded_vocab_size, transformer_config
from rspo_mega.models.llada.forward_context import (
    CacheView,
    ForwardContext,
    QuerySelection,
    hidden_rows,
)
from rspo_mega.models.llada.logits import true_vocab_columns, vocab_parallel_log_probs
from rspo_mega.models.llada.megatron_seams import check_megatron_seams
from rspo_mega.models.llada.padding_rotation import real_tokens_first_rows
from rspo_mega.models.llada.spec import llada_layer_spec, resolve_transformer_impl

log = logging.getLogger(__name__)


def build_llada_model(
    cfg: ModelConfig,
    *,
    pre_process: Optional[bool] = None,
    post_process: Optional[bool] = None,
    vp_stage: Optional[int] = None,
    init_weights: bool = True,
    sequence_parallel: bool = False,
    seed: int = 0,
) -> torch.nn.Module:
    """This rank's part of an LLaDA model under the current megatron parallel state.

    ``pre_process``/``post_process`` default to first/last pipeline stage (of ``vp_stage`` with
    virtual stages). bf16 models come wrapped in ``Float16Module`` (fp32 logits out).
    ``init_weights=False`` skips random initialisation (the weights will be loaded).
    ``sequence_parallel`` splits the activations between the TP ranks along the sequence
    (``parallel.sequence_parallel``; the TE spec on a GPU only). ``cfg`` is read as it is
    (``rspo_mega.setup.load_run_config`` resolved ``model.hf_config`` into it).
    With ``cfg.lora.enabled`` the targeted linears carry adapters (initialised from ``seed``, the
    same at any layout) and every other parameter is frozen. Raises if the installed
    megatron-core changed an internal the model relies on
    (:mod:`rspo_mega.models.llada.megatron_seams`).
    """
    if not ps.model_parallel_is_initialized():
        raise RuntimeError("build_llada_model: initialise megatron parallel state first")
    check_megatron_seams()
    pre_process, post_process = _stage_ends(pre_process, post_process, vp_stage)
    impl = resolve_transformer_impl(cfg.transformer_impl)
    config = transformer_config(cfg, impl=impl, sequence_parallel=sequence_parallel,
                                perform_initialization=init_weights)
    tp = ps.get_tensor_model_parallel_world_size()
    model = LLaDAModel(
        true_vocab_size=cfg.vocab_size,
        transformer_impl=impl,
        config=config,
        transformer_layer_spec=llada_layer_spec(impl, cfg.lora),
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
    if cfg.lora.enabled:
        if init_weights:
            lora.init_adapters(model, seed)
        lora.freeze_base(model)
    return _placed(model, config)


def _stage_ends(pre_process: Optional[bool], post_process: Optional[bool],
                vp_stage: Optional[int]) -> tuple[bool, bool]:
    """``(pre_process, post_process)``: the given flags, else whether this rank holds the first /
    last pipeline stage (of ``vp_stage`` with virtual stages)."""
    virtual = ps.get_virtual_pipeline_model_parallel_world_size() is not None
    if pre_process is None:
        pre_process = ps.is_pipeline_first_stage(ignore_virtual=not virtual, vp_stage=vp_stage)
    if post_process is None:
        post_process = ps.is_pipeline_last_stage(ignore_virtual=not virtual, vp_stage=vp_stage)
    return pre_process, post_process


def _placed(model: torch.nn.Module, config: Any) -> torch.nn.Module:
    """``model`` on the current GPU (if any), wrapped in ``Float16Module`` for bf16 ``config``."""
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


def llada_forward(
    model: torch.nn.Module,
    input_ids: torch.Tensor,
    attention_mask: Optional[torch.Tensor] = None,
    labels: Optional[torch.Tensor] = None,
    positions: Optional[torch.Tensor] = None,
    kv_cache: Optional[CacheView] = None,
    adapters: bool = True,
) -> torch.Tensor:
    """One bidirectional forward of an LLaDA model built by :func:`build_llada_model`.

    ``input_ids``: ``[b, s]``; ``attention_mask``: ``[b, s]`` bool, True = real token (None = no
    padding, no mask tensor at all); ``positions``: the outputs wanted, long ``[b, m]`` (positions of
    each row) or ``[n]`` (flat indices ``row * s + position``); None: all ``s`` of every row. On
    the last pipeline stage returns float32 vocab-parallel logits ``[b, m, v]`` / ``[n, v]`` or,
    with ``labels [b, s]``, the log-probs ``[b, m]`` / ``[n]`` of the labels there. On other
    stages returns the hidden states ``[s, b, h]``.

    ``kv_cache``: a view of a block KV cache (:mod:`rspo_mega.models.llada.kv_cache`); then
    ``input_ids [b, L]`` are the columns ``[lo, lo + L)`` of the cached sequences, their K/V are
    written to the cache, their queries attend to all ``S`` cached keys, and ``attention_mask``
    covers those keys: ``[b, S]``. ``positions`` index the ``L`` columns given.

    ``adapters=False``: a model with LoRA adapters runs as its base model for this forward (the
    RL reference); no effect without adapters.
    """
    inner = unwrap_model(model)
    b, s = input_ids.shape
    if kv_cache is not None:
        if labels is not None:
            raise ValueError("llada_forward: a cached (rollout) forward returns logits; labels "
                             "need the full sequence without kv_cache")
        return _cached_forward(model, input_ids, attention_mask, positions, kv_cache, adapters)
    _check_full_forward(b, s, labels, positions)
    if attention_mask is not None and inner.transformer_impl == "transformer_engine":
        input_ids, attention_mask, labels, positions = real_tokens_first_rows(
            input_ids, attention_mask, labels, positions)
    position_ids = torch.arange(s, device=input_ids.device).unsqueeze(0).expand(b, s)
    mask = None if attention_mask is None else padding_attention_mask(attention_mask)
    return model(input_ids=input_ids, position_ids=position_ids, attention_mask=mask,
                 labels=labels, positions=positions, adapters=adapters)


def _check_full_forward(b: int, s: int, labels: Optional[torch.Tensor],
                        positions: Optional[torch.Tensor]) -> None:
    """``labels`` must be ``[b, s]``, ``positions`` ``[b, m]`` or flat ``[n]``."""
    if labels is not None and labels.shape != (b, s):
        raise ValueError(f"labels shape {tuple(labels.shape)} != input_ids shape {(b, s)}")
    if positions is not None and not (positions.dim() == 1 or
                                      (positions.dim() == 2 and positions.shape[0] == b)):
        raise ValueError(f"positions must be [b={b}, m] or [n], got shape {tuple(positions.shape)}")


def _cached_forward(model: torch.nn.Module, input_ids: torch.Tensor,
                    attention_mask: Optional[torch.Tensor], positions: Optional[torch.Tensor],
                    kv_cache: CacheView, adapters: bool = True) -> torch.Tensor:
    """:func:`llada_forward` of the columns ``[lo, lo + L)`` through the block KV cache."""
    b, span = input_ids.shape
    seq = kv_cache.seq_len
    if kv_cache.lo + span > seq:
        raise ValueError(f"cached forward of columns [{kv_cache.lo}, {kv_cache.lo + span}) "
                         f"exceeds the cache's {seq} positions")
    if attention_mask is not None and attention_mask.shape != (b, seq):
        raise ValueError(f"attention_mask must cover the {seq} cached keys: [b={b}, {seq}], got "
                         f"{tuple(attention_mask.shape)}")
    position_ids = (torch.arange(span, device=input_ids.device) + kv_cache.lo).expand(b, span)
    mask = None if attention_mask is None else padding_attention_mask(attention_mask)
    return model(input_ids=input_ids, position_ids=position_ids, attention_mask=mask,
                 positions=positions, kv_cache=kv_cache, adapters=adapters)


class LLaDAModel(GPTModel):
    """megatron-core's GPTModel with LLaDA's head: selected positions, real vocab ids, fp32 out.

    ``true_vocab_size``: real ids (the output weight is padded beyond); ``transformer_impl``:
    the resolved layer spec (``local`` | ``transformer_engine``).
    """

    def __init__(self, *args: Any, true_vocab_size: int, transformer_impl: str, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.true_vocab_size = int(true_vocab_size)
        self.transformer_impl = transformer_impl
        tp_rank = ps.get_tensor_model_parallel_rank()
        shard = self.vocab_size // ps.get_tensor_model_parallel_world_size()
        self.vocab_start = tp_rank * shard  # global id of this rank's first logit column
        self.vocab_columns = true_vocab_columns(self.true_vocab_size, shard, tp_rank)

    def forward(self, input_ids: Tensor, position_ids: Tensor, attention_mask: Optional[Tensor],
                decoder_input: Optional[Tensor] = None, labels: Optional[Tensor] = None,
                positions: Optional[Tensor] = None, kv_cache: Optional[CacheView] = None,
                adapters: bool = True, **unused: Any) -> Tensor:
        """Embedding (first stage), decoder, head (last stage); see :func:`llada_forward`.

        The cache view and the query selection reach the layers as the decoder's
        ``inference_context`` (a :class:`ForwardContext`); on the last stage of the local spec
        the last layer runs its queries only at ``positions``
        (:mod:`rspo_mega.models.llada.layer`)."""
        pre = self._preprocess(input_ids=input_ids, position_ids=position_ids,
                               decoder_input=decoder_input)
        hidden, rotary, rotary_cos, rotary_sin, sequence_len_offset = pre[:5]
        if kv_cache is not None:  # the span's true positions, lo .. lo + L - 1
            rotary = self.rotary_pos_emb(position_ids.shape[1], offset=kv_cache.lo)
        context = self._forward_context(kv_cache, positions, *position_ids.shape)
        with lora.adapter_scope(adapters):
            hidden = self.decoder(
                hidden_states=hidden, attention_mask=attention_mask, rotary_pos_emb=rotary,
                rotary_pos_cos=rotary_cos, rotary_pos_sin=rotary_sin,
                rotary_pos_cos_sin=pre[6] if len(pre) == 7 else None,
                sequence_len_offset=sequence_len_offset, inference_context=context,
            )
        if not self.post_process:
            return hidden
        return self.head(hidden, labels, positions,
                         None if context is None else context.query_selection)

    def _forward_context(self, kv_cache: Optional[CacheView], positions: Optional[Tensor],
                         b: int, s: int) -> Optional[ForwardContext]:
        """The layers' context: the cache view and the last layer's query selection; None
        when there is neither (megatron's forward runs unchanged)."""
        selection = self._query_selection(positions, b, s)
        if kv_cache is None and selection is None:
            return None
        last = self.decoder.layers[-1].layer_number if selection is not None else None
        return ForwardContext(kv_cache, selection, last)

    def _query_selection(self, positions: Optional[Tensor], b: int,
                         s: int) -> Optional[QuerySelection]:
        """The last layer's query positions: on the last stage of the local spec without
        sequence parallelism or full recompute (megatron's recomputed block forward passes no
        context), when ``positions`` select fewer than ``s`` per row; else None."""
        if (positions is None or not self.post_process or self.transformer_impl != "local"
                or self.config.sequence_parallel or self.config.recompute_granularity == "full"
                or not len(self.decoder.layers)):
            return None
        return QuerySelection.from_positions(positions, b, s)

    def kv_cache_shape(self, rows: int, seq_len: int) -> tuple[int, ...]:
        """What a block KV cache allocates for this chunk's layers:
        ``[layers, 2, rows, seq_len, ng, hn]`` (``2`` = key, value; ``ng`` the KV groups of this
        TP rank), in :attr:`kv_cache_dtype`, layer ``i`` holding :attr:`kv_cache_layers` ``[i]``."""
        tp = ps.get_tensor_model_parallel_world_size()
        groups = (self.config.num_query_groups or self.config.num_attention_heads) // tp
        return (len(self.decoder.layers), 2, rows, seq_len, groups, self.config.kv_channels)

    @property
    def kv_cache_layers(self) -> list[int]:
        """Global layer numbers (megatron's 1-based ``layer_number``) of this chunk's layers."""
        return [layer.layer_number for layer in self.decoder.layers]

    @property
    def kv_cache_dtype(self) -> torch.dtype:
        """The dtype of the cached keys and values: that of the attention's activations."""
        config = self.config
        return torch.bfloat16 if config.bf16 else torch.float16 if config.fp16 else torch.float32

    def head(self, hidden: Tensor, labels: Optional[Tensor], positions: Optional[Tensor],
             selection: Optional[QuerySelection] = None) -> Tensor:
        """``hidden [s, b, h]`` (final norm applied; the selected rows when the last layer ran
        ``selection``) -> logits ``[b, m, v]`` / ``[n, v]`` or log-probs ``[b, m]`` / ``[n]``
        (see :func:`llada_forward` for ``positions``)."""
        if self.config.sequence_parallel:  # all-gather here, reduce-scatter of the grads back
            hidden = tensor_parallel.gather_from_sequence_parallel_region(hidden)
        if selection is not None:
            x = selection.head_input(hidden)
        elif positions is not None and positions.dim() == 1:  # flat row * s + position
            s, b = hidden.shape[:2]
            x = hidden.reshape(s * b, -1).index_select(0, hidden_rows(positions, s, b))
        else:
            x = hidden.transpose(0, 1)  # [b, s, h]
            if positions is not None:
                x = x.gather(1, positions.unsqueeze(-1).expand(-1, -1, x.shape[-1]))
        if not self.config.sequence_parallel:  # identity forward, all-reduce of the input grad
            x = tensor_parallel.copy_to_tensor_model_parallel_region(x)
        logits = torch.matmul(x, self.output_layer.weight[: self.vocab_columns].t()).float()
        if labels is None:
            return logits
        return self.label_log_probs(logits, labels, positions)

    def label_log_probs(self, logits: Tensor, labels: Tensor, positions: Optional[Tensor]) -> Tensor:
        """Log-probs ``[b, m]`` / ``[n]`` of ``labels [b, s]`` at ``positions`` (None: all) from
        this rank's logit columns ``[b, m, v]`` / ``[n, v]`` (vocab-parallel, no gather)."""
        if positions is not None:
            labels = labels.reshape(-1).index_select(0, positions) if positions.dim() == 1 \
                else labels.gather(1, positions)
        group = ps.get_tensor_model_parallel_group() \
            if ps.get_tensor_model_parallel_world_size() > 1 else None
        return vocab_parallel_log_probs(logits, labels, self.vocab_start, group)
