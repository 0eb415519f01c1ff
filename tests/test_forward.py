"""The forward process (docs/formulas.md: F1–F4, S12).

Monte Carlo checks use a fixed seed and a tolerance of 5 standard errors: for a sample mean of n draws
of variance v the SE is √(v/n); for a sample variance it is v·√(2/(n−1)) (Gaussian data).
"""

from __future__ import annotations

import math

import numpy as np
import pytest
from independent import alpha_bar_indep

from ldmkit.reference import forward, kl, schedules
from ldmkit.reference.schedules import Schedule


def assert_moments(x, mean, var, axis=-1):
    """Sample mean and variance of x along ``axis`` within 5 SE of (mean, var)."""
    n = x.shape[axis]
    m, v = x.mean(axis=axis), x.var(axis=axis, ddof=1)
    mean, var = np.broadcast_to(mean, m.shape), np.broadcast_to(var, v.shape)
    assert np.all(np.abs(m - mean) < 5 * np.sqrt(var / n)), (m, mean)
    assert np.all(np.abs(v - var) < 5 * var * np.sqrt(2 / (n - 1))), (v, var)


@pytest.mark.parametrize("betas", [schedules.linear_betas(50, 1e-3, 0.1), schedules.cosine_betas(50)],
                         ids=["linear50", "cosine50"])
def test_F1_chain_of_q_steps_has_F2_marginal(betas):
    """F1 → F2: T applications of q_step from a fixed x_0 give q(x_t given x_0) = N(√ᾱ_t x_0, (1−ᾱ_t))
    at every t (MC, n = 100k per coordinate, 5 SE), with ᾱ_t computed here from the betas."""
    sched = Schedule.from_betas(betas)
    ab = alpha_bar_indep(betas)
    rng = np.random.default_rng(1)
    x0 = np.array([-1.5, 0.0, 2.0])
    n = 100_000
    x = np.repeat(x0[:, None], n, axis=1)
    for t in range(1, sched.T + 1):
        x = forward.q_step(x, t, rng, sched)
        if t in (1, 7, 25, 49, 50):
            assert_moments(x, math.sqrt(ab[t]) * x0, 1 - ab[t])


def test_F1_q_step_formula_with_explicit_noise_and_batch_t():
    """F1: x_t = √(1−β_t) x_{t−1} + √β_t ε, per-example t broadcast over (B, C, H, W)."""
    sched = Schedule.named("cosine", 100)
    rng = np.random.default_rng(2)
    x = rng.standard_normal((3, 2, 4, 4))
    eps = rng.standard_normal(x.shape)
    t = np.array([1, 50, 100])
    out = forward.q_step(x, t, eps, sched)
    b = schedules.cosine_betas(100)[t - 1][:, None, None, None]
    np.testing.assert_allclose(out, np.sqrt(1 - b) * x + np.sqrt(b) * eps, rtol=1e-13)


def test_F2_q_sample_moments_per_example_t():
    """F2: q_sample with per-example t gives rows with mean √ᾱ_t x_0 and variance 1 − ᾱ_t (MC, 5 SE)."""
    sched = Schedule.named("linear", 1000)
    ab = alpha_bar_indep(schedules.linear_betas(1000))
    rng = np.random.default_rng(3)
    t = np.array([1, 10, 488, 1000])
    x0 = np.array([0.5, -1.0, 2.0, 1.0])
    n = 200_000
    xt = forward.q_sample(np.repeat(x0[:, None], n, axis=1), t, rng, sched)
    assert_moments(xt, np.sqrt(ab[t]) * x0, 1 - ab[t])
    # explicit noise: the closed form
    eps = rng.standard_normal((4, 5))
    out = forward.q_sample(np.repeat(x0[:, None], 5, axis=1), t, eps, sched)
    np.testing.assert_allclose(out, np.sqrt(ab[t])[:, None] * x0[:, None] + np.sqrt(1 - ab[t])[:, None] * eps,
                               rtol=1e-11)
    # t = 0 is the data itself (ᾱ_0 = 1)
    np.testing.assert_array_equal(forward.q_sample(x0, 0, np.ones(4), sched), x0)


def test_F2_q_mean_variance_closed_form():
    """F2: q_mean_variance returns (√ᾱ_t x_0, 1 − ᾱ_t, log(1 − ᾱ_t)), log −∞ at t = 0."""
    sched = Schedule.named("scaled_linear", 1000)
    ab = alpha_bar_indep(schedules.scaled_linear_betas(1000))
    x0 = np.arange(12.0).reshape(3, 4) - 5
    t = np.array([0, 1, 999])
    mean, var, logvar = forward.q_mean_variance(x0, t, sched)
    np.testing.assert_allclose(mean, np.sqrt(ab[t])[:, None] * x0, rtol=1e-12)
    np.testing.assert_allclose(np.broadcast_to(var, x0.shape), np.broadcast_to((1 - ab[t])[:, None], x0.shape),
                               rtol=1e-10)
    assert logvar[0, 0] == -np.inf
    np.testing.assert_allclose(logvar[1:, 0], np.log1p(-ab[t[1:]]), rtol=1e-10)


