"""LLaDA's layer modules: the last layer runs its queries only where the head reads (same logits
and gradients), and the local spec's SwiGLU MLP computes megatron's MLP."""

from __future__ import annotations

import pytest
import torch

from rspo_mega.config.schema import ModelConfig
from rspo_mega.models.llada.forward_context import QuerySelection
from tests.distributed import run_distributed

CFG = ModelConfig(num_layers=3, hidden_size=64, ffn_hidden_size=96, num_attention_heads=4,
                  num_query_groups=2, vocab_size=300, max_position_embeddings=64)


def test_selection_of_flat_positions_reads_back_the_callers_rows():
    b, s, h = 3, 7, 5
    hidden = torch.randn(s, b, h)
    flat = torch.tensor([15, 2, 20, 2, 0, 14, 8])  # unsorted, a repeat, row 1 has one position
    sel = QuerySelection.from_positions(flat, b, s)
    assert sel is not None and sel.index.shape == (b, 3)
    expected = hidden[flat % s, flat // s]
    assert torch.equal(sel.head_input(sel.rows(hidden)), expected)
    slots = hidden.gather(0, sel.index.t().unsqueeze(-1).expand(-1, -1, h))  # as the attention
    assert torch.equal(sel.head_input(sel.context(slots)), expected)  # padding slots dropped
    pos = torch.tensor([[6, 0], [3, 3], [1, 2]])
    sel = QuerySelection.from_positions(pos, b, s)
    assert torch.equal(sel.head_input(sel.rows(hidden)), hidden.transpose(0, 1).gather(
        1, pos[..., None].expand(-1, -1, h)))


def test_no_selection_when_it_saves_nothing():
    assert QuerySelection.from_positions(torch.arange(7).expand(2, 7), 2, 7) is None
    assert QuerySelection.from_positions(torch.arange(7), 2, 7) is None  # row 0 has all 7
    assert QuerySelection.from_positions(torch.zeros(0, dtype=torch.long), 2, 7) is None


def _grads(model) -> torch.Tensor:
    return torch.cat([p.grad.reshape(-1) for p in model.parameters() if p.grad is not None])


def _body(rank: int, world: int) -> dict:
    from rspo_mega.models.llada import build_llada_model, llada_forward, unwrap_model
    from rspo_mega.parallel import initialize_model_parallel

    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, CFG.vocab_size, (3, 24), generator=gen)
    pad = torch.ones_like(ids, dtype=torch.bool)
    pad[1, :5] = False
    flat = torch.tensor([70, 3, 30, 31, 50, 3, 60])  # row * 24 + position
    block = torch.tensor([[20, 21, 22], [8, 9, 23], [0, 5, 5]])
    out: dict = {}
    for tp in (1, 2):
        initialize_model_parallel(tp=tp)
        torch.manual_seed(1)
        model = build_llada_model(CFG)
        rows_seen: list = []
        unwrap_model(model).decoder.layers[-1].mlp.register_forward_hook(
            lambda mod, args, res: rows_seen.append(args[0].shape[0]))
        full = llada_forward(model, ids, pad, labels=ids)
        full.reshape(-1)[flat].sum().backward()
        g_full = _grads(model)
        model.zero_grad()
        picked = llada_forward(model, ids, pad, labels=ids, positions=flat)
        picked.sum().backward()
        g_picked = _grads(model)
        logits = llada_forward(model, ids, pad)
        out[tp] = {
            "lp_err": (picked - full.reshape(-1)[flat]).abs().max().item(),
            "grad_rel": ((g_picked - g_full).norm() / g_full.norm()).item(),
            "block_err": (llada_forward(model, ids, pad, positions=block) - logits.gather(
                1, block[..., None].expand(-1, -1, logits.shape[-1]))).abs().max().item(),
            "last_layer_rows": rows_seen,
        }
    return out


