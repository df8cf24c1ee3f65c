"""LoRA on the Transformer Engine spec, run for real where a GPU is present (skipped on CPU-only
machines such as CI). ``benchmarks/gpu_checks.sh`` runs it as its ``lora_te`` check.

One process, NCCL world of 1 (TP=PP=1), a model whose GEMM shapes FP8 accepts, adapters (r=16)
on all four linears (TE's fused LayerNorm+Linear for QKV and fc1), in bf16 and with FP8 base
GEMMs (delayed scaling, hybrid format):

* step 0 equals the base: a fresh adapter (``B = 0``) gives a separately built base model's
  logits (same base weights);
* the reference is the base: with ``B != 0`` and ``adapters=False`` the logits are the base's;
* the merged weights (``W + alpha / r * B A``, what the export writes) give the adapted logits;
* forward + backward: finite loss, every adapter factor's gradient finite and nonzero, no
  gradient on any base weight.

Each case prints its figures as one JSON line (``-s``: into the check's output file).
"""

from __future__ import annotations

import json

import pytest
import torch

from tests.gpu.test_gpu_path import _fp8_capable, _te, nccl_world  # noqa: F401 (fixture)

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

VOCAB, RANK = 1000, 16
# Relative logit error limits. "same": a fresh adapter or the adapters switched off against the
# base model; bf16 runs the base GEMMs as the base model does, FP8 quantises inputs that may round
# differently (the adapter's branch asks TE for the norm output). "merged": the merged weights
# against the adapted model, bf16 rounding of W + dW and of two GEMMs against one (0.010 on the
# local spec on a CPU), FP8 quantising the merged weights themselves.
BF16_MERGED = 3e-2
LIMITS = {"te_bf16": {"same": 1e-3, "merged": BF16_MERGED},
          "te_fp8": {"same": 2e-2, "merged": 0.1}}
CASES = [pytest.param(False, id="te_bf16", marks=pytest.mark.skipif(
             not torch.cuda.is_available() or not _te(), reason="needs Transformer Engine")),
         pytest.param(True, id="te_fp8", marks=pytest.mark.skipif(
             not torch.cuda.is_available() or not _te() or not _fp8_capable(),
             reason="needs Transformer Engine and an FP8 GPU (sm_89+)"))]


def _cfg(fp8: bool, lora: bool, impl: str):
    from rspo_mega.config.schema import ModelConfig

    cfg = ModelConfig(num_layers=2, hidden_size=256, ffn_hidden_size=768, num_attention_heads=4,
                      vocab_size=VOCAB, mask_token_id=VOCAB - 1, eos_token_id=VOCAB - 2,
                      max_position_embeddings=128, params_dtype="bfloat16",
                      transformer_impl=impl)
    cfg.fp8.enabled = fp8
    cfg.lora.enabled, cfg.lora.rank, cfg.lora.alpha = lora, RANK, 32.0
    return cfg


def _rel(got: torch.Tensor, ref: torch.Tensor) -> float:
    return ((got.float() - ref.float()).norm() / ref.float().norm()).item()


def _logits(model, ids: torch.Tensor, adapters: bool = True) -> torch.Tensor:
    from rspo_mega.models.llada import llada_forward

    with torch.no_grad():
        return llada_forward(model, ids, adapters=adapters)[..., :VOCAB].float()


def _adapters(model) -> list:
    from rspo_mega.models.llada import unwrap_model
    from rspo_mega.models.llada.lora import adapter_modules

    return list(adapter_modules(unwrap_model(model)))


def _same_base(adapted, base) -> None:
    """Copy ``base``'s weights into ``adapted``'s frozen base (adapters untouched)."""
    from rspo_mega.models.llada.lora import is_adapter_name

    weights = dict(base.named_parameters())
    with torch.no_grad():
        for name, p in adapted.named_parameters():
            if not is_adapter_name(name):
                p.copy_(weights[name])


