"""Loss value and full gradient are the same for any TP/PP/DP layout and micro-batch split, and
for the ELBO runner's one-pass and two-pass modes (PP layouts always run two passes).

Three launches (1, 2 and 4 gloo ranks) cover: one process with 1 and 4 micro-batches; DP2, TP2,
PP2; TP2xDP2, PP2xDP2, TP2xPP2, for RSPO (batch and group centering), ESPO, diffu-GRPO and AGRPO
(entropy-weighted sampled steps of a synthetic trajectory record, tempered forward, the rollout
log-probs those of the perturbed "old" policy), on the tiny LLaDA model. Completions are dealt to DP ranks round-robin, so prompt groups span ranks. The
masks of every completion are also compared across layouts.
"""

from __future__ import annotations

import dataclasses

import torch

from rspo_mega.config.schema import AlgorithmConfig, LikelihoodConfig
from tests.distributed import run_distributed
from tests.likelihood import _models

B, G, PROMPT, GEN = 8, 4, 6, 10
CASES = {
    "rspo": (AlgorithmConfig(name="rspo", lambda_=0.5),
             LikelihoodConfig(mask_scheme="coupled", mc_samples=2)),
    "rspo_group": (AlgorithmConfig(name="rspo", lambda_=0.5, centering="group"),
                   LikelihoodConfig(mask_scheme="stratified", mc_samples=3)),
    "espo": (AlgorithmConfig(name="espo", advantage="mean", clip_eps=0.05, kl_beta=0.05),
             LikelihoodConfig(mask_scheme="coupled", mc_samples=2)),
    "diffu_grpo": (AlgorithmConfig(name="diffu_grpo", clip_eps=0.05, kl_beta=0.04),
                   LikelihoodConfig(mask_scheme="one_step", mc_samples=2)),
    "agrpo": (AlgorithmConfig(name="agrpo", advantage="mean", clip_eps=0.05, kl_beta=0.04),
              LikelihoodConfig(mask_scheme="trajectory", mc_samples=3)),
}


def _build(cfg, vpp):
    from rspo_mega.models.llada.model import build_llada_model

    if vpp is None:
        return _models.build(cfg)
    chunks = [build_llada_model(cfg, vp_stage=i) for i in range(vpp)]
    for c in chunks:  # Megatron-LM #750/#1450: interleaved PP=2 needs unbatched p2p
        c.config.batch_p2p_comm = False
    return chunks


