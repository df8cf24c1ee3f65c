"""The CPU compatibility layer: every adaptation megatron-core needs to run without CUDA.

megatron-core assumes a CUDA device in many places (``torch.cuda.current_device()`` for buffers,
the CUDA RNG for its RNG tracker, ``device="cuda"`` literals, type-name checks on tensors). This
module is the *only* place where rspo_mega adapts to that. It is applied once, by
:func:`apply_cpu_compat`, and only when CUDA is unavailable: the GPU path never goes through it.

Each :class:`Patch` names the megatron-core function it covers, why, and a ``still_needed`` probe
that inspects the installed megatron-core: if an upgrade removes the CUDA assumption, the probe
returns False and ``tests/test_cpu_compat.py`` fails, so stale patches are noticed and removed.
Line numbers refer to megatron-core 0.16.1 (0.19.x differs slightly).
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import inspect
import logging
import types
from dataclasses import dataclass
from typing import Any, Callable, Iterator

import torch

log = logging.getLogger(__name__)

_APPLIED: list[str] = []


@dataclass(frozen=True)
class Patch:
    """One adaptation: the megatron-core site it covers, why, and how to apply and probe it."""

    covers: str  # "module:function" in megatron-core
    reason: str
    apply: Callable[[], None]
    still_needed: Callable[[], bool]  # True while megatron-core still has the CUDA assumption


def _has(module: str, needle: str) -> bool:
    """Whether the installed source file of ``module`` still contains ``needle``."""
    return needle in inspect.getsource(importlib.import_module(module))


def _is_cuda(device: Any) -> bool:
    if isinstance(device, torch.device):
        return device.type == "cuda"
    if isinstance(device, str):
        return device.startswith("cuda")
    return isinstance(device, int) and not isinstance(device, bool)


def _cpu_device(device: Any) -> Any:
    return torch.device("cpu") if _is_cuda(device) else device


# --------------------------------------------------------------------------------------------
# Global torch.cuda shims (CUDA is absent, so nothing else can be relying on these).
# --------------------------------------------------------------------------------------------


class _NullStream:
    """Stands in for ``torch.cuda.Stream``: CPU work is synchronous, so every method is a no-op."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        pass

    def wait_stream(self, stream: Any) -> None:
        pass

    def synchronize(self) -> None:
        pass

    def record_event(self, event: Any = None) -> None:
        return None

    def __enter__(self) -> "_NullStream":
        return self

    def __exit__(self, *exc: Any) -> None:
        return None


def _patch_current_device() -> None:
    torch.cuda.current_device = lambda: torch.device("cpu")  # type: ignore[assignment]


def _patch_sync_and_streams() -> None:
    torch.cuda.synchronize = lambda device=None: None  # type: ignore[assignment]
    torch.cuda.current_stream = lambda device=None: _NullStream()  # type: ignore[assignment]
    torch.cuda.stream = lambda stream=None: contextlib.nullcontext()  # type: ignore[assignment]


def _patch_tensor_cuda() -> None:
    torch.Tensor.cuda = lambda self, *a, **k: self  # type: ignore[assignment]


def _patch_rng() -> None:
    from megatron.core.tensor_parallel import random as mrandom

    def get_state(device: Any = "cuda", clone: bool = False, graph_safe: bool = False):
        return torch.get_rng_state()

    def set_state(new_state: torch.Tensor, device: Any = -1, graph_safe: bool = False) -> None:
        torch.set_rng_state(new_state)

    torch.cuda.get_rng_state = lambda device="cuda": torch.get_rng_state()  # type: ignore
    torch.cuda.set_rng_state = lambda s, device="cuda": torch.set_rng_state(s)  # type: ignore
    torch.cuda.manual_seed = lambda seed: torch.default_generator.manual_seed(int(seed))  # type: ignore
    mrandom._get_cuda_rng_state = get_state
    mrandom._set_cuda_rng_state = set_state
    # The tracker warns when the CPU RNG moves inside fork(); with the CUDA RNG routed to the CPU
    # generator that is expected, so that one message is silenced.
    logging.getLogger(mrandom.__name__).addFilter(
        lambda rec: "CPU RNG state changed within GPU RNG context" not in rec.getMessage()
    )


# --------------------------------------------------------------------------------------------
# Module-scoped shims: a view of torch in which "cuda" device literals mean the CPU.
# --------------------------------------------------------------------------------------------

