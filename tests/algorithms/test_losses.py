"""Losses on a toy differentiable log-prob model (single process, no megatron groups)."""

from __future__ import annotations

import pytest
import torch

from rspo_mega.algorithms import (
    ESPOLoss,
    LossInputs,
    RSPOLoss,
    build_loss,
    centering_mean,
    compute_advantages,
    loss_coefficients,
)
from rspo_mega.config.schema import AlgorithmConfig, LikelihoodConfig
from rspo_mega.likelihood import MaskSampler, estimate_elbo
from tests.likelihood._models import TINY, make_completions

torch.set_default_dtype(torch.float32)


def _setup(scheme: str = "coupled", k: int = 2, n: int = 8, g: int = 4, seed: int = 0):
    lik = LikelihoodConfig(mask_scheme=scheme, mc_samples=k)
    batch, rewards = make_completions(n, g, 4, 6, seed=seed)
    masked = MaskSampler(lik, 3, TINY.mask_token_id, TINY.eos_token_id).sample(batch, 0)
    gen = torch.Generator().manual_seed(seed + 1)
    z = torch.randn(masked.num_sequences, masked.seq_length, 5, generator=gen, dtype=torch.float64)
    theta = torch.randn(5, generator=gen, dtype=torch.float64).requires_grad_(True)
    logp_of = lambda th: -torch.nn.functional.softplus(z @ th)  # noqa: E731
    ref = logp_of(torch.randn(5, generator=gen, dtype=torch.float64)).detach()
    old = logp_of(theta.detach() + 0.05 * torch.randn(5, generator=gen, dtype=torch.float64))
    return lik, batch, rewards, masked, theta, logp_of, ref, old.detach()


def _inputs(masked, logp, adv, batch, ref=None, old=None):
    return LossInputs(masked=masked, logp=logp, advantages=adv, group_ids=batch.group_ids,
                      num_groups=int(batch.group_ids.max()) + 1, ref_logp=ref, old_logp=old)


@pytest.mark.parametrize("centering", ["batch", "group", "microbatch", "none"])
@pytest.mark.parametrize("lam", [0.01, 0.7])
def test_rspo_gradient_is_lambda_times_squared_regression_gradient(centering, lam):
    lik, batch, rewards, masked, theta, logp_of, ref, _ = _setup()
    algo = AlgorithmConfig(name="rspo", lambda_=lam, centering=centering, microbatch_completions=3)
    adv = compute_advantages(rewards.double(), batch.group_ids, 2, algo)
    loss = RSPOLoss(algo, lik)(_inputs(masked, logp_of(theta), adv, batch, ref))
    (g_loss,) = torch.autograd.grad(loss.loss, theta)
    # independent: lambda * grad 1/2 mean (dhat - A/lambda)^2, centering mean stop-gradient
    est, est_ref = estimate_elbo(logp_of(theta), masked), estimate_elbo(ref, masked)
    d = (est.elbo - est_ref.elbo) / est.lengths
    center = centering_mean(d, centering, batch.group_ids, 2, 3, None)
    if centering == "none":
        assert not center.any()
    dhat = d - center.detach()
    reg = lam * 0.5 * ((dhat - adv / lam) ** 2).mean()
    (g_reg,) = torch.autograd.grad(reg, theta)
    assert torch.allclose(g_loss, g_reg, rtol=1e-9, atol=1e-12)


def test_rspo_lambda_zero_is_advantage_weighted_elbo_gradient():
    lik, batch, rewards, masked, theta, logp_of, ref, _ = _setup(seed=3)
    algo = AlgorithmConfig(name="rspo", lambda_=0.0)
    adv = compute_advantages(rewards.double(), batch.group_ids, 2, algo)
    loss = RSPOLoss(algo, lik)(_inputs(masked, logp_of(theta), adv, batch, ref))
    (g_loss,) = torch.autograd.grad(loss.loss, theta)
    est = estimate_elbo(logp_of(theta), masked)
    (g_pg,) = torch.autograd.grad(-(adv * est.elbo / est.lengths).mean(), theta)
    assert torch.allclose(g_loss, g_pg, rtol=1e-9, atol=1e-12)


