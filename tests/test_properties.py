"""Property tests (hypothesis) of identities that hold for every valid input.

Each property is a mathematical fact independent of the implementation: KL ≥ 0 with equality only at
equal arguments (K1, K2, K6), bin probabilities summing to 1 (K5), the posterior mean and variance laws
(P1: E[μ̃] = √ᾱ_{t−1}x_0 and total variance), β̃_t ≤ β_t, SNR monotone (S7), respacing idempotent and
composable (S8), well-formed timestep lists (S9), invertible conversions (P3), the DDIM marginal (P6/P7),
zero-terminal rescale (Lin et al.). LDMKIT_HYPOTHESIS_EXAMPLES raises the example count for a deeper run.
"""

from __future__ import annotations

import math
import os

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st
from independent import alpha_bar_indep

from ldmkit.reference import kl, posterior, schedules
from ldmkit.reference.schedules import Schedule

N_EXAMPLES = int(os.environ.get("LDMKIT_HYPOTHESIS_EXAMPLES", "60"))
SETTINGS = settings(max_examples=N_EXAMPLES, deadline=None)

finite = st.floats(-5.0, 5.0, allow_nan=False, allow_infinity=False)
logvars = st.floats(-6.0, 4.0, allow_nan=False, allow_infinity=False)
betas_st = st.lists(st.floats(1e-5, 0.6, allow_nan=False), min_size=2, max_size=40).map(np.array)


@st.composite
def schedule_and_t(draw, low=1):
    b = draw(betas_st)
    t = draw(st.integers(low, b.size))
    return Schedule.from_betas(b), t


# ------------------------------------------------------------------------------------------------ K1, K2, K6
@SETTINGS
@given(finite, logvars, finite, logvars)
def test_K1_kl_nonnegative_and_zero_only_at_equal_arguments(m1, lv1, m2, lv2):
    """K1: KL(p ‖ q) ≥ 0, = 0 when p = q, > 0 when the means or variances differ by ≥ 1e-3."""
    d = float(kl.normal_kl(m1, lv1, m2, lv2))
    assert d >= -1e-12
    assert float(kl.normal_kl(m1, lv1, m1, lv1)) == 0.0
    if abs(m1 - m2) >= 1e-3 or abs(lv1 - lv2) >= 1e-3:
        assert d > 0


@SETTINGS
@given(st.integers(0, 2**32 - 1), st.integers(1, 5))
def test_K2_full_kl_nonnegative_zero_at_equal(seed, d):
    """K2: KL ≥ 0 for random SPD covariances; = 0 for identical arguments."""
    rng = np.random.default_rng(seed)
    A, B = rng.standard_normal((d, d)), rng.standard_normal((d, d))
    c1, c2 = A @ A.T + 0.1 * np.eye(d), B @ B.T + 0.1 * np.eye(d)
    mu1, mu2 = rng.standard_normal(d), rng.standard_normal(d)
    assert kl.gaussian_kl_full(mu1, c1, mu2, c2) > 0
    assert abs(kl.gaussian_kl_full(mu1, c1, mu1, c1)) < 1e-9


@SETTINGS
@given(st.integers(0, 2**32 - 1), st.integers(2, 12))
def test_K6_discrete_kl_gibbs_inequality(seed, k):
    """K6: KL(p ‖ q) = H(p, q) − H(p) ≥ 0, and = 0 for p = q."""
    rng = np.random.default_rng(seed)
    p, q = rng.dirichlet(np.ones(k)), rng.dirichlet(np.ones(k))
    d = float(kl.kl_discrete(p, q))
    assert d >= -1e-12
    assert abs(d - float(kl.cross_entropy(p, q) - kl.entropy(p))) < 1e-10
    assert abs(float(kl.kl_discrete(p, p))) < 1e-15


# ------------------------------------------------------------------------------------------------ K5
@SETTINGS
@given(st.floats(-2.0, 2.0), st.floats(-7.0, 1.5), st.integers(2, 300))
def test_K5_bin_probabilities_sum_to_one(mean, log_scale, levels):
    """K5: the K bin probabilities of the discretised Gaussian sum to 1 for any mean and scale, and each
    log-probability is ≤ 0."""
    x = -1 + 2 * np.arange(levels) / (levels - 1)
    lp = kl.discretized_gaussian_log_likelihood(x, mean, log_scale, levels=levels)
    assert np.all(lp <= 1e-15)
    assert abs(math.fsum(np.exp(lp)) - 1.0) < 1e-9


