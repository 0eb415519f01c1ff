"""Posteriors and parameterisations (docs/formulas.md: P1–P8; P9 is in test_analytic.py).

Grid checks compute a posterior by Bayes' rule on a fine 1-D grid (prior density × likelihood, normalised
numerically); a uniform grid with ≥ 25 points per posterior standard deviation over ±12 SD integrates a
Gaussian to near machine precision, so the tolerance is rtol 1e-7. Monte Carlo checks use 5 standard errors.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
from independent import alpha_bar_indep, log_normal

from ldmkit.reference import posterior, schedules
from ldmkit.reference.schedules import Schedule

LINEAR = Schedule.named("linear", 1000)
COSINE = Schedule.named("cosine", 1000)


def grid_moments(log_density, lo, hi, h):
    """Mean and variance of the density ∝ exp(log_density) on a uniform grid of step h over [lo, hi]."""
    x = np.arange(lo, hi + h, h)
    lp = log_density(x)
    w = np.exp(lp - lp.max())
    w /= w.sum()
    m = np.sum(w * x)
    return m, np.sum(w * (x - m) ** 2)


def grid_bayes(m1, v1, m2, v2):
    """Posterior moments of a N(m1, v1) prior times a likelihood that, as a function of x, is ∝ N(x; m2, v2).
    The posterior lies between m1 and m2 with SD ≤ min SD, so the grid spans that ±12·min SD."""
    s = math.sqrt(min(v1, v2))
    return grid_moments(lambda x: log_normal(x, m1, v1) + log_normal(x, m2, v2),
                        min(m1, m2) - 12 * s, max(m1, m2) + 12 * s, s / 40)


# ------------------------------------------------------------------------------------------------ P1
@pytest.mark.parametrize(("sched", "t"), [(LINEAR, 2), (LINEAR, 3), (LINEAR, 50), (LINEAR, 488), (LINEAR, 1000),
                                          (COSINE, 2), (COSINE, 500), (COSINE, 999), (COSINE, 1000)])
def test_P1_q_posterior_equals_grid_bayes(sched, t):
    """P1: q(x_{t−1} given x_t, x_0) ∝ q(x_{t−1} given x_0)·q(x_t given x_{t−1}), computed on a 1-D grid:
    prior N(√ᾱ_{t−1}x_0, 1−ᾱ_{t−1}), likelihood N(x_t; √α_t x_{t−1}, β_t) = N(x_{t−1}; x_t/√α_t, β_t/α_t)/√α_t."""
    ab = alpha_bar_indep(sched.betas[1:])
    beta = sched.betas[t]
    rng = np.random.default_rng(t)
    for x0 in (-0.8, 1.3):
        xt = math.sqrt(ab[t]) * x0 + math.sqrt(1 - ab[t]) * rng.standard_normal()
        m_grid, v_grid = grid_bayes(math.sqrt(ab[t - 1]) * x0, 1 - ab[t - 1],
                                    xt / math.sqrt(1 - beta), beta / (1 - beta))
        mean, var, logvar = posterior.q_posterior(np.array([x0]), np.array([xt]), t, sched)
        assert mean[0] == pytest.approx(m_grid, rel=1e-7, abs=1e-9)
        assert var == pytest.approx(v_grid, rel=1e-7)
        assert logvar == pytest.approx(math.log(v_grid), abs=1e-7)


def test_P1_q_posterior_t1_is_x0_and_batch_shapes():
    """P1: at t = 1 the posterior of x_0 is x_0 itself (β̃_1 = 0); per-example t over NCHW matches the
    closed form written here."""
    rng = np.random.default_rng(0)
    x0 = rng.standard_normal((4, 2, 3, 3))
    xt = rng.standard_normal(x0.shape)
    mean, var, _ = posterior.q_posterior(x0, xt, 1, LINEAR)
    np.testing.assert_allclose(mean, x0, rtol=1e-12)
    assert var == 0.0
    t = np.array([1, 2, 300, 1000])
    ab = alpha_bar_indep(schedules.linear_betas(1000))
    b = np.concatenate([[0.0], schedules.linear_betas(1000)])
    c1 = np.sqrt(ab[t - 1]) * b[t] / (1 - ab[t])
    c2 = np.sqrt(1 - b[t]) * (1 - ab[t - 1]) / (1 - ab[t])
    mean, var, _ = posterior.q_posterior(x0, xt, t, LINEAR)
    r = (slice(None), None, None, None)
    np.testing.assert_allclose(mean, c1[r] * x0 + c2[r] * xt, rtol=1e-10)
    np.testing.assert_allclose(var.reshape(-1), (1 - ab[t - 1]) / (1 - ab[t]) * b[t], rtol=1e-10)


# ------------------------------------------------------------------------------------------------ P2
def test_P2_gaussian_product_1d_against_grid():
    """P2: the product N(μ₁, v₁)·N(μ₂, v₂), normalised on a grid, has the moments gaussian_product gives."""
    for m1, v1, m2, v2 in [(0.0, 1.0, 2.0, 0.5), (-3.0, 0.01, 1.0, 4.0), (5.0, 2.0, 5.0, 2.0)]:
        mu, cov = posterior.gaussian_product(np.array([m1]), np.array([[v1]]), np.array([m2]), np.array([[v2]]))
        m_grid, v_grid = grid_bayes(m1, v1, m2, v2)
        assert mu[0] == pytest.approx(m_grid, rel=1e-8, abs=1e-10)
        assert cov[0, 0] == pytest.approx(v_grid, rel=1e-8)


def test_P2_gaussian_product_2d_closed_form_and_grid():
    """P2 in 2-D: against the Kalman-gain form Σ = Σ₁ − Σ₁(Σ₁+Σ₂)⁻¹Σ₁, μ = μ₁ + Σ₁(Σ₁+Σ₂)⁻¹(μ₂−μ₁),
    and against the moments of the product density on a 2-D grid (rtol 1e-6)."""
    mu1, mu2 = np.array([0.5, -1.0]), np.array([-0.3, 0.8])
    c1 = np.array([[1.0, 0.6], [0.6, 2.0]])
    c2 = np.array([[0.5, -0.2], [-0.2, 0.3]])
    mu, cov = posterior.gaussian_product(mu1, c1, mu2, c2)
    gain = c1 @ np.linalg.inv(c1 + c2)
    np.testing.assert_allclose(cov, c1 - gain @ c1, rtol=1e-12)
    np.testing.assert_allclose(mu, mu1 + gain @ (mu2 - mu1), rtol=1e-12)
    g = np.linspace(-5, 5, 801)
    X, Y = np.meshgrid(g, g, indexing="ij")
    pts = np.stack([X, Y], axis=-1)

    def logn(m, c):
        d = pts - m
        return -0.5 * np.einsum("...i,ij,...j->...", d, np.linalg.inv(c), d)

    w = np.exp(logn(mu1, c1) + logn(mu2, c2))
    w /= w.sum()
    m_grid = np.einsum("ij,ijk->k", w, pts)
    d = pts - m_grid
    c_grid = np.einsum("ij,ijk,ijl->kl", w, d, d)
    np.testing.assert_allclose(mu, m_grid, rtol=1e-6, atol=1e-9)
    np.testing.assert_allclose(cov, c_grid, rtol=1e-6, atol=1e-9)


# ------------------------------------------------------------------------------------------------ P3
@pytest.mark.parametrize("sched", [LINEAR, COSINE], ids=["linear", "cosine"])
def test_P3_conversions_round_trip_batch_t(sched):
    """P3/P5: x0 ↔ ε ↔ v and score ↔ ε round trips on random NCHW inputs with per-example t, against the
    definitions x_t = √ᾱ x_0 + √(1−ᾱ) ε and v = √ᾱ ε − √(1−ᾱ) x_0 written here."""
    rng = np.random.default_rng(7)
    B = 6
    t = np.array([1, 2, 10, 500, 999, 1000])
    x0 = rng.standard_normal((B, 3, 4, 4))
    eps = rng.standard_normal(x0.shape)
    ab = alpha_bar_indep(sched.betas[1:])[t][:, None, None, None]
    xt = np.sqrt(ab) * x0 + np.sqrt(1 - ab) * eps
    v = np.sqrt(ab) * eps - np.sqrt(1 - ab) * x0
    tol = dict(rtol=1e-9, atol=1e-9)
    np.testing.assert_allclose(posterior.x0_from_eps(xt, t, eps, sched), x0, rtol=1e-7, atol=1e-7)
    np.testing.assert_allclose(posterior.eps_from_x0(xt, t, x0, sched), eps, **tol)
    np.testing.assert_allclose(posterior.v_from_eps(xt, t, eps, sched), v, rtol=1e-7, atol=1e-7)
    np.testing.assert_allclose(posterior.v_from_x0(xt, t, x0, sched), v, **tol)
    np.testing.assert_allclose(posterior.eps_from_v(xt, t, v, sched), eps, **tol)
    np.testing.assert_allclose(posterior.x0_from_v(xt, t, v, sched), x0, **tol)
    score = posterior.score_from_eps(xt, t, eps, sched)
    np.testing.assert_allclose(score, -eps / np.sqrt(1 - ab), **tol)
    np.testing.assert_allclose(posterior.eps_from_score(xt, t, score, sched), eps, **tol)
    # x0_eps_from_output accepts each prediction type and its diffusers alias
    for kind, out in [("eps", eps), ("epsilon", eps), ("x0", x0), ("sample", x0), ("v", v), ("v_prediction", v)]:
        got_x0, got_eps = posterior.x0_eps_from_output(out, xt, t, sched, prediction=kind)
        np.testing.assert_allclose(got_x0, x0, rtol=1e-7, atol=1e-7)
        np.testing.assert_allclose(got_eps, eps, rtol=1e-7, atol=1e-7)


def test_P3_clipped_x0_recomputes_eps():
    """P3: with clip = c, x̂_0 is clipped to [−c, c] and ε̂ recomputed so that x_t = √ᾱ x̂_0 + √(1−ᾱ) ε̂."""
    rng = np.random.default_rng(8)
    xt = 3 * rng.standard_normal((5, 4))
    eps = rng.standard_normal((5, 4))
    t = np.array([5, 50, 200, 600, 1000])
    x0, e = posterior.x0_eps_from_output(eps, xt, t, LINEAR, prediction="eps", clip=1.0)
    assert np.all(np.abs(x0) <= 1.0)
    ab = alpha_bar_indep(schedules.linear_betas(1000))[t][:, None]
    np.testing.assert_allclose(np.sqrt(ab) * x0 + np.sqrt(1 - ab) * e, xt, rtol=1e-10, atol=1e-12)
    raw = (xt - np.sqrt(1 - ab) * eps) / np.sqrt(ab)
    np.testing.assert_allclose(x0, np.clip(raw, -1, 1), rtol=1e-7, atol=1e-9)


# ------------------------------------------------------------------------------------------------ P4
@pytest.mark.parametrize("sched", [LINEAR, COSINE], ids=["linear", "cosine"])
def test_P4_mean_from_eps_equals_P1_mean_at_x0_hat(sched):
    """P4: μ_θ = (x_t − β_t/√(1−ᾱ_t) ε)/√α_t equals μ̃_t(x̂_0, x_t) with x̂_0 = x0_from_eps(x_t, ε)."""
    rng = np.random.default_rng(9)
    t = np.array([1, 2, 17, 400, 999])
    xt = rng.standard_normal((5, 3))
    eps = rng.standard_normal((5, 3))
    mu = posterior.mean_from_eps(xt, t, eps, sched)
    x0_hat = posterior.x0_from_eps(xt, t, eps, sched)
    np.testing.assert_allclose(mu, posterior.q_posterior(x0_hat, xt, t, sched)[0], rtol=1e-8, atol=1e-9)
    # and the formula written out here
    b = sched.betas[t][:, None]
    ab = alpha_bar_indep(sched.betas[1:])[t][:, None]
    np.testing.assert_allclose(mu, (xt - b / np.sqrt(1 - ab) * eps) / np.sqrt(1 - b), rtol=1e-10)


def test_P4_su_notation_mean_equals_ddpm_mean():
    """P4 in Su's notation (Su 1.7/1.15): μ(x_t) = (x_t − (β_t²/β̄_t)·ε)/α_t with Su's α, β, β̄ from
    su_from_ddpm, equals the DDPM mean_from_eps; Su's x_t = ᾱ_t x_0 + β̄_t ε equals the F2 q_sample."""
    from ldmkit.reference import forward

    sched = Schedule.named("su", 1000)
    a_su, b_su, ab_su, bb_su = schedules.su_from_ddpm(sched)
    rng = np.random.default_rng(10)
    t = np.array([1, 10, 100, 1000])
    x0, eps = rng.standard_normal((4, 2)), rng.standard_normal((4, 2))
    xt_su = ab_su[t][:, None] * x0 + bb_su[t][:, None] * eps
    np.testing.assert_allclose(forward.q_sample(x0, t, eps, sched), xt_su, rtol=1e-12)
    mu_su = (xt_su - (b_su[t] ** 2 / bb_su[t])[:, None] * eps) / a_su[t][:, None]
    np.testing.assert_allclose(posterior.mean_from_eps(xt_su, t, eps, sched), mu_su, rtol=1e-11)


