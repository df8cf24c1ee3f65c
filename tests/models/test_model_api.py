"""The public model API on 2 gloo ranks: log-probs, padding masks, gradients, bf16, impl choice."""

from __future__ import annotations

import os
from dataclasses import replace

import pytest
import torch

from rspo_mega.config.schema import ModelConfig
from tests.distributed import run_distributed

CFG = ModelConfig(num_layers=2, hidden_size=64, ffn_hidden_size=128, num_attention_heads=4,
                  num_query_groups=2, vocab_size=300, max_position_embeddings=64)


def _err(a: torch.Tensor, b: torch.Tensor) -> float:
    """Max abs difference of two logit tensors of the same shape."""
    return (a - b).abs().max().item() if a.shape == b.shape else float("inf")


def _body(rank: int, world: int) -> dict:
    from megatron.core import parallel_state as ps

    from rspo_mega.models.llada import (build_llada_model, llada_forward, resolve_transformer_impl,
                                        unwrap_model, vocab_parallel_log_probs)
    from rspo_mega.parallel import initialize_model_parallel

    out: dict = {"impl": resolve_transformer_impl("auto")}
    try:
        resolve_transformer_impl("transformer_engine")
    except RuntimeError as exc:
        out["te_error"] = str(exc)
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, CFG.vocab_size, (2, 10), generator=gen)
    for tp in (1, 2):
        initialize_model_parallel(tp=tp)
        model = build_llada_model(CFG)
        inner = unwrap_model(model)
        group = ps.get_tensor_model_parallel_group() if tp > 1 else None
        logits = llada_forward(model, ids)
        out[f"tp{tp}_columns"] = (logits.shape[-1], inner.vocab_start)
        before = logits.clone()
        lp = vocab_parallel_log_probs(logits, ids, inner.vocab_start, group)
        out[f"tp{tp}_unchanged"] = torch.equal(before, logits)
        direct = llada_forward(model, ids, labels=ids)
        out[f"tp{tp}_lp_err"] = (direct - lp).abs().max().item()
        ones = torch.ones_like(ids, dtype=torch.bool)
        out[f"tp{tp}_mask_ones_err"] = _err(llada_forward(model, ids, ones), logits)
        # the head at chosen positions (repeats allowed) equals the full head read there
        pos = torch.tensor([[9, 0, 3], [5, 5, 1]])
        out[f"tp{tp}_positions_err"] = _err(llada_forward(model, ids, positions=pos),
                                            logits.gather(1, pos[..., None].expand(-1, -1, logits.shape[-1])))
        out[f"tp{tp}_positions_lp_err"] = _err(llada_forward(model, ids, labels=ids, positions=pos),
                                               direct.gather(1, pos))
        flat = torch.tensor([9, 3, 15, 11, 3])  # row * 10 + position
        out[f"tp{tp}_flat_err"] = _err(llada_forward(model, ids, labels=ids, positions=flat),
                                       direct.reshape(-1)[flat])
        # left padding: what sits at padded positions must not reach real positions
        mask = ones.clone()
        mask[0, :4] = False
        other = ids.clone()
        other[0, :4] = (ids[0, :4] + 7) % CFG.vocab_size
        a, b = llada_forward(model, ids, mask), llada_forward(model, other, mask)
        out[f"tp{tp}_pad_leak"] = _err(a[0, 4:], b[0, 4:])
        out[f"tp{tp}_unpadded_differs"] = _err(llada_forward(model, other)[0, 4:], logits[0, 4:])
        # the TE path rotates left-padded rows so real tokens come first (RoPE: same outputs)
        inner.transformer_impl = "transformer_engine"
        rotated, rotated_lp = llada_forward(model, ids, mask), llada_forward(model, ids, mask, ids)
        out[f"tp{tp}_rotated_positions_err"] = max(
            _err(llada_forward(model, ids, mask, ids, positions=pos[:, :1] * 0 + 6), rotated_lp[:, 6:7]),
            _err(llada_forward(model, ids, mask, ids, positions=flat), rotated_lp.reshape(-1)[flat]))
        out[f"tp{tp}_rotated_err"] = _err(rotated[:, 4:], a[:, 4:])
        expected_lp = vocab_parallel_log_probs(a, ids, inner.vocab_start, group)
        out[f"tp{tp}_rotated_lp_err"] = (rotated_lp - expected_lp)[:, 4:].abs().max().item()
        holed = ones.clone()
        holed[1, 3] = False
        try:
            llada_forward(model, ids, holed)
        except ValueError as exc:
            out[f"tp{tp}_holed_error"] = str(exc)
        inner.transformer_impl = "local"
        # gradient of the log-probs never reaches padded output rows
        direct.sum().backward()
        grad = model.output_layer.weight.grad
        start = ps.get_tensor_model_parallel_rank() * grad.shape[0]
        valid = max(0, CFG.vocab_size - start)
        out[f"tp{tp}_pad_grad"] = grad[valid:].abs().max().item() if valid < grad.shape[0] else 0.0
        out[f"tp{tp}_real_grad"] = grad[:valid].abs().max().item()
    initialize_model_parallel(tp=2)
    bf16 = build_llada_model(replace(CFG, params_dtype="bfloat16"))
    logits = llada_forward(bf16, ids)
    out["bf16"] = (str(logits.dtype), str(next(bf16.parameters()).dtype), tuple(logits.shape),
                   ps.get_tensor_model_parallel_rank())
    return out