_FACTORIES = ("zeros", "ones", "empty", "full", "tensor", "empty_like", "zeros_like", "arange")


class _CpuTorchView(types.ModuleType):
    """``torch`` for one megatron module, with ``device="cuda"`` in tensor factories mapped to CPU."""

    def __init__(self) -> None:
        super().__init__("torch")

    def __getattr__(self, name: str) -> Any:
        attr = getattr(torch, name)
        if name in _FACTORIES:

            @functools.wraps(attr)
            def factory(*args: Any, **kwargs: Any) -> torch.Tensor:
                if "device" in kwargs:
                    kwargs["device"] = _cpu_device(kwargs["device"])
                return attr(*args, **kwargs)

            return factory
        return attr


def _cpu_torch_in(module: str) -> Callable[[], None]:
    def apply() -> None:
        importlib.import_module(module).torch = _CpuTorchView()

    return apply


def _has_cuda_literal(module: str) -> Callable[[], bool]:
    return lambda: _has(module, "device='cuda'") or _has(module, 'device="cuda"')


def _patch_causal_masks() -> None:
    from megatron.core.fusions import fused_softmax
    from megatron.core.transformer import utils as tutils

    def causal(sq: int) -> torch.Tensor:
        return torch.triu(torch.ones(sq, sq, dtype=torch.bool), diagonal=1)

    def sliding(sq: int, skv: int, window_size: tuple[int, int]) -> torch.Tensor:
        m = torch.ones(sq, skv, dtype=torch.bool)
        upper = torch.triu(m, diagonal=skv - sq - window_size[0])
        return ~torch.tril(upper, diagonal=skv - sq + window_size[1])

    for mod in (tutils, fused_softmax):
        mod.get_default_causal_mask = causal
        mod.get_sliding_window_causal_mask = sliding


def _patch_sharded_tensor_init() -> None:
    from megatron.core.dist_checkpointing.mapping import ShardedTensor

    original = ShardedTensor.init_data

    def init_data(self: Any, device: Any, init_fn: Callable = torch.empty) -> None:
        return original(self, _cpu_device(device), init_fn)

    ShardedTensor.init_data = init_data


@contextlib.contextmanager
def _cuda_type_names() -> Iterator[None]:
    """Inside: ``tensor.type()`` (no arguments) reports CPU tensors with CUDA names."""
    original = torch.Tensor.type

    def type_(self: torch.Tensor, dtype: Any = None, non_blocking: bool = False, **kw: Any):
        if dtype is None and not kw and not self.is_cuda:
            return original(self).replace("torch.", "torch.cuda.", 1)
        return original(self, dtype, non_blocking, **kw)

    torch.Tensor.type = type_  # type: ignore[assignment]
    try:
        yield
    finally:
        torch.Tensor.type = original  # type: ignore[assignment]


def _with_cuda_type_names(owner: Any, name: str) -> Callable[[], None]:
    def apply() -> None:
        raw = inspect.getattr_static(owner, name)
        fn = raw.__func__ if isinstance(raw, (staticmethod, classmethod)) else raw

        @functools.wraps(fn)
        def wrapped(*args: Any, **kwargs: Any) -> Any:
            with _cuda_type_names():
                return fn(*args, **kwargs)

        if isinstance(raw, staticmethod):
            wrapped = staticmethod(wrapped)  # type: ignore[assignment]
        elif isinstance(raw, classmethod):
            wrapped = classmethod(wrapped)  # type: ignore[assignment]
        setattr(owner, name, wrapped)

    return apply


def _lazy_attr(module: str, *path: str) -> Any:
    obj: Any = importlib.import_module(module)
    for p in path:
        obj = getattr(obj, p)
    return obj


def _type_name_patch(module: str, *path: str, imported_by: tuple[str, ...] = ()) -> Patch:
    """``imported_by``: modules that did ``from <module> import <name>`` and need rebinding."""
    covers = f"megatron.core.{module}:{'.'.join(path)}"
    full = f"megatron.core.{module}"

    def apply() -> None:
        owner = _lazy_attr(full, *path[:-1]) if len(path) > 1 else importlib.import_module(full)
        _with_cuda_type_names(owner, path[-1])()
        for other in imported_by:
            setattr(importlib.import_module(f"megatron.core.{other}"), path[-1],
                    getattr(owner, path[-1]))

    def still_needed() -> bool:
        return "torch.cuda.FloatTensor" in inspect.getsource(_lazy_attr(full, *path))

    return Patch(covers, "asserts tensor.type() == 'torch.cuda.*Tensor'", apply, still_needed)


