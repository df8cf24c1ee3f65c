"""LoRA adapters on megatron-core's tensor-parallel linears (``model.lora``).

A targeted linear (the attention's ``linear_qkv`` / ``linear_proj``, the MLP's ``linear_fc1`` /
``linear_fc2``, local or Transformer Engine) is built as its own class with a :class:`LoRAAdapter`
child: ``y = W x + (alpha / r) * B A dropout(x)``. The base weights are frozen
(:func:`freeze_base`), ``B`` starts at zero, so a fresh adapter computes the base model exactly.

Tensor parallelism follows the base layer:

* column-parallel base (qkv, fc1; output sharded): ``A [r, in]`` replicated, ``B [out / tp, r]``
  sharded like the output. ``z = A x`` is the same on every rank; its gradient is all-reduced
  (``copy_to_tensor_model_parallel_region``), so ``A``'s gradient is complete on each rank.
* row-parallel base (proj, fc2; input sharded): ``A [r, in / tp]`` sharded like the input,
  ``B [out, r]`` replicated; the partial sums ``A_r x_r`` are all-reduced where the base reduces
  its output (reduce-scattered over the sequence with sequence parallelism).

With sequence parallelism the replicated factor sees one sequence shard per rank and carries
megatron's ``sequence_parallel`` attribute (its gradient is summed over TP like the norms').
TE's fused LayerNorm+Linear returns its normalised input (``return_layernorm_output``) for the
adapter; with FP8 the base GEMM runs in FP8 and the adapter in the parameters' dtype.

Adapters are switched off for one forward by ``llada_forward(..., adapters=False)`` (the RL
reference: the base model, no second copy); :func:`adapter_scope` carries that argument from
``LLaDAModel.forward`` down to the linears for the duration of that forward only, in a context
variable, never as module state.

Shapes: ``s`` tokens (``s / tp`` with sequence parallelism), ``b`` batch, ``r`` rank.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import math
import zlib
from typing import Any, Iterator, Optional

import torch
import torch.nn.functional as F
from megatron.core import parallel_state as ps
from megatron.core import tensor_parallel
from megatron.core.transformer.spec_utils import ModuleSpec

from rspo_mega.config.schema import LoRAConfig, LoRATarget, choices

TARGETS: tuple[str, ...] = choices(LoRATarget)
COLUMN_TARGETS = ("linear_qkv", "linear_fc1")  # output-sharded bases; the others are row-parallel
ADAPTER = "adapter"  # the child module's name: parameters ``<linear>.adapter.lora_{a,b}``

_ENABLED: contextvars.ContextVar[bool] = contextvars.ContextVar("lora_adapters", default=True)


@contextlib.contextmanager
def adapter_scope(enabled: bool) -> Iterator[None]:
    """Adapters on (``True``) or off for the forward run inside the block (this thread only)."""
    token = _ENABLED.set(bool(enabled))
    try:
        yield
    finally:
        _ENABLED.reset(token)


def is_adapter_name(name: str) -> bool:
    """Whether a parameter name / checkpoint key belongs to a LoRA adapter."""
    return f".{ADAPTER}.lora_" in f".{name}"


class LoRAAdapter(torch.nn.Module):
    """The low-rank update of one tensor-parallel linear (see the module docstring).

    ``lora_a [r, in_local]``, ``lora_b [out_local, r]``; ``column``: whether the base is
    column-parallel. ``forward(x [s, b, in_local]) -> [s, b, out_local]``, scaled by alpha / r.
    """

    def __init__(self, in_features: int, out_features: int, lora: LoRAConfig, column: bool,
                 config: Any) -> None:
        super().__init__()
        tp = ps.get_tensor_model_parallel_world_size()
        self.column, self.rank = column, lora.rank
        self.scaling = lora.alpha / lora.rank
        self.sequence_parallel = bool(config.sequence_parallel)
        in_local = in_features if column else in_features // tp
        out_local = out_features // tp if column else out_features
        dtype = config.params_dtype
        self.lora_a = torch.nn.Parameter(torch.zeros(lora.rank, in_local, dtype=dtype))
        self.lora_b = torch.nn.Parameter(torch.zeros(out_local, lora.rank, dtype=dtype))
        sharded, replicated = (self.lora_b, self.lora_a) if column else (self.lora_a, self.lora_b)
        tensor_parallel.set_tensor_model_parallel_attributes(sharded, True, 0 if column else 1, 1)
        tensor_parallel.set_defaults_if_not_set_tensor_model_parallel_attributes(replicated)
        setattr(replicated, "sequence_parallel", self.sequence_parallel)
        self.dropout = torch.nn.Dropout(lora.dropout) if lora.dropout > 0 else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.dropout is not None:
            x = self._dropout(x)
        z = F.linear(x, self.lora_a.to(x.dtype))  # [s, b, r]: full (column) or partial (row)
        if self.column and self.sequence_parallel:  # each rank: its sequence shard
            z = tensor_parallel.gather_from_sequence_parallel_region(z)
        elif self.column:
            z = tensor_parallel.copy_to_tensor_model_parallel_region(z)
        elif self.sequence_parallel:
            z = tensor_parallel.reduce_scatter_to_sequence_parallel_region(z)
        else:
            z = tensor_parallel.reduce_from_tensor_model_parallel_region(z)
        return F.linear(z, self.lora_b.to(z.dtype)) * self.scaling

    def _dropout(self, x: torch.Tensor) -> torch.Tensor:
        """Dropout with megatron's RNG: the TP-shared stream for a replicated input (column
        base without sequence parallelism), the per-rank stream for a sharded one."""
        if self.column and not self.sequence_parallel:
            return self.dropout(x)
        with tensor_parallel.get_cuda_rng_tracker().fork():
            return self.dropout(x)

    def reset_parameters(self, generator: torch.Generator) -> None:
        """``B = 0``; ``A ~ U(-1/sqrt(in), 1/sqrt(in))`` drawn as the full (unsharded) matrix from
        ``generator``, then this rank's shard: the same adapter at every TP/PP layout."""
        tp, rank = ps.get_tensor_model_parallel_world_size(), ps.get_tensor_model_parallel_rank()
        in_full = self.lora_a.shape[1] * (1 if self.column else tp)
        bound = 1.0 / math.sqrt(in_full)
        full = torch.empty(self.rank, in_full).uniform_(-bound, bound, generator=generator)
        local = full if self.column else full.chunk(tp, dim=1)[rank]
        with torch.no_grad():
            self.lora_a.copy_(local.to(self.lora_a.dtype))
            self.lora_b.zero_()

    def delta_weight(self) -> torch.Tensor:
        """This rank's ``scaling * B A`` in the base weight's local layout ``[out_local,
        in_local]`` (row base: the adapter's own input shard of ``A``)."""
        return (self.lora_b.float() @ self.lora_a.float()) * self.scaling


