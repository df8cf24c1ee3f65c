"""Model-only megatron-core ``torch_dist`` checkpoints: save/load a model, stream global tensors.

* :func:`save_model` / :func:`load_model`: every rank of a TP/PP/DP layout saves or loads its
  shards through ``model.sharded_state_dict()``. Loading works at any TP/PP: the checkpoint holds
  global tensors; embedding/output rows tolerate a different vocab padding (megatron marks them
  ``allow_shape_mismatch``: missing rows read as zeros, extra rows are ignored); ``_extra_state``
  entries the checkpoint lacks (e.g. TE attention's FP8 state in a converted checkpoint) are
  skipped; anything else missing raises naming the key.
* :func:`write_global_checkpoint`: one process writes global tensors with the keys loading
  expects, producing each tensor only when the writer reaches it (peak memory: a few tensors).
* :func:`read_global_tensors`: one process reads chosen global tensors / single layers back.
"""

from __future__ import annotations

import contextlib
import logging
import os
from dataclasses import dataclass
from typing import Callable, Iterator, Optional

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from megatron.core import dist_checkpointing
from megatron.core.dist_checkpointing.mapping import ShardedObject, ShardedTensor
from megatron.core.dist_checkpointing.serialization import load_sharded_metadata
from megatron.core.dist_checkpointing.strategies.torch import (
    MCoreSavePlanner,
    TorchDistSaveShardedStrategy,
    _replace_state_dict_keys_with_sharded_keys,
    mcore_to_pyt_state_dict,
)
from torch.distributed.checkpoint.planner import WriteItemType

from rspo_mega.parallel import apply_cpu_compat, bind_children_to_owner
from rspo_mega.models.llada.lora import is_adapter_name
from rspo_mega.parallel.ranks import rank

log = logging.getLogger(__name__)

Producer = Callable[[str, Optional[int]], torch.Tensor]  # (key, layer or None) -> tensor


@contextlib.contextmanager
def single_process_group() -> Iterator[None]:
    """A 1-rank gloo group for single-process checkpoint I/O (reuses an existing group).

    Checkpoint helpers started here die with this process (as in a launched run's ranks).
    """
    apply_cpu_compat()
    bind_children_to_owner()
    if dist.is_initialized():
        yield
        return
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        yield
    finally:
        dist.destroy_process_group()


# ------------------------------------------------------------------------------------------
# Model save / load (any layout, every rank)
# ------------------------------------------------------------------------------------------


TE_PICKLE_ENV = "NVTE_ALLOW_UNSAFE_PICKLE_EXTRA_STATE"


@contextlib.contextmanager
def trusted_te_extra_state() -> Iterator[None]:
    """Let Transformer Engine unpickle FP8 delayed-scaling metadata while model states are loaded.

    TE stores the amax history and scales of the ``delayed`` recipe as a pickle in each layer's
    ``_extra_state`` and refuses to unpickle it unless ``NVTE_ALLOW_UNSAFE_PICKLE_EXTRA_STATE=1``.
    Checkpoints are only loaded from paths the user configured (the run's own ``checkpoint``
    directories, ``init_from``, ``rspo-eval --checkpoint``), so loading opts in for its duration
    and restores the variable afterwards. Stateless recipes (``tensorwise``, ``mxfp8``,
    ``blockwise``) store nothing.
    """
    before = os.environ.get(TE_PICKLE_ENV)
    os.environ[TE_PICKLE_ENV] = "1"
    try:
        yield
    finally:
        if before is None:
            os.environ.pop(TE_PICKLE_ENV, None)
        else:
            os.environ[TE_PICKLE_ENV] = before


def checkpoint_keys(ckpt_dir: str) -> set[str]:
    """Every tensor/object key stored in a torch_dist checkpoint."""
    meta = load_sharded_metadata(ckpt_dir)
    return {v.key for v in meta.values()}


def save_model(model: torch.nn.Module, ckpt_dir: str, prefix: str = "") -> None:
    """Save this rank's shards of ``model`` (collective over all ranks; ``ckpt_dir`` is created)."""
    if rank() == 0:
        os.makedirs(ckpt_dir, exist_ok=True)
    dist.barrier()
    dist_checkpointing.save(_unwrapped(model).sharded_state_dict(prefix=prefix), ckpt_dir)