@pytest.mark.parametrize("name", ["linear", "cosine", "su"])
def test_F3_su_merged_noise_variance_equals_one_minus_alpha_bar(name):
    """F3: the variance of Su's merged noise Σ_i (α_t⋯α_{i+1})β_i ε_i (Su eq. 1.3) is 1 − ᾱ_t(Su)² =
    1 − DDPM ᾱ_t (Su eq. 1.4), for every t = 0..T."""
    T = 200
    sched = Schedule.named(name, T)
    ab = alpha_bar_indep(sched.betas[1:])
    got = np.array([schedules.su_merged_noise_variance(sched, t) for t in range(T + 1)])
    np.testing.assert_allclose(got, 1 - ab, rtol=1e-10, atol=1e-15)
    big = Schedule.named(name, 1000)
    ab_big = alpha_bar_indep(big.betas[1:])
    for t in (1, 500, 1000):
        assert schedules.su_merged_noise_variance(big, t) == pytest.approx(1 - ab_big[t], rel=1e-10)


def test_F3_su_merged_noise_monte_carlo():
    """F3: simulate Su's sum of t independent Gaussians with his weights and check its variance (5 SE)."""
    sched = Schedule.named("su", 30)
    a_su, b_su, ab_su, _ = schedules.su_from_ddpm(sched)
    rng = np.random.default_rng(4)
    n, t = 200_000, 30
    total = np.zeros(n)
    for i in range(1, t + 1):
        total += np.prod(a_su[i + 1 : t + 1]) * b_su[i] * rng.standard_normal(n)
    assert_moments(total, 0.0, 1 - ab_su[t] ** 2)
    assert schedules.su_merged_noise_variance(sched, t) == pytest.approx(1 - ab_su[t] ** 2, rel=1e-12)


def _prior_kl_indep(x0, ab):
    """KL(N(√ᾱ x0, 1−ᾱ) ‖ N(0, 1)) by the textbook formula log(σ_q/σ_p) + (σ_p² + (μ_p−μ_q)²)/(2σ_q²) − ½."""
    sp2 = 1 - ab
    return np.log(1.0 / np.sqrt(sp2)) + (sp2 + ab * x0**2) / 2 - 0.5


@pytest.mark.parametrize("sched", [Schedule.named("linear", 1000),
                                   Schedule.from_betas(schedules.linear_betas(10, 0.01, 0.2))],
                         ids=["linear1000", "linear10"])
def test_F4_prior_kl_against_K1_and_monte_carlo(sched):
    """F4: L_T = KL(q(x_T given x_0) ‖ N(0, I)) equals K1 with p = N(0, 1), the textbook formula, and a
    Monte Carlo estimate E_q[log q − log p] (n = 200k, 5 SE)."""
    ab = alpha_bar_indep(sched.betas[1:])[-1]
    x0 = np.array([-1.0, 0.0, 0.3, 2.0])
    got = forward.prior_kl(x0, sched)
    np.testing.assert_allclose(got, _prior_kl_indep(x0, ab), rtol=1e-9, atol=1e-14)
    k1 = kl.normal_kl(math.sqrt(ab) * x0, math.log(1 - ab), 0.0, 0.0)
    np.testing.assert_allclose(got, k1, rtol=1e-9, atol=1e-14)
    rng = np.random.default_rng(5)
    n = 200_000
    for i, x in enumerate(x0):
        mu, var = math.sqrt(ab) * x, 1 - ab
        xs = mu + math.sqrt(var) * rng.standard_normal(n)
        lr = (-0.5 * np.log(2 * np.pi * var) - 0.5 * (xs - mu) ** 2 / var) - (-0.5 * np.log(2 * np.pi) - 0.5 * xs**2)
        se = lr.std(ddof=1) / math.sqrt(n)
        assert abs(lr.mean() - got[i]) < 5 * se + 1e-15
    # a zero-terminal-SNR schedule ends at exactly N(0, I): L_T = 0
    z = Schedule.from_betas(schedules.rescale_zero_terminal_snr(schedules.linear_betas(1000)))
    np.testing.assert_array_equal(forward.prior_kl(x0, z), 0.0)


def test_S12_random_walk_q_sample_per_example_t():
    """S12: random_walk_q_sample with per-example t: row variance t, mean x_0 (MC, 5 SE)."""
    rng = np.random.default_rng(6)
    t = np.array([0.0, 1.0, 4.0, 30.0])
    n = 100_000
    x = forward.random_walk_q_sample(np.ones((4, n)), t, rng)
    np.testing.assert_array_equal(x[0], 1.0)
    assert_moments(x[1:], 1.0, t[1:])