def _merged(base, adapted) -> None:
    """Add each adapter's ``alpha / r * B A`` to ``base``'s weight of the same linear."""
    linears = dict(base.named_modules())
    inner = dict(adapted.named_modules())
    with torch.no_grad():
        for name, module in inner.items():
            if name.endswith(".adapter"):
                weight = linears[name.removesuffix(".adapter")].weight
                weight.add_(module.delta_weight().to(weight.dtype))


def _train(adapted, ids: torch.Tensor) -> float:
    """Three forward + backward passes (delayed scaling settles); the last loss."""
    from rspo_mega.models.llada import llada_forward

    for _ in range(3):
        adapted.zero_grad(set_to_none=True)
        loss = -llada_forward(adapted, ids, labels=ids).mean()
        loss.backward()
    return loss.item()


def lora_figures(fp8: bool, impl: str, device: str) -> dict:
    """Build the base and the LoRA model (same base weights) on ``device`` and return the
    figures (relative logit errors, loss, adapter gradient norm) after checking the gradients:
    every adapter factor's finite and nonzero, none on a base weight. Needs megatron's parallel
    state (TP=PP=1)."""
    from rspo_mega.models.llada import build_llada_model
    from rspo_mega.parallel import set_random_seed

    set_random_seed(7)
    base = build_llada_model(_cfg(fp8, False, impl))
    adapted = build_llada_model(_cfg(fp8, True, impl), seed=7)
    _same_base(adapted, base)
    adapters = _adapters(adapted)
    assert len(adapters) == 2 * 4 and all(a.lora_b.abs().max() == 0 for _, a in adapters)
    ids = torch.randint(0, VOCAB - 2, (4, 64), generator=torch.Generator().manual_seed(0))
    ids = ids.to(device)
    figures = {"step0_vs_base": _rel(_logits(adapted, ids), _logits(base, ids))}
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for _, adapter in adapters:  # B != 0: the adapters change the model
            adapter.lora_b.copy_(torch.randn(adapter.lora_b.shape, generator=gen) * 0.03)
    figures["reference_vs_base"] = _rel(_logits(adapted, ids, adapters=False), _logits(base, ids))
    on = _logits(adapted, ids)
    figures["adapted_vs_base"] = _rel(on, _logits(base, ids))
    _merged(base, adapted)
    figures["merged_vs_adapted"] = _rel(_logits(base, ids), on)
    figures["loss"] = _train(adapted, ids)
    trained = {n: p for n, p in adapted.named_parameters() if p.requires_grad}
    assert len(trained) == 2 * len(adapters) and all(".adapter.lora_" in n for n in trained)
    assert all(p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().max() > 0
               for p in trained.values()), [n for n, p in trained.items() if p.grad is None]
    assert all(p.grad is None for p in adapted.parameters() if not p.requires_grad)
    figures["adapter_grad_norm"] = torch.stack([p.grad.float().norm()
                                                for p in trained.values()]).norm().item()
    return figures


def check_figures(figures: dict, same: float, merged: float) -> None:
    """The adapters change the model (so the checks can fail), a fresh adapter and the adapters
    switched off give the base (``same``), the merged weights the adapted model (``merged``)."""
    assert torch.isfinite(torch.tensor(figures["loss"])), figures
    assert figures["adapted_vs_base"] > 2 * merged, figures
    assert figures["step0_vs_base"] <= same, figures
    assert figures["reference_vs_base"] <= same, figures
    assert figures["merged_vs_adapted"] <= merged, figures


@pytest.mark.parametrize("fp8", CASES)
def test_lora_on_te_bf16_and_fp8(nccl_world, fp8):  # noqa: F811 (the fixture)
    case = "te_fp8" if fp8 else "te_bf16"
    figures = lora_figures(fp8, "transformer_engine", "cuda")
    print(json.dumps({"case": case, **figures}))
    check_figures(figures, **LIMITS[case])
