"""HF LLaDA <-> megatron-core ``torch_dist`` conversion (the logic behind ``tools/convert_*``).

Both directions stream: one HF tensor (or one layer of a megatron tensor) is materialised at a
time, so peak memory is a few tensors, not the model. Outputs go to a temp directory next to the
target that replaces it only on success (:func:`fs.atomic_output_dir`).

The megatron checkpoint stores the canonical (TE-named) global tensors, which load into either
layer spec at any TP/PP; the vocab rows are padded for ``tp`` (other TP sizes still load: see
:mod:`checkpoint`). The source ``config.json`` is kept in it as ``hf_config.json``, so the
reverse conversion needs no other input.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import asdict
from typing import Callable, Iterator, Optional

import torch

from rspo_mega.config.schema import ModelConfig
from rspo_mega.models.llada import checkpoint as ckpt
from rspo_mega.models.llada import hf_adapter as A
from rspo_mega.models.llada.config import padded_vocab_size
from rspo_mega.models.llada.fs import atomic_output_dir
from rspo_mega.models.llada.hf_config import (
    hf_config_dict,
    model_config_from_hf_dict,
    read_hf_config,
)
from rspo_mega.models.llada.hf_io import (
    INDEX_NAME,
    PICKLE_SUFFIXES,
    HFCheckpointReader,
    copy_template_files,
    parse_size,
    write_hf_checkpoint,
)

log = logging.getLogger(__name__)

HF_CONFIG_COPY = "hf_config.json"
CONVERSION_INFO = "llada_conversion.json"
DTYPES = {"bfloat16": torch.bfloat16, "float32": torch.float32, "float16": torch.float16}


def _dtype(name: Optional[str]) -> Optional[torch.dtype]:
    if name is None:
        return None
    if name not in DTYPES:
        raise ValueError(f"dtype {name!r}: expected one of {sorted(DTYPES)}")
    return DTYPES[name]


def check_layout(cfg: ModelConfig, tp: int, pp: int) -> None:
    """Raise if ``cfg`` cannot be split over ``tp`` x ``pp``."""
    groups = cfg.num_query_groups or cfg.num_attention_heads
    for what, n, by in (("num_attention_heads", cfg.num_attention_heads, tp),
                        ("num_query_groups", groups, tp), ("ffn_hidden_size", cfg.ffn_hidden_size, tp),
                        ("num_layers", cfg.num_layers, pp)):
        if by < 1 or n % by:
            raise ValueError(f"{what}={n} is not divisible by {'tp' if what != 'num_layers' else 'pp'}={by}")


def open_hf_checkpoint(hf_dir: str, base: ModelConfig
                       ) -> tuple[HFCheckpointReader, dict, ModelConfig]:
    """Check an HF LLaDA directory and open it: ``(reader, raw config.json, model config)``.

    In order: the safetensors index and every shard it lists (a pickle file is refused, nothing
    is unpickled), config.json (a supported dense LLaDA, required keys), then every tensor's name
    and shape against that geometry. Only headers are read. The model config takes its geometry
    and token ids from config.json, its other fields from ``base``.
    """
    reader = HFCheckpointReader(hf_dir)
    raw = read_hf_config(hf_dir)
    cfg = model_config_from_hf_dict(raw, os.path.join(hf_dir, "config.json"), base)
    A.check_hf_shapes(cfg, reader.shape, reader.keys(), hf_dir)
    return reader, raw, cfg


def convert_hf_to_mcore(hf_dir: str, out_dir: str, tp: int = 1, pp: int = 1,
                        dtype: Optional[str] = None, overwrite: bool = False,
                        make_vocab_size_divisible_by: int = 128) -> ModelConfig:
    """Convert an HF LLaDA directory into a torch_dist checkpoint for a ``tp`` x ``pp`` layout.

    ``dtype`` (bfloat16 | float32 | float16) defaults to the source dtype. Returns the model
    config. Raises naming the key/file on missing, extra or misshapen tensors.
    """
    reader, raw, cfg = open_hf_checkpoint(
        hf_dir, ModelConfig(make_vocab_size_divisible_by=make_vocab_size_divisible_by))
    check_layout(cfg, tp, pp)
    store = _dtype(dtype) or reader.dtype(f"{A.HF_PREFIX}wte.weight")
    padded = padded_vocab_size(cfg, tp)
    by_key = {p.key: p for p in A.PARAMS}
    specs = [ckpt.GlobalTensorSpec(p.key, A.mcore_shape(p, cfg, padded), store,
                                   cfg.num_layers if p.per_layer else None) for p in A.PARAMS]

    def produce(key: str, layer: Optional[int]) -> torch.Tensor:
        param = by_key[key]
        sources = [reader.get(k) for k in A.hf_keys(param, layer)]
        return A.to_mcore(param, sources, cfg, padded).to(store)

    with atomic_output_dir(out_dir, overwrite) as tmp:
        ckpt.write_global_checkpoint(tmp, specs, produce, A.EXTRA_STATE_KEYS, cfg.num_layers)
        with open(os.path.join(tmp, HF_CONFIG_COPY), "w") as f:
            json.dump(raw, f, indent=2)
        with open(os.path.join(tmp, CONVERSION_INFO), "w") as f:
            json.dump({"source": os.path.abspath(hf_dir), "tp": tp, "pp": pp,
                       "padded_vocab_size": padded, "dtype": str(store).replace("torch.", ""),
                       "model": asdict(cfg)}, f, indent=2)
    log.info("converted %s -> %s (tp=%d pp=%d, padded vocab %d)", hf_dir, out_dir, tp, pp, padded)
    return cfg


def _model_prefixes(keys: set[str]) -> list[str]:
    """Prefixes under which a whole model's tensors are stored (a trainer checkpoint: the policy,
    the optimizer's moments, the reference)."""
    anchor = "embedding.word_embeddings.weight"
    return sorted(k[: -len(anchor)] for k in keys if k.endswith(anchor))


