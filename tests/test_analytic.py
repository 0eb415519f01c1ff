"""Analytic oracles (docs/formulas.md: X1–X3) and Su's two optimal reverse variances (P9).

Truths used: posterior expectations by grid quadrature of prior × likelihood (1-D and 2-D grids), Monte
Carlo of the forward process from data samples (fixed seeds, 5 standard errors), finite differences of
log-densities written out here, and the conversions of reference.posterior (themselves proved in
test_posterior.py against their definitions).
"""

from __future__ import annotations

import math

import numpy as np
import pytest
from independent import alpha_bar_indep, log_normal

from ldmkit.reference import analytic, posterior, schedules
from ldmkit.reference.schedules import Schedule

LINEAR = Schedule.named("linear", 1000)
GAUSS = analytic.GaussianData(mean=[0.5, -1.0, 2.0], var=[0.2, 1.0, 3.0])
MIX2 = analytic.GaussianMixtureData(weights=[0.2, 0.5, 0.3], means=[[-2.0, 0.0], [1.0, 1.0], [2.0, -2.0]],
                                    vars=[0.3, 0.1, 0.5])
MIX1 = analytic.GaussianMixtureData(weights=[0.3, 0.45, 0.25], means=[[-2.0], [0.5], [3.0]], vars=[0.2, 0.05, 1.0])
LEVELS = [(0.8, 0.6), (1.0, 2.0), (0.1, math.sqrt(0.99)), (1.0, math.sqrt(3.0))]  # VP, VE, VP noisy, random walk


def mixture_logpdf_indep(x, data, a, sigma):
    """log Σ_k w_k N(x; a m_k, (a² s_k² + σ²) I) by direct summation of densities (x of shape (n, d))."""
    dens = 0.0
    for w, m, v in zip(data.weights, data.means, data.vars, strict=True):
        var = a**2 * v + sigma**2
        dens = dens + w * np.exp(np.sum(log_normal(x, a * m, var), axis=-1))
    return np.log(dens)


# ------------------------------------------------------------------------------------------------ X1
@pytest.mark.parametrize(("a", "sigma"), LEVELS)
def test_X1_gaussian_posterior_mean_against_grid(a, sigma):
    """X1: E[x_0 given x_t] for x_0 ~ N(m, s²) and x_t = a x_0 + σε equals ∫ x_0 p(x_0) N(x_t; a x_0, σ²) dx_0
    / ∫ p(x_0) N(x_t; a x_0, σ²) dx_0 on a 1-D grid per dimension (rtol 1e-8)."""
    x = np.array([0.9, -2.5, 4.0])
    got = GAUSS.x0_mean(x, a, sigma)
    for i in range(3):
        m, s2 = GAUSS.mean[i], GAUSS.var[i]
        g = np.linspace(m - 14 * math.sqrt(s2), m + 14 * math.sqrt(s2), 40001)
        w = np.exp(log_normal(g, m, s2) + log_normal(x[i], a * g, sigma**2))
        assert got[i] == pytest.approx(np.sum(w * g) / np.sum(w), rel=1e-8)


def test_X1_gaussian_posterior_mean_monte_carlo_regression():
    """X1: draw x_0 ~ data, x_t = √ᾱ x_0 + √(1−ᾱ) ε; the least-squares regression of x_0 on x_t (exact for
    jointly Gaussian variables) has the slope and intercept of x0_mean (slope within 5 SE)."""
    rng = np.random.default_rng(1)
    n = 200_000
    ab = alpha_bar_indep(schedules.linear_betas(1000))[400]
    a, s = math.sqrt(ab), math.sqrt(1 - ab)
    x0 = GAUSS.sample(n, rng)
    xt = a * x0 + s * rng.standard_normal(x0.shape)
    pred0 = GAUSS.x0_mean(np.zeros(3), a, s)
    slope_code = GAUSS.x0_mean(np.ones(3), a, s) - pred0
    for i in range(3):
        c = np.cov(x0[:, i], xt[:, i])
        slope = c[0, 1] / c[1, 1]
        intercept = x0[:, i].mean() - slope * xt[:, i].mean()
        resid = x0[:, i] - intercept - slope * xt[:, i]
        se = math.sqrt(resid.var() / (n * xt[:, i].var()))
        assert abs(slope - slope_code[i]) < 5 * se
        assert abs(intercept - pred0[i]) < 5 * math.sqrt(resid.var() / n) * (1 + abs(xt[:, i].mean()) / xt[:, i].std())


