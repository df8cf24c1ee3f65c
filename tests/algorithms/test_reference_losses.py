"""Differential tests: each baseline loss against the formula its public code computes.

For identical inputs (per-token log-probs of the policy, the old policy and the reference on the
same masked batch, and rewards), the value and the gradient in the policy's log-probs of
ESPOLoss, DiffuGRPOLoss and AGRPOLoss must equal, to 1e-6, the formula written out here in the
layout of the published trainers (from the papers and the public ESPO, d1 and AGRPO trainers):

* ESPO: the coupled ELBO of each MC draw from the per-token cross-entropies of the two halves
  (masked half weighted by 1/p with p = l/(L+1), complement by 1/(L/(L+1) - p), halved), the
  ELBOs averaged over draws; rho = exp((ELBO - ELBO_old)/L) with L the completion length; the
  clipped surrogate summed over the batch and divided by its size; plus beta times the k2
  penalty (ELBO - ELBO_ref)^2/2 summed and divided by batch size times L. Advantages
  leave-one-out, not scaled by the group's standard deviation.
* diffu-GRPO (d1): per-token ratio and k3 on the completion tokens up to and including the first
  EOS, the per-token loss summed under that completion mask and divided by its count.
  Advantages (r - mean) / (std + 1e-4) per group.
* AGRPO: per MC draw, the step t sampled per completion, the tokens it unmasked; the clipped
  per-token surrogate against the rollout's log-probs plus beta * k3 * rho; importance weight
  (1 / (last_step + 1)) / q(t) with q from the summed token entropies of each step (1e-8 added,
  0 after the last non-EOS step); summed over tokens and divided by draws x completions.
  Advantages r - mean per group.
"""

from __future__ import annotations

import pytest
import torch

from rspo_mega.algorithms import LossInputs, build_loss, compute_advantages
from rspo_mega.config.schema import AlgorithmConfig, LikelihoodConfig
from rspo_mega.likelihood import MaskSampler, TrajectorySampler
from tests.likelihood._models import TINY, make_completions, with_trajectory

B, G, PROMPT, GEN = 8, 4, 5, 7


def _logps(shape: tuple[int, int], seed: int) -> torch.Tensor:
    """Random per-token log-probs (float64)."""
    gen = torch.Generator().manual_seed(seed)
    return -3.0 * torch.rand(shape, generator=gen, dtype=torch.float64) - 0.05


def _near(base: torch.Tensor, seed: int) -> torch.Tensor:
    """``base`` perturbed: another policy's log-probs on the same tokens."""
    gen = torch.Generator().manual_seed(seed)
    return base + 0.15 * torch.randn(base.shape, generator=gen, dtype=torch.float64)