@pytest.mark.timeout(200)
def test_selected_queries_give_the_full_layers_logits_and_gradients():
    for res in run_distributed(_body, world_size=2, timeout=180):
        for tp in (1, 2):
            r = res[tp]
            assert r["lp_err"] < 1e-5 and r["block_err"] < 1e-5
            assert r["grad_rel"] < 1e-5
            # the last layer's MLP runs on all 24 positions in a full forward, on the 7 flat
            # positions themselves, on the 3 block positions of each row
            assert r["last_layer_rows"] == [24, 7, 24, 3]


def _recompute_body(rank: int, world: int) -> dict:
    from rspo_mega.models.llada import build_llada_model, llada_forward, unwrap_model
    from rspo_mega.parallel import initialize_model_parallel

    ids = torch.randint(0, CFG.vocab_size, (2, 16), generator=torch.Generator().manual_seed(0))
    flat = torch.tensor([3, 20, 21, 9])  # row * 16 + position
    initialize_model_parallel()
    torch.manual_seed(1)
    model = build_llada_model(CFG)
    config = unwrap_model(model).config
    out = {}
    for recompute in (None, "full"):
        config.recompute_granularity = recompute
        config.recompute_method, config.recompute_num_layers = "uniform", 1
        model.zero_grad()
        picked = llada_forward(model, ids, labels=ids, positions=flat)
        picked.sum().backward()
        out[recompute] = (picked.detach(), _grads(model))
    return out


@pytest.mark.timeout(200)
def test_full_recompute_runs_every_query_and_gives_the_same_log_probs():
    """megatron's recomputed block forward passes no context to the layers, so with full
    recompute the last layer runs every query; the head still reads the positions asked for."""
    res = run_distributed(_recompute_body, world_size=1, timeout=180)[0]
    (lp, grads), (lp_recompute, grads_recompute) = res[None], res["full"]
    assert (lp - lp_recompute).abs().max().item() < 1e-5
    assert ((grads - grads_recompute).norm() / grads.norm()).item() < 1e-5


def _mlp_body(rank: int, world: int) -> dict:
    import dataclasses

    import torch.nn.functional as F
    from megatron.core.transformer.mlp import MLP, MLPSubmodules
    from megatron.core.tensor_parallel.layers import ColumnParallelLinear, RowParallelLinear

    from rspo_mega.models.llada.config import transformer_config
    from rspo_mega.models.llada.layer import SwiGLUMLP
    from rspo_mega.parallel import initialize_model_parallel

    initialize_model_parallel(tp=1)
    config = transformer_config(CFG, impl="local")
    torch.manual_seed(0)
    ours = SwiGLUMLP(config)
    subs = MLPSubmodules(linear_fc1=ColumnParallelLinear, linear_fc2=RowParallelLinear)
    theirs = MLP(config, subs)
    theirs.load_state_dict(ours.state_dict())
    x = torch.randn(5, 2, CFG.hidden_size, requires_grad=True)
    expected = theirs(x)[0]
    with_grad = ours(x)[0]
    (g_ours,) = torch.autograd.grad(with_grad.sum(), x)
    (g_theirs,) = torch.autograd.grad(expected.sum(), x)
    with torch.no_grad():
        in_place = ours(x)[0]
    offset = SwiGLUMLP(dataclasses.replace(config, glu_linear_offset=1.0))
    return {"plain": ours.plain_swiglu, "offset_plain": offset.plain_swiglu,
            "grad_err": (with_grad - expected).abs().max().item(),
            "no_grad_err": (in_place - expected).abs().max().item(),
            "input_grad_err": (g_ours - g_theirs).abs().max().item(),
            "silu": F.silu is ours.activation_func}


def test_swiglu_mlp_computes_megatrons_mlp():
    (res,) = run_distributed(_mlp_body, world_size=1, timeout=120)
    assert res["plain"] and res["silu"] and not res["offset_plain"]  # others: megatron's forward
    assert res["grad_err"] < 1e-6 and res["no_grad_err"] < 1e-6 and res["input_grad_err"] < 1e-6