def _literal_patch(module: str, covers: str) -> Patch:
    full = f"megatron.core.{module}"
    return Patch(
        f"{full}:{covers}", "allocates with a device='cuda' literal",
        _cpu_torch_in(full), _has_cuda_literal(full),
    )


PATCHES: tuple[Patch, ...] = (
    Patch(
        "megatron.core.tensor_parallel.mappings:_reduce_scatter_along_first_dim (and ~170 sites)",
        "allocates buffers on torch.cuda.current_device()",
        _patch_current_device,
        lambda: _has("megatron.core.tensor_parallel.mappings", "torch.cuda.current_device()"),
    ),
    Patch(
        "megatron.core.pipeline_parallel.p2p_communication:_communicate",
        "calls torch.cuda.synchronize() after batched p2p",
        _patch_sync_and_streams,
        lambda: _has("megatron.core.pipeline_parallel.p2p_communication", "torch.cuda.synchronize"),
    ),
    Patch(
        "megatron.core.tensor_parallel.random:CudaRNGStatesTracker.add/fork",
        "seeds and swaps the CUDA RNG; routed to the CPU generator",
        _patch_rng,
        lambda: _has("megatron.core.tensor_parallel.random", "torch.cuda.get_rng_state()"),
    ),
    Patch(
        "megatron.core.transformer.utils:get_default_causal_mask",
        "builds the causal mask with device='cuda' (also imported by name in fused_softmax)",
        _patch_causal_masks,
        lambda: _has("megatron.core.transformer.utils", 'torch.ones(sq, sq, device="cuda")'),
    ),
    _literal_patch("pipeline_parallel.schedules", "forward_backward_no_pipelining (token counts)"),
    _literal_patch("optimizer.optimizer", "FP32Optimizer/MixedPrecisionOptimizer buffers"),
    _literal_patch("optimizer.clip_grads", "get_grad_norm_fp32"),
    _literal_patch("optimizer.grad_scaler", "ConstantGradScaler/DynamicGradScaler"),
    _literal_patch("dist_checkpointing.exchange_utils", "exchange_loaded_tensors_*"),
    _literal_patch("utils", "local_multi_tensor_l2_norm (grad-norm fallback without apex/TE)"),
    Patch(
        "megatron.core.dist_checkpointing.mapping:ShardedTensor.init_data",
        "exchange_utils calls init_data('cuda') for tensors it receives",
        _patch_sharded_tensor_init,
        lambda: _has("megatron.core.dist_checkpointing.exchange_utils", 'init_data("cuda")'),
    ),
    Patch(
        "torch.Tensor.cuda (used by megatron-core optimizers and checkpoint loading)",
        "moves CPU tensors to CUDA; identity without CUDA",
        _patch_tensor_cuda,
        lambda: _has("megatron.core.optimizer.distrib_optimizer", ".cuda()"),
    ),
    _type_name_patch("optimizer.clip_grads", "clip_grad_by_total_norm_fp32",
                     imported_by=("optimizer.optimizer",)),
    _type_name_patch("optimizer.optimizer", "Float16OptimizerWithFloat16Params", "__init__"),
    _type_name_patch(
        "optimizer.distrib_optimizer", "DistributedOptimizer", "_build_model_and_main_param_groups"
    ),
)


def apply_cpu_compat(force: bool = False) -> list[str]:
    """Apply every patch once (idempotent) when CUDA is unavailable; returns what was applied.

    ``force`` applies the patches even if CUDA is present (tests only). On a CUDA machine without
    ``force`` nothing is touched and an empty list is returned.
    """
    if _APPLIED:
        return list(_APPLIED)
    if torch.cuda.is_available() and not force:
        return []
    for patch in PATCHES:
        patch.apply()
        _APPLIED.append(patch.covers)
    log.info("cpu_compat: applied %d megatron-core CPU patches", len(_APPLIED))
    return list(_APPLIED)


def is_applied() -> bool:
    """Whether the CPU patches are active in this process."""
    return bool(_APPLIED)
