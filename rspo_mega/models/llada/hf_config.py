"""HF LLaDA ``config.json`` <-> :class:`ModelConfig`.

Only dense ``LLaDAModelLM`` checkpoints (MHA or GQA) are supported; anything the Megatron model
cannot reproduce exactly (biases, tied weights, ALiBi, LayerNorm, QK-norm, non-SiLU MLP, scaled
logits) is refused with the offending key named. The file's values always win over the LLaDA
config class defaults (which differ from the released checkpoints).
"""

from __future__ import annotations

import json
import os
from dataclasses import replace
from typing import Any, Iterable, Optional

from rspo_mega.config.schema import ModelConfig

SUPPORTED_ARCHITECTURES = ("LLaDAModelLM",)
KNOWN_UNSUPPORTED = {
    "LLaDAMoEModelLM": "LLaDA-MoE (experts, QK-norm) is not supported by this converter",
    "LLaDA2MoeModelLM": "LLaDA2.x (fused QKV, partial RoPE, MoE) is not supported",
    "DreamModel": "Dream (Qwen2 layout, shifted logits) is not supported",
}

# key -> value the Megatron LLaDA model requires (missing keys take these values).
_REQUIRED = {
    "activation_type": "silu",
    "block_type": "llama",
    "layer_norm_type": "rms",
    "weight_tying": False,
    "include_bias": False,
    "alibi": False,
    "rope": True,
    "attention_layer_norm": False,
    "scale_logits": False,
    "input_emb_norm": False,
}


def _config_path(path: str | os.PathLike) -> str:
    path = os.fspath(path)
    return os.path.join(path, "config.json") if os.path.isdir(path) else path


def read_hf_config(path: str | os.PathLike) -> dict[str, Any]:
    """The raw ``config.json`` dict (``path``: the file or its directory)."""
    file = _config_path(path)
    if not os.path.isfile(file):
        raise FileNotFoundError(f"no HF config.json at {file}")
    with open(file) as f:
        try:
            raw = json.load(f)
        except json.JSONDecodeError as exc:
            raise ValueError(f"{file}: not valid JSON ({exc})") from None
    if not isinstance(raw, dict):
        raise ValueError(f"{file}: expected a JSON object")
    return raw


def check_architecture(raw: dict[str, Any], source: str = "config.json") -> None:
    """Raise ``ValueError`` unless ``raw`` describes a dense LLaDA model this code can run."""
    archs = raw.get("architectures") or []
    if not any(a in SUPPORTED_ARCHITECTURES for a in archs):
        reasons = [KNOWN_UNSUPPORTED[a] for a in archs if a in KNOWN_UNSUPPORTED]
        why = f": {reasons[0]}" if reasons else ""
        raise ValueError(
            f"{source}: unsupported architecture {archs or raw.get('model_type')!r}{why}; "
            f"supported: {list(SUPPORTED_ARCHITECTURES)}"
        )
    for key, want in _REQUIRED.items():
        if key in raw and raw[key] is not None and raw[key] != want:
            raise ValueError(f"{source}: {key}={raw[key]!r} is not supported (need {want!r})")
    if raw.get("include_qkv_bias"):
        raise ValueError(f"{source}: include_qkv_bias=True is not supported")


def hf_model_fields(raw: dict[str, Any], source: str = "config.json") -> dict[str, Any]:
    """The :class:`ModelConfig` fields a config.json determines (geometry and token ids), after
    checking that it describes a dense LLaDA model this code can run."""
    check_architecture(raw, source)

    def need(key: str) -> Any:
        if raw.get(key) is None:
            raise ValueError(f"{source}: missing required key {key!r}")
        return raw[key]

    hidden, heads = int(need("d_model")), int(need("n_heads"))
    if raw.get("n_kv_heads") is not None:
        groups = int(raw["n_kv_heads"])
    else:
        groups = 1 if raw.get("multi_query_attention") else heads
    ffn = raw.get("mlp_hidden_size") or int(raw.get("mlp_ratio", 4)) * hidden
    vocab = int(raw.get("embedding_size") or need("vocab_size"))
    eos = raw.get("eos_token_id")
    return dict(
        num_layers=int(need("n_layers")),
        hidden_size=hidden,
        ffn_hidden_size=int(ffn),
        num_attention_heads=heads,
        num_query_groups=None if groups == heads else groups,
        vocab_size=vocab,
        max_position_embeddings=int(raw.get("max_sequence_length") or 4096),
        rope_theta=float(raw.get("rope_theta", 10000.0)),
        norm_eps=float(raw.get("rms_norm_eps", 1e-5)),
        mask_token_id=int(raw.get("mask_token_id", 126336)),
        eos_token_id=int(eos) if eos is not None else vocab - 1,
        pad_token_id=raw.get("pad_token_id"),
        bos_token_id=raw.get("bos_token_id"),
        init_method_std=float(raw.get("init_std", 0.02)),
    )


def model_config_from_hf_dict(raw: dict[str, Any], source: str = "config.json",
                              base: Optional[ModelConfig] = None) -> ModelConfig:
    """A ``ModelConfig`` with the geometry of ``raw``; non-geometry fields come from ``base``."""
    return replace(base or ModelConfig(), **hf_model_fields(raw, source))