def _ours(algo, lik, masked, batch, adv, logp, ref, old):
    """Our loss and its gradient in ``logp``."""
    logp = logp.clone().requires_grad_(True)
    out = build_loss(algo, lik)(LossInputs(
        masked=masked, logp=logp, advantages=adv, group_ids=batch.group_ids,
        num_groups=B // G, ref_logp=ref, old_logp=old))
    (grad,) = torch.autograd.grad(out.loss, logp)
    return out.loss.detach(), grad


def _close(ours: tuple, theirs: tuple) -> None:
    (loss, grad), (ref_loss, ref_grad) = ours, theirs
    assert abs(float(loss) - float(ref_loss)) <= 1e-6 * max(1.0, abs(float(ref_loss)))
    assert torch.allclose(grad, ref_grad, rtol=1e-6, atol=1e-9)
    assert ref_grad.abs().sum() > 0


def _rewards(seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.rand(B, generator=gen, dtype=torch.float64).round(decimals=1)


# --- ESPO ------------------------------------------------------------------------------------

def _espo_elbo(logp: torch.Tensor, masked, k: int) -> torch.Tensor:
    """Per completion, the mean over ``k`` coupled draws of ELBO = -(sum of weighted
    cross-entropies of both halves) / 2, rows ``(b*k + j)*2 + {0: masked half, 1: complement}``."""
    out = []
    for b in range(B):
        length = int(masked.lengths[b])
        draws = []
        for j in range(k):
            first, second = (b * k + j) * 2, (b * k + j) * 2 + 1
            p = float(masked.score_mask[first].sum()) / (length + 1)
            nll = -logp[first][masked.score_mask[first]].sum() / p if p > 0 else 0.0
            nll_c = -logp[second][masked.score_mask[second]].sum() / (length / (length + 1) - p) \
                if p < length / (length + 1) else 0.0
            draws.append(-(nll + nll_c) / 2)
        out.append(torch.stack(draws).mean())
    return torch.stack(out)


def _espo_reference(logp, old, ref, masked, rewards, eps, beta, k):
    grouped = rewards.view(-1, G)
    adv = (grouped - (grouped.sum(1, keepdim=True) - grouped) / (G - 1)).view(-1)
    logp = logp.clone().requires_grad_(True)
    elbo, elbo_old, elbo_ref = (_espo_elbo(x, masked, k) for x in (logp, old, ref))
    length = float(masked.lengths[0])
    coef = torch.exp((elbo - elbo_old) / length)
    surrogate = torch.min(coef * adv, torch.clamp(coef, 1 - eps, 1 + eps) * adv)
    loss = -surrogate.sum() / B + beta * ((elbo - elbo_ref) ** 2 / 2).sum() / (B * length)
    (grad,) = torch.autograd.grad(loss, logp)
    return loss.detach(), grad, adv


@pytest.mark.parametrize("eps,beta", [(0.2, 0.01), (0.02, 0.3)])
def test_espo_equals_its_reference_formula(eps, beta):
    k = 2
    lik = LikelihoodConfig(mask_scheme="coupled", mc_samples=k)
    algo = AlgorithmConfig(name="espo", clip_eps=eps, kl_beta=beta, advantage="leave_one_out")
    batch, _ = make_completions(B, G, PROMPT, GEN, seed=11)
    masked = MaskSampler(lik, 3, TINY.mask_token_id, TINY.eos_token_id).sample(batch, 2)
    assert bool((masked.lengths == GEN).all())  # the whole generated span, as ESPO's L
    old = _logps(masked.input_ids.shape, 1)
    logp, ref = _near(old, 2), _near(old, 3)
    rewards = _rewards(4)
    loss, grad, adv = _espo_reference(logp, old, ref, masked, rewards, eps, beta, k)
    ours_adv = compute_advantages(rewards, batch.group_ids, B // G, algo)
    assert torch.allclose(ours_adv, adv, rtol=1e-12, atol=1e-12)
    _close(_ours(algo, lik, masked, batch, ours_adv, logp, ref, old), (loss, grad))


# --- diffu-GRPO (d1) -------------------------------------------------------------------------

def _d1_reference(logp, old, ref, batch, rewards, eps, beta):
    """d1's loss on the completion columns ``[B, GEN]`` (K = 1: one row per completion)."""
    grouped = rewards.view(-1, G)
    mean = grouped.mean(1).repeat_interleave(G)
    std = grouped.std(1).repeat_interleave(G)
    adv = (rewards - mean) / (std + 1e-4)
    completion = batch.input_ids[:, PROMPT:]
    is_eos = completion == TINY.eos_token_id
    eos_idx = torch.full((B,), GEN, dtype=torch.long)
    eos_idx[is_eos.any(1)] = is_eos.int().argmax(1)[is_eos.any(1)]
    mask = (torch.arange(GEN).expand(B, -1) <= eos_idx.unsqueeze(1)).double()
    logp = logp.clone().requires_grad_(True)
    lp, lo, lr = (x[:, PROMPT:] for x in (logp, old, ref))
    coef = torch.exp(lp - lo)
    per_token = -torch.min(coef * adv.unsqueeze(1),
                           torch.clamp(coef, 1 - eps, 1 + eps) * adv.unsqueeze(1))
    per_token = per_token + beta * (torch.exp(lr - lp) - (lr - lp) - 1)
    loss = (per_token * mask).sum() / mask.sum()
    (grad,) = torch.autograd.grad(loss, logp)
    return loss.detach(), grad, adv, mask


@pytest.mark.parametrize("eps,beta", [(0.5, 0.04), (0.05, 0.5)])
def test_diffu_grpo_equals_d1_formula(eps, beta):
    lik = LikelihoodConfig(mask_scheme="one_step", mc_samples=1, count_positions="until_eos")
    algo = AlgorithmConfig(name="diffu_grpo", clip_eps=eps, kl_beta=beta, advantage="standardized")
    batch, _ = make_completions(B, G, PROMPT, GEN, seed=12)
    masked = MaskSampler(lik, 3, TINY.mask_token_id, TINY.eos_token_id).sample(batch, 2)
    old = _logps(masked.input_ids.shape, 5)
    logp, ref = _near(old, 6), _near(old, 7)
    rewards = _rewards(8)
    loss, grad, adv, mask = _d1_reference(logp, old, ref, batch, rewards, eps, beta)
    lengths = mask.sum(1)
    assert lengths.min() < lengths.max()  # completions of unequal length: a token mean
    assert torch.equal(masked.score_mask[:, PROMPT:], mask.bool())
    ours_adv = compute_advantages(rewards, batch.group_ids, B // G, algo)
    assert torch.allclose(ours_adv, adv, rtol=1e-12, atol=1e-12)
    _close(_ours(algo, lik, masked, batch, ours_adv, logp, ref, old), (loss, grad))


# --- AGRPO -----------------------------------------------------------------------------------

def _agrpo_reference(logp, ref, masked, batch, rewards, eps, beta, k):
    adv = rewards - rewards.view(-1, G).mean(1).repeat_interleave(G)
    logp = logp.clone().requires_grad_(True)
    loss = torch.zeros((), dtype=torch.float64)
    steps = 1 + int(batch.commit_step.max())
    for b in range(B):
        gen = batch.completion_mask[b]
        commit, tokens = batch.commit_step[b, gen], batch.input_ids[b, gen]
        last_step = int(commit[tokens != TINY.eos_token_id].max())
        entropies = torch.full((steps,), 1e-8, dtype=torch.float64)
        entropies.scatter_add_(0, commit, batch.commit_entropy[b, gen].double())
        entropies[torch.arange(steps) > last_step] = 0.0
        probs = entropies / entropies.sum()
        for i in range(k):
            row = b * k + i
            t = int(masked.sampled_steps[b, i])
            unmask = batch.completion_mask[b] & (batch.commit_step[b] == t)
            assert torch.equal(unmask, masked.score_mask[row])
            old = batch.commit_logp[b, unmask].double()
            ratio = torch.exp(logp[row, unmask] - old)
            kl = torch.exp(ref[row, unmask] - logp[row, unmask]) \
                - (ref[row, unmask] - logp[row, unmask]) - 1
            per_token = -torch.min(ratio * adv[b], torch.clip(ratio, 1 - eps, 1 + eps) * adv[b])
            per_token = per_token + beta * kl * ratio
            weight = (1.0 / (last_step + 1)) / probs[t]
            loss = loss + (per_token * weight).sum() / (k * B)
    (grad,) = torch.autograd.grad(loss, logp)
    return loss.detach(), grad, adv


@pytest.mark.parametrize("eps,beta", [(0.2, 0.0), (0.05, 0.3)])
def test_agrpo_equals_its_reference_formula(eps, beta):
    k = 3
    lik = LikelihoodConfig(mask_scheme="trajectory", mc_samples=k, step_sampling="entropy")
    algo = AlgorithmConfig(name="agrpo", clip_eps=eps, kl_beta=beta, advantage="mean")
    batch, _ = make_completions(B, G, PROMPT, GEN, seed=13)
    batch = with_trajectory(batch, seed=14)
    masked = TrajectorySampler(lik, 3, TINY.mask_token_id, TINY.eos_token_id).sample(batch, 2)
    rollout = batch.commit_logp.repeat_interleave(k, dim=0).double()
    logp = torch.where(masked.score_mask, _near(rollout, 15), 0.0)
    ref = torch.where(masked.score_mask, _near(rollout, 16), 0.0)
    rewards = _rewards(17)
    loss, grad, adv = _agrpo_reference(logp, ref, masked, batch, rewards, eps, beta, k)
    ours_adv = compute_advantages(rewards, batch.group_ids, B // G, algo)
    assert torch.allclose(ours_adv, adv, rtol=1e-12, atol=1e-12)
    _close(_ours(algo, lik, masked, batch, ours_adv, logp, ref if beta else None, None),
           (loss, grad))