def load_model(model: torch.nn.Module, ckpt_dir: str, prefix: str = "") -> None:
    """Load ``ckpt_dir`` into ``model`` at its current TP/PP layout (collective).

    ``prefix`` is prepended to every checkpoint key (e.g. ``"model."`` for a trainer checkpoint).
    LoRA adapters are not read: they keep their values (the checkpoint is their base).
    """
    if not os.path.isdir(ckpt_dir):
        raise FileNotFoundError(f"checkpoint directory {ckpt_dir} does not exist")
    inner = _unwrapped(model)
    sharded = {k: v for k, v in inner.sharded_state_dict(prefix=prefix).items()
               if not is_adapter_name(k)}
    stored = checkpoint_keys(ckpt_dir)
    skipped = []
    for name in list(sharded):
        value = sharded[name]
        key = value.key if isinstance(value, (ShardedTensor, ShardedObject)) else None
        if name.endswith("_extra_state") and key is not None and key not in stored:
            skipped.append(name)
            del sharded[name]
    missing = sorted({_key(v) for v in sharded.values()} - stored - {None})
    if missing:
        raise KeyError(f"{ckpt_dir}: checkpoint lacks tensor(s) {missing[:5]}")
    loaded = dist_checkpointing.load(sharded, ckpt_dir)
    # A trainer checkpoint also returns its common (non-sharded) state, e.g. the optimizer's.
    loaded = {k: v for k, v in loaded.items() if k in sharded}
    if prefix:
        loaded = {k[len(prefix):] if k.startswith(prefix) else k: v for k, v in loaded.items()}
    with trusted_te_extra_state():
        result = inner.load_state_dict(loaded, strict=False)
    bad_missing = [k for k in result.missing_keys
                   if not k.endswith("_extra_state") and not is_adapter_name(k)]
    if bad_missing or result.unexpected_keys:
        raise KeyError(
            f"{ckpt_dir}: state dict mismatch: missing {bad_missing[:5]}, "
            f"unexpected {result.unexpected_keys[:5]}"
        )
    if skipped:
        log.info("load_model: %d _extra_state entries not in %s were skipped", len(skipped), ckpt_dir)


def _key(value: object) -> Optional[str]:
    if isinstance(value, (ShardedTensor, ShardedObject)):
        return value.key
    factory_key = getattr(value, "key", None)  # ShardedTensorFactory
    return factory_key if isinstance(factory_key, str) else None


def _unwrapped(model: torch.nn.Module) -> torch.nn.Module:
    from rspo_mega.models.llada.model import unwrap_model

    return unwrap_model(model)


# ------------------------------------------------------------------------------------------
# Single-process streaming writer / reader of global tensors
# ------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class GlobalTensorSpec:
    """A global tensor to write: ``shape`` excludes the layer axis of per-layer tensors."""

    key: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    num_layers: Optional[int] = None  # None = not stacked per layer


class _LazyPlanner(MCoreSavePlanner):
    """Produces each tensor when the DCP writer asks for it (instead of holding them all).

    The writer is serial (``per_thread_copy_ahead=0``, one thread): when it asks for a tensor the
    previous one has been written, so that one's storage is released at once (torch's writer
    otherwise keeps a reference to the last tensor of every key until the file is closed).
    """

    def __init__(self, produce: Callable[[str, tuple[int, ...]], torch.Tensor], **kwargs) -> None:
        super().__init__(**kwargs)
        self._produce = produce
        self._previous: Optional[torch.Tensor] = None
        self.error: Optional[BaseException] = None  # the producer's own exception, if any

    def resolve_data(self, write_item):  # type: ignore[override]
        if write_item.type == WriteItemType.BYTE_IO:
            return super().resolve_data(write_item)
        if self._previous is not None:
            self._previous.untyped_storage().resize_(0)
            self._previous = None
        try:
            tensor = self._produce(write_item.index.fqn, tuple(write_item.index.offset))
        except BaseException as exc:
            self.error = exc
            raise
        storage = tensor.untyped_storage()
        if (not storage.resizable() or storage.nbytes() != tensor.nbytes
                or not tensor.is_contiguous()):  # own exactly its bytes, so they can be freed
            tensor = tensor.clone(memory_format=torch.contiguous_format)
        self._previous = tensor
        return tensor


class _StreamingSaveStrategy(TorchDistSaveShardedStrategy):
    """torch_dist format, written synchronously by torch's DCP writer with lazy tensors."""

    def __init__(self, produce: Callable[[str, tuple[int, ...]], torch.Tensor]) -> None:
        super().__init__("torch_dist", 1, keep_only_main_replica=True, thread_count=1)
        self._produce = produce

    def save(self, sharded_state_dict, checkpoint_dir) -> None:  # type: ignore[override]
        flat, _, _ = _replace_state_dict_keys_with_sharded_keys(sharded_state_dict, True)
        pyt_state_dict = mcore_to_pyt_state_dict(flat, False)
        writer = dcp.FileSystemWriter(str(checkpoint_dir), thread_count=1, single_file_per_rank=True,
                                      per_thread_copy_ahead=0)
        planner = _LazyPlanner(self._produce, flatten_state_dict=False)
        try:
            dcp.save(pyt_state_dict, storage_writer=writer, planner=planner)
        except BaseException:  # DCP's CheckpointException derives from BaseException
            if planner.error is not None:  # DCP wraps it; surface the original (names the key)
                raise planner.error from None
            raise