def _body(rank: int, world: int, layouts: list, splits: list, num_layers: int = 2,
          cases: tuple = tuple(CASES), passes: tuple = (False, True)) -> dict | None:
    from megatron.core import parallel_state as ps

    from rspo_mega.algorithms import build_loss, compute_advantages, loss_backward
    from rspo_mega.likelihood import (
        ElboRunner, MaskSampler, ReferenceModel, TrajectorySampler, tempered_forward,
    )
    from rspo_mega.parallel import initialize_model_parallel

    cfg = dataclasses.replace(_models.TINY, num_layers=num_layers)
    batch, rewards = _models.make_completions(B, G, PROMPT, GEN, seed=5)
    batch = _models.with_trajectory(batch, seed=6)
    out = {}
    for tp, pp, *rest in layouts:
        vpp = rest[0] if rest else None
        initialize_model_parallel(tp=tp, pp=pp, vpp=vpp)
        dp, dp_rank = ps.get_data_parallel_world_size(), ps.get_data_parallel_rank()
        mine = torch.arange(dp_rank, B, dp)
        local = batch.select(mine)
        policy = _build(cfg, vpp)
        _models.canonical_init(policy, seed=1)
        ref = ReferenceModel.from_policy(policy, lambda: _build(cfg, vpp))
        for case in cases:
            algo, lik = CASES[case]
            trajectory = lik.mask_scheme == "trajectory"
            sampler = (TrajectorySampler if trajectory else MaskSampler)(
                lik, seed=42, mask_token_id=cfg.mask_token_id, eos_token_id=cfg.eos_token_id)
            masked = sampler.sample(local, iteration=3)
            forward = tempered_forward(0.8) if trajectory else _models.forward_fn()
            for split, one_pass in ((sp, op) for sp in splits for op in passes):
                mbs = -(-masked.num_sequences // split) if split > 0 else -split
                runner = ElboRunner(forward, mbs, ddp_averages_gradients=False, one_pass=one_pass)
                _models.canonical_init(policy, seed=1)
                _models.canonical_init(policy, seed=2, scale=0.03, add=True)
                old = runner.logprobs(policy, masked)
                if trajectory and old is not None:  # the rollout policy: the perturbed one
                    masked = dataclasses.replace(
                        masked, rollout_logp=torch.where(masked.score_mask, old, 0.0))
                _models.canonical_init(policy, seed=3, scale=0.03, add=True)
                ref_logp = ref.logprobs(runner, masked)
                adv = compute_advantages(rewards[mine], local.group_ids, B // G, algo)
                for p in (q for c in policy for q in c.parameters()):
                    p.grad = None
                res = loss_backward(build_loss(algo, lik), runner, policy, masked, adv,
                                    local.group_ids, B // G, ref_logp=ref_logp, old_logp=old)
                _models.allreduce_grads_dp(policy)
                grads = _models.full_grads(policy)
                rows = {int(u): masked.input_ids[i * len(masked.input_ids) // len(mine):
                                                 (i + 1) * len(masked.input_ids) // len(mine)]
                        for i, u in enumerate(local.uids)}
                all_rows: list = [None] * world
                torch.distributed.all_gather_object(all_rows, rows)
                merged = {k: v for r in all_rows for k, v in r.items()}
                out[(tp, pp, case, split, one_pass)] = (res.loss, res.metrics, grads, merged)
    return out if rank == 0 else None


def _flat(grads: dict) -> torch.Tensor:
    return torch.cat([grads[k].flatten().double() for k in sorted(grads)])


def test_invariance_across_layouts_and_microbatches():
    single = run_distributed(_body, 1, args=([(1, 1)], [1, 4]), timeout=240)[0]
    two = run_distributed(_body, 2, args=([(1, 1), (2, 1), (1, 2)], [-5]), timeout=240)[0]
    four = run_distributed(_body, 4, args=([(2, 1), (1, 2), (2, 2)], [-5]), timeout=240)[0]
    for case in CASES:
        loss0, metrics0, grads0, masks0 = single[(1, 1, case, 1, False)]
        g0 = _flat(grads0)
        assert g0.norm() > 0, case
        others = {}
        for one in (False, True):
            others[f"mb4 one_pass={one}"] = single[(1, 1, case, 4, one)]
            others.update({f"w2 tp{t} pp{p} one_pass={one}": two[(t, p, case, -5, one)]
                           for t, p in [(1, 1), (2, 1), (1, 2)]})
            others.update({f"w4 tp{t} pp{p} one_pass={one}": four[(t, p, case, -5, one)]
                           for t, p in [(2, 1), (1, 2), (2, 2)]})
        others["mb1 one_pass=True"] = single[(1, 1, case, 1, True)]
        for tag, (loss, metrics, grads, masks) in others.items():
            assert sorted(grads) == sorted(grads0), (case, tag)
            rel = ((_flat(grads) - g0).norm() / g0.norm()).item()
            assert rel < 1e-5, (case, tag, rel)
            assert abs(loss - loss0) <= 1e-5 * max(1.0, abs(loss0)), (case, tag, loss, loss0)
            for key, value in metrics0.items():
                assert abs(metrics[key] - value) <= 1e-5 * max(1.0, abs(value)) or (
                    value != value and metrics[key] != metrics[key]), (case, tag, key)
            assert masks.keys() == masks0.keys()
            for uid in masks0:
                assert torch.equal(masks[uid], masks0[uid]), (case, tag, uid)


def test_invariance_interleaved_pipeline():
    """PP2 x VP2 (4 layers, 4 virtual stages) against one process, RSPO and diffu-GRPO."""
    cases = ("rspo", "diffu_grpo")
    kwargs = {"num_layers": 4, "cases": cases, "passes": (False,)}
    single = run_distributed(_body, 1, args=([(1, 1)], [1]), kwargs=kwargs, timeout=240)[0]
    inter = run_distributed(_body, 2, args=([(1, 2, 2)], [-4]), kwargs=kwargs, timeout=240)[0]
    for case in cases:
        loss0, _, grads0, _ = single[(1, 1, case, 1, False)]
        loss, _, grads, _ = inter[(1, 2, case, -4, False)]
        g0 = _flat(grads0)
        assert sorted(grads) == sorted(grads0)
        assert ((_flat(grads) - g0).norm() / g0.norm()).item() < 1e-5, case
        assert abs(loss - loss0) <= 1e-5 * max(1.0, abs(loss0)), case