# ------------------------------------------------------------------------------------------------ P1, S6, S7
@SETTINGS
@given(schedule_and_t(low=2), finite)
def test_P1_posterior_mean_and_variance_laws(st_pair, x0):
    """P1: coefficients are positive; at x_t = √ᾱ_t x_0 the posterior mean is √ᾱ_{t−1} x_0 (E over x_t of
    μ̃ is the prior mean); law of total variance β̃_t + coef2²(1 − ᾱ_t) = 1 − ᾱ_{t−1}; β̃_t ≤ β_t."""
    sched, t = st_pair
    ab = alpha_bar_indep(sched.betas[1:])
    c1, c2 = sched.posterior_mean_coef1[t], sched.posterior_mean_coef2[t]
    assert c1 > 0 and c2 > 0
    mean, var, _ = posterior.q_posterior(np.array([x0]), np.array([math.sqrt(ab[t]) * x0]), t, sched)
    assert abs(mean[0] - math.sqrt(ab[t - 1]) * x0) <= 1e-9 * (1 + abs(x0))
    assert abs(float(var) + c2**2 * (1 - ab[t]) - (1 - ab[t - 1])) <= 1e-9
    assert float(var) <= sched.betas[t] * (1 + 1e-12)


@SETTINGS
@given(betas_st)
def test_S7_snr_strictly_decreasing(b):
    """S7: SNR(t) = ᾱ_t/(1 − ᾱ_t) is strictly decreasing in t for any betas in (0, 1)."""
    sched = Schedule.from_betas(b)
    assert np.all(np.diff(sched.snr) < 0)
    assert np.all(np.diff(sched.log_snr) < 0)


# ------------------------------------------------------------------------------------------------ S8, S9
@SETTINGS
@given(betas_st, st.data())
def test_S8_respace_idempotent_and_composes(b, data):
    """S8: respacing by all timesteps is the identity; respacing twice is respacing by the composition."""
    sched = Schedule.from_betas(b)
    T = sched.T
    full = schedules.respace(sched, np.arange(1, T + 1))
    np.testing.assert_allclose(full.alpha_bars, sched.alpha_bars, rtol=1e-11)
    tau = np.array(sorted(data.draw(st.sets(st.integers(1, T), min_size=1, max_size=T))))
    inner = np.array(sorted(data.draw(st.sets(st.integers(1, tau.size), min_size=1, max_size=tau.size))))
    twice = schedules.respace(schedules.respace(sched, tau), inner)
    once = schedules.respace(sched, tau[inner - 1])
    np.testing.assert_array_equal(twice.timestep_map, once.timestep_map)
    np.testing.assert_allclose(twice.alpha_bars, once.alpha_bars, rtol=1e-11)
    np.testing.assert_allclose(once.alpha_bars[1:], alpha_bar_indep(b)[tau[inner - 1]], rtol=1e-10)


@SETTINGS
@given(st.integers(1, 2000), st.data(), st.sampled_from(["linspace", "leading", "trailing"]))
def test_S9_timesteps_well_formed(T, data, spacing):
    """S9: N distinct math timesteps in 1..T, strictly descending; trailing (and linspace for N ≥ 2) starts
    at t = T; linspace and leading end at t = 1 (k = 0). (diffusers' linspace with N = 1 is k = [0].)"""
    n = data.draw(st.integers(1, T))
    t = schedules.timesteps(n, T, spacing)
    assert t.shape == (n,)
    assert np.all(np.diff(t) < 0)
    assert t.min() >= 1 and t.max() <= T
    if spacing == "trailing" or (spacing == "linspace" and n >= 2):
        assert t[0] == T
    if spacing in ("linspace", "leading"):
        assert t[-1] == 1