def test_rspo_push_clip_is_a_huber_regression():
    lik, batch, rewards, masked, theta, logp_of, ref, _ = _setup(seed=5)
    lam, bound = 0.7, 0.6
    algo = AlgorithmConfig(name="rspo", lambda_=lam, centering="none", push_clip=bound)
    adv = compute_advantages(rewards.double(), batch.group_ids, 2, algo)
    loss = RSPOLoss(algo, lik)(_inputs(masked, logp_of(theta), adv, batch, ref))
    (g_loss,) = torch.autograd.grad(loss.loss, theta)
    est, est_ref = estimate_elbo(logp_of(theta), masked), estimate_elbo(ref, masked)
    dhat = (est.elbo - est_ref.elbo) / est.lengths
    huber = torch.nn.functional.huber_loss(dhat, adv / lam, delta=bound / lam, reduction="mean")
    (g_huber,) = torch.autograd.grad(lam * huber, theta)
    assert torch.allclose(g_loss, g_huber, rtol=1e-9, atol=1e-12)
    clipped = ((adv - lam * dhat).abs() > bound).double().mean().item()
    assert 0 < clipped < 1  # the bound binds on some completions, not all
    assert loss.metrics.reduce()["rspo/push_clip_frac"] == pytest.approx(clipped)


@pytest.mark.parametrize("name,scheme", [("rspo", "coupled"), ("espo", "stratified"),
                                         ("diffu_grpo", "one_step")])
def test_coefficient_path_gives_the_exact_gradient(name, scheme):
    """The two-pass scheme: grad of sum(coeff * logp(theta)) equals grad of loss(logp(theta))."""
    lik, batch, rewards, masked, theta, logp_of, ref, old = _setup(scheme=scheme, seed=4)
    algo = AlgorithmConfig(name=name, lambda_=0.3, clip_eps=0.02, kl_beta=0.1, advantage="mean")
    adv = compute_advantages(rewards.double(), batch.group_ids, 2, algo)
    loss_fn = build_loss(algo, lik)
    out = loss_fn(_inputs(masked, logp_of(theta), adv, batch, ref, old))
    (g_direct,) = torch.autograd.grad(out.loss, theta)
    out2, coeff = loss_coefficients(loss_fn, _inputs(masked, logp_of(theta).detach(), adv, batch, ref, old))
    (g_coeff,) = torch.autograd.grad((coeff * logp_of(theta)).sum(), theta)
    assert torch.allclose(out.loss, out2.loss)
    assert torch.allclose(g_direct, g_coeff, rtol=1e-9, atol=1e-12)
    assert g_direct.norm() > 0


def test_without_old_logprobs_the_ratio_is_one():
    lik, batch, rewards, masked, theta, logp_of, ref, _ = _setup(seed=7)
    algo = AlgorithmConfig(name="espo", kl_beta=0.0, advantage="mean")
    adv = compute_advantages(rewards.double(), batch.group_ids, 2, algo)
    out = ESPOLoss(algo, lik)(_inputs(masked, logp_of(theta), adv, batch))
    assert torch.allclose(out.loss, -adv.mean())
    assert out.metrics.reduce()["espo/ratio_mean"] == pytest.approx(1.0)


@pytest.mark.parametrize("kind", ["mean", "leave_one_out", "standardized"])
def test_advantages_match_plain_group_statistics(kind):
    rewards = torch.tensor([1.0, 0.0, 0.5, 2.0, 3.0, 1.0, 7.0], dtype=torch.float64)
    groups = torch.tensor([0, 0, 1, 0, 1, 1, 2])  # uneven groups, a singleton, shuffled
    adv = compute_advantages(rewards, groups, 3, AlgorithmConfig(advantage=kind, advantage_eps=1e-4))
    for g in range(3):
        idx = (groups == g).nonzero().flatten()
        r = rewards[idx]
        if len(idx) == 1:
            assert adv[idx].abs().max() == 0
            continue
        base = r - r.mean()
        expect = {"mean": base, "leave_one_out": base * len(r) / (len(r) - 1),
                  "standardized": base / (r.std() + 1e-4)}[kind]
        assert torch.allclose(adv[idx], expect)


def test_metrics_against_advantage_fraction():
    lik, batch, rewards, masked, theta, logp_of, ref, _ = _setup(seed=8)
    algo = AlgorithmConfig(name="rspo", lambda_=0.1)
    adv = torch.tensor([1.0, -1.0, 0.0, 2.0, -0.5, 0.0, 1.0, -1.0], dtype=torch.float64)
    lp = logp_of(theta).detach()
    out = RSPOLoss(algo, lik)(_inputs(masked, lp, adv, batch, ref))
    m = out.metrics.reduce()
    e, er = estimate_elbo(lp, masked), estimate_elbo(ref, masked)
    d = (e.elbo - er.elbo) / e.lengths
    dhat = d - d.mean()
    valid = adv != 0
    expect = (torch.sign(dhat) != torch.sign(adv))[valid].double().mean().item()
    assert m["relative_score/against_advantage_frac"] == pytest.approx(expect)
    assert m["relative_score/std"] == pytest.approx(d.std(unbiased=False).item(), rel=1e-9)
    assert m["rspo/push_mean"] == pytest.approx(
        (adv - 0.1 * dhat).mean().item(), abs=1e-12)


