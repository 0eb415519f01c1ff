"""Posteriors and parameterisations (FORMULAS P1–P8).

Conversions take the noisy sample first: ``f(x_t, t, value, schedule)``, with x_t of shape (B, ...) and
per-example math t (scalar or (B,)). The DDPM notation is used throughout; see ``schedules.su_from_ddpm``.
"""

from __future__ import annotations

import numpy as np

from ._checks import (
    as_float_array,
    broadcast_t,
    check_real,
    check_same_shape,
    check_t_batch,
    check_timesteps,
    prediction_name,
)
from .schedules import Schedule, check_schedule


def _prep(x_t, t, value, schedule, value_name, low=1):
    check_schedule(schedule)
    x_t = as_float_array(x_t, "x_t")
    value = as_float_array(value, value_name)
    check_same_shape(x_t, value, "x_t", value_name)
    t = check_timesteps(t, "t", schedule.T, low=low)
    check_t_batch(t, x_t)
    return x_t, t, value


def _tab(schedule, name, t, ndim):
    return broadcast_t(getattr(schedule, name), t, ndim)


def q_posterior(x0, x_t, t, schedule: Schedule):
    """P1: q(x_{t−1} given x_t, x_0) = N(μ̃_t, β̃_t I), t in 1..T.

    μ̃_t = √ᾱ_{t−1}β_t/(1−ᾱ_t)·x_0 + √α_t(1−ᾱ_{t−1})/(1−ᾱ_t)·x_t, β̃_t = (1−ᾱ_{t−1})/(1−ᾱ_t)·β_t.
    Returns (mean, variance, log_variance_clipped): the log variance at t = 1 (log 0) is replaced by
    log β̃_2 as in improved-diffusion (``Schedule.posterior_log_variance_clipped``).
    """
    x_t, t, x0 = _prep(x_t, t, x0, schedule, "x0")
    nd = x_t.ndim
    mean = _tab(schedule, "posterior_mean_coef1", t, nd) * x0 + _tab(schedule, "posterior_mean_coef2", t, nd) * x_t
    return mean, _tab(schedule, "posterior_variance", t, nd), _tab(schedule, "posterior_log_variance_clipped", t, nd)


def gaussian_product(mu1, cov1, mu2, cov2):
    """P2: the (unnormalised) product of Gaussian densities N(μ₁, Σ₁)·N(μ₂, Σ₂) ∝ N(μ, Σ) with
    Σ = (Σ₁⁻¹ + Σ₂⁻¹)⁻¹ and μ = Σ(Σ₁⁻¹μ₁ + Σ₂⁻¹μ₂). Means (d,), covariances (d, d)."""
    mu1, mu2 = as_float_array(mu1, "mu1"), as_float_array(mu2, "mu2")
    cov1, cov2 = as_float_array(cov1, "cov1"), as_float_array(cov2, "cov2")
    d = mu1.shape[-1] if mu1.ndim else 0
    if mu1.ndim != 1 or mu2.shape != mu1.shape or cov1.shape != (d, d) or cov2.shape != (d, d):
        raise ValueError(f"means must have shape (d,) and covariances (d, d); got {mu1.shape}, {cov1.shape}, "
                         f"{mu2.shape}, {cov2.shape}")
    p1, p2 = np.linalg.inv(cov1), np.linalg.inv(cov2)
    cov = np.linalg.inv(p1 + p2)
    return cov @ (p1 @ mu1 + p2 @ mu2), cov


def ddim_sigma(t, t_prev, eta: float, schedule: Schedule):
    """P7: σ_t(η) = η·√((1−ᾱ_{t_prev})/(1−ᾱ_t))·√(1−ᾱ_t/ᾱ_{t_prev}), for a step t → t_prev < t.

    η = 1 gives DDPM's β̃_t when t_prev = t−1; η = 0 is deterministic (DDIM). Shape of t.
    """
    check_schedule(schedule)
    t = check_timesteps(t, "t", schedule.T, low=1)
    t_prev = check_timesteps(t_prev, "t_prev", schedule.T, low=0)
    if np.any(t_prev >= t):
        raise ValueError("t_prev must be smaller than t")
    eta = check_real(eta, "eta", 0.0)
    ab, abp = schedule.alpha_bars[t], schedule.alpha_bars[t_prev]
    return eta * np.sqrt((1.0 - abp) / (1.0 - ab)) * np.sqrt(1.0 - ab / abp)