def _lora_forward(self: Any, base_forward: Any, x: torch.Tensor, *args: Any,
                  **kwargs: Any) -> tuple[Any, Any]:
    """The base linear's ``(output, bias)`` plus the adapter's update when adapters are on."""
    te_norm = getattr(self, "return_layernorm_output", False)
    out = base_forward(x, *args, **kwargs)
    if te_norm:  # TE LayerNormLinear: ((y, ln_out), None) or (y, bias, ln_out)
        (y, adapter_in), bias = (out[0], out[1]) if len(out) == 2 else ((out[0], out[2]), out[1])
        if not isinstance(adapter_in, torch.Tensor) or type(adapter_in) is not torch.Tensor:
            adapter_in = adapter_in.dequantize()  # an FP8 norm output
    else:
        (y, bias), adapter_in = out, x
    if _ENABLED.get():
        y = y + getattr(self, ADAPTER)(adapter_in).to(y.dtype)
    return y, bias


@functools.cache
def lora_linear_class(base: type) -> type:
    """``base`` (a megatron or TE column/row-parallel linear class) with a LoRA adapter."""

    def __init__(self: Any, input_size: int, output_size: int, *args: Any, lora: LoRAConfig,
                 target: str, **kwargs: Any) -> None:
        base.__init__(self, input_size, output_size, *args, **kwargs)
        self.lora_target = target
        column = target in COLUMN_TARGETS
        if hasattr(self, "return_layernorm_output"):  # TE LayerNormLinear: give the adapter LN(x)
            self.return_layernorm_output = True
        self.add_module(ADAPTER, LoRAAdapter(input_size, output_size, lora, column, kwargs["config"]))

    def forward(self: Any, x: torch.Tensor, *args: Any, **kwargs: Any) -> tuple[Any, Any]:
        return _lora_forward(self, functools.partial(base.forward, self), x, *args, **kwargs)

    def sharded_state_dict(self: Any, prefix: str = "", sharded_offsets: tuple = (),
                           metadata: Optional[dict] = None) -> dict:
        own = f"{prefix}{ADAPTER}."
        state = {k: v for k, v in base.sharded_state_dict(self, prefix, sharded_offsets,
                                                          metadata).items()
                 if not k.startswith(own)}
        state.update(adapter_sharded_state_dict(self, prefix, sharded_offsets, metadata))
        return state

    return type(f"LoRA{base.__name__}", (base,), {
        "__init__": __init__, "forward": forward, "sharded_state_dict": sharded_state_dict,
        "__doc__": f"{base.__name__} with a LoRA adapter (rspo_mega.models.llada.lora)."})


