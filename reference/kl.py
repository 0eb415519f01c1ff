"""Divergences and likelihoods (docs/formulas.md: K1–K7), in nats.

Elementwise functions broadcast their arguments; reductions are the caller's (``losses`` sums them).
"""

from __future__ import annotations

import math

import numpy as np

from ._checks import as_float_array, check_int

_LOG_2PI = math.log(2.0 * math.pi)
_erfc = np.frompyfunc(math.erfc, 1, 1)


def normal_kl(mean1, logvar1, mean2, logvar2):
    """K1: KL(N(μ₁, σ₁²) ‖ N(μ₂, σ₂²)) elementwise = ½(log σ₂²/σ₁² − 1 + σ₁²/σ₂² + (μ₁−μ₂)²/σ₂²).

    (docs/formulas.md writes it with q = the second argument, p = the first.) Shapes broadcast.
    """
    m1, lv1 = as_float_array(mean1, "mean1"), as_float_array(logvar1, "logvar1")
    m2, lv2 = as_float_array(mean2, "mean2"), as_float_array(logvar2, "logvar2")
    return 0.5 * (lv2 - lv1 - 1.0 + np.exp(lv1 - lv2) + (m1 - m2) ** 2 * np.exp(-lv2))


def _check_cov(cov, d, name):
    c = as_float_array(cov, name)
    if c.shape != (d, d):
        raise ValueError(f"{name} must have shape ({d}, {d}), got {c.shape}")
    if not np.allclose(c, c.T, rtol=1e-10, atol=1e-12):
        raise ValueError(f"{name} must be symmetric")
    try:
        return c, np.linalg.cholesky(c)
    except np.linalg.LinAlgError as exc:
        raise ValueError(f"{name} must be positive definite") from exc


def gaussian_kl_full(mu1, cov1, mu2, cov2) -> float:
    """K2: KL(N(μ₁, Σ₁) ‖ N(μ₂, Σ₂)) = ½(tr(Σ₂⁻¹Σ₁) + (μ₂−μ₁)ᵀΣ₂⁻¹(μ₂−μ₁) − d + log det Σ₂/det Σ₁).

    Means (d,), covariances (d, d) symmetric positive definite; computed through Cholesky factors.
    """
    mu1, mu2 = as_float_array(mu1, "mu1"), as_float_array(mu2, "mu2")
    if mu1.ndim != 1 or mu2.shape != mu1.shape:
        raise ValueError(f"mu1 and mu2 must both have shape (d,), got {mu1.shape} and {mu2.shape}")
    d = mu1.shape[0]
    _, l1 = _check_cov(cov1, d, "cov1")
    _, l2 = _check_cov(cov2, d, "cov2")
    a = np.linalg.solve(l2, l1)
    diff = np.linalg.solve(l2, mu2 - mu1)
    logdet = 2.0 * (np.sum(np.log(np.diag(l2))) - np.sum(np.log(np.diag(l1))))
    return float(0.5 * (np.sum(a**2) + diff @ diff - d + logdet))


def vae_kl(mean, logvar):
    """K3: KL(N(μ, σ²) ‖ N(0, I)) = ½Σ(μ² + σ² − 1 − log σ²), summed over all axes but the first (batch).

    mean, logvar: (B, ...) → (B,).
    """
    mean, logvar = as_float_array(mean, "mean"), as_float_array(logvar, "logvar")
    if mean.shape != logvar.shape or mean.ndim < 1:
        raise ValueError(f"mean and logvar must have the same shape (B, ...), got {mean.shape} and {logvar.shape}")
    kl = 0.5 * (mean**2 + np.exp(logvar) - 1.0 - logvar)
    return kl.reshape(kl.shape[0], -1).sum(axis=1)


def gaussian_log_likelihood(x, mean, logvar):
    """K4: log N(x; μ, σ²) elementwise = −½ log 2π − ½ log σ² − ½(x−μ)²/σ²; summed over D elements it is
    the diagonal −D/2 log 2π − Σ log σ_i − ½Σ(x_i−μ_i)²/σ_i². Shapes broadcast."""
    x, mean, logvar = as_float_array(x, "x"), as_float_array(mean, "mean"), as_float_array(logvar, "logvar")
    return -0.5 * (_LOG_2PI + logvar + (x - mean) ** 2 * np.exp(-logvar))


def _normal_cdf_diff(lo, hi):
    """Φ(hi) − Φ(lo) for lo ≤ hi (±inf allowed), computed in the tail where it does not cancel."""
    s = 1.0 / math.sqrt(2.0)
    upper = lo > 0  # both in the upper tail: use survival functions
    a = np.where(upper, lo, -hi) * s
    b = np.where(upper, hi, -lo) * s
    # np.asarray: a ufunc from frompyfunc returns a bare Python float (no .astype) for 0-d input
    return 0.5 * (np.asarray(_erfc(a), dtype=np.float64) - np.asarray(_erfc(b), dtype=np.float64))


