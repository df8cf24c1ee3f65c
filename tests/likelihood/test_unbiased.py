"""Unbiasedness by enumeration: the exact mean of every estimator equals the exact ELBO.

Toy model: ``logp_i(S) = -softplus(W_i . 1[S] + c_i)``, the log-prob of token i given the set S
of masked positions (so it depends on *which* positions are masked). The exact ELBO is computed in
the exact-count form; each estimator's expectation is computed by enumerating its randomness
(counts, subsets, offsets; for ``bernoulli`` a Gauss-Legendre quadrature over t, exact for this
polynomial integrand) and building the masks and weights with the library's own functions.
"""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch

from rspo_mega.config.schema import LikelihoodConfig
from rspo_mega.likelihood import MaskSampler, estimate_elbo
from rspo_mega.likelihood.masks import (
    bernoulli_unit,
    coupled_units,
    exact_count_unit,
    stratified_counts,
)
from tests.likelihood._models import TINY, make_completions


def _toy(length: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed + length)
    w = torch.randn(length, length, generator=g, dtype=torch.float64)
    c = torch.randn(length, generator=g, dtype=torch.float64)
    return lambda mask: -torch.nn.functional.softplus(w @ mask.double() + c)


def _value(units, f) -> float:
    return sum(w * float(f(m)[m].sum()) for m, w in units if w != 0.0)


def _subsets(length: int, count: int):
    for s in itertools.combinations(range(length), count):
        rest = [i for i in range(length) if i not in s]
        yield torch.tensor(list(s) + rest, dtype=torch.long)


def exact_elbo(length: int, f) -> float:
    total = 0.0
    for m in range(1, length + 1):
        for order in _subsets(length, m):
            mask = torch.zeros(length, dtype=torch.bool)
            mask[order[:m]] = True
            total += (1.0 / length) * (length / m) / math.comb(length, m) * float(f(mask)[mask].sum())
    return total


def mean_coupled(length: int, f) -> float:
    return sum(
        _value(coupled_units(length, l, order), f) / ((length + 1) * math.comb(length, l))
        for l in range(length + 1) for order in _subsets(length, l)
    )


def mean_stratified(length: int, k: int, f) -> float:
    total = 0.0
    for offset in range(length):
        for l in stratified_counts(length, k, offset):
            for order in _subsets(length, l):
                total += _value([exact_count_unit(length, l, order)], f) / (
                    length * k * math.comb(length, l))
    return total


def mean_bernoulli(length: int, f) -> float:
    nodes, weights = np.polynomial.legendre.leggauss(16)
    total = 0.0
    for x, wq in zip(nodes, weights):
        t = 0.5 * (x + 1.0)
        for bits in range(1 << length):
            mask = torch.tensor([(bits >> i) & 1 == 1 for i in range(length)])
            m = int(mask.sum())
            p = t ** m * (1 - t) ** (length - m)
            uniforms = torch.where(mask, 0.0, 1.0).double()  # draws that produce this mask
            total += 0.5 * wq * p * _value([bernoulli_unit(t, uniforms)], f)
    return total


@pytest.mark.parametrize("length", [1, 2, 3, 5, 6])
def test_estimators_are_unbiased_by_enumeration(length):
    f = _toy(length)
    exact = exact_elbo(length, f)
    assert mean_coupled(length, f) == pytest.approx(exact, rel=1e-10, abs=1e-12)
    assert mean_bernoulli(length, f) == pytest.approx(exact, rel=1e-10, abs=1e-12)
    for k in (1, 2, 3, 4):
        assert mean_stratified(length, k, f) == pytest.approx(exact, rel=1e-10, abs=1e-12)
    assert mean_coupled(length, f) == pytest.approx(mean_stratified(length, 2, f), rel=1e-10)


def test_exact_elbo_matches_the_continuous_time_form():
    length = 4
    f = _toy(length, seed=3)
    total = 0.0  # int_0^1 (1/t) t^m (1-t)^(L-m) dt = (m-1)! (L-m)! / L!
    for bits in range(1, 1 << length):
        mask = torch.tensor([(bits >> i) & 1 == 1 for i in range(length)])
        m = int(mask.sum())
        coef = math.factorial(m - 1) * math.factorial(length - m) / math.factorial(length)
        total += coef * float(f(mask)[mask].sum())
    assert exact_elbo(length, f) == pytest.approx(total, rel=1e-12)


@pytest.mark.parametrize("scheme", ["coupled", "stratified", "bernoulli"])
def test_sampler_plus_estimate_elbo_is_unbiased_monte_carlo(scheme):
    """End to end through MaskSampler and estimate_elbo: the MC mean over many uids lands within
    4.5 standard errors of the exact ELBO."""
    prompt, length, n = 3, 5, 1500
    batch, _ = make_completions(n, 1, prompt, length, seed=9)
    cfg = LikelihoodConfig(mask_scheme=scheme, mc_samples=2, bernoulli_eps=0.0)
    masked = MaskSampler(cfg, 5, TINY.mask_token_id, TINY.eos_token_id).sample(batch, 1)
    f = _toy(length, seed=1)
    comp = masked.input_ids[:, prompt:] == TINY.mask_token_id  # [N, L]
    logp = torch.zeros(masked.num_sequences, prompt + length, dtype=torch.float64)
    for n_i in range(masked.num_sequences):
        logp[n_i, prompt:] = f(comp[n_i])
    est = estimate_elbo(logp, masked)
    exact = exact_elbo(length, f)
    mean, se = est.elbo.mean().item(), est.elbo.std().item() / n ** 0.5
    assert abs(mean - exact) < 4.5 * se, (mean, exact, se)
    assert torch.allclose(est.score, est.elbo / length)
    assert (est.spread >= 0).all()


def test_bernoulli_eps_truncation_bias_is_small_and_documented():
    # With eps > 0, t ~ U(eps, 1): the O(eps) bias of LLaDA/MDLM. Check it stays O(eps).
    length, eps = 4, 1e-3
    f = _toy(length, seed=2)
    nodes, weights = np.polynomial.legendre.leggauss(16)
    total = 0.0
    for x, wq in zip(nodes, weights):
        t = eps + (1 - eps) * 0.5 * (x + 1.0)
        for bits in range(1, 1 << length):
            mask = torch.tensor([(bits >> i) & 1 == 1 for i in range(length)])
            m = int(mask.sum())
            p = t ** m * (1 - t) ** (length - m)
            total += 0.5 * wq * p * _value([bernoulli_unit(t, torch.where(mask, 0.0, 1.0))], f)
    exact = exact_elbo(length, f)
    assert abs(total - exact) < 10 * eps * abs(exact)
