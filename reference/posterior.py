"""Posteriors and parameterisations (docs/formulas.md: P1–P8).

Conversions take the noisy sample first: ``f(x_t, t, value, schedule)``, with x_t of shape (B, ...) and
per-example math t (scalar or (B,)). The DDPM notation is used throughout; see ``schedules.su_from_ddpm``.
"""

from __future__ import annotations

import numpy as np

from ._checks import (
    PREDICTIONS,
    as_float_array,
    broadcast_t,
    check_real,
    check_same_shape,
    check_t_batch,
    check_timesteps,
    gather,
    prediction_name,
)
from .schedules import Schedule, check_schedule

__all__ = ["PREDICTIONS", "check_ddim_eta", "check_signal", "ddim_coefficients", "ddim_posterior", "ddim_sigma",
           "denoised", "dynamic_threshold", "eps_from_score", "eps_from_v", "eps_from_x0", "gaussian_product",
           "mean_from_eps", "posterior_mean", "q_posterior", "random_walk_mean_from_eps", "random_walk_posterior",
           "score_from_eps", "v_from_eps", "v_from_x0", "x0_eps_from_output", "x0_from_eps", "x0_from_v"]


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
    mean = posterior_mean(x0, x_t, t, schedule)
    return mean, _tab(schedule, "posterior_variance", t, nd), _tab(schedule, "posterior_log_variance_clipped", t, nd)


def posterior_mean(x0, x_t, t, schedule: Schedule):
    """P1's mean μ̃_t = √ᾱ_{t−1}β_t/(1−ᾱ_t)·x_0 + √α_t(1−ᾱ_{t−1})/(1−ᾱ_t)·x_t, unchecked (the kernel of
    ``q_posterior`` and of the DDPM step); t an int or a per-example int array, as ``denoised``."""
    nd = x_t.ndim
    return gather(schedule.posterior_mean_coef1, t, nd) * x0 + gather(schedule.posterior_mean_coef2, t, nd) * x_t


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
    return _ddim_sigma(schedule.alpha_bars[t], schedule.alpha_bars[t_prev], check_real(eta, "eta", 0.0))


def _ddim_sigma(ab, ab_prev, eta):
    """P7 on ᾱ_t and ᾱ_{t_prev} (floats or arrays), unchecked."""
    return eta * np.sqrt((1.0 - ab_prev) / (1.0 - ab)) * np.sqrt(1.0 - ab / ab_prev)


def check_ddim_eta(eta: float, t, t_prev, schedule: Schedule) -> None:
    """ValueError unless σ_t(η)² ≤ 1 − ᾱ_{t_prev} on every step t → t_prev (P6's condition on P7's σ)."""
    ab_prev = schedule.alpha_bars[t_prev]
    if np.any(_ddim_sigma(schedule.alpha_bars[t], ab_prev, eta) ** 2 > 1.0 - ab_prev + 1e-12):
        raise ValueError(f"eta={eta!r} is too large for this step: sigma_t(eta)**2 must be <= 1 - alpha_bar[t_prev]")


def ddim_coefficients(t, t_prev, eta, schedule: Schedule, ndim: int = 0, sigma=None):
    """P6 with P7, unchecked (the kernel of ``ddim_step``, the DDIM loop and sampler.onnx's graph):
    (ζ, ξ, σ) such that x_{t_prev} = ζ·x̂_0 + ξ·x_t + σ·z, with σ = σ_t(η) (or ``sigma`` as given),
    ξ = √(1−ᾱ_{t_prev}−σ²)/√(1−ᾱ_t) and ζ = √ᾱ_{t_prev} − ξ√ᾱ_t.

    t, t_prev: ints (floats come back) or per-example int arrays (arrays shaped to broadcast over ``ndim``).
    """
    ab_prev = gather(schedule.alpha_bars, t_prev, ndim)
    if sigma is None:
        sigma = _ddim_sigma(gather(schedule.alpha_bars, t, ndim), ab_prev, eta)
    xi = np.sqrt(np.maximum(1.0 - ab_prev - sigma**2, 0.0)) / gather(schedule.sqrt_one_minus_alpha_bars, t, ndim)
    zeta = np.sqrt(ab_prev) - xi * gather(schedule.sqrt_alpha_bars, t, ndim)
    if isinstance(t, (int, np.integer)):
        return float(zeta), float(xi), float(sigma)
    return zeta, xi, sigma


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
    sig = sigma.reshape(sigma.shape + (1,) * (nd - sigma.ndim)) if sigma.ndim else sigma
    if np.any(sigma < 0) or np.any(1.0 - _tab(schedule, "alpha_bars", t_prev, nd) - sig**2 < -1e-12):
        raise ValueError("sigma must satisfy 0 <= sigma_t**2 <= 1 - alpha_bar[t_prev] (P6)")
    zeta, xi, _ = ddim_coefficients(t, t_prev, None, schedule, nd, sigma=sig)
    return zeta * x0 + xi * x_t, np.broadcast_to(sig**2, np.broadcast_shapes(np.shape(sig), (1,) * nd))


def x0_from_eps(x_t, t, eps, schedule: Schedule):
    """P3: x_0 = (x_t − √(1−ᾱ_t) ε)/√ᾱ_t; t in 1..T (ᾱ_t > 0 required)."""
    x_t, t, eps = _prep(x_t, t, eps, schedule, "eps")
    check_signal(schedule, t)
    return denoised(eps, x_t, t, schedule, "eps")[0]


def check_signal(schedule: Schedule, t) -> None:
    """ValueError where ᾱ_t = 0 (zero terminal SNR): x̂_0 from ε̂ divides by √ᾱ_t there."""
    if np.any(schedule.alpha_bars[t] == 0):
        raise ValueError("eps-prediction cannot be used where alpha_bar[t] = 0 (zero terminal SNR, R2): "
                         "x0 = (x_t - sqrt(1 - alpha_bar) * eps) / sqrt(alpha_bar) divides by zero there; "
                         "use v- or x0-prediction")