def _detect_prefix(keys: set[str]) -> str:
    anchor = "embedding.word_embeddings.weight"
    found = [p for p in _model_prefixes(keys) if not p.startswith("optimizer.")]
    if len(found) != 1:
        raise KeyError(f"cannot find a unique '*{anchor}' in the checkpoint (found {found}); "
                       "pass --prefix")
    return found[0]


def _source_config(ckpt_dir: str, hf_config: Optional[str], template: Optional[str]) -> dict:
    for candidate in (hf_config, os.path.join(ckpt_dir, HF_CONFIG_COPY),
                      template and os.path.join(template, "config.json")):
        if candidate and os.path.exists(candidate):
            return read_hf_config(candidate)
    raise FileNotFoundError(
        f"{ckpt_dir}: no {HF_CONFIG_COPY}; pass --hf-config (a config.json) or --template"
    )


def _check_stored(cfg: ModelConfig, shapes: dict, prefix: str, ckpt_dir: str) -> None:
    """Missing / extra / misshapen megatron tensors under ``prefix`` raise naming the key."""
    expected = {prefix + p.key: p for p in A.PARAMS}
    others = [o for o in _model_prefixes(set(shapes)) if len(o) > len(prefix) and o.startswith(prefix)]
    ours = {k for k in shapes if k.startswith(prefix) and not k.endswith("_extra_state")
            and not any(k.startswith(o) for o in others)}
    A.check_key_sets(set(expected), ours, ckpt_dir, limit=None)
    for key, param in expected.items():
        got = shapes[key][0]
        want = A.mcore_shape(param, cfg, got[0] if param.kind == "vocab" else 0)
        if param.per_layer:
            want = (cfg.num_layers,) + want
        if param.kind == "vocab" and got[0] < cfg.vocab_size:
            raise ValueError(f"{ckpt_dir}: {key} has {got[0]} rows < vocab {cfg.vocab_size}")
        if tuple(got) != tuple(want):
            raise ValueError(f"{ckpt_dir}: tensor {key} has shape {list(got)}, expected {list(want)}")


def _hf_order(cfg: ModelConfig) -> list[tuple[A.MCoreParam, Optional[int]]]:
    """Megatron tensors in HF file order: embedding, layer 0..L-1, final norm, output."""
    glob = [p for p in A.PARAMS if not p.per_layer]
    layer = [p for p in A.PARAMS if p.per_layer]
    return ([(glob[0], None)] + [(p, i) for i in range(cfg.num_layers) for p in layer]
            + [(p, None) for p in glob[1:]])