# ------------------------------------------------------------------------------------------------ P5
def test_P5_score_is_gradient_of_log_q_xt_given_x0():
    """P5: score_from_eps(x_t, t, ε) equals d/dx_t log q(x_t given x_0) by central differences (h = 1e-5)."""
    rng = np.random.default_rng(11)
    ab = alpha_bar_indep(schedules.cosine_betas(1000))
    for t in (1, 30, 500, 1000):
        x0 = rng.standard_normal(5)
        eps = rng.standard_normal(5)
        xt = math.sqrt(ab[t]) * x0 + math.sqrt(1 - ab[t]) * eps
        h = 1e-5 * math.sqrt(1 - ab[t])
        fd = (log_normal(xt + h, math.sqrt(ab[t]) * x0, 1 - ab[t])
              - log_normal(xt - h, math.sqrt(ab[t]) * x0, 1 - ab[t])) / (2 * h)
        np.testing.assert_allclose(posterior.score_from_eps(xt, t, eps, COSINE), fd, rtol=1e-6, atol=1e-6)


# ------------------------------------------------------------------------------------------------ P6
def test_P6_ddim_posterior_keeps_marginal_closed_form():
    """P6: for random t_prev < t and random σ² ∈ [0, 1 − ᾱ_{t_prev}], x_{t_prev} = ζx_0 + ξx_t + σz with
    x_t ~ q(x_t given x_0) has mean √ᾱ_{t_prev}x_0 and variance 1 − ᾱ_{t_prev} (ζ, ξ read off the mean
    as a linear map), and the mean matches P6's formula written here."""
    rng = np.random.default_rng(12)
    ab = alpha_bar_indep(schedules.linear_betas(1000))
    for _ in range(40):
        t = int(rng.integers(2, 1001))
        tp = int(rng.integers(0, t))
        sigma = math.sqrt(rng.uniform(0, 1) * (1 - ab[tp]))
        zeta = posterior.ddim_posterior(np.ones(1), np.zeros(1), t, tp, sigma, LINEAR)[0][0]
        xi = posterior.ddim_posterior(np.zeros(1), np.ones(1), t, tp, sigma, LINEAR)[0][0]
        var = posterior.ddim_posterior(np.zeros(1), np.ones(1), t, tp, sigma, LINEAR)[1]
        assert float(np.squeeze(var)) == pytest.approx(sigma**2, rel=1e-12, abs=1e-300)
        assert zeta + xi * math.sqrt(ab[t]) == pytest.approx(math.sqrt(ab[tp]), rel=1e-9)
        assert xi**2 * (1 - ab[t]) + sigma**2 == pytest.approx(1 - ab[tp], rel=1e-9, abs=1e-15)
        x0, xt = rng.standard_normal(3), rng.standard_normal(3)
        expect = math.sqrt(ab[tp]) * x0 + math.sqrt(max(1 - ab[tp] - sigma**2, 0)) * (
            xt - math.sqrt(ab[t]) * x0) / math.sqrt(1 - ab[t])
        np.testing.assert_allclose(posterior.ddim_posterior(x0, xt, t, tp, sigma, LINEAR)[0], expect,
                                   rtol=1e-9, atol=1e-12)