def eps_from_x0(x_t, t, x0, schedule: Schedule):
    """P3: ε = (x_t − √ᾱ_t x_0)/√(1−ᾱ_t); t in 1..T."""
    x_t, t, x0 = _prep(x_t, t, x0, schedule, "x0")
    return denoised(x0, x_t, t, schedule, "x0")[1]


def v_from_eps(x_t, t, eps, schedule: Schedule):
    """P3/R5: v = √ᾱ_t ε − √(1−ᾱ_t) x_0 with x_0 = x0(x_t, ε); equivalently (ε − √(1−ᾱ_t) x_t)/√ᾱ_t."""
    x_t, t, eps = _prep(x_t, t, eps, schedule, "eps")
    nd = x_t.ndim
    a, s = _tab(schedule, "sqrt_alpha_bars", t, nd), _tab(schedule, "sqrt_one_minus_alpha_bars", t, nd)
    return (eps - s * x_t) / a


def eps_from_v(x_t, t, v, schedule: Schedule):
    """P3/R5: ε̂ = √(1−ᾱ_t) x_t + √ᾱ_t v̂ (finite at ᾱ_t = 0, zero terminal SNR: ε̂ = x_t)."""
    x_t, t, v = _prep(x_t, t, v, schedule, "v")
    return denoised(v, x_t, t, schedule, "v")[1]


def x0_from_v(x_t, t, v, schedule: Schedule):
    """P3/R5: x̂_0 = √ᾱ_t x_t − √(1−ᾱ_t) v̂ (finite at ᾱ_t = 0, zero terminal SNR: x̂_0 = −v̂)."""
    x_t, t, v = _prep(x_t, t, v, schedule, "v")
    return denoised(v, x_t, t, schedule, "v")[0]


def v_from_x0(x_t, t, x0, schedule: Schedule):
    """P3/R5: v = √ᾱ_t ε − √(1−ᾱ_t) x_0 with ε = ε(x_t, x_0); equivalently (√ᾱ_t x_t − x_0)/√(1−ᾱ_t)."""
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
    x_t, t, model_output = _prep(x_t, t, model_output, schedule, "model_output")
    if kind == "eps":
        check_signal(schedule, t)
    if clip is not None:
        clip = check_real(clip, "clip", 0.0, low_open=True)
    return denoised(model_output, x_t, t, schedule, kind, clip)


def denoised(model_output, x_t, t, schedule: Schedule, prediction: str, clip=None):
    """P3, unchecked (the kernel of ``x0_eps_from_output`` and of every sampling loop's denoiser): (x̂_0, ε̂)
    from a model output of the canonical type ``prediction`` ('eps', 'x0' or 'v'):

        eps: x̂_0 = x_t/√ᾱ_t − √(1/ᾱ_t − 1)·ε̂;   x0: ε̂ = (x_t − √ᾱ_t x̂_0)/√(1−ᾱ_t);
        v:   x̂_0 = √ᾱ_t x_t − √(1−ᾱ_t) v,  ε̂ = √ᾱ_t v + √(1−ᾱ_t) x_t;

    with ``clip`` c > 0, x̂_0 is clipped to [−c, c] and ε̂ recomputed from it (improved-diffusion). t: an int
    (NumPy arrays or torch tensors, coefficients as floats) or a per-example int array (NumPy).
    """
    nd = x_t.ndim
    a, s = gather(schedule.sqrt_alpha_bars, t, nd), gather(schedule.sqrt_one_minus_alpha_bars, t, nd)
    if prediction == "eps":
        eps = model_output
        x0 = gather(schedule.sqrt_recip_alpha_bars, t, nd) * x_t - gather(schedule.sqrt_recipm1_alpha_bars, t, nd) * eps
    elif prediction == "x0":
        x0 = model_output
        eps = (x_t - a * x0) / s
    else:
        x0 = a * x_t - s * model_output
        eps = a * model_output + s * x_t
    if clip is not None:
        x0 = x0.clip(-clip, clip)
        eps = (x_t - a * x0) / s
    return x0, eps


def dynamic_threshold(x0, percentile: float = 99.5):
    """R4: Imagen's dynamic thresholding of x̂_0 (Saharia et al. 2022, §2.3), per example:
    s = max(1, the ``percentile``-th percentile of |x̂_0| over the example's entries), x̂_0 ← clip(x̂_0, −s, s)/s.

    x0 (B, ...); percentile in (0, 100] (99.5 as diffusers' ``dynamic_thresholding_ratio`` 0.995; NumPy's
    default linear interpolation between order statistics, as ``torch.quantile``). With p = 100, s is the
    largest |x̂_0| (floored at 1): nothing is clipped and the example is only scaled into [−1, 1]; an example
    already inside [−1, 1] is returned unchanged for every p. Returns (B, ...) in [−1, 1].

    A pixel-space tool: the latents of ldmkit's models have unit variance (V1), so it is offered here, not in
    the samplers.
    """
    x0 = as_float_array(x0, "x0")
    if x0.ndim < 1 or x0.shape[0] < 1:
        raise ValueError(f"x0 must have a leading batch axis, shape (B, ...), got {x0.shape}")
    percentile = check_real(percentile, "percentile", 0.0, 100.0, low_open=True)
    flat = np.abs(x0.reshape(x0.shape[0], -1))
    s = np.maximum(1.0, np.percentile(flat, percentile, axis=1)).reshape((-1,) + (1,) * (x0.ndim - 1))
    return np.clip(x0, -s, s) / s


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