# ------------------------------------------------------------------------------------------------ P3
@SETTINGS
@given(betas_st, st.integers(0, 2**32 - 1))
def test_P3_conversions_invertible(b, seed):
    """P3/P5: x0 → ε → x0, ε → v → ε, v → x0 and score → ε recover their inputs for any schedule and t."""
    sched = Schedule.from_betas(b)
    rng = np.random.default_rng(seed)
    B = 5
    t = rng.integers(1, sched.T + 1, size=B)
    x0, eps = rng.standard_normal((B, 3)), rng.standard_normal((B, 3))
    ab = alpha_bar_indep(b)[t][:, None]
    xt = np.sqrt(ab) * x0 + np.sqrt(1 - ab) * eps
    scale = 1 / np.sqrt(ab)  # x0 from ε loses about this factor of precision
    assert np.all(np.abs(posterior.x0_from_eps(xt, t, eps, sched) - x0) < 1e-12 * scale * 10)
    assert np.all(np.abs(posterior.eps_from_x0(xt, t, x0, sched) - eps) < 1e-12 / np.sqrt(1 - ab) * 10)
    v = posterior.v_from_x0(xt, t, x0, sched)
    np.testing.assert_allclose(posterior.eps_from_v(xt, t, v, sched), eps, rtol=1e-9, atol=1e-9)
    np.testing.assert_allclose(posterior.x0_from_v(xt, t, v, sched), x0, rtol=1e-9, atol=1e-9)
    s = posterior.score_from_eps(xt, t, eps, sched)
    np.testing.assert_allclose(posterior.eps_from_score(xt, t, s, sched), eps, rtol=1e-12, atol=1e-12)


# ------------------------------------------------------------------------------------------------ P6, P7
@SETTINGS
@given(schedule_and_t(low=1), st.floats(0.0, 1.0), st.data())
def test_P6_P7_ddim_sigma_admissible_and_marginal_kept(st_pair, eta, data):
    """P7/P6: σ_t(η)² ≤ 1 − ᾱ_{t_prev} for η ≤ 1; with it, ζ + ξ√ᾱ_t = √ᾱ_{t_prev} and
    ξ²(1 − ᾱ_t) + σ² = 1 − ᾱ_{t_prev} (the marginal q(x_{t_prev} given x_0) is kept); η = 1 with
    t_prev = t − 1 gives β̃_t."""
    sched, t = st_pair
    tp = data.draw(st.integers(0, t - 1))
    ab = alpha_bar_indep(sched.betas[1:])
    sig = float(posterior.ddim_sigma(t, tp, eta, sched))
    assert sig**2 <= (1 - ab[tp]) * (1 + 1e-12) + 1e-300
    zeta = posterior.ddim_posterior(np.ones(1), np.zeros(1), t, tp, sig, sched)[0][0]
    xi = posterior.ddim_posterior(np.zeros(1), np.ones(1), t, tp, sig, sched)[0][0]
    assert abs(zeta + xi * math.sqrt(ab[t]) - math.sqrt(ab[tp])) < 1e-9
    assert abs(xi**2 * (1 - ab[t]) + sig**2 - (1 - ab[tp])) < 1e-9
    s1 = float(posterior.ddim_sigma(t, t - 1, 1.0, sched))
    assert abs(s1**2 - (1 - ab[t - 1]) / (1 - ab[t]) * sched.betas[t]) <= 1e-10 * sched.betas[t]


# ------------------------------------------------------------------------------------------------ zero SNR
@SETTINGS
@given(betas_st)
def test_zero_terminal_snr_rescale_properties(b):
    """Lin et al.'s rescale on any betas: ᾱ_T = 0 exactly, β_1 unchanged, the other betas stay in (0, 1)."""
    nb = schedules.rescale_zero_terminal_snr(b)
    sched = Schedule.from_betas(nb)
    assert sched.alpha_bars[-1] == 0.0
    assert abs(nb[0] - b[0]) <= 1e-9 * b[0]
    assert np.all((nb[:-1] > 0) & (nb[:-1] < 1))


# ------------------------------------------------------------------------------------------------ P2
@SETTINGS
@given(st.integers(0, 2**32 - 1), st.integers(1, 4))
def test_P2_gaussian_product_symmetric_and_shrinks(seed, d):
    """P2: the product is symmetric in its factors, and its covariance is ≤ each factor's (Loewner order)."""
    rng = np.random.default_rng(seed)
    A, B = rng.standard_normal((d, d)), rng.standard_normal((d, d))
    c1, c2 = A @ A.T + 0.2 * np.eye(d), B @ B.T + 0.2 * np.eye(d)
    m1, m2 = rng.standard_normal(d), rng.standard_normal(d)
    mu, cov = posterior.gaussian_product(m1, c1, m2, c2)
    mu_r, cov_r = posterior.gaussian_product(m2, c2, m1, c1)
    np.testing.assert_allclose(mu, mu_r, rtol=1e-8, atol=1e-10)
    np.testing.assert_allclose(cov, cov_r, rtol=1e-8, atol=1e-10)
    assert np.linalg.eigvalsh(c1 - cov).min() > -1e-9
    assert np.linalg.eigvalsh(c2 - cov).min() > -1e-9