# Fields a run may set apart from its start's config.json: the context length (RoPE has no
# weights, so a run may decode longer sequences than the start was trained on).
RUN_CHOSEN_FIELDS = ("max_position_embeddings",)


def conflicting_fields(cfg: ModelConfig, raw: dict[str, Any], source: str = "config.json",
                       keys: Optional[Iterable[str]] = None) -> list[tuple[str, Any, Any]]:
    """``(field, value in cfg, value in raw)`` for every field :func:`hf_model_fields` reads
    from ``raw`` (only those in ``keys`` when given; never :data:`RUN_CHOSEN_FIELDS`) on which
    ``cfg`` differs. Unset query groups mean one per head and an unset pad id means EOS, on
    either side."""
    fields = hf_model_fields(raw, source)
    theirs = replace(cfg, **fields)
    chosen = [k for k in fields if (keys is None or k in set(keys))
              and k not in RUN_CHOSEN_FIELDS]
    return [(k, getattr(cfg, k), fields[k]) for k in chosen
            if _effective(cfg, k) != _effective(theirs, k)]


def _effective(cfg: ModelConfig, key: str) -> Any:
    """``cfg.<key>`` with the defaults the model applies filled in."""
    if key == "num_query_groups":
        return cfg.num_query_groups or cfg.num_attention_heads
    if key == "pad_token_id":
        return cfg.eos_token_id if cfg.pad_token_id is None else cfg.pad_token_id
    return getattr(cfg, key)


def model_config_from_hf(path: str | os.PathLike, base: Optional[ModelConfig] = None) -> ModelConfig:
    """Parse an HF LLaDA ``config.json`` (file or directory) into a ``ModelConfig``."""
    return model_config_from_hf_dict(read_hf_config(path), _config_path(path), base)


def _llada_defaults() -> dict[str, Any]:
    """A fresh dict of the fixed LLaDA ``config.json`` keys (architecture, remote code, switches)."""
    return {
        "architectures": ["LLaDAModelLM"],
        "model_type": "llada",
        "auto_map": {
            "AutoConfig": "configuration_llada.LLaDAConfig",
            "AutoModel": "modeling_llada.LLaDAModelLM",
            "AutoModelForCausalLM": "modeling_llada.LLaDAModelLM",
        },
        "activation_type": "silu", "alibi": False, "alibi_bias_max": 8.0,
        "attention_dropout": 0.0, "attention_layer_norm": False,
        "attention_layer_norm_with_affine": True, "bias_for_layer_norm": False,
        "block_group_size": 1, "block_type": "llama", "embedding_dropout": 0.0,
        "flash_attention": False, "include_bias": False, "include_qkv_bias": False,
        "init_cutoff_factor": None, "init_device": "meta", "init_fn": "mitchell",
        "input_emb_norm": False, "layer_norm_type": "rms", "layer_norm_with_affine": True,
        "mlp_ratio": 4, "multi_query_attention": None, "precision": "amp_bf16",
        "residual_dropout": 0.0, "rope": True, "rope_full_precision": True,
        "scale_logits": False, "use_cache": False, "weight_tying": False,
    }


def _model_keys(cfg: ModelConfig, torch_dtype: str) -> dict[str, Any]:
    """The ``config.json`` keys ``cfg`` determines: geometry, token ids and ``torch_dtype``."""
    return dict(
        d_model=cfg.hidden_size,
        n_heads=cfg.num_attention_heads,
        n_kv_heads=cfg.num_query_groups or cfg.num_attention_heads,
        n_layers=cfg.num_layers,
        mlp_hidden_size=cfg.ffn_hidden_size,
        vocab_size=cfg.vocab_size,
        embedding_size=cfg.vocab_size,
        max_sequence_length=cfg.max_position_embeddings,
        rope_theta=cfg.rope_theta,
        rms_norm_eps=cfg.norm_eps,
        init_std=cfg.init_method_std,
        mask_token_id=cfg.mask_token_id,
        eos_token_id=cfg.eos_token_id,
        pad_token_id=cfg.pad_token_id if cfg.pad_token_id is not None else cfg.eos_token_id,
        torch_dtype=torch_dtype,
    )


def hf_config_dict(cfg: ModelConfig, torch_dtype: str = "bfloat16",
                   template: Optional[dict[str, Any]] = None) -> dict[str, Any]:
    """An HF LLaDA ``config.json`` dict for ``cfg`` (real LLaDA keys).

    With ``template`` (e.g. the original config.json) its other keys are kept and only the
    geometry, token ids and ``torch_dtype`` are overwritten.
    """
    out = _llada_defaults()
    out.update(template or {})
    out.update(_model_keys(cfg, torch_dtype))
    if template and template.get("embedding_size") == cfg.vocab_size and template.get("vocab_size"):
        out["vocab_size"] = template["vocab_size"]  # true tokenizer vocab below the row count
    if cfg.bos_token_id is not None:
        out["bos_token_id"] = cfg.bos_token_id
    return dict(sorted(out.items()))
