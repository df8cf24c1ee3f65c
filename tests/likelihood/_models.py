"""Test helpers: a tiny LLaDA model with layout-independent weights, and full-gradient gathering.

Weights are written from a canonical, unsharded definition (a generator per parameter name and
global layer index), then sliced to this rank's TP shard, so every TP/PP layout computes the same
function. Gradients are gathered back into that canonical form (TP shards concatenated, PP stages
merged). The gated MLP's ``linear_fc1`` is special: each TP rank holds ``[gate_r; up_r]``.
"""

from __future__ import annotations

import re
import zlib
from typing import Iterator

import torch
import torch.distributed as dist

from rspo_mega.config.schema import ModelConfig
from rspo_mega.likelihood.batch_types import CompletionBatch

TINY = ModelConfig(num_layers=2, hidden_size=32, ffn_hidden_size=64, num_attention_heads=4,
                   vocab_size=60, make_vocab_size_divisible_by=8, max_position_embeddings=64,
                   mask_token_id=59, eos_token_id=58)


def build(cfg: ModelConfig = TINY) -> list[torch.nn.Module]:
    from rspo_mega.models.llada.model import build_llada_model

    return [build_llada_model(cfg)]


def forward_fn():
    from rspo_mega.models.llada.model import llada_forward

    return llada_forward


def _unwrap(chunk: torch.nn.Module) -> torch.nn.Module:
    while hasattr(chunk, "module"):
        chunk = chunk.module
    return chunk


def named_params(chunks: list[torch.nn.Module]) -> Iterator[tuple[str, torch.nn.Parameter]]:
    """(canonical name with the global layer index, parameter) of this rank."""
    for chunk in chunks:
        inner = _unwrap(chunk)
        layers = getattr(getattr(inner, "decoder", None), "layers", None)
        offset = layers[0].layer_number - 1 if layers is not None and len(layers) else 0
        for name, p in inner.named_parameters():
            yield re.sub(r"layers\.(\d+)\.", lambda m: f"layers.{int(m.group(1)) + offset}.",
                         name), p


def _tp() -> tuple[int, int, object]:
    from megatron.core import parallel_state as ps

    return (ps.get_tensor_model_parallel_world_size(), ps.get_tensor_model_parallel_rank(),
            ps.get_tensor_model_parallel_group())


def _is_glu(name: str) -> bool:
    """fc1's output rows (its weight, a LoRA adapter's B): ``[gate_r; up_r]`` on TP rank r."""
    return name.endswith(("mlp.linear_fc1.weight", "mlp.linear_fc1.adapter.lora_b"))


def canonical_init(chunks: list[torch.nn.Module], seed: int, scale: float = 0.08,
                   add: bool = False) -> None:
    """Set (or, with ``add``, perturb) every parameter from its canonical full tensor."""
    tp, rank, _ = _tp()
    with torch.no_grad():
        for name, p in named_params(chunks):
            sharded = getattr(p, "tensor_model_parallel", False) and tp > 1
            dim = getattr(p, "partition_dim", 0)
            shape = list(p.shape)
            if sharded:
                shape[dim] *= tp
            gen = torch.Generator().manual_seed(zlib.crc32(name.encode()) + 7919 * seed)
            full = torch.randn(shape, generator=gen, dtype=torch.float64) * scale
            if not add and "norm" in name:
                full = full + 1.0
            if sharded and _is_glu(name):
                gate, up = full.chunk(2, dim=0)
                local = torch.cat([gate.chunk(tp, 0)[rank], up.chunk(tp, 0)[rank]], dim=0)
            elif sharded:
                local = full.chunk(tp, dim)[rank]
            else:
                local = full
            if add:
                p.add_(local.to(p.dtype))
            else:
                p.copy_(local.to(p.dtype))