@pytest.mark.timeout(200)
def test_model_api_on_two_ranks():
    for res in run_distributed(_body, world_size=2, timeout=180):
        assert res["impl"] == "local"
        assert "needs Transformer Engine" in res["te_error"]
        for tp in (1, 2):
            assert res[f"tp{tp}_unchanged"], "vocab_parallel_log_probs modified its input"
            assert res[f"tp{tp}_lp_err"] < 1e-5
            assert res[f"tp{tp}_mask_ones_err"] < 1e-5
            assert res[f"tp{tp}_positions_err"] < 1e-5 and res[f"tp{tp}_positions_lp_err"] < 1e-5
            assert res[f"tp{tp}_flat_err"] < 1e-5
            assert res[f"tp{tp}_rotated_positions_err"] < 1e-5
            assert res[f"tp{tp}_pad_leak"] < 1e-5
            assert res[f"tp{tp}_unpadded_differs"] > 1e-4  # the check above is not vacuous
            assert res[f"tp{tp}_rotated_err"] < 1e-4 and res[f"tp{tp}_rotated_lp_err"] < 1e-4
            assert "must be contiguous" in res[f"tp{tp}_holed_error"]
            assert res[f"tp{tp}_pad_grad"] == 0.0 and res[f"tp{tp}_real_grad"] > 0
        # vocab 300 padded to 512 at TP=2: rank 0 holds ids 0-255, rank 1 the 44 real ids 256-299
        assert res["tp1_columns"] == (300, 0)
        rank = res["bf16"][3]
        assert res["tp2_columns"] == [(256, 0), (44, 256)][rank]
        assert res["bf16"][:3] == ("torch.float32", "torch.bfloat16", (2, 10, [256, 44][rank]))


def test_trusted_te_extra_state_is_scoped(monkeypatch):
    """The TE pickle opt-in holds during a model load only; a user's own setting is restored."""
    from rspo_mega.models.llada.checkpoint import TE_PICKLE_ENV, trusted_te_extra_state

    monkeypatch.delenv(TE_PICKLE_ENV, raising=False)
    with trusted_te_extra_state():
        assert os.environ[TE_PICKLE_ENV] == "1"
    assert TE_PICKLE_ENV not in os.environ
    monkeypatch.setenv(TE_PICKLE_ENV, "0")
    try:
        with trusted_te_extra_state():
            raise RuntimeError("load failed")
    except RuntimeError:
        pass
    assert os.environ[TE_PICKLE_ENV] == "0"
