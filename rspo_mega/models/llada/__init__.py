"""LLaDA (masked-diffusion LM) on megatron-core: model, HF config/key mapping, checkpoints.

Public API::

    build_llada_model(cfg, *, pre_process=None, post_process=None, vp_stage=None)
    llada_forward(model, input_ids, attention_mask=None, labels=None, positions=None)
    vocab_parallel_log_probs(logits_vp, labels, vocab_start=0, group=None)
    padded_vocab_size(cfg, tp)
    model_config_from_hf(path)
    transformer_config(cfg, parallel=None, impl="local", **overrides)
    save_model(model, dir) / load_model(model, dir, prefix="")
    convert_hf_to_mcore(...) / convert_mcore_to_hf(...)
"""

from rspo_mega.models.llada.checkpoint import load_model, save_model
from rspo_mega.models.llada.config import padded_vocab_size, transformer_config
from rspo_mega.models.llada.convert import convert_hf_to_mcore, convert_mcore_to_hf
from rspo_mega.models.llada.hf_config import model_config_from_hf
from rspo_mega.models.llada.logits import vocab_parallel_log_probs
from rspo_mega.models.llada.model import LLaDAModel, build_llada_model, llada_forward, unwrap_model
from rspo_mega.models.llada.spec import llada_layer_spec, resolve_transformer_impl

__all__ = [
    "LLaDAModel",
    "build_llada_model",
    "convert_hf_to_mcore",
    "convert_mcore_to_hf",
    "llada_forward",
    "llada_layer_spec",
    "load_model",
    "model_config_from_hf",
    "padded_vocab_size",
    "resolve_transformer_impl",
    "save_model",
    "transformer_config",
    "unwrap_model",
    "vocab_parallel_log_probs",
]
