"""Load an HF LLaDA checkpoint straight into this rank's model chunks (no converted copy on disk).

The tensors go through the converter's mapping (:mod:`hf_adapter`): for each megatron tensor a
chunk holds (one layer of a per-layer parameter, or a global one), its HF source tensors are read
(:class:`hf_io.HFCheckpointReader`: one tensor materialised per read), combined by
:func:`hf_adapter.to_mcore` into the global megatron tensor with this run's vocab padding, and the
chunk's part of it, located by the chunk's ``sharded_state_dict`` (TP shard, global layer of the
pipeline stage), is copied into the parameter in place.

A rank reads only the HF tensors of its own pipeline stage, each once, in shard-file order. Memory
above the model: one global megatron tensor and its HF sources at a time (HF tensors are read
whole; the TP slice is cut after the transform). No collective: every rank loads on its own.
"""

from __future__ import annotations

import logging
from typing import Optional

import torch
from megatron.core.dist_checkpointing.dict_utils import nested_values
from megatron.core.dist_checkpointing.mapping import ShardedObject, ShardedTensor
from megatron.core.dist_checkpointing.state_dict_utils import load_preprocess

from rspo_mega.config.schema import ModelConfig
from rspo_mega.models.llada import hf_adapter as A
from rspo_mega.models.llada.hf_io import HFCheckpointReader
from rspo_mega.models.llada.lora import is_adapter_name

log = logging.getLogger(__name__)

Target = tuple[A.MCoreParam, Optional[int]]  # a megatron tensor and its global layer (or None)


def _local_shards(inner: torch.nn.Module) -> dict[Target, list[ShardedTensor]]:
    """The chunk's parameter shards grouped by megatron tensor and global layer.

    ``_extra_state`` objects (empty for the local spec, FP8 metadata for TE) keep their initial
    values, as :func:`checkpoint.load_model` does for a converted checkpoint that lacks them.
    """
    by_key = {p.key: p for p in A.PARAMS}
    base = {k: v for k, v in inner.sharded_state_dict().items() if not is_adapter_name(k)}
    sharded, _, _ = load_preprocess(base)  # splits fc1 into gate and up
    out: dict[Target, list[ShardedTensor]] = {}
    for item in nested_values(sharded):
        if isinstance(item, ShardedObject):
            continue
        key = getattr(item, "key", repr(item))
        if not isinstance(item, ShardedTensor) or key not in by_key:
            raise KeyError(f"model tensor {key!r} has no source in an HF LLaDA checkpoint")
        param = by_key[key]
        if param.per_layer != (item.prepend_axis_num == 1):
            raise ValueError(f"model tensor {key!r}: {item.prepend_axis_num} prepended axes, "
                             f"expected {int(param.per_layer)}")
        out.setdefault((param, item.global_offset[0] if param.per_layer else None), []).append(item)
    return out


def _read_order(reader: HFCheckpointReader, target: Target) -> tuple[str, int, int]:
    """Sort key: the shard file of the first HF source, then the layer, then the tensor."""
    param, layer = target
    return (reader.weight_map[A.hf_keys(param, layer)[0]], -1 if layer is None else layer,
            A.PARAMS.index(param))


def _copy_part(full: torch.Tensor, item: ShardedTensor, params: dict[int, str],
               layer: Optional[int]) -> str:
    """Copy ``item``'s slice of the global tensor ``full`` into the parameter ``item`` views;
    returns the parameter's name."""
    want = tuple(item.global_shape[item.prepend_axis_num:])
    if tuple(full.shape) != want:
        raise ValueError(f"{item.key} (layer {layer}): the HF tensors give {list(full.shape)}, "
                         f"the model holds {list(want)}")
    name = params.get(item.data.untyped_storage().data_ptr())
    if name is None:
        raise RuntimeError(f"{item.key} (layer {layer}): its shard is not a view of a model "
                           "parameter, so it cannot be loaded in place")
    item.data.copy_(full[item.global_slice()[item.prepend_axis_num:]])
    return name


def load_hf_weights(model: torch.nn.Module, reader: HFCheckpointReader, cfg: ModelConfig) -> int:
    """Fill every parameter of ``model`` (one chunk of any TP/PP/VPP layout) from ``reader``.

    ``cfg`` must describe the checkpoint (:func:`convert.open_hf_checkpoint` checked its tensors
    against it). Casts to the parameters' dtype and device. Returns the number of HF tensor reads.
    """
    from rspo_mega.models.llada.model import unwrap_model

    inner = unwrap_model(model)
    params = {p.untyped_storage().data_ptr(): n for n, p in inner.named_parameters()
              if not is_adapter_name(n)}  # LoRA adapters keep their initial values
    shards = _local_shards(inner)
    written: set[str] = set()
    reads = 0
    with torch.no_grad():
        for target in sorted(shards, key=lambda t: _read_order(reader, t)):
            param, layer = target
            items = shards[target]
            sources = [reader.get(k) for k in A.hf_keys(param, layer)]
            reads += len(sources)
            padded_rows = items[0].global_shape[0]  # used by vocab tensors only
            full = A.to_mcore(param, sources, cfg, padded_rows)
            del sources
            written.update(_copy_part(full, item, params, layer) for item in items)
            del full
    missed = sorted(set(params.values()) - written)
    if missed:
        raise KeyError(f"{reader.path}: no HF source reached model parameter(s) {missed[:5]}")
    log.debug("loaded %d HF tensors of %s into %d parameters", reads, reader.path, len(written))
    return reads
