"""Divergences and likelihoods (docs/formulas.md: K1–K7).

Monte Carlo estimates use a fixed seed and 5 standard errors (SE = sample SD of the log-ratio / √n);
quadrature uses composite Gauss–Legendre rules written here, independent of the erfc the code uses.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
from independent import log_normal

from ldmkit.reference import kl

_GL_X, _GL_W = np.polynomial.legendre.leggauss(10)


def integrate(f, a, b, pieces=400):
    """∫_a^b f by composite 10-point Gauss–Legendre on ``pieces`` equal sub-intervals."""
    edges = np.linspace(a, b, pieces + 1)
    mid, half = (edges[1:] + edges[:-1]) / 2, (edges[1:] - edges[:-1]) / 2
    x = mid[:, None] + half[:, None] * _GL_X
    return float(np.sum(half[:, None] * _GL_W * f(x)))


def log_std_normal_mass(a, b):
    """log ∫_a^b φ(z) dz for a < b (±inf allowed), by quadrature; in a tail it integrates
    φ(a)·∫_0^{b−a} exp(−a u − u²/2) du so that masses down to 1e-300 are resolved."""
    if b <= 0:
        return log_std_normal_mass(-b, -a)
    if a >= 0:
        span = min(b - a, -a + math.sqrt(a * a + 120.0))  # the integrand is < e^{-60} beyond
        val = integrate(lambda u: np.exp(-a * u - u * u / 2), 0.0, span)
        return -0.5 * math.log(2 * math.pi) - a * a / 2 + math.log(val)
    lo, hi = max(a, -40.0), min(b, 40.0)
    return math.log(integrate(lambda z: np.exp(-z * z / 2) / math.sqrt(2 * math.pi), lo, hi))


# ------------------------------------------------------------------------------------------------ K1
@pytest.mark.parametrize(("m1", "v1", "m2", "v2"), [(0.0, 1.0, 0.0, 1.0), (0.3, 0.5, -1.0, 2.0),
                                                    (2.0, 3.0, 0.0, 0.2), (-1.0, 1e-2, -1.1, 1e-2)])
def test_K1_normal_kl_against_quadrature_and_monte_carlo(m1, v1, m2, v2):
    """K1: KL(N(μ₁,σ₁²) ‖ N(μ₂,σ₂²)) = ∫ p log p/q by quadrature (rtol 1e-9), and by MC (n = 200k, 5 SE)."""
    got = float(kl.normal_kl(m1, math.log(v1), m2, math.log(v2)))
    s = math.sqrt(v1)

    def integrand(x):
        lp, lq = log_normal(x, m1, v1), log_normal(x, m2, v2)
        return np.exp(lp) * (lp - lq)

    assert got == pytest.approx(integrate(integrand, m1 - 40 * s, m1 + 40 * s), rel=1e-9, abs=1e-13)
    rng = np.random.default_rng(1)
    x = m1 + s * rng.standard_normal(200_000)
    lr = log_normal(x, m1, v1) - log_normal(x, m2, v2)
    assert abs(lr.mean() - got) <= 5 * lr.std(ddof=1) / math.sqrt(x.size) + 1e-12


def test_K1_normal_kl_broadcasts_elementwise():
    """K1: elementwise over broadcast shapes, equal to the scalar formula written here."""
    rng = np.random.default_rng(2)
    m1, lv1 = rng.standard_normal((3, 1, 4)), rng.standard_normal((3, 1, 4))
    m2, lv2 = rng.standard_normal((5, 1)), rng.standard_normal((5, 1))
    got = kl.normal_kl(m1, lv1, m2, lv2)
    assert got.shape == (3, 5, 4)
    v1, v2 = np.exp(lv1), np.exp(lv2)
    expect = np.log(np.sqrt(v2) / np.sqrt(v1)) + (v1 + (m1 - m2) ** 2) / (2 * v2) - 0.5
    np.testing.assert_allclose(got, expect, rtol=1e-12, atol=1e-14)


# ------------------------------------------------------------------------------------------------ K2
def _mvn_logpdf(x, mu, cov):
    d = mu.size
    diff = x - mu
    sol = np.linalg.solve(cov, diff.T).T
    return -0.5 * (d * math.log(2 * math.pi) + np.linalg.slogdet(cov)[1] + np.sum(diff * sol, axis=1))


def test_K2_full_covariance_kl_monte_carlo():
    """K2: gaussian_kl_full in d = 3 against E_p[log p − log q] by MC (n = 200k, 5 SE), with log
    densities from slogdet and solve (not Cholesky); KL(p ‖ p) = 0."""
    rng = np.random.default_rng(3)
    A, B = rng.standard_normal((3, 3)), rng.standard_normal((3, 3))
    c1, c2 = A @ A.T + 0.5 * np.eye(3), B @ B.T + 0.5 * np.eye(3)
    mu1, mu2 = rng.standard_normal(3), rng.standard_normal(3)
    got = kl.gaussian_kl_full(mu1, c1, mu2, c2)
    x = mu1 + rng.standard_normal((200_000, 3)) @ np.linalg.cholesky(c1).T
    lr = _mvn_logpdf(x, mu1, c1) - _mvn_logpdf(x, mu2, c2)
    assert abs(lr.mean() - got) < 5 * lr.std(ddof=1) / math.sqrt(x.shape[0])
    assert got > 0
    assert kl.gaussian_kl_full(mu1, c1, mu1, c1) == pytest.approx(0.0, abs=1e-12)
    # the formula written out with explicit inverses and determinants
    inv2 = np.linalg.inv(c2)
    d = mu2 - mu1
    expect = 0.5 * (np.trace(inv2 @ c1) + d @ inv2 @ d - 3 + math.log(np.linalg.det(c2) / np.linalg.det(c1)))
    assert got == pytest.approx(expect, rel=1e-11)


def test_K2_diagonal_equals_sum_of_K1():
    """K2/K1: with diagonal covariances the full KL is the sum of the elementwise KLs."""
    rng = np.random.default_rng(4)
    m1, m2 = rng.standard_normal(5), rng.standard_normal(5)
    v1, v2 = np.exp(rng.standard_normal(5)), np.exp(rng.standard_normal(5))
    full = kl.gaussian_kl_full(m1, np.diag(v1), m2, np.diag(v2))
    assert full == pytest.approx(float(np.sum(kl.normal_kl(m1, np.log(v1), m2, np.log(v2)))), rel=1e-12)


# ------------------------------------------------------------------------------------------------ K3
def test_K3_vae_kl_equals_K2_against_standard_normal():
    """K3: KL(N(μ, σ²) ‖ N(0, I)) per batch row, summed over C, H, W, equals K2 against N(0, I)."""
    rng = np.random.default_rng(5)
    mean = rng.standard_normal((3, 2, 2, 2))
    logvar = 0.5 * rng.standard_normal((3, 2, 2, 2))
    got = kl.vae_kl(mean, logvar)
    assert got.shape == (3,)
    for b in range(3):
        m, v = mean[b].ravel(), np.exp(logvar[b].ravel())
        assert got[b] == pytest.approx(kl.gaussian_kl_full(m, np.diag(v), np.zeros(8), np.eye(8)), rel=1e-12)
        assert got[b] == pytest.approx(0.5 * np.sum(m**2 + v - 1 - np.log(v)), rel=1e-12)
    np.testing.assert_allclose(kl.vae_kl(np.zeros((2, 3)), np.zeros((2, 3))), 0.0, atol=0)


# ------------------------------------------------------------------------------------------------ K4
def test_K4_gaussian_log_likelihood_against_density():
    """K4: log of the density 1/√(2πσ²)·exp(−(x−μ)²/2σ²) evaluated directly; the diagonal sum equals the
    multivariate log-density with a diagonal covariance; exp(log-likelihood) integrates to 1."""
    rng = np.random.default_rng(6)
    x, mean = rng.standard_normal(6), rng.standard_normal(6)
    logvar = rng.standard_normal(6)
    sd = np.exp(0.5 * logvar)
    got = kl.gaussian_log_likelihood(x, mean, logvar)
    np.testing.assert_allclose(got, np.log(np.exp(-((x - mean) ** 2) / (2 * sd**2)) / (sd * np.sqrt(2 * np.pi))),
                               rtol=1e-12)
    total = float(np.sum(got))
    D = 6
    assert total == pytest.approx(-D / 2 * math.log(2 * math.pi) - np.sum(np.log(sd))
                                  - 0.5 * np.sum((x - mean) ** 2 / sd**2), rel=1e-12)
    assert total == pytest.approx(float(_mvn_logpdf(x[None], mean, np.diag(sd**2))[0]), rel=1e-12)
    mass = integrate(lambda z: np.exp(kl.gaussian_log_likelihood(z, 0.3, math.log(0.25))), -12, 12)
    assert mass == pytest.approx(1.0, rel=1e-12)


# ------------------------------------------------------------------------------------------------ K5
def _bin_log_probs_indep(mean, scale, levels):
    """log P(bin) for each of the K levels by quadrature of the Gaussian density over each bin."""
    centres = -1 + 2 * np.arange(levels) / (levels - 1)
    half = 1.0 / (levels - 1)
    out = []
    for i, c in enumerate(centres):
        lo = -math.inf if i == 0 else (c - half - mean) / scale
        hi = math.inf if i == levels - 1 else (c + half - mean) / scale
        out.append(log_std_normal_mass(lo, hi))
    return centres, np.array(out)


@pytest.mark.parametrize(("mean", "scale", "levels"), [(0.0, 0.5, 2), (0.1, 0.3, 5), (-0.37, 0.05, 17),
                                                       (0.2, 0.01, 256), (0.95, 2.0, 256)])
def test_K5_discretized_likelihood_matches_bin_integrals_and_sums_to_one(mean, scale, levels):
    """K5: each level's log-probability equals the log of the Gaussian density integrated over its bin
    (half-width 1/(K−1), open-ended outer bins) by quadrature (rtol 1e-9 on the probability, and on the
    log in the deep tails), and the K probabilities sum to 1."""
    centres, expect = _bin_log_probs_indep(mean, scale, levels)
    got = kl.discretized_gaussian_log_likelihood(centres, mean, math.log(scale), levels=levels)
    assert got.shape == (levels,)
    assert math.fsum(np.exp(got)) == pytest.approx(1.0, abs=1e-12)
    finite = expect > np.log(np.finfo(np.float64).tiny)
    np.testing.assert_allclose(np.exp(got[finite]), np.exp(expect[finite]), rtol=1e-9, atol=1e-300)
    np.testing.assert_allclose(got[finite], expect[finite], rtol=1e-9, atol=1e-9)


def test_K5_deep_tail_is_accurate():
    """K5: far in the tails (probabilities 1e-40…1e-200) the log-probability stays accurate, where a naive
    Φ(hi) − Φ(lo) would cancel to 0."""
    levels = 256
    centres = -1 + 2 * np.arange(levels) / (levels - 1)
    for mean, scale, idx in [(-0.5, 0.1, 240), (0.8, 0.1, 3), (0.0, 0.03, 200), (0.0, 0.034, 0)]:
        _, expect = _bin_log_probs_indep(mean, scale, levels)
        got = kl.discretized_gaussian_log_likelihood(centres[idx], mean, math.log(scale), levels=levels)
        assert math.log(1e-300) < expect[idx] < math.log(1e-40)
        assert float(got) == pytest.approx(expect[idx], rel=1e-9)
    # beyond float64 (here e^-3900) the documented floor is log(smallest positive float64)
    _, expect = _bin_log_probs_indep(0.8, 0.02, levels)
    got = kl.discretized_gaussian_log_likelihood(centres[3], 0.8, math.log(0.02), levels=levels)
    assert expect[3] < -3000
    assert float(got) == pytest.approx(math.log(np.finfo(np.float64).tiny), rel=1e-12)


def test_K5_scalar_and_broadcast_inputs():
    """K5: scalar (0-d) inputs work and equal the array result; x, mean and log_scale broadcast."""
    got = kl.discretized_gaussian_log_likelihood(0.0, 0.1, math.log(0.3), levels=5)
    arr = kl.discretized_gaussian_log_likelihood(np.array([0.0]), 0.1, math.log(0.3), levels=5)
    assert np.ndim(got) == 0
    assert float(got) == pytest.approx(float(arr[0]), rel=1e-15)
    _, expect = _bin_log_probs_indep(0.1, 0.3, 5)
    assert float(got) == pytest.approx(expect[2], rel=1e-9)
    x = np.array([[-1.0], [0.0], [1.0]])
    means = np.array([-0.5, 0.0, 0.5])
    out = kl.discretized_gaussian_log_likelihood(x, means, math.log(0.4), levels=3)
    assert out.shape == (3, 3)
    np.testing.assert_allclose(np.exp(out).sum(axis=0), 1.0, rtol=1e-12)


# ------------------------------------------------------------------------------------------------ K6
def test_K6_kl_is_cross_entropy_minus_entropy():
    """K6: KL(p ‖ q) = H(p, q) − H(p) on random pmfs (with zeros in p), against sums written out here."""
    rng = np.random.default_rng(7)
    p = rng.dirichlet(np.ones(6), size=4)
    p[0, 2] = 0.0
    p[0] /= p[0].sum()
    q = rng.dirichlet(np.ones(6), size=4)
    h = np.array([-sum(pi * math.log(pi) for pi in row if pi > 0) for row in p])
    ce = np.array([-sum(pi * math.log(qi) for pi, qi in zip(prow, qrow, strict=True) if pi > 0)
                   for prow, qrow in zip(p, q, strict=True)])
    np.testing.assert_allclose(kl.entropy(p), h, rtol=1e-12)
    np.testing.assert_allclose(kl.cross_entropy(p, q), ce, rtol=1e-12)
    np.testing.assert_allclose(kl.kl_discrete(p, q), ce - h, rtol=1e-10, atol=1e-14)
    assert np.all(kl.kl_discrete(p, q) > 0)
    np.testing.assert_allclose(kl.kl_discrete(p, p), 0.0, atol=1e-15)
    # uniform and point masses
    assert float(kl.entropy(np.full(8, 1 / 8))) == pytest.approx(math.log(8), rel=1e-14)
    assert float(kl.entropy(np.eye(4)[1])) == 0.0
    assert float(kl.kl_discrete(np.eye(4)[1], np.full(4, 0.25))) == pytest.approx(math.log(4), rel=1e-14)
    # support mismatch: q = 0 where p > 0 gives +∞
    assert float(kl.kl_discrete(np.array([0.5, 0.5]), np.array([1.0, 0.0]))) == math.inf
    assert float(kl.cross_entropy(np.array([0.5, 0.5]), np.array([1.0, 0.0]))) == math.inf


# ------------------------------------------------------------------------------------------------ K7
def test_K7_chain_rule_both_orders_sum_to_joint_kl():
    """K7: KL(p(a,b) ‖ q(a,b)) = KL(p(a) ‖ q(a)) + E_{p(a)}KL(p(b given a) ‖ q(b given a)), and the inverted
    form conditioning on b; both equal the joint KL, with the marginal terms computed here."""
    rng = np.random.default_rng(8)
    p = rng.dirichlet(np.ones(12)).reshape(3, 4)
    q = rng.dirichlet(np.ones(12)).reshape(3, 4)
    joint = float(np.sum(p * np.log(p / q)))
    for axis in (0, 1):
        marg, cond = kl.kl_chain_rule(p, q, first_axis=axis)
        assert marg + cond == pytest.approx(joint, rel=1e-12)
        pa, qa = p.sum(axis=1 - axis), q.sum(axis=1 - axis)
        assert marg == pytest.approx(float(np.sum(pa * np.log(pa / qa))), rel=1e-12)
        assert cond >= 0 and marg >= 0
    # independent p and q with equal b-marginals: conditional term equals the a-part only
    pa, pb, qa = np.array([0.2, 0.8]), np.array([0.1, 0.3, 0.6]), np.array([0.5, 0.5])
    marg, cond = kl.kl_chain_rule(np.outer(pa, pb), np.outer(qa, pb), first_axis=0)
    assert cond == pytest.approx(0.0, abs=1e-15)
    assert marg == pytest.approx(float(np.sum(pa * np.log(pa / qa))), rel=1e-12)
