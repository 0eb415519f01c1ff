"""The forward (noising) process (docs/formulas.md: F1–F4, S12).

Shapes: ``x0``/``x_prev`` are (B, ...) arrays (NCHW for images); ``t`` is a math timestep, a scalar or
shape (B,), broadcast over the other axes. ``noise`` is an array of the same shape or a Generator.
"""

from __future__ import annotations

import numpy as np

from ._checks import as_float_array, broadcast_t, check_t_batch, check_timesteps, draw_noise
from .schedules import Schedule, check_schedule


def _x_and_t(x, t, schedule, name="x0", low=0):
    x = as_float_array(x, name)
    t = check_timesteps(t, "t", schedule.T, low=low)
    check_t_batch(t, x)
    return x, t


def q_sample(x0, t, noise, schedule: Schedule) -> np.ndarray:
    """F2: x_t = √ᾱ_t x_0 + √(1−ᾱ_t) ε, a draw from q(x_t given x_0); t in 0..T; shape of x0."""
    schedule = check_schedule(schedule)
    x0, t = _x_and_t(x0, t, schedule)
    eps = draw_noise(noise, x0.shape)
    return (broadcast_t(schedule.sqrt_alpha_bars, t, x0.ndim) * x0
            + broadcast_t(schedule.sqrt_one_minus_alpha_bars, t, x0.ndim) * eps)


def q_step(x_prev, t, noise, schedule: Schedule) -> np.ndarray:
    """F1: one forward step x_t = √α_t x_{t−1} + √(1−α_t) ε; t in 1..T; shape of x_prev."""
    schedule = check_schedule(schedule)
    x_prev, t = _x_and_t(x_prev, t, schedule, "x_prev", low=1)
    eps = draw_noise(noise, x_prev.shape)
    return (np.sqrt(broadcast_t(schedule.alphas, t, x_prev.ndim)) * x_prev
            + np.sqrt(broadcast_t(schedule.betas, t, x_prev.ndim)) * eps)


def q_mean_variance(x0, t, schedule: Schedule):
    """F2: the marginal q(x_t given x_0) = N(√ᾱ_t x_0, (1−ᾱ_t) I).

    Returns (mean, variance, log_variance); mean has the shape of x0, the others broadcast to it.
    """
    schedule = check_schedule(schedule)
    x0, t = _x_and_t(x0, t, schedule)
    mean = broadcast_t(schedule.sqrt_alpha_bars, t, x0.ndim) * x0
    var = broadcast_t(1.0 - schedule.alpha_bars, t, x0.ndim)
    with np.errstate(divide="ignore"):
        return mean, var, np.log(var)


def prior_kl(x0, schedule: Schedule) -> np.ndarray:
    """F4: the prior term L_T = KL(q(x_T given x_0) ‖ N(0, I)), elementwise in nats; shape of x0.

    KL(N(μ, σ²) ‖ N(0, 1)) = ½(μ² + σ² − 1 − log σ²) with μ = √ᾱ_T x_0, σ² = 1 − ᾱ_T (K1 with p = N(0,1)).
    """
    schedule = check_schedule(schedule)
    x0 = as_float_array(x0, "x0")
    ab = schedule.alpha_bars[-1]
    var = 1.0 - ab
    return 0.5 * (ab * x0**2 + var - 1.0 - np.log(var))


def random_walk_q_sample(x0, t, noise) -> np.ndarray:
    """S12: Inouye's random walk, q(x_t given x_0) = N(x_0, t·I): x_t = x_0 + √t ε; t ≥ 0 scalar or (B,)."""
    x0 = as_float_array(x0, "x0")
    t = as_float_array(t, "t")
    if np.any(t < 0):
        raise ValueError("t must be >= 0 for the random-walk process")
    check_t_batch(t, x0)
    eps = draw_noise(noise, x0.shape)
    tt = t.reshape(t.shape + (1,) * (x0.ndim - t.ndim)) if t.ndim else t
    return x0 + np.sqrt(tt) * eps