def ddim_posterior(x0, x_t, t, t_prev, sigma, schedule: Schedule):
    """P6: DDIM's generalised posterior q_σ(x_{t_prev} given x_t, x_0) = N(μ, σ_t² I) with
    μ = √ᾱ_{t_prev} x_0 + √(1−ᾱ_{t_prev}−σ_t²)·(x_t − √ᾱ_t x_0)/√(1−ᾱ_t); written as ζ_t x_0 + ξ_t x_t.

    It keeps q(x_{t_prev} given x_0) = N(√ᾱ_{t_prev}x_0, (1−ᾱ_{t_prev}) I) for every σ_t² ≤ 1 − ᾱ_{t_prev}.
    ``sigma`` is σ_t (scalar or per example). Returns (mean, variance).
    """
    x_t, t, x0 = _prep(x_t, t, x0, schedule, "x0")
    t_prev = check_timesteps(t_prev, "t_prev", schedule.T, low=0)
    check_t_batch(t_prev, x_t, "t_prev")
    if np.any(t_prev >= t):
        raise ValueError("t_prev must be smaller than t")
    sigma = as_float_array(sigma, "sigma")
    check_t_batch(sigma, x_t, "sigma")
    nd = x_t.ndim
    abp = _tab(schedule, "alpha_bars", t_prev, nd)
    sig = sigma.reshape(sigma.shape + (1,) * (nd - sigma.ndim)) if sigma.ndim else sigma
    room = 1.0 - abp - sig**2
    if np.any(sigma < 0) or np.any(room < -1e-12):
        raise ValueError("sigma must satisfy 0 <= sigma_t**2 <= 1 - alpha_bar[t_prev] (P6)")
    xi = np.sqrt(np.maximum(room, 0.0)) / _tab(schedule, "sqrt_one_minus_alpha_bars", t, nd)
    zeta = np.sqrt(abp) - xi * _tab(schedule, "sqrt_alpha_bars", t, nd)
    return zeta * x0 + xi * x_t, np.broadcast_to(sig**2, np.broadcast_shapes(np.shape(sig), (1,) * nd))


def x0_from_eps(x_t, t, eps, schedule: Schedule):
    """P3: x_0 = (x_t − √(1−ᾱ_t) ε)/√ᾱ_t; t in 1..T (ᾱ_t > 0 required)."""
    x_t, t, eps = _prep(x_t, t, eps, schedule, "eps")
    if np.any(schedule.alpha_bars[t] == 0):
        raise ValueError("x0_from_eps needs alpha_bar[t] > 0; "
                         "a zero-terminal-SNR schedule needs v- or x0-prediction")
    nd = x_t.ndim
    return _tab(schedule, "sqrt_recip_alpha_bars", t, nd) * x_t - _tab(schedule, "sqrt_recipm1_alpha_bars", t, nd) * eps


def eps_from_x0(x_t, t, x0, schedule: Schedule):
    """P3: ε = (x_t − √ᾱ_t x_0)/√(1−ᾱ_t); t in 1..T."""
    x_t, t, x0 = _prep(x_t, t, x0, schedule, "x0")
    nd = x_t.ndim
    return (x_t - _tab(schedule, "sqrt_alpha_bars", t, nd) * x0) / _tab(schedule, "sqrt_one_minus_alpha_bars", t, nd)


def v_from_eps(x_t, t, eps, schedule: Schedule):
    """P3: v = √ᾱ_t ε − √(1−ᾱ_t) x_0 with x_0 = x0(x_t, ε); equivalently (ε − √(1−ᾱ_t) x_t)/√ᾱ_t."""
    x_t, t, eps = _prep(x_t, t, eps, schedule, "eps")
    nd = x_t.ndim
    a, s = _tab(schedule, "sqrt_alpha_bars", t, nd), _tab(schedule, "sqrt_one_minus_alpha_bars", t, nd)
    return (eps - s * x_t) / a


def eps_from_v(x_t, t, v, schedule: Schedule):
    """P3: ε = √ᾱ_t v + √(1−ᾱ_t) x_t."""
    x_t, t, v = _prep(x_t, t, v, schedule, "v")
    nd = x_t.ndim
    return _tab(schedule, "sqrt_alpha_bars", t, nd) * v + _tab(schedule, "sqrt_one_minus_alpha_bars", t, nd) * x_t


def x0_from_v(x_t, t, v, schedule: Schedule):
    """P3: x_0 = √ᾱ_t x_t − √(1−ᾱ_t) v."""
    x_t, t, v = _prep(x_t, t, v, schedule, "v")
    nd = x_t.ndim
    return _tab(schedule, "sqrt_alpha_bars", t, nd) * x_t - _tab(schedule, "sqrt_one_minus_alpha_bars", t, nd) * v