def write_global_checkpoint(
    ckpt_dir: str,
    specs: list[GlobalTensorSpec],
    producer: Producer,
    extra_state_keys: tuple[str, ...] = (),
    num_layers: Optional[int] = None,
) -> None:
    """Write a torch_dist checkpoint of global tensors from one process, tensor by tensor.

    ``producer(key, layer)`` returns the tensor (one layer's slice for stacked keys) with the
    spec's shape and dtype; it is called once per tensor, in the writer's order. Per-layer
    ``extra_state_keys`` get empty (``None``) objects, as megatron's local linear layers save.
    """
    by_key = {s.key: s for s in specs}

    def produce(key: str, offset: tuple[int, ...]) -> torch.Tensor:
        spec = by_key[key]
        layer = offset[0] if spec.num_layers is not None else None
        tensor = producer(key, layer)
        if tuple(tensor.shape) != spec.shape or tensor.dtype != spec.dtype:
            raise ValueError(
                f"{key} (layer {layer}): produced {list(tensor.shape)} {tensor.dtype}, "
                f"expected {list(spec.shape)} {spec.dtype}"
            )
        return tensor.reshape((1,) + spec.shape if layer is not None else spec.shape)

    sharded: dict[str, object] = {}
    for spec in specs:
        for layer in range(spec.num_layers) if spec.num_layers is not None else [None]:
            placeholder = torch.empty(spec.shape, dtype=spec.dtype, device="meta")
            if layer is None:
                sharded[spec.key] = ShardedTensor.from_rank_offsets(spec.key, placeholder, replica_id=0)
            else:
                sharded[f"{spec.key}.{layer}"] = ShardedTensor.from_rank_offsets(
                    spec.key, placeholder, (0, layer, spec.num_layers),
                    replica_id=0, prepend_axis_num=1,
                )
    for key in extra_state_keys:
        for layer in range(num_layers or 0):
            sharded[f"{key}.{layer}"] = ShardedObject(key, None, (num_layers,), (layer,), replica_id=0)
    with single_process_group():
        dist_checkpointing.save(sharded, ckpt_dir, sharded_strategy=_StreamingSaveStrategy(produce))


def stored_tensor_shapes(ckpt_dir: str) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    """``key -> (global shape, dtype)`` of every tensor in a torch_dist checkpoint."""
    with single_process_group():
        meta = dist_checkpointing.load_tensors_metadata(ckpt_dir)
    return {k: (tuple(v.global_shape), v.dtype) for k, v in meta.items()}


def read_global_tensors(
    ckpt_dir: str, requests: dict[str, Optional[int]],
    shapes: dict[str, tuple[tuple[int, ...], torch.dtype]],
) -> dict[str, torch.Tensor]:
    """Read whole global tensors (layer ``None``) or one layer of stacked ones, in one pass.

    ``requests``: stored key -> layer index (stacked tensors, leading axis) or None.
    ``shapes``: from :func:`stored_tensor_shapes`.
    """
    sharded = {}
    for key, layer in requests.items():
        if key not in shapes:
            raise KeyError(f"{ckpt_dir}: no tensor {key} in the checkpoint")
        shape, dtype = shapes[key]
        if layer is None:
            sharded[key] = ShardedTensor.from_rank_offsets(key, torch.empty(shape, dtype=dtype),
                                                           replica_id=0)
        else:
            # A [1, ...] slab at offset `layer` of axis 0 (no prepended axis: a single rank
            # reading one layer is not a regular megatron grid).
            sharded[key] = ShardedTensor.from_rank_offsets(
                key, torch.empty((1,) + shape[1:], dtype=dtype), (0, layer, shape[0]),
                replica_id=0,
            )
    with single_process_group():
        loaded = dist_checkpointing.load(sharded, ckpt_dir, validate_access_integrity=False)
    # the load also returns the checkpoint's common (non-tensor) state, e.g. a trainer's optimizer
    return {k: v if requests[k] is None else v[0] for k, v in loaded.items() if k in requests}