def adapter_sharded_state_dict(linear: Any, prefix: str, sharded_offsets: tuple,
                               metadata: Optional[dict]) -> dict:
    """The adapter's two tensors as sharded tensors (``<prefix>adapter.lora_{a,b}``): the
    sharded factor along its TP axis (fc1's ``B`` as megatron's gated ``[gate_r; up_r]``)."""
    from megatron.core.transformer.mlp import apply_swiglu_sharded_factory
    from megatron.core.transformer.utils import make_sharded_tensors_for_checkpoint

    adapter: LoRAAdapter = getattr(linear, ADAPTER)
    axis = {"lora_b": 0} if adapter.column else {"lora_a": 1}
    state = make_sharded_tensors_for_checkpoint(
        adapter.state_dict(prefix="", keep_vars=True), f"{prefix}{ADAPTER}.", axis,
        sharded_offsets)
    if linear.lora_target == "linear_fc1" and linear.config.gated_linear_unit:
        key = f"{prefix}{ADAPTER}.lora_b"
        singleton = (metadata or {}).get("singleton_local_shards", False)
        state[key] = apply_swiglu_sharded_factory(state[key], sharded_offsets, singleton)
    return state


def lora_linear_spec(base: Any, lora: LoRAConfig, target: str) -> ModuleSpec:
    """The spec of a targeted linear (``base``: its class, or a ModuleSpec of it)."""
    cls = base.module if isinstance(base, ModuleSpec) else base
    params = dict(base.params or {}) if isinstance(base, ModuleSpec) else {}
    return ModuleSpec(module=lora_linear_class(cls), params={**params, "lora": lora,
                                                             "target": target})


def adapter_modules(model: torch.nn.Module) -> Iterator[tuple[str, LoRAAdapter]]:
    """``(canonical name with the global layer index, adapter)`` of one model chunk, e.g.
    ``decoder.layers.3.self_attention.linear_qkv``."""
    for layer in model.decoder.layers:
        for path, module in layer.named_modules():
            if isinstance(module, LoRAAdapter):
                linear = path[: -len(ADAPTER) - 1]
                yield f"decoder.layers.{layer.layer_number - 1}.{linear}", module


def init_adapters(model: torch.nn.Module, seed: int) -> None:
    """Every adapter of a chunk from ``seed`` and its canonical name (layout independent)."""
    for name, adapter in adapter_modules(model):
        generator = torch.Generator().manual_seed(seed * 1_000_003 + zlib.crc32(name.encode()))
        adapter.reset_parameters(generator)


def freeze_base(model: torch.nn.Module) -> int:
    """Freeze every parameter but the adapters'; returns the number of trainable elements."""
    trainable = 0
    for name, param in model.named_parameters():
        param.requires_grad_(is_adapter_name(name))
        trainable += param.numel() if param.requires_grad else 0
    return trainable


def _canonical(name: str, model: torch.nn.Module) -> str:
    """A parameter name with its chunk-local layer index replaced by the global one."""
    parts = name.split(".")
    if parts[:2] == ["decoder", "layers"]:
        parts[2] = str(model.decoder.layers[int(parts[2])].layer_number - 1)
    return ".".join(parts)


def base_fingerprint(models: list[torch.nn.Module]) -> dict[str, list[float]]:
    """``canonical name -> [sum |w|, sum w^2]`` (float64) of every frozen base tensor of the
    whole model, the same at every TP/PP layout up to float64 rounding (collective over the
    model-parallel group; ``models``: this rank's unwrapped chunks). Padded vocab rows are zero,
    so they do not change it."""
    tp_rank = ps.get_tensor_model_parallel_rank()
    local: dict[str, list[float]] = {}
    for model in models:
        for name, param in model.named_parameters():
            sharded = getattr(param, "tensor_model_parallel", False)
            if is_adapter_name(name) or (tp_rank != 0 and not sharded):
                continue  # TP-replicated tensors are counted once
            w = param.detach().double()
            local[_canonical(name, model)] = [w.abs().sum().item(), w.square().sum().item()]
    gathered: list = [None] * torch.distributed.get_world_size(ps.get_model_parallel_group())
    torch.distributed.all_gather_object(gathered, local, group=ps.get_model_parallel_group())
    total: dict[str, list[float]] = {}
    for part in gathered:
        for name, (l1, l2) in part.items():
            old = total.get(name, [0.0, 0.0])
            total[name] = [old[0] + l1, old[1] + l2]
    return dict(sorted(total.items()))


def fingerprint_difference(saved: dict[str, list[float]], current: dict[str, list[float]],
                           rel_tol: float = 1e-9) -> Optional[str]:
    """The first base tensor whose fingerprint differs (``None`` when all agree)."""
    for name in sorted(set(saved) | set(current)):
        a, b = saved.get(name), current.get(name)
        if a is None or b is None:
            return f"{name} is {'new' if a is None else 'missing'}"
        if any(abs(x - y) > rel_tol * max(abs(x), abs(y)) for x, y in zip(a, b)):
            return f"{name} differs (sum |w| {a[0]:.6g} -> {b[0]:.6g})"
    return None
