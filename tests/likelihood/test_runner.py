"""ElboRunner and ReferenceModel on the tiny LLaDA model (one 2-rank launch).

* micro-batched log-probs equal one direct forward of the whole batch at the scored positions
  (and are 0 elsewhere);
* the reference is a frozen copy: same log-probs as the policy at construction, unchanged after
  the policy moves, no gradients;
* megatron DDP (which averages over DP) with ``ddp_averages_gradients=True`` yields the same
  gradient as the summing reduction with ``ddp_averages_gradients=False``.
"""

from __future__ import annotations

import torch

from rspo_mega.config.schema import AlgorithmConfig, LikelihoodConfig
from tests.distributed import run_distributed
from tests.likelihood import _models


def _body(rank: int, world: int) -> dict:
    from megatron.core import parallel_state as ps
    from megatron.core.distributed import (
        DistributedDataParallel,
        DistributedDataParallelConfig,
        finalize_model_grads,
    )

    from rspo_mega.algorithms import build_loss, compute_advantages, loss_backward
    from rspo_mega.likelihood import ElboRunner, MaskSampler, ReferenceModel
    from rspo_mega.parallel import initialize_model_parallel

    cfg, fwd = _models.TINY, _models.forward_fn()
    res: dict = {}
    initialize_model_parallel(tp=1, pp=1)
    batch, rewards = _models.make_completions(8, 4, 5, 7, seed=2)
    mine = torch.arange(ps.get_data_parallel_rank(), 8, 2)
    local = batch.select(mine)
    lik = LikelihoodConfig(mask_scheme="coupled", mc_samples=2)
    masked = MaskSampler(lik, 1, cfg.mask_token_id, cfg.eos_token_id).sample(local, 0)

    policy = _models.build(cfg)
    _models.canonical_init(policy, seed=1)
    runner = ElboRunner(fwd, 3, ddp_averages_gradients=False)
    lp = runner.logprobs(policy, masked)
    with torch.no_grad():
        direct = fwd(policy[0], masked.input_ids, masked.attention_mask, masked.labels)
    res["runner_vs_direct"] = (lp - torch.where(masked.score_mask, direct, 0.0)).abs().max().item()
    res["scored_only"] = bool((lp[~masked.score_mask] == 0).all() and (lp[masked.score_mask] < 0).all())

    ref = ReferenceModel.from_policy(policy, lambda: _models.build(cfg), offload=True)
    res["ref_vs_policy_at_init"] = (ref.logprobs(runner, masked) - lp).abs().max().item()
    _models.canonical_init(policy, seed=5, scale=0.05, add=True)
    res["ref_after_policy_moved"] = (ref.logprobs(runner, masked) - lp).abs().max().item()
    res["ref_frozen"] = all(not p.requires_grad for p in ref.parameters())

    algo = AlgorithmConfig(name="rspo", lambda_=0.2)
    adv = compute_advantages(rewards[mine], local.group_ids, 2, algo)
    ref_lp = ref.logprobs(runner, masked)
    loss_fn = build_loss(algo, lik)
    loss_backward(loss_fn, runner, policy, masked, adv, local.group_ids, 2, ref_logp=ref_lp)
    _models.allreduce_grads_dp(policy)
    summed = _models.full_grads(policy)
    res["ref_has_no_grad"] = all(p.grad is None for p in ref.parameters())

    chunk = _models.build(cfg)
    _models.canonical_init(chunk, seed=1)
    _models.canonical_init(chunk, seed=5, scale=0.05, add=True)
    ddp = DistributedDataParallel(
        config=chunk[0].config,
        ddp_config=DistributedDataParallelConfig(grad_reduce_in_fp32=True),
        module=chunk[0],
    )
    chunk[0].config.finalize_model_grads_func = finalize_model_grads
    ddp.zero_grad_buffer()
    runner_avg = ElboRunner(fwd, 3, ddp_averages_gradients=True)
    loss_backward(loss_fn, runner_avg, [ddp], masked, adv, local.group_ids, 2, ref_logp=ref_lp)
    for _, p in _models.named_params([ddp]):
        p.grad = p.main_grad.clone()
    averaged = _models.full_grads([ddp])
    num = sum(((averaged[k] - summed[k]) ** 2).sum() for k in summed) ** 0.5
    den = sum((summed[k] ** 2).sum() for k in summed) ** 0.5
    res["ddp_rel_err"] = float(num / den)
    return res


def test_runner_reference_and_ddp_scaling():
    for res in run_distributed(_body, 2, timeout=180):
        assert res["runner_vs_direct"] < 1e-5 and res["scored_only"], res
        assert res["ref_vs_policy_at_init"] == 0.0, res
        assert res["ref_after_policy_moved"] == 0.0, res
        assert res["ref_frozen"] and res["ref_has_no_grad"], res
        assert res["ddp_rel_err"] < 1e-6, res