def test_P6_ddim_posterior_keeps_marginal_monte_carlo():
    """P6: sample x_t ~ q(x_t given x_0), then x_{t_prev} ~ q_σ(· given x_t, x_0); the draws have the
    marginal N(√ᾱ_{t_prev}x_0, 1 − ᾱ_{t_prev}) (n = 200k, 5 SE), for σ = 0, a middle σ and the largest σ."""
    rng = np.random.default_rng(13)
    ab = alpha_bar_indep(schedules.cosine_betas(1000))
    n = 200_000
    x0 = np.full(n, 0.7)
    t, tp = 600, 300
    for frac in (0.0, 0.37, 1.0):
        sigma = math.sqrt(frac * (1 - ab[tp]))
        xt = math.sqrt(ab[t]) * x0 + math.sqrt(1 - ab[t]) * rng.standard_normal(n)
        mean, var = posterior.ddim_posterior(x0, xt, t, tp, sigma, COSINE)
        x_prev = mean + np.sqrt(var) * rng.standard_normal(n)
        m, v = x_prev.mean(), x_prev.var(ddof=1)
        target_v = 1 - ab[tp]
        assert abs(m - math.sqrt(ab[tp]) * 0.7) < 5 * math.sqrt(target_v / n)
        assert abs(v - target_v) < 5 * target_v * math.sqrt(2 / (n - 1))