def full_grads(chunks: list[torch.nn.Module]) -> dict[str, torch.Tensor]:
    """Canonical full gradients of the whole model (same on every rank)."""
    from megatron.core import parallel_state as ps

    tp, _, tp_group = _tp()
    local = {}
    for name, p in named_params(chunks):
        g = p.grad if p.grad is not None else torch.zeros_like(p)
        if getattr(p, "tensor_model_parallel", False) and tp > 1:
            parts = [torch.empty_like(g) for _ in range(tp)]
            dist.all_gather(parts, g.contiguous(), group=tp_group)
            if _is_glu(name):
                halves = [q.chunk(2, dim=0) for q in parts]
                g = torch.cat([h[0] for h in halves] + [h[1] for h in halves], dim=0)
            else:
                g = torch.cat(parts, dim=p.partition_dim)
        local[name] = g.detach().clone()
    pp = ps.get_pipeline_model_parallel_world_size()
    if pp == 1:
        return local
    gathered: list = [None] * pp
    dist.all_gather_object(gathered, local, group=ps.get_pipeline_model_parallel_group())
    merged: dict[str, torch.Tensor] = {}
    for d in gathered:
        merged.update(d)
    return merged


def allreduce_grads_dp(chunks: list[torch.nn.Module]) -> None:
    """Sum gradients over the data-parallel group (what a summing DDP all-reduce does)."""
    from megatron.core import parallel_state as ps

    group = ps.get_data_parallel_group()
    if dist.get_world_size(group) == 1:
        return
    for _, p in named_params(chunks):
        if p.grad is not None:
            dist.all_reduce(p.grad, group=group)


def make_completions(num: int, group_size: int, prompt_len: int, gen_len: int, seed: int = 0,
                     cfg: ModelConfig = TINY) -> tuple[CompletionBatch, torch.Tensor]:
    """A global batch of ``num`` completions in groups of ``group_size`` and their rewards."""
    gen = torch.Generator().manual_seed(seed)
    s = prompt_len + gen_len
    ids = torch.randint(0, cfg.eos_token_id, (num, s), generator=gen)
    for i in range(num):  # EOS padding after a random stop point
        stop = int(torch.randint(gen_len // 2, gen_len + 1, (1,), generator=gen))
        ids[i, prompt_len + stop:] = cfg.eos_token_id
    completion = torch.zeros(num, s, dtype=torch.bool)
    completion[:, prompt_len:] = True
    batch = CompletionBatch(
        input_ids=ids,
        attention_mask=torch.ones(num, s, dtype=torch.bool),
        completion_mask=completion,
        uids=torch.arange(num) * 7 + 1000,
        group_ids=torch.arange(num) // group_size,
    )
    rewards = torch.rand(num, generator=gen, dtype=torch.float64).round(decimals=1).float()
    return batch, rewards


def with_trajectory(batch: CompletionBatch, seed: int = 0) -> CompletionBatch:
    """``batch`` with a synthetic trajectory record: each completion's positions spread over 3 to
    6 steps (each step commits at least one), random rollout log-probs and entropies."""
    import dataclasses

    gen = torch.Generator().manual_seed(seed)
    commit = torch.full(batch.input_ids.shape, -1, dtype=torch.long)
    for row in range(batch.size):
        cols = batch.completion_mask[row].nonzero().flatten()
        steps = int(torch.randint(3, 7, (1,), generator=gen))
        order = cols[torch.randperm(cols.numel(), generator=gen)]
        step_of = torch.cat([torch.arange(steps), torch.randint(0, steps, (cols.numel() - steps,),
                                                                generator=gen)])
        commit[row, order] = step_of
    completion = batch.completion_mask
    logp = torch.where(completion, -3.0 * torch.rand(commit.shape, generator=gen), 0.0)
    entropy = torch.where(completion, 2.0 * torch.rand(commit.shape, generator=gen), 0.0)
    return dataclasses.replace(batch, commit_step=commit, commit_logp=logp, commit_entropy=entropy)