def discretized_gaussian_log_likelihood(x, mean, log_scale, levels: int = 256):
    """K5: log-probability of data x on K = ``levels`` evenly spaced values in [−1, 1] under a Gaussian
    N(mean, exp(log_scale)²) discretised into bins of half-width 1/(K−1) around each level; the outer
    bins are open-ended (−∞ to −1 + 1/(K−1), 1 − 1/(K−1) to ∞), so the K probabilities sum to 1.

    Ho et al.'s L_0. Computed with the exact erfc (no tanh approximation); log-probabilities below the
    smallest positive float64 are floored there. x must lie on the grid. Shapes broadcast; elementwise.
    """
    levels = check_int(levels, "levels", 2)
    x, mean = as_float_array(x, "x"), as_float_array(mean, "mean")
    log_scale = as_float_array(log_scale, "log_scale")
    if np.any(np.abs(x) > 1.0):
        raise ValueError("x must lie in [-1, 1] for the discretised likelihood")
    k = (x + 1.0) * (levels - 1) / 2.0
    if np.any(np.abs(k - np.round(k)) > 1e-6):
        raise ValueError(f"x must lie on the grid of {levels} levels in [-1, 1] (x = -1 + 2k/(levels-1))")
    half = 1.0 / (levels - 1)
    inv_s = np.exp(-log_scale)
    lo = np.where(x <= -1.0 + 1e-12, -np.inf, (x - half - mean) * inv_s)
    hi = np.where(x >= 1.0 - 1e-12, np.inf, (x + half - mean) * inv_s)
    lo, hi = np.broadcast_arrays(lo, hi)
    p = _normal_cdf_diff(lo, hi)
    return np.log(np.maximum(p, np.finfo(np.float64).tiny))


def _check_pmf(p, name):
    p = as_float_array(p, name)
    if p.ndim < 1 or np.any(p < 0) or not np.allclose(p.sum(axis=-1), 1.0, atol=1e-9):
        raise ValueError(f"{name} must be a probability vector (non-negative, summing to 1 over the last axis)")
    return p


def entropy(p):
    """K6: H(p) = −Σ p log p over the last axis (0 log 0 = 0); shape p.shape[:-1]."""
    p = _check_pmf(p, "p")
    with np.errstate(divide="ignore", invalid="ignore"):
        return -np.sum(np.where(p > 0, p * np.log(p), 0.0), axis=-1)


def cross_entropy(p, q):
    """K6: H(p, q) = −Σ p log q over the last axis (inf where q = 0 < p)."""
    p, q = _check_pmf(p, "p"), _check_pmf(q, "q")
    with np.errstate(divide="ignore", invalid="ignore"):
        return -np.sum(np.where(p > 0, p * np.log(q), 0.0), axis=-1)


def kl_discrete(p, q):
    """K6: KL(p ‖ q) = H(p, q) − H(p) = Σ p log(p/q) over the last axis."""
    p, q = _check_pmf(p, "p"), _check_pmf(q, "q")
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.sum(np.where(p > 0, p * (np.log(p) - np.log(q)), 0.0), axis=-1)


def kl_chain_rule(p_joint, q_joint, first_axis: int = 0):
    """K7: the chain rule KL(p(a, b) ‖ q(a, b)) = KL(p(a) ‖ q(a)) + E_{p(a)} KL(p(b given a) ‖ q(b given a)),
    where a is axis ``first_axis`` (0 or 1) of the 2-D joint tables; ``first_axis=1`` gives the inverted
    form that conditions the other way. Returns (marginal KL, expected conditional KL)."""
    p, q = as_float_array(p_joint, "p_joint"), as_float_array(q_joint, "q_joint")
    if p.ndim != 2 or p.shape != q.shape:
        raise ValueError(f"p_joint and q_joint must be 2-D tables of the same shape, got {p.shape} and {q.shape}")
    first_axis = check_int(first_axis, "first_axis", 0, 1)
    _check_pmf(p.ravel(), "p_joint")
    _check_pmf(q.ravel(), "q_joint")
    if first_axis == 1:
        p, q = p.T, q.T
    pa, qa = p.sum(axis=1), q.sum(axis=1)
    if np.any((pa > 0) & (qa == 0)):
        return float("inf"), float("inf")
    marginal = kl_discrete(pa, qa)
    cond = 0.0
    for i in np.flatnonzero(pa > 0):
        cond += pa[i] * kl_discrete(p[i] / pa[i], q[i] / qa[i])
    return float(marginal), float(cond)