def test_P6_per_example_sigma_and_clean_step():
    """P6: per-example σ broadcasts over the batch; the step to t_prev = 0 (ᾱ_0 = 1) with σ = 0 returns x_0."""
    rng = np.random.default_rng(14)
    x0, xt = rng.standard_normal((3, 2, 2)), rng.standard_normal((3, 2, 2))
    ab = alpha_bar_indep(schedules.linear_betas(1000))
    t, tp = np.array([10, 500, 1000]), np.array([5, 0, 900])
    sig = np.array([0.01, 0.0, 0.2])
    mean, var = posterior.ddim_posterior(x0, xt, t, tp, sig, LINEAR)
    r = (slice(None), None, None)
    expect = np.sqrt(ab[tp])[r] * x0 + np.sqrt(1 - ab[tp] - sig**2)[r] * (xt - np.sqrt(ab[t])[r] * x0) / np.sqrt(
        1 - ab[t])[r]
    np.testing.assert_allclose(mean, expect, rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(np.broadcast_to(var, x0.shape), np.broadcast_to((sig**2)[r], x0.shape))
    np.testing.assert_allclose(mean[1], x0[1], rtol=1e-12)


# ------------------------------------------------------------------------------------------------ P7
@pytest.mark.parametrize("sched", [LINEAR, COSINE], ids=["linear", "cosine"])
def test_P7_ddim_sigma_eta1_is_beta_tilde(sched):
    """P7: σ_t(η = 1)² with t_prev = t − 1 equals DDPM's β̃_t = (1−ᾱ_{t−1})/(1−ᾱ_t)·β_t for every t; η = 0
    gives 0; σ is linear in η. And then P6 with that σ is exactly P1."""
    ab = alpha_bar_indep(sched.betas[1:])
    t = np.arange(1, 1001)
    tilde = (1 - ab[t - 1]) / (1 - ab[t]) * sched.betas[t]
    s1 = posterior.ddim_sigma(t, t - 1, 1.0, sched)
    np.testing.assert_allclose(s1**2, tilde, rtol=1e-9, atol=1e-300)
    np.testing.assert_array_equal(posterior.ddim_sigma(t, t - 1, 0.0, sched), 0.0)
    np.testing.assert_allclose(posterior.ddim_sigma(t, t - 1, 0.4, sched), 0.4 * s1, rtol=1e-14)
    rng = np.random.default_rng(15)
    tt = np.array([2, 3, 100, 999, 1000])
    x0, xt = rng.standard_normal((5, 4)), rng.standard_normal((5, 4))
    mean6, var6 = posterior.ddim_posterior(x0, xt, tt, tt - 1, posterior.ddim_sigma(tt, tt - 1, 1.0, sched), sched)
    mean1, var1, _ = posterior.q_posterior(x0, xt, tt, sched)
    np.testing.assert_allclose(mean6, mean1, rtol=1e-7, atol=1e-8)
    np.testing.assert_allclose(np.ravel(var6), np.ravel(var1), rtol=1e-9)


def test_P7_ddim_variance_anchors():
    """P7: docs/anchors.md DDIM variances (η = 1) on linear T = 1000: k 420 → 400 gives 0.14771, 980 → 960 gives
    0.32460 (math t = k + 1). The published digits are truncated (0.1477195…), and diffusers' own test
    checks them to 1e-5, so that is the tolerance here."""
    assert float(posterior.ddim_sigma(421, 401, 1.0, LINEAR)) ** 2 == pytest.approx(0.14771, abs=1e-5)
    assert float(posterior.ddim_sigma(981, 961, 1.0, LINEAR)) ** 2 == pytest.approx(0.32460, abs=1e-5)


# ------------------------------------------------------------------------------------------------ P8
@pytest.mark.parametrize("t", [2, 3, 5, 50])
def test_P8_random_walk_posterior_grid_bayes(t):
    """P8: Inouye's random walk (variance-t process, S12): q(x_{t−1} given x_t, x_0) ∝ N(x_{t−1}; x_0, t−1)·
    N(x_t; x_{t−1}, 1) on a grid equals N((1−1/t)x_t + x_0/t, 1 − 1/t); and μ_θ = x_t − ε̃/t with
    ε̃ = x_t − x_0 is that mean. (The slides mix std t and variance t; the variance-t process is used.)"""
    rng = np.random.default_rng(t)
    x0 = 0.4
    xt = x0 + math.sqrt(t) * rng.standard_normal()
    m_grid, v_grid = grid_bayes(x0, t - 1.0, xt, 1.0)
    mean, var = posterior.random_walk_posterior(np.array([x0]), np.array([xt]), t)
    assert mean[0] == pytest.approx(m_grid, rel=1e-8, abs=1e-10)
    assert float(np.squeeze(var)) == pytest.approx(v_grid, rel=1e-8)
    mu = posterior.random_walk_mean_from_eps(np.array([xt]), t, np.array([xt - x0]))
    assert mu[0] == pytest.approx(m_grid, rel=1e-8, abs=1e-10)


def test_P8_random_walk_posterior_monte_carlo_and_t1():
    """P8: simulate the walk x_{t−1} = x_0 + √(t−1)ε, x_t = x_{t−1} + ε'; the regression of x_{t−1} on x_t
    (jointly Gaussian given x_0) has slope 1 − 1/t and residual variance 1 − 1/t (5 SE). t = 1: var 0."""
    rng = np.random.default_rng(16)
    n, t, x0 = 200_000, 4, -0.3
    xp = x0 + math.sqrt(t - 1) * rng.standard_normal(n)
    xt = xp + rng.standard_normal(n)
    slope = np.cov(xp, xt)[0, 1] / xt.var(ddof=1)
    resid = xp - x0 - slope * (xt - x0)
    mean, var = posterior.random_walk_posterior(np.full(n, x0), xt, float(t))
    coef = (mean[1] - mean[0]) / (xt[1] - xt[0])
    se_slope = math.sqrt(resid.var() / (n * xt.var()))
    assert abs(slope - coef) < 5 * se_slope
    v = float(np.squeeze(var))
    assert abs(resid.var(ddof=2) - v) < 5 * v * math.sqrt(2 / (n - 2))
    mean1, var1 = posterior.random_walk_posterior(np.array([x0]), np.array([5.0]), 1)
    assert mean1[0] == x0 and float(np.squeeze(var1)) == 0.0
