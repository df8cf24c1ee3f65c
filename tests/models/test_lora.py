"""LoRA adapters on the tensor/pipeline-parallel LLaDA (:mod:`rspo_mega.models.llada.lora`).

Three launches (1, 2 and 4 gloo ranks) run the same body: the tiny model with adapters on all four
linears, weights (base and adapters, B non-zero) written from a canonical unsharded definition;
RSPO's loss and the adapters' full gradient, the policy's log-probs and the reference's
(adapters off) must agree with one process at TP2, PP2, DP2, TP2xPP2, TP2xDP2 and PP2xDP2. In each
layout the reference equals a separately built model without adapters holding the same base
weights, a fresh LoRA model (B = 0) computes that base model's log-probs exactly, and only the
adapters receive gradients.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

from rspo_mega.config.schema import AlgorithmConfig, LikelihoodConfig, LoRAConfig
from tests.distributed import run_distributed
from tests.likelihood import _models

B, G, PROMPT, GEN = 8, 4, 6, 10
LORA = LoRAConfig(enabled=True, rank=4, alpha=8.0)
ALGO = AlgorithmConfig(name="rspo", lambda_=0.5)
LIK = LikelihoodConfig(mask_scheme="coupled", mc_samples=2)


def _layout_result(tp: int, pp: int, batch, rewards) -> dict:
    """This layout's loss, adapter gradients and log-probs (rank 0's canonical view)."""
    from megatron.core import parallel_state as ps

    from rspo_mega.algorithms import build_loss, compute_advantages, loss_backward
    from rspo_mega.likelihood import BaseReference, ElboRunner, MaskSampler
    from rspo_mega.models.llada import lora
    from rspo_mega.models.llada.model import build_llada_model, unwrap_model
    from rspo_mega.parallel import initialize_model_parallel

    initialize_model_parallel(tp=tp, pp=pp)
    dp, dp_rank = ps.get_data_parallel_world_size(), ps.get_data_parallel_rank()
    mine = torch.arange(dp_rank, B, dp)
    local = batch.select(mine)
    cfg = dataclasses.replace(_models.TINY, lora=LORA)
    policy, base = [build_llada_model(cfg, seed=7)], [build_llada_model(_models.TINY)]
    _models.canonical_init(base, seed=1)
    _models.canonical_init(policy, seed=1)
    lora.init_adapters(unwrap_model(policy[0]), seed=7)  # a fresh adapter: B = 0
    masked = MaskSampler(LIK, seed=42, mask_token_id=cfg.mask_token_id,
                         eos_token_id=cfg.eos_token_id).sample(local, iteration=3)
    runner = ElboRunner(_models.forward_fn(), 8, ddp_averages_gradients=False, one_pass=False)
    base_logp = runner.logprobs(base, masked)
    fresh_logp = runner.logprobs(policy, masked)
    _models.canonical_init(policy, seed=1)  # adapters too: B != 0
    ref_logp = BaseReference(policy).logprobs(runner, masked)
    logp = runner.logprobs(policy, masked)
    adv = compute_advantages(rewards[mine], local.group_ids, B // G, ALGO)
    res = loss_backward(build_loss(ALGO, LIK), runner, policy, masked, adv, local.group_ids,
                        B // G, ref_logp=ref_logp, old_logp=None)
    _models.allreduce_grads_dp(policy)
    grads = _models.full_grads(policy)
    out = {"loss": res.loss, "grads": grads,
           "trainable": sorted(n for n, p in _models.named_params(policy) if p.requires_grad)}
    if base_logp is not None:
        out.update(base_err=(ref_logp - base_logp).abs().max().item(),
                   fresh_err=(fresh_logp - base_logp).abs().max().item(),
                   adapted_diff=(logp - base_logp).abs().max().item(),
                   logp=_gather_rows(logp, mine))
    return out


def _gather_rows(logp: torch.Tensor, mine: torch.Tensor) -> dict[int, torch.Tensor]:
    """Each completion's log-probs by global index, from the last stage's DP ranks."""
    from megatron.core import parallel_state as ps

    k = logp.shape[0] // len(mine)
    rows = {int(u): logp[i * k:(i + 1) * k] for i, u in enumerate(mine)}
    parts: list = [None] * ps.get_data_parallel_world_size()
    torch.distributed.all_gather_object(parts, rows, group=ps.get_data_parallel_group())
    return {u: t for part in parts for u, t in part.items()}


def _body(rank: int, world: int, layouts: list) -> dict:
    batch, rewards = _models.make_completions(B, G, PROMPT, GEN, seed=5)
    out = {}
    for tp, pp in layouts:
        result = _layout_result(tp, pp, batch, rewards)
        gathered: list = [None] * world
        torch.distributed.all_gather_object(gathered, result)
        out[(tp, pp)] = {k: v for r in gathered for k, v in r.items() if k != "trainable"}
        out[(tp, pp)]["trainable"] = result["trainable"]
    return out


def _flat(grads: dict) -> torch.Tensor:
    return torch.cat([grads[k].flatten().double() for k in sorted(grads)])


@pytest.mark.timeout(600)
def test_lora_same_across_layouts_reference_is_base_and_step0_is_base():
    single = run_distributed(_body, 1, args=([(1, 1)],), timeout=240)[0][(1, 1)]
    two = run_distributed(_body, 2, args=([(1, 1), (2, 1), (1, 2)],), timeout=240)[0]
    four = run_distributed(_body, 4, args=([(2, 1), (1, 2), (2, 2)],), timeout=240)[0]
    adapters = [n for n in single["grads"] if ".adapter.lora_" in n]
    assert single["trainable"] == sorted(adapters)  # the base is frozen
    assert len(adapters) == 2 * 4 * _models.TINY.num_layers
    assert all(single["grads"][n].abs().max() == 0 for n in single["grads"] if n not in adapters)
    g0 = _flat({n: single["grads"][n] for n in adapters})
    assert g0.norm() > 0
    assert single["adapted_diff"] > 1e-3  # the adapters change the model
    layouts = {f"dp2 {k}": v for k, v in two.items()} | {f"w4 {k}": v for k, v in four.items()}
    for tag, res in {"tp1": single, **layouts}.items():
        assert res["base_err"] <= 1e-6, (tag, res["base_err"])  # reference = the base model
        assert res["fresh_err"] <= 1e-6, (tag, res["fresh_err"])  # B = 0: step 0 is the base
        g = _flat({n: res["grads"][n] for n in adapters})
        rel = ((g - g0).norm() / g0.norm()).item()
        assert rel < 1e-5, (tag, rel)
        assert abs(res["loss"] - single["loss"]) <= 1e-5 * max(1.0, abs(single["loss"])), tag
        for uid, row in single["logp"].items():
            assert torch.allclose(res["logp"][uid], row, atol=1e-5, rtol=1e-5), (tag, uid)


@pytest.mark.parametrize("overrides, named", [
    (["model.lora.rank=0"], "config key 'model.lora.rank' must be >= 1, got 0"),
    (["model.lora.target_modules=[linear_qkv, linear_q]"],
     "config key 'model.lora.target_modules[1]' = 'linear_q' must be one of"),
    (["model.lora.target_modules=[]"], "model.lora.target_modules=[] must name each linear"),
    (["model.lora.dropout=0.1", "likelihood.one_pass=false"],
     "model.lora.dropout=0.1 needs likelihood.one_pass=true"),
    (["model.lora.alpha=-2"], "config key 'model.lora.alpha' must be > 0, got -2"),
    (["model.lora.alpha=0"], "config key 'model.lora.alpha' must be > 0, got 0"),
    (["model.lora.rank=-4"], "config key 'model.lora.rank' must be >= 1, got -4"),
    (["model.lora.dropout=1.0"], "config key 'model.lora.dropout'"),
    (["model.lora.target_modules=linear_qkv"], "config key 'model.lora.target_modules' must be a list"),
    (["model.lora.target_modules=[linear_fc1, linear_fc1]"],
     "model.lora.target_modules=['linear_fc1', 'linear_fc1'] must name each linear once"),
    ([], "model.lora.enabled=true trains adapters on the weights of checkpoint.init_from: set it"),
])
def test_bad_lora_settings_are_named(overrides, named):
    from rspo_mega.setup import load_run_config
    from rspo_mega.config.loader import ConfigError
    from rspo_mega.setup import validate_run

    with pytest.raises(ConfigError) as err:
        validate_run(load_run_config(None, ["model.lora.enabled=true", "checkpoint.init_from=null",
                                           *overrides]), 1)
    assert named in str(err.value) and "\n" not in str(err.value)


def test_an_unwritable_peft_export_is_named(tmp_path):
    from rspo_mega.setup import load_run_config
    from rspo_mega.config.loader import ConfigError
    from rspo_mega.config.paths import check_outputs

    taken = tmp_path / "a_file"
    taken.write_text("x")
    cfg = load_run_config(None, ["model.lora.enabled=true", f"logging.output_dir={tmp_path}/run",
                             f"checkpoint.export_peft={taken}"])
    with pytest.raises(ConfigError, match=f"checkpoint.export_peft={taken}: it is a file"):
        check_outputs(cfg)
    cfg.model.lora.enabled = False  # without LoRA nothing is written there
    check_outputs(cfg)


def _gpu_check_body(rank: int, world: int) -> dict:
    from rspo_mega.parallel import initialize_model_parallel
    from tests.gpu.test_gpu_lora import lora_figures

    initialize_model_parallel(tp=1, pp=1)
    return lora_figures(False, "local", "cpu")


def test_the_gpu_lora_check_on_the_local_spec():
    """``tests/gpu/test_gpu_lora.py``'s check (run on TE bf16/FP8 where a GPU is lent) on the
    local spec in bf16 on this CPU: a fresh adapter and the adapters switched off give the base
    exactly, the merged weights the adapted logits within bf16 rounding, only adapters get
    gradients."""
    from tests.gpu.test_gpu_lora import BF16_MERGED, check_figures

    figures = run_distributed(_gpu_check_body, 1, timeout=240)[0]
    check_figures(figures, same=0.0, merged=BF16_MERGED)