@pytest.mark.parametrize("algo,lik,key", [
    (AlgorithmConfig(lambda_=-0.1), LikelihoodConfig(), "algorithm.lambda_"),
    (AlgorithmConfig(centering="prompt"), LikelihoodConfig(), "algorithm.centering"),
    (AlgorithmConfig(advantage="rank"), LikelihoodConfig(), "algorithm.advantage"),
    (AlgorithmConfig(clip_eps=0.0), LikelihoodConfig(), "algorithm.clip_eps"),
    (AlgorithmConfig(kl_beta=-1.0), LikelihoodConfig(), "algorithm.kl_beta"),
    (AlgorithmConfig(push_clip=0.0), LikelihoodConfig(), "algorithm.push_clip"),
    (AlgorithmConfig(inner_updates=0), LikelihoodConfig(), "algorithm.inner_updates"),
    (AlgorithmConfig(name="ppo"), LikelihoodConfig(), "algorithm.name"),
    (AlgorithmConfig(name="diffu_grpo"), LikelihoodConfig(), "likelihood.mask_scheme"),
    (AlgorithmConfig(centering="microbatch", microbatch_completions=5), LikelihoodConfig(),
     "algorithm.microbatch_completions"),
    (AlgorithmConfig(), LikelihoodConfig(mc_samples=0), "likelihood.mc_samples"),
    (AlgorithmConfig(), LikelihoodConfig(mask_scheme="random"), "likelihood.mask_scheme"),
])
def test_bad_algorithm_config_names_the_key(algo, lik, key):
    """The loader (a field's rules) or validate_config (rules between fields) names the key."""
    from dataclasses import asdict

    from rspo_mega.config import ConfigError
    from rspo_mega.setup import run_config_from_dict, validate_run

    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        validate_run(run_config_from_dict({"algorithm": asdict(algo), "likelihood": asdict(lik)}))


@pytest.mark.parametrize("name,scheme", [("rspo", "bernoulli"), ("espo", "coupled"),
                                         ("diffu_grpo", "one_step")])
def test_fresh_masks_per_update_suit_every_elbo_loss(name, scheme):
    """Ratio losses too: the old policy scores each update's masks (training.update_loop)."""
    from dataclasses import asdict

    from rspo_mega.setup import run_config_from_dict, validate_run

    algo = AlgorithmConfig(name=name, inner_updates=4)
    lik = LikelihoodConfig(mask_scheme=scheme, fresh_masks_per_update=True)
    validate_run(run_config_from_dict({"algorithm": asdict(algo), "likelihood": asdict(lik)}))


def test_rspo_without_reference_is_an_error():
    lik, batch, rewards, masked, theta, logp_of, _, _ = _setup(seed=9)
    with pytest.raises(ValueError, match="ref_logp"):
        RSPOLoss(AlgorithmConfig(), lik)(_inputs(masked, logp_of(theta), rewards.double(), batch))


def test_losses_declare_the_run_they_need():
    """RL or not, the reference and the mask schemes: the registry's declarations, read by the
    setup step's rules, the planner and the trainer (no test of a loss's name)."""
    from rspo_mega.algorithms import LOSSES, is_rl, needs_reference

    assert {n for n in LOSSES if is_rl(AlgorithmConfig(name=n))} == set(LOSSES) - {"sft"}
    with_kl = {n: needs_reference(AlgorithmConfig(name=n, kl_beta=0.1)) for n in LOSSES}
    without = {n: needs_reference(AlgorithmConfig(name=n, kl_beta=0.0)) for n in LOSSES}
    assert with_kl == {"rspo": True, "espo": True, "diffu_grpo": True, "agrpo": True, "sft": False}
    assert without == {"rspo": True, "espo": False, "diffu_grpo": False, "agrpo": False,
                       "sft": False}
    assert LOSSES["agrpo"].mask_schemes == ("trajectory",)
    assert all("trajectory" not in loss.mask_schemes for n, loss in LOSSES.items() if n != "agrpo")