@pytest.mark.parametrize(("a", "sigma"), LEVELS)
def test_X1_score_and_eps_against_finite_differences(a, sigma):
    """X1: score = ∇ log N(x_t; a m, a² s² + σ²) by central differences of the density written here;
    ε* = −σ·score = (x_t − a·E[x_0 given x_t])/σ; log_prob matches the written density."""
    rng = np.random.default_rng(2)
    x = rng.standard_normal((4, 3)) * 2
    var = a**2 * GAUSS.var + sigma**2
    h = 1e-5
    fd = (log_normal(x + h, a * GAUSS.mean, var) - log_normal(x - h, a * GAUSS.mean, var)) / (2 * h)
    np.testing.assert_allclose(GAUSS.score(x, a, sigma), fd, rtol=1e-7, atol=1e-8)
    eps = GAUSS.eps(x, a, sigma)
    np.testing.assert_allclose(eps, -sigma * fd, rtol=1e-7, atol=1e-8)
    np.testing.assert_allclose(eps, (x - a * GAUSS.x0_mean(x, a, sigma)) / sigma, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(GAUSS.log_prob(x, a, sigma), np.sum(log_normal(x, a * GAUSS.mean, var), axis=-1),
                               rtol=1e-12)


def test_X1_per_example_noise_levels():
    """X1: per-example a, σ of shape (B,) give each row what the scalar call gives."""
    rng = np.random.default_rng(3)
    x = rng.standard_normal((3, 3))
    a, s = np.array([0.9, 0.5, 0.1]), np.array([0.3, 0.8, 0.99])
    for fn in (GAUSS.x0_mean, GAUSS.score, GAUSS.eps):
        batch = fn(x, a, s)
        for i in range(3):
            np.testing.assert_allclose(batch[i], fn(x[i], a[i], s[i]), rtol=1e-13)


# ------------------------------------------------------------------------------------------------ X2
@pytest.mark.parametrize(("a", "sigma"), LEVELS)
def test_X2_responsibilities_log_prob_and_score(a, sigma):
    """X2: responsibilities = w_k N_k(x)/Σ_j w_j N_j(x) by Bayes' rule written here; log_prob equals the
    directly summed mixture density; score equals its central-difference gradient (h = 1e-5)."""
    rng = np.random.default_rng(4)
    x = rng.standard_normal((5, 2)) * 2
    dens = np.stack([w * np.exp(np.sum(log_normal(x, a * m, a**2 * v + sigma**2), axis=-1))
                     for w, m, v in zip(MIX2.weights, MIX2.means, MIX2.vars, strict=True)], axis=-1)
    np.testing.assert_allclose(MIX2.responsibilities(x, a, sigma), dens / dens.sum(-1, keepdims=True),
                               rtol=1e-9, atol=1e-15)
    np.testing.assert_allclose(MIX2.log_prob(x, a, sigma), mixture_logpdf_indep(x, MIX2, a, sigma), rtol=1e-11)
    h = 1e-5
    fd = np.zeros_like(x)
    for j in range(2):
        e = np.zeros(2)
        e[j] = h
        fd[:, j] = (mixture_logpdf_indep(x + e, MIX2, a, sigma) - mixture_logpdf_indep(x - e, MIX2, a, sigma)) / (2 * h)
    np.testing.assert_allclose(MIX2.score(x, a, sigma), fd, rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(MIX2.eps(x, a, sigma), -sigma * MIX2.score(x, a, sigma), rtol=1e-14)


@pytest.mark.parametrize(("a", "sigma"), [(0.8, 0.6), (0.3, math.sqrt(0.91)), (1.0, 0.5)])
def test_X2_mixture_posterior_mean_against_2d_grid(a, sigma):
    """X2: E[x_0 given x_t] for the 2-D mixture equals the posterior mean of p(x_0)·N(x_t; a x_0, σ² I) by
    quadrature on a 2-D grid of x_0 (rtol 1e-6), including Tweedie's x0 = (x_t + σ² score)/a."""
    g = np.linspace(-6.0, 6.0, 801)
    X, Y = np.meshgrid(g, g, indexing="ij")
    pts = np.stack([X.ravel(), Y.ravel()], axis=-1)
    prior = np.exp(mixture_logpdf_indep(pts, MIX2, 1.0, 0.0))
    for xt in ([0.3, -0.4], [1.5, 1.2], [-1.0, 0.2]):
        xt = np.array(xt)
        w = prior * np.exp(np.sum(log_normal(xt, a * pts, sigma**2), axis=-1))
        expect = (w[:, None] * pts).sum(0) / w.sum()
        np.testing.assert_allclose(MIX2.x0_mean(xt, a, sigma), expect, rtol=1e-6, atol=1e-8)


def test_X2_scalar_and_per_example_noise_levels():
    """X2: scalar a, σ work for a batch and for one point; per-example (B,) levels match row by row."""
    rng = np.random.default_rng(5)
    x = rng.standard_normal((3, 2))
    a, s = np.array([0.9, 0.5, 0.1]), np.array([0.3, 0.8, 0.99])
    for fn in (MIX2.x0_mean, MIX2.score, MIX2.eps, MIX2.responsibilities, MIX2.log_prob):
        batch = fn(x, a, s)
        for i in range(3):
            np.testing.assert_allclose(fn(x[i], a[i], s[i]), batch[i], rtol=1e-12)
            np.testing.assert_allclose(fn(x[i:i + 1], a[i], s[i])[0], batch[i], rtol=1e-12)


def test_X2_posterior_mean_at_zero_signal_is_data_mean():
    """X2: at a = 0 (pure noise, the t = T step of a zero-terminal-SNR schedule) E[x_0 given x_t] = E[x_0]
    = Σ_k w_k m_k, whatever x_t; for Gaussian data it is m."""
    x = np.array([[0.3, -2.0], [5.0, 1.0]])
    np.testing.assert_allclose(MIX2.x0_mean(x, 0.0, 1.0), np.broadcast_to(MIX2.weights @ MIX2.means, x.shape),
                               rtol=1e-12)
    np.testing.assert_allclose(GAUSS.x0_mean(np.ones((2, 3)), 0.0, 1.0), np.broadcast_to(GAUSS.mean, (2, 3)))


# ------------------------------------------------------------------------------------------------ X3
def test_X3_gaussian_marginal_monte_carlo():
    """X3: x_t = a x_0 + σε with x_0 from GaussianData.sample has the marginal N(a m, a² s² + σ²) (5 SE)."""
    rng = np.random.default_rng(6)
    n = 200_000
    for a, sigma in LEVELS[:2]:
        x = a * GAUSS.sample(n, rng) + sigma * rng.standard_normal((n, 3))
        mean, var = GAUSS.marginal(a, sigma)
        assert np.all(np.abs(x.mean(0) - mean) < 5 * np.sqrt(var / n))
        assert np.all(np.abs(x.var(0, ddof=1) - var) < 5 * var * math.sqrt(2 / (n - 1)))


@pytest.mark.parametrize(("a", "sigma"), [(1.0, 0.0), (0.8, 0.6), (0.5, math.sqrt(0.75))])
def test_X3_mixture_marginal_histogram(a, sigma):
    """X3: a histogram of x_t = a x_0 + σε (x_0 from the 1-D mixture, n = 200k) matches the bin masses of
    exp(log_prob) integrated by quadrature, each bin within 5 binomial SE; log_prob integrates to 1."""
    rng = np.random.default_rng(7)
    n = 200_000
    x0, k = MIX1.sample(n, rng)
    assert abs(np.mean(k == 1) - 0.45) < 5 * math.sqrt(0.45 * 0.55 / n)
    xt = a * x0[:, 0] + sigma * rng.standard_normal(n)
    edges = np.linspace(-4.0, 5.0, 31)
    counts, _ = np.histogram(xt, edges)
    xs_gl, ws_gl = np.polynomial.legendre.leggauss(20)
    for lo, hi, c in zip(edges[:-1], edges[1:], counts, strict=True):
        sub = np.linspace(lo, hi, 9)
        mid, half = (sub[1:] + sub[:-1]) / 2, (sub[1:] - sub[:-1]) / 2
        pts = (mid[:, None] + half[:, None] * xs_gl).reshape(-1, 1)
        p = float(np.sum((half[:, None] * ws_gl).reshape(-1) * np.exp(MIX1.log_prob(pts, a, sigma))))
        assert abs(c / n - p) < 5 * math.sqrt(p * (1 - p) / n) + 1e-12
    grid = np.linspace(-15, 18, 200001)[:, None]
    assert np.sum(np.exp(MIX1.log_prob(grid, a, sigma))) * (grid[1, 0] - grid[0, 0]) == pytest.approx(1.0, rel=1e-9)


# ------------------------------------------------------------------------------------------------ vp_model
@pytest.mark.parametrize("data", [GAUSS, MIX2], ids=["gauss", "mixture"])
def test_vp_model_predictions_consistent_with_P3(data):
    """X1/X2 via vp_model: the eps, x0 and v models are the same denoiser under the P3 conversions, for
    per-example t and for a scalar t; eps equals the data's ε*(x_t; √ᾱ_t, √(1−ᾱ_t))."""
    rng = np.random.default_rng(8)
    x = rng.standard_normal((4, data.dim))
    m_eps, m_x0, m_v = (analytic.vp_model(data, LINEAR, p) for p in ("eps", "x0", "v"))
    ab = alpha_bar_indep(schedules.linear_betas(1000))
    for t in (np.array([1, 30, 600, 1000]), 250):
        eps, x0, v = m_eps(x, t), m_x0(x, t), m_v(x, t)
        np.testing.assert_allclose(posterior.x0_from_eps(x, t, eps, LINEAR), x0, rtol=1e-8, atol=1e-8)
        np.testing.assert_allclose(posterior.v_from_eps(x, t, eps, LINEAR), v, rtol=1e-8, atol=1e-8)
        np.testing.assert_allclose(posterior.eps_from_v(x, t, v, LINEAR), eps, rtol=1e-8, atol=1e-8)
        a = np.sqrt(ab[t])[..., None] if np.ndim(t) else math.sqrt(ab[t])
        s = np.sqrt(1 - ab[t])[..., None] if np.ndim(t) else math.sqrt(1 - ab[t])
        np.testing.assert_allclose(eps, -s * data.score(x, np.ravel(a) if np.ndim(t) else a,
                                                        np.ravel(s) if np.ndim(t) else s), rtol=1e-10)


def test_vp_model_class_conditional_rows():
    """X2 via vp_model: with labels y, row i is denoised by component y[i] alone; y = −1 uses the mixture."""
    rng = np.random.default_rng(9)
    x = rng.standard_normal((4, 2))
    t = np.array([100, 200, 300, 400])
    y = np.array([0, 2, -1, 1])
    out = analytic.vp_model(MIX2, LINEAR, "x0")(x, t, y)
    ab = alpha_bar_indep(schedules.linear_betas(1000))[t]
    for i in range(4):
        src = MIX2 if y[i] < 0 else analytic.GaussianData(MIX2.means[y[i]], MIX2.vars[y[i]])
        np.testing.assert_allclose(out[i], src.x0_mean(x[i], math.sqrt(ab[i]), math.sqrt(1 - ab[i])), rtol=1e-12)


def test_vp_model_zero_terminal_snr_x0_and_v():
    """X2 via vp_model on a zero-terminal-SNR schedule: at t = T (ᾱ_T = 0) the x0 model predicts the data
    mean Σ w_k m_k and the v model predicts −E[x_0] (v = √ᾱ ε − √(1−ᾱ) x_0 = −x̂_0); both finite."""
    z = Schedule.from_betas(schedules.rescale_zero_terminal_snr(schedules.linear_betas(1000)))
    x = np.array([[0.5, -0.5], [2.0, 3.0]])
    mean = MIX2.weights @ MIX2.means
    np.testing.assert_allclose(analytic.vp_model(MIX2, z, "x0")(x, 1000), np.broadcast_to(mean, x.shape), rtol=1e-12)
    np.testing.assert_allclose(analytic.vp_model(MIX2, z, "v")(x, 1000), np.broadcast_to(-mean, x.shape), rtol=1e-12)
    np.testing.assert_allclose(analytic.vp_model(GAUSS, z, "v")(np.zeros((1, 3)), 1000)[0], -GAUSS.mean, rtol=1e-12)


# ------------------------------------------------------------------------------------------------ P9
def test_P9_reverse_variance_endpoints():
    """P9 (Su 2.5): the exact reverse variance is β̃_t for one-point data (s² = 0) and β_t for standard
    normal data (s² = 1)."""
    for name in ("linear", "cosine"):
        sched = Schedule.named(name, 1000)
        ab = alpha_bar_indep(sched.betas[1:])
        t = np.arange(1, 1001)
        tilde = (1 - ab[t - 1]) / (1 - ab[t]) * sched.betas[t]
        np.testing.assert_allclose(analytic.reverse_variance(t, sched, 0.0), tilde, rtol=1e-10, atol=1e-300)
        np.testing.assert_allclose(analytic.reverse_variance(t, sched, 1.0), sched.betas[t], rtol=1e-12)


def _reverse_var_2d_grid(betas, t, m, s2, xt):
    """Var(x_{t−1} given x_t) from the joint p(x_0) q(x_{t−1} given x_0) q(x_t given x_{t−1}) on a 2-D grid over
    (x_0, x_{t−1}), marginalising x_0 numerically (no closed-form marginal of x_{t−1} is used)."""
    ab = alpha_bar_indep(betas)
    beta = betas[t - 1]
    lik_c, lik_s = xt / math.sqrt(1 - beta), math.sqrt(beta / (1 - beta))
    xp = np.linspace(lik_c - 12 * lik_s, lik_c + 12 * lik_s, 1201)
    x0 = np.linspace(m - 12 * math.sqrt(s2), m + 12 * math.sqrt(s2), 2401)
    X0, XP = np.meshgrid(x0, xp, indexing="ij")
    lp = (log_normal(X0, m, s2) + log_normal(XP, math.sqrt(ab[t - 1]) * X0, 1 - ab[t - 1])
          + log_normal(xt, math.sqrt(1 - beta) * XP, beta))
    w = np.exp(lp - lp.max()).sum(axis=0)
    w /= w.sum()
    mu = np.sum(w * xp)
    return np.sum(w * (xp - mu) ** 2)


@pytest.mark.parametrize("t", [2, 5, 10])
def test_P9_reverse_variance_against_2d_grid(t):
    """P9: for data N(0.4, 0.3) the conditional variance of x_{t−1} given x_t, computed on a (x_0, x_{t−1}) grid,
    equals reverse_variance (rtol 1e-6) — between β̃_t and β_t."""
    betas = schedules.linear_betas(10, 0.01, 0.3)
    sched = Schedule.from_betas(betas)
    got = float(analytic.reverse_variance(t, sched, 0.3))
    assert got == pytest.approx(_reverse_var_2d_grid(betas, t, 0.4, 0.3, xt=0.7), rel=1e-6)
    assert sched.posterior_variance[t] < got < sched.betas[t]


def test_P9_reverse_variance_monte_carlo():
    """P9: simulate x_0 ~ N(m, s²), x_{t−1} ~ q(· given x_0), x_t ~ q(· given x_{t−1}) on linear T = 1000 at
    t = 700; the residual variance of regressing x_{t−1} on x_t (exact for Gaussians) is reverse_variance
    (5 SE, SE = v√(2/(n−2)))."""
    rng = np.random.default_rng(10)
    n, t, m, s2 = 200_000, 700, -0.5, 0.3
    ab = alpha_bar_indep(schedules.linear_betas(1000))
    beta = schedules.linear_betas(1000)[t - 1]
    x0 = m + math.sqrt(s2) * rng.standard_normal(n)
    xp = math.sqrt(ab[t - 1]) * x0 + math.sqrt(1 - ab[t - 1]) * rng.standard_normal(n)
    xt = math.sqrt(1 - beta) * xp + math.sqrt(beta) * rng.standard_normal(n)
    c = np.cov(xp, xt)
    resid_var = (c[0, 0] - c[0, 1] ** 2 / c[1, 1]) * (n - 1) / (n - 2)
    v = float(analytic.reverse_variance(t, LINEAR, s2))
    assert abs(resid_var - v) < 5 * v * math.sqrt(2 / (n - 2))