def v_from_x0(x_t, t, x0, schedule: Schedule):
    """P3: v = √ᾱ_t ε − √(1−ᾱ_t) x_0 with ε = ε(x_t, x_0); equivalently (√ᾱ_t x_t − x_0)/√(1−ᾱ_t)."""
    x_t, t, x0 = _prep(x_t, t, x0, schedule, "x0")
    nd = x_t.ndim
    a, s = _tab(schedule, "sqrt_alpha_bars", t, nd), _tab(schedule, "sqrt_one_minus_alpha_bars", t, nd)
    return (a * x_t - x0) / s


def score_from_eps(x_t, t, eps, schedule: Schedule):
    """P5: Tweedie's score ∇ log q(x_t) ≈ −ε/√(1−ᾱ_t) (exact for the conditional q(x_t given x_0))."""
    x_t, t, eps = _prep(x_t, t, eps, schedule, "eps")
    return -eps / _tab(schedule, "sqrt_one_minus_alpha_bars", t, x_t.ndim)


def eps_from_score(x_t, t, score, schedule: Schedule):
    """P5: ε = −√(1−ᾱ_t)·score."""
    x_t, t, score = _prep(x_t, t, score, schedule, "score")
    return -score * _tab(schedule, "sqrt_one_minus_alpha_bars", t, x_t.ndim)


def mean_from_eps(x_t, t, eps, schedule: Schedule):
    """P4: the reverse mean μ_θ = (x_t − β_t/√(1−ᾱ_t)·ε_θ)/√α_t (equal to μ̃_t at x̂_0 = x0(x_t, ε_θ))."""
    x_t, t, eps = _prep(x_t, t, eps, schedule, "eps")
    nd = x_t.ndim
    b = _tab(schedule, "betas", t, nd)
    eps_coef = b / _tab(schedule, "sqrt_one_minus_alpha_bars", t, nd)
    return (x_t - eps_coef * eps) / np.sqrt(_tab(schedule, "alphas", t, nd))


def x0_eps_from_output(model_output, x_t, t, schedule: Schedule, prediction: str = "eps", clip=None):
    """Both x̂_0 and ε̂ from a model output of type ``prediction`` ('eps', 'x0' or 'v'; P3).

    ``clip``: None, or a bound c > 0 to clip x̂_0 to [−c, c] (ε̂ is then recomputed from the clipped x̂_0,
    as improved-diffusion does). Returns (x0, eps), each of the shape of x_t.
    """
    kind = prediction_name(prediction)
    if kind == "eps":
        eps = as_float_array(model_output, "model_output")
        x0 = x0_from_eps(x_t, t, eps, schedule)
    elif kind == "x0":
        x0 = as_float_array(model_output, "model_output")
        eps = eps_from_x0(x_t, t, x0, schedule)
    else:
        x0 = x0_from_v(x_t, t, model_output, schedule)
        eps = eps_from_v(x_t, t, model_output, schedule)
    if clip is not None:
        clip = check_real(clip, "clip", 0.0, low_open=True)
        x0 = np.clip(x0, -clip, clip)
        eps = eps_from_x0(x_t, t, x0, schedule)
    return x0, eps


def random_walk_posterior(x0, x_t, t):
    """P8: Inouye's posterior for the random walk (S12): q(x_{t−1} given x_t, x_0) = N((1−1/t)x_t + x_0/t,
    (1−1/t) I), t ≥ 1. Inouye's slides mix std t and variance t; this is the consistent variance-t
    process (q(x_t given x_0) = N(x_0, t I)). Returns (mean, variance)."""
    x_t, tt, x0 = _random_walk_args(x_t, t, x0, "x0")
    return (1.0 - 1.0 / tt) * x_t + x0 / tt, np.broadcast_to(1.0 - 1.0 / tt, np.shape(tt))


def random_walk_mean_from_eps(x_t, t, eps_tilde):
    """P8: the random-walk reverse mean μ_θ = x_t − ε̃_θ/t, where ε̃ = x_t − x_0 is what the model predicts."""
    x_t, tt, eps_tilde = _random_walk_args(x_t, t, eps_tilde, "eps_tilde")
    return x_t - eps_tilde / tt


def _random_walk_args(x_t, t, value, name):
    """(x_t, t shaped to broadcast over x_t, value) checked for the random-walk formulas (t ≥ 1)."""
    x_t, value = as_float_array(x_t, "x_t"), as_float_array(value, name)
    check_same_shape(x_t, value, "x_t", name)
    t = as_float_array(t, "t")
    if np.any(t < 1):
        raise ValueError("t must be >= 1 for the random-walk posterior")
    check_t_batch(t, x_t)
    return x_t, (t.reshape(t.shape + (1,) * (x_t.ndim - t.ndim)) if t.ndim else t), value