def convert_mcore_to_hf(ckpt_dir: str, out_dir: str, hf_config: Optional[str] = None,
                        template: Optional[str] = None, prefix: Optional[str] = None,
                        dtype: Optional[str] = None, max_shard_size: str | int = "5GB",
                        overwrite: bool = False,
                        update: Optional[Callable[[str, torch.Tensor], torch.Tensor]] = None,
                        ) -> ModelConfig:
    """Convert a torch_dist checkpoint (saved at any TP/PP) into an HF LLaDA directory.

    ``prefix`` is the key prefix of the model tensors (auto-detected when None, e.g. ``model.``
    in a trainer checkpoint). Geometry comes from ``hf_config``, the checkpoint's own
    ``hf_config.json``, or ``template``'s config.json; tokenizer/modeling files are copied from
    ``template``. ``dtype`` (bfloat16 | float32 | float16) defaults to the checkpoint's. A
    trainer's iteration directory (``iter_N``) stands for its ``dist/`` checkpoint.
    ``update(hf_key, tensor)`` changes each HF tensor before it is cast and written (a LoRA
    merge: :meth:`lora_export.HFAdapters.merge`).
    """
    if not os.path.isdir(ckpt_dir):
        raise FileNotFoundError(f"megatron checkpoint directory {ckpt_dir} does not exist")
    if os.path.isdir(os.path.join(ckpt_dir, "dist")):
        ckpt_dir = os.path.join(ckpt_dir, "dist")
    raw = _source_config(ckpt_dir, hf_config, template)
    cfg = model_config_from_hf_dict(raw, "source config.json")
    shapes = ckpt.stored_tensor_shapes(ckpt_dir)
    prefix = _detect_prefix(set(shapes)) if prefix is None else prefix
    _check_stored(cfg, shapes, prefix, ckpt_dir)
    out_dtype = _dtype(dtype) or shapes[prefix + A.PARAMS[0].key][1]
    dtype = str(out_dtype).replace("torch.", "")
    order = _hf_order(cfg)
    hf_shapes = A.hf_shapes(cfg)
    entries = [(k, out_dtype, hf_shapes[k]) for p, i in order for k in A.hf_keys(p, i)]

    tensors = _hf_tensors(ckpt_dir, order, prefix, shapes, cfg, out_dtype, update)
    with atomic_output_dir(out_dir, overwrite) as tmp:
        config = hf_config_dict(cfg, dtype, template=raw)
        write_hf_checkpoint(tmp, entries, tensors, parse_size(max_shard_size), config)
        if template:
            copy_template_files(template, tmp, skip=_not_copied)
    log.info("converted %s -> %s", ckpt_dir, out_dir)
    return cfg


def _layer_groups(
    order: list[tuple[A.MCoreParam, Optional[int]]],
) -> list[list[tuple[A.MCoreParam, Optional[int]]]]:
    """``order`` cut into runs: the tensors of one layer together, each global tensor alone."""
    groups: list[list[tuple[A.MCoreParam, Optional[int]]]] = []
    for param, layer in order:
        if groups and layer is not None and groups[-1][0][1] == layer:
            groups[-1].append((param, layer))
        else:
            groups.append([(param, layer)])
    return groups


def _hf_tensors(ckpt_dir: str, order: list[tuple[A.MCoreParam, Optional[int]]], prefix: str,
                shapes: dict, cfg: ModelConfig,
                out_dtype: torch.dtype,
                update: Optional[Callable[[str, torch.Tensor], torch.Tensor]] = None,
                ) -> Iterator[tuple[str, torch.Tensor]]:
    """(HF key, tensor in ``out_dtype``) in HF file order, read lazily: one checkpoint read per
    layer (and one per global tensor), so a layer is held at a time."""
    for group in _layer_groups(order):
        loaded = ckpt.read_global_tensors(
            ckpt_dir, {prefix + p.key: layer for p, layer in group}, shapes)
        for param, layer in group:
            for hf_key, t in A.from_mcore(param, loaded.pop(prefix + param.key), cfg, layer):
                yield hf_key, (update(hf_key, t) if update else t).to(out_dtype)


def _not_copied(name: str) -> bool:
    """Template files the export writes itself or that describe the template's weights (its
    model card): weights, indexes, config.json, ``*.md``."""
    return (name in ("config.json", INDEX_NAME) or name.endswith(".safetensors")
            or name.endswith(PICKLE_SUFFIXES) or name.endswith(".bin.index.json")
            or name.endswith(".md"))

