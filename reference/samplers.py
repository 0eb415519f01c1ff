"""Samplers (FORMULAS A1–A9): one-step updates and whole sampling loops, in float64.

Conventions (DESIGN.md):
- x is (B, ...) (NCHW for images, (B, d) for toy data); discrete time is the math t (1..T; t = 0 is clean,
  ᾱ_0 = 1); continuous time is t ∈ [0, 1] (float array of shape (B,) when passed to a score function).
- A model is ``model(x_t, t, y)`` with t an int64 array of shape (B,) holding the MODEL's timestep
  (``schedule.timestep_map[t]``, the identity unless the schedule was ``respace``d) and y the labels or None.
  ``prediction`` is 'eps', 'x0' or 'v' (or diffusers' 'epsilon', 'sample', 'v_prediction').
- Noise is always an argument. A step takes an array of x's shape or a ``numpy.random.Generator``. A loop
  takes a Generator or an array of shape (num_steps, *x.shape) whose slot i is used at loop step i; the
  slots of deterministic steps (DDPM's t = 1, DDIM's σ = 0 steps) are ignored, and a Generator is drawn
  from only at stochastic steps. ``noise`` may be None when no step of the call is stochastic.
- Each loop returns the final sample, or ``(sample, trajectory)`` with ``return_trajectory=True``; the
  trajectory is an array (num_steps + 1, *x.shape) that starts with x_T.

The discrete ODE samplers (DDIM η = 0, ``euler_sample``, ``heun_sample``, ``dpmpp_2m_sample``) all
discretise the same probability-flow ODE: written in σ = √((1−ᾱ)/ᾱ) and x̃ = x/√ᾱ it is dx̃/dσ = ε̂ (A5),
whose Euler discretisation is exactly DDIM with η = 0.
"""

from __future__ import annotations

import numbers
from dataclasses import dataclass

import numpy as np

from ._checks import (
    as_float_array,
    check_int,
    check_real,
    check_same_shape,
    check_t_batch,
    check_timesteps,
    draw_noise,
    prediction_name,
    variance_name,
)
from .posterior import ddim_posterior, ddim_sigma, q_posterior, random_walk_mean_from_eps, x0_eps_from_output
from .schedules import Schedule, check_schedule, su_from_ddpm, ve_sde_sigma, vp_sde_beta, vp_sde_marginal

__all__ = [
    "VESDE", "VPSDE", "annealed_langevin_sample", "cfg", "ddim_sample", "ddim_step", "ddpm_sample", "ddpm_step",
    "dpmpp_2m_sample", "euler_sample", "heun_sample", "langevin_sample", "pf_ode_sample", "random_walk_sample",
    "reverse_sde_sample", "reverse_sde_step", "su_sample",
]

ODE_METHODS = ("euler", "heun")
SU_SIGMAS = ("beta", "beta_tilde", "zero")


# --------------------------------------------------------------------------------------------------------
# private helpers
# --------------------------------------------------------------------------------------------------------


def _callable(fn, name: str):
    if not callable(fn):
        raise TypeError(f"{name} must be callable, got {type(fn).__name__}")
    return fn


def _batch(x, name: str) -> np.ndarray:
    """x as a float64 array with a leading batch axis."""
    x = as_float_array(x, name)
    if x.ndim < 1:
        raise ValueError(f"{name} must have a leading batch axis, shape (B, ...), got a scalar")
    return x


def _expand(v: np.ndarray, ndim: int) -> np.ndarray:
    """Per-example values (shape () or (B,)) shaped to broadcast over an ndim array with batch axis first."""
    return v.reshape(v.shape + (1,) * (ndim - v.ndim)) if v.ndim else v


def _call(fn, name: str, x: np.ndarray, *args) -> np.ndarray:
    """``fn(x, *args)`` as a finite float64 array of x's shape (model outputs and scores)."""
    out = as_float_array(fn(x, *args), f"{name} output")
    if out.shape != x.shape:
        raise ValueError(f"{name} output must have the shape of x {x.shape}, got {out.shape}")
    return out


def _model_output(model, x: np.ndarray, t: int, schedule: Schedule, y) -> np.ndarray:
    """The model at math step t of ``schedule``: called with the model timestep ``timestep_map[t]`` as (B,)."""
    t_model = np.full((x.shape[0],), schedule.timestep_map[t], dtype=np.int64)
    return _call(model, "model", x, t_model, y)


def _denoise(model, x, t, schedule, prediction, y, clip):
    """(x̂_0, ε̂) from the model at math step t (P3; x̂_0 optionally clipped to [−clip, clip])."""
    return x0_eps_from_output(_model_output(model, x, t, schedule, y), x, t, schedule, prediction, clip)


def _step_list(timesteps, schedule: Schedule) -> np.ndarray:
    """Sampling timesteps: a non-empty, strictly descending 1-D list of math t in 1..T."""
    ts = check_timesteps(timesteps, "timesteps", schedule.T, low=1)
    if ts.ndim != 1 or ts.size < 1:
        raise ValueError(f"timesteps must be a non-empty 1-D array of math t in 1..{schedule.T}, "
                         f"got shape {ts.shape}")
    if np.any(np.diff(ts) >= 0):
        shown = ts[:8].tolist() + (["..."] if ts.size > 8 else [])
        raise ValueError(f"timesteps must be strictly descending (e.g. schedules.timesteps(...)), got {shown}")
    return ts


def _loop_noise(noise, num_steps: int, shape: tuple, needed: bool):
    """``get(i)``: the noise of loop step i, from a Generator or from slot i of a (num_steps, *shape) array."""
    if isinstance(noise, np.random.Generator):
        return lambda i: noise.standard_normal(shape)
    if noise is None:
        if needed:
            raise TypeError(f"noise must be a numpy.random.Generator or an array of shape {(num_steps, *shape)}, "
                            "got None (this call has stochastic steps)")
        return lambda i: None
    arr = draw_noise(noise, (num_steps, *shape))
    return lambda i: arr[i]


class _Trajectory:
    """Collects the states of a loop when asked to (the first is x_T)."""

    def __init__(self, x: np.ndarray, keep: bool):
        self.states = [x] if keep else None

    def add(self, x: np.ndarray) -> None:
        if self.states is not None:
            self.states.append(x)

    def result(self, x: np.ndarray):
        return x if self.states is None else (x, np.stack(self.states))


def _t_array(t, x: np.ndarray, low: float = 0.0) -> np.ndarray:
    """Continuous time(s) t in [low, 1] as a float array of shape () or (B,)."""
    t = as_float_array(t, "t")
    check_t_batch(t, x)
    if np.any(t < low) or np.any(t > 1):
        raise ValueError(f"t must lie in [{low:g}, 1] (continuous time), got {t.min() if t.size else t!r}")
    return t


# --------------------------------------------------------------------------------------------------------
# discrete steps (A1, A2)
# --------------------------------------------------------------------------------------------------------

def ddpm_step(model_output, x_t, t, schedule: Schedule, variance: str = "beta_tilde", noise=None,
              prediction: str = "eps", clip=None) -> np.ndarray:
    """A1: one DDPM ancestral step x_{t−1} = μ̃_t(x̂_0, x_t) + σ_t z, z = 0 where t = 1.

    μ̃_t is the posterior mean of P1 at x̂_0 = x̂_0(model_output) (P3); for ε-prediction it equals
    P4's (x_t − β_t/√(1−ᾱ_t)·ε_θ)/√α_t. σ_t² is β̃_t (variance='beta_tilde', alias 'fixed_small') or
    β_t ('beta', alias 'fixed_large'). With 'beta' ldmkit uses β_t at every t; improved-diffusion's
    FIXED_LARGE substitutes β̃_2 at t = 1 instead, which makes no difference since the t = 1 step adds
    no noise. ``clip``: None or c > 0 to clip x̂_0 to [−c, c].

    Shapes: model_output and x_t (B, ...); t scalar or (B,) in 1..T; noise an array (B, ...) or a
    Generator, and may be None where every t is 1. Returns x_{t−1}, (B, ...).
    """
    schedule = check_schedule(schedule)
    kind = variance_name(variance)
    x_t = _batch(x_t, "x_t")
    t = check_timesteps(t, "t", schedule.T, low=1)
    check_t_batch(t, x_t)
    x0, _ = x0_eps_from_output(model_output, x_t, t, schedule, prediction, clip)
    mean, _, _ = q_posterior(x0, x_t, t, schedule)
    if not np.any(t > 1):
        if noise is not None and not isinstance(noise, np.random.Generator):
            draw_noise(noise, x_t.shape)  # validate an array that is not used
        return mean
    table = schedule.posterior_variance if kind == "beta_tilde" else schedule.betas
    std = _expand(np.where(t > 1, np.sqrt(table[t]), 0.0), x_t.ndim)
    return mean + std * draw_noise(noise, x_t.shape)


def ddim_step(model_output, x_t, t, t_prev, schedule: Schedule, eta: float = 0.0, noise=None,
              prediction: str = "eps", clip=None) -> np.ndarray:
    """A2 (via P6, P7): one DDIM step t → t_prev < t on any timestep subsequence,
    x_prev = √ᾱ_prev x̂_0 + √(1−ᾱ_prev−σ²)·ε̂ + σ z, with σ = σ_t(η) of P7.

    Computed as the mean of P6's q_σ(x_prev given x_t, x̂_0) plus σ z. t_prev = 0 is the clean step
    (ᾱ_0 = 1, σ = 0): it returns x̂_0 exactly. η = 0 is deterministic; η = 1 with t_prev = t − 1 is DDPM
    with β̃_t. Take t_prev from the timestep list (never t − T//N, ANCHORS). ``clip`` as in ``ddpm_step``.

    Shapes: model_output and x_t (B, ...); t in 1..T and t_prev in 0..t−1, each scalar or (B,); eta ≥ 0
    with σ² ≤ 1 − ᾱ_prev; noise an array (B, ...) or a Generator, and may be None where σ = 0.
    Returns x_prev, (B, ...).
    """
    schedule = check_schedule(schedule)
    x_t = _batch(x_t, "x_t")
    t = check_timesteps(t, "t", schedule.T, low=1)
    t_prev = check_timesteps(t_prev, "t_prev", schedule.T, low=0)
    check_t_batch(t, x_t)
    check_t_batch(t_prev, x_t, "t_prev")
    if np.any(t_prev >= t):
        raise ValueError("t_prev must be smaller than t (t_prev in 0..t-1; 0 is the clean step)")
    eta = check_real(eta, "eta", 0.0)
    sigma = ddim_sigma(t, t_prev, eta, schedule)
    if np.any(sigma**2 > 1.0 - schedule.alpha_bars[t_prev] + 1e-12):
        raise ValueError(f"eta={eta!r} is too large for this step: sigma_t(eta)**2 must be <= 1 - alpha_bar[t_prev]")
    x0, _ = x0_eps_from_output(model_output, x_t, t, schedule, prediction, clip)
    mean, var = ddim_posterior(x0, x_t, t, t_prev, sigma, schedule)
    if not np.any(sigma > 0):
        if noise is not None and not isinstance(noise, np.random.Generator):
            draw_noise(noise, x_t.shape)  # validate an array that is not used
        return mean
    return mean + np.sqrt(var) * draw_noise(noise, x_t.shape)


# --------------------------------------------------------------------------------------------------------
# discrete loops (A1, A2, A3, A4, A5)
# --------------------------------------------------------------------------------------------------------

def ddpm_sample(model, x_T, schedule: Schedule, variance: str = "beta_tilde", noise=None, prediction: str = "eps",
                y=None, clip=None, return_trajectory: bool = False):
    """A1 loop: x_{t−1} = μ̃_t(x̂_0, x_t) + σ_t z for t = T..1 of ``schedule`` (``ddpm_step``).

    ``schedule`` may be ``respace``d: that is DDPM on the subsequence (S8), the model being called with
    the parent's timesteps ``timestep_map[t]``. Shapes: x_T (B, ...); noise a Generator or an array
    (schedule.T, *x_T.shape), slot i used at t = T − i (slot T−1, for t = 1, is ignored).
    """
    schedule = check_schedule(schedule)
    _callable(model, "model")
    variance_name(variance)
    prediction_name(prediction)
    x = _batch(x_T, "x_T")
    T = schedule.T
    get = _loop_noise(noise, T, x.shape, needed=T > 1)
    traj = _Trajectory(x, return_trajectory)
    for i, t in enumerate(range(T, 0, -1)):
        out = _model_output(model, x, t, schedule, y)
        x = ddpm_step(out, x, t, schedule, variance, get(i) if t > 1 else None, prediction, clip)
        traj.add(x)
    return traj.result(x)


def ddim_sample(model, x_T, schedule: Schedule, timesteps, eta: float = 0.0, noise=None, prediction: str = "eps",
                y=None, clip=None, return_trajectory: bool = False):
    """A2 loop: ``ddim_step`` from timesteps[i] to timesteps[i+1] (the last step to t = 0, ᾱ_0 = 1).

    ``timesteps``: strictly descending math t in 1..T (e.g. ``schedules.timesteps(N, T)``). Shapes: x_T
    (B, ...); noise a Generator or an array (len(timesteps), *x_T.shape), slot i used at step i (ignored
    where σ = 0: always at the last step, every step when η = 0).
    """
    schedule = check_schedule(schedule)
    _callable(model, "model")
    prediction_name(prediction)
    ts = _step_list(timesteps, schedule)
    eta = check_real(eta, "eta", 0.0)
    x = _batch(x_T, "x_T")
    prevs = np.concatenate([ts[1:], [0]])
    get = _loop_noise(noise, ts.size, x.shape, needed=eta > 0 and ts.size > 1)
    traj = _Trajectory(x, return_trajectory)
    for i, (t, t_prev) in enumerate(zip(ts, prevs, strict=True)):
        out = _model_output(model, x, t, schedule, y)
        stochastic = eta > 0 and t_prev > 0
        x = ddim_step(out, x, t, t_prev, schedule, eta, get(i) if stochastic else None, prediction, clip)
        traj.add(x)
    return traj.result(x)


def _ode_sample(model, x_T, schedule, timesteps, prediction, y, clip, return_trajectory, second_order):
    """EDM's sampler on dx̃/dσ = ε̂ (A5), σ = √(1/ᾱ − 1), x̃ = x/√ᾱ; Euler, or Heun except on the last step."""
    schedule = check_schedule(schedule)
    _callable(model, "model")
    prediction_name(prediction)
    ts = _step_list(timesteps, schedule)
    if schedule.alpha_bars[ts[0]] == 0:
        raise ValueError("the first timestep has alpha_bar = 0 (sigma = inf): the sigma-ODE cannot start there; "
                         "use ddim_sample or dpmpp_2m_sample, or start at a timestep below T")
    x = _batch(x_T, "x_T")
    sig, root = schedule.sqrt_recipm1_alpha_bars, schedule.sqrt_alpha_bars  # σ(0) = 0, √ᾱ_0 = 1
    traj = _Trajectory(x, return_trajectory)
    xt = x / root[ts[0]]
    for t, t_next in zip(ts, np.concatenate([ts[1:], [0]]), strict=True):
        _, d = _denoise(model, xt * root[t], t, schedule, prediction, y, clip)
        h = sig[t_next] - sig[t]
        x_euler = xt + h * d
        if second_order and t_next > 0:
            _, d_next = _denoise(model, x_euler * root[t_next], t_next, schedule, prediction, y, clip)
            xt = xt + h * 0.5 * (d + d_next)
        else:
            xt = x_euler
        traj.add(xt * root[t_next])
    return traj.result(xt)


def euler_sample(model, x_T, schedule: Schedule, timesteps, prediction: str = "eps", y=None, clip=None,
                 return_trajectory: bool = False):
    """A5: Euler on the probability-flow ODE dx̃/dσ = ε̂ (σ = √((1−ᾱ)/ᾱ), x̃ = x/√ᾱ), over ``timesteps``
    then σ = 0; x̃_{i+1} = x̃_i + (σ_{i+1} − σ_i) ε̂_i. Identical to DDIM with η = 0 ("DDIM as its
    discretisation"). One model call per step; shapes as ``ddim_sample``."""
    return _ode_sample(model, x_T, schedule, timesteps, prediction, y, clip, return_trajectory, False)


def heun_sample(model, x_T, schedule: Schedule, timesteps, prediction: str = "eps", y=None, clip=None,
                return_trajectory: bool = False):
    """A5: EDM's 2nd-order Heun sampler (Karras et al. 2022, Alg. 1 with no churn) on the PF-ODE
    dx̃/dσ = ε̂ with σ = √((1−ᾱ)/ᾱ), x̃ = x/√ᾱ:

        x̃' = x̃_i + (σ_{i+1} − σ_i) ε̂(x̃_i; σ_i),  x̃_{i+1} = x̃_i + (σ_{i+1} − σ_i)·½(ε̂(x̃_i; σ_i) + ε̂(x̃'; σ_{i+1})).

    The model is evaluated only at grid timesteps (2N − 1 calls for N timesteps); the last step, to σ = 0,
    is Euler, as in EDM, and returns x̂_0. The trajectory holds x = √ᾱ·x̃ at each grid point.
    Shapes as ``ddim_sample``.
    """
    return _ode_sample(model, x_T, schedule, timesteps, prediction, y, clip, return_trajectory, True)


def dpmpp_2m_sample(model, x_T, schedule: Schedule, timesteps, prediction: str = "eps", y=None, clip=None,
                    return_trajectory: bool = False):
    """A5: DPM-Solver++(2M) (Lu et al. 2022; k-diffusion's ``sample_dpmpp_2m``) on the data prediction
    x̂_0, in λ_t = log(√ᾱ_t/√(1−ᾱ_t)) = ½ log SNR(t). With h = λ_{i+1} − λ_i,

        x_{i+1} = (√(1−ᾱ_{i+1})/√(1−ᾱ_i))·x_i − √ᾱ_{i+1}·expm1(−h)·D_i,
        D_i = x̂_0,i (first step), else (1 + 1/(2r))·x̂_0,i − 1/(2r)·x̂_0,i−1 with r = h_{i−1}/h;

    the last step, to t = 0, returns x̂_0 (as k-diffusion when σ_next = 0). One model call per timestep.
    This VP form is k-diffusion's x̃ = x/√ᾱ form multiplied through by √ᾱ_{i+1}. Shapes as ``ddim_sample``.
    """
    schedule = check_schedule(schedule)
    _callable(model, "model")
    prediction_name(prediction)
    ts = _step_list(timesteps, schedule)
    x = _batch(x_T, "x_T")
    lam = 0.5 * schedule.log_snr
    traj = _Trajectory(x, return_trajectory)
    old_x0, h_last = None, None
    for t, t_next in zip(ts, np.concatenate([ts[1:], [0]]), strict=True):
        x0, _ = _denoise(model, x, t, schedule, prediction, y, clip)
        if t_next == 0:
            x = x0
        else:
            h = lam[t_next] - lam[t]
            d = x0 if old_x0 is None else (1 + 0.5 * h / h_last) * x0 - 0.5 * h / h_last * old_x0
            x = (schedule.sqrt_one_minus_alpha_bars[t_next] / schedule.sqrt_one_minus_alpha_bars[t]) * x \
                - schedule.sqrt_alpha_bars[t_next] * np.expm1(-h) * d
            h_last = h
        old_x0 = x0
        traj.add(x)
    return traj.result(x)


def su_sample(model, x_T, schedule: Schedule, noise=None, sigma: str = "beta", prediction: str = "eps", y=None,
              clip=None, return_trajectory: bool = False):
    """A3: Su's samplers (his eqs. 1.15–1.16), in his notation (``schedules.su_from_ddpm``: his α_t, β_t are
    √ of DDPM's, his ᾱ_t = √ᾱ_t, β̄_t = √(1−ᾱ_t)):

        x_{t−1} = (x_t − β_t²/β̄_t·ε_θ(x_t, t))/α_t + σ_t z,  t = T..1, z = 0 at t = 1,

    with sigma='beta' (σ_t = β_t, his random sampler), 'beta_tilde' (σ_t = β̄_{t−1}β_t/β̄_t) or 'zero'
    (σ_t = 0: the greedy, deterministic sampler). 'fixed_large'/'fixed_small' are accepted aliases.
    The same numbers as ``ddpm_sample`` with variance 'beta'/'beta_tilde' on the same noise.
    Shapes: x_T (B, ...); noise a Generator or an array (T, *x_T.shape), slot i used at t = T − i.
    """
    schedule = check_schedule(schedule)
    _callable(model, "model")
    prediction_name(prediction)
    names = (*SU_SIGMAS, "fixed_large", "fixed_small")
    if not isinstance(sigma, str) or sigma not in names:
        raise ValueError(f"sigma must be one of {sorted(names)}, got {sigma!r}")
    kind = "zero" if sigma == "zero" else variance_name(sigma)
    if schedule.zero_terminal_snr:
        raise ValueError("su_sample divides by Su's alpha_T = 0 on a zero-terminal-SNR schedule; use ddpm_sample")
    alpha, beta, _, beta_bar = su_from_ddpm(schedule)
    x = _batch(x_T, "x_T")
    T = schedule.T
    get = _loop_noise(noise, T, x.shape, needed=kind != "zero" and T > 1)
    traj = _Trajectory(x, return_trajectory)
    for i, t in enumerate(range(T, 0, -1)):
        _, eps = _denoise(model, x, t, schedule, prediction, y, clip)
        x = (x - beta[t] ** 2 / beta_bar[t] * eps) / alpha[t]
        if t > 1 and kind != "zero":
            s = beta[t] if kind == "beta" else beta_bar[t - 1] * beta[t] / beta_bar[t]
            x = x + s * draw_noise(get(i), x.shape)
        traj.add(x)
    return traj.result(x)


def random_walk_sample(model, x_T, T: int, noise=None, y=None, return_trajectory: bool = False):
    """A4: Inouye's sampler for the random-walk process (S12, P8):

        x_{t−1} = x_t − ε̃_θ(x_t, t)/t + √(1 − 1/t)·z,  t = T..1, z = 0 at t = 1,

    where the model predicts ε̃ = x_t − x_0 (q(x_t given x_0) = N(x_0, t I), the variance-t reading of the
    slides) and is called with the math t as int64 (B,). x_T ~ N(0, T I) (or the exact marginal) is the
    caller's. Shapes: x_T (B, ...); noise a Generator or an array (T, *x_T.shape), slot i used at t = T − i.
    """
    _callable(model, "model")
    T = check_int(T, "T", 1)
    x = _batch(x_T, "x_T")
    get = _loop_noise(noise, T, x.shape, needed=T > 1)
    traj = _Trajectory(x, return_trajectory)
    for i, t in enumerate(range(T, 0, -1)):
        eps = _call(model, "model", x, np.full((x.shape[0],), t, dtype=np.int64), y)
        x = random_walk_mean_from_eps(x, float(t), eps)
        if t > 1:
            x = x + np.sqrt(1.0 - 1.0 / t) * draw_noise(get(i), x.shape)
        traj.add(x)
    return traj.result(x)


# --------------------------------------------------------------------------------------------------------
# continuous-time SDEs and their samplers (S10, S11, A5, A6, A7)
# --------------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class VPSDE:
    """S10: the VP-SDE dx = −½β(t)x dt + √β(t) dw, β(t) = β_min + t(β_max − β_min), t ∈ [0, 1];
    x_t given x_0 ~ N(a_t x_0, σ_t² I) with (a_t, σ_t) = ``marginal(t)`` (``schedules.vp_sde_marginal``)."""

    beta_min: float = 0.1
    beta_max: float = 20.0

    def __post_init__(self):
        object.__setattr__(self, "beta_min", check_real(self.beta_min, "beta_min", 0.0, low_open=True))
        object.__setattr__(self, "beta_max", check_real(self.beta_max, "beta_max", self.beta_min))

    def drift(self, x, t):
        """f(x, t) = −½β(t)x; x (B, ...), t scalar or (B,)."""
        x = _batch(x, "x")
        return -0.5 * _expand(vp_sde_beta(_t_array(t, x), self.beta_min, self.beta_max), x.ndim) * x

    def diffusion(self, t):
        """g(t) = √β(t); shape of t."""
        t = as_float_array(t, "t")
        if np.any(t < 0) or np.any(t > 1):
            raise ValueError("t must lie in [0, 1] (continuous time)")
        return np.sqrt(vp_sde_beta(t, self.beta_min, self.beta_max))

    def marginal(self, t):
        """(a_t, σ_t) = (exp(−½∫₀ᵗβ), √(1 − exp(−∫₀ᵗβ))); shapes of t."""
        return vp_sde_marginal(t, self.beta_min, self.beta_max)


@dataclass(frozen=True)
class VESDE:
    """S11: the VE-SDE dx = g(t) dw with σ_t = σ_min(σ_max/σ_min)^t and g(t) = σ_t√(2 log(σ_max/σ_min)),
    so that g² = dσ_t²/dt. ``marginal(t)`` = (1, σ_t): as in Song et al., the data are taken to carry the
    σ_min = σ_0 noise already, so the marginals are exactly p_data ∗ N(0, σ_t² I)."""

    sigma_min: float = 0.01
    sigma_max: float = 50.0

    def __post_init__(self):
        object.__setattr__(self, "sigma_min", check_real(self.sigma_min, "sigma_min", 0.0, low_open=True))
        object.__setattr__(self, "sigma_max", check_real(self.sigma_max, "sigma_max", self.sigma_min,
                                                         low_open=True))

    def drift(self, x, t):
        """f(x, t) = 0; x (B, ...), t scalar or (B,)."""
        x = _batch(x, "x")
        _t_array(t, x)
        return np.zeros_like(x)

    def diffusion(self, t):
        """g(t) = σ_t √(2 log(σ_max/σ_min)); shape of t."""
        return ve_sde_sigma(t, self.sigma_min, self.sigma_max) * np.sqrt(2 * np.log(self.sigma_max / self.sigma_min))

    def marginal(self, t):
        """(a_t, σ_t) = (1, σ_min(σ_max/σ_min)^t); shapes of t."""
        sigma = ve_sde_sigma(t, self.sigma_min, self.sigma_max)
        return np.ones_like(sigma), sigma


def _sde(sde):
    if not isinstance(sde, (VPSDE, VESDE)):
        raise TypeError(f"sde must be a VPSDE or a VESDE, got {type(sde).__name__}")
    return sde


def _reverse_drift(x, t, score, sde, noise_scale):
    """f(x, t) − ½(1 + noise_scale²)·g(t)²·score: the drift of the reverse-time family (A7)."""
    g2 = _expand(sde.diffusion(t) ** 2, x.ndim)
    return sde.drift(x, t) - 0.5 * (1.0 + noise_scale**2) * g2 * score


def reverse_sde_step(x, t, dt, score, sde, noise, noise_scale: float = 1.0) -> np.ndarray:
    """A6/A7: one Euler–Maruyama step of the reverse-time SDE from t to t − dt, with the reduced-noise
    family σ(t) = noise_scale·g(t), 0 ≤ σ ≤ g:

        x ← x − [f(x, t) − ½(g(t)² + σ(t)²)·score]·dt + σ(t)√dt·z.

    noise_scale = 1 is the reverse SDE (A6: x − [f − g²∇log p]dt + g√dt z); 0 is the probability-flow ODE
    (A5), and then ``noise`` may be None. Shapes: x and score (B, ...); t scalar or (B,) in [0, 1];
    dt > 0 with t − dt ≥ 0; noise an array (B, ...) or a Generator.
    """
    sde = _sde(sde)
    x = _batch(x, "x")
    t = _t_array(t, x)
    dt = check_real(dt, "dt", 0.0, low_open=True)
    if np.any(t - dt < -1e-12):
        raise ValueError(f"dt must satisfy t - dt >= 0, got dt={dt!r} at t={float(np.min(t))!r}")
    score = as_float_array(score, "score")
    check_same_shape(x, score, "x", "score")
    noise_scale = check_real(noise_scale, "noise_scale", 0.0, 1.0)
    x_new = x - _reverse_drift(x, t, score, sde, noise_scale) * dt
    if noise_scale == 0:
        return x_new
    sigma = _expand(noise_scale * sde.diffusion(t), x.ndim)
    return x_new + sigma * np.sqrt(dt) * draw_noise(noise, x.shape)


def _time_grid(num_steps, t_end):
    num_steps = check_int(num_steps, "num_steps", 1)
    t_end = check_real(t_end, "t_end", 0.0, 1.0, high_open=True)
    return np.linspace(1.0, t_end, num_steps + 1)


def reverse_sde_sample(score_fn, x_T, sde, num_steps: int, noise, t_end: float = 1e-3, noise_scale: float = 1.0,
                       return_trajectory: bool = False):
    """A6/A7 loop: ``reverse_sde_step`` on the uniform grid t_i = 1 − i(1 − t_end)/N, i = 0..N, with the
    score evaluated at the start of each step, ``score_fn(x, t)`` (t a float array (B,)). Returns the
    state at t_end (no final denoising step); compare it with the marginal at t_end. x_T ~ the marginal at
    t = 1 is the caller's (N(0, I) for the VP-SDE, N(0, σ_max² I) for the VE-SDE approximately).
    Shapes: x_T (B, ...); noise a Generator or an array (num_steps, *x_T.shape), slot i used at step i.
    """
    _callable(score_fn, "score_fn")
    sde = _sde(sde)
    grid = _time_grid(num_steps, t_end)
    noise_scale = check_real(noise_scale, "noise_scale", 0.0, 1.0)
    x = _batch(x_T, "x_T")
    get = _loop_noise(noise, grid.size - 1, x.shape, needed=noise_scale > 0)
    traj = _Trajectory(x, return_trajectory)
    for i in range(grid.size - 1):
        t = np.full((x.shape[0],), grid[i])
        x = reverse_sde_step(x, t, grid[i] - grid[i + 1], _call(score_fn, "score_fn", x, t), sde, get(i),
                             noise_scale)
        traj.add(x)
    return traj.result(x)


def pf_ode_sample(score_fn, x_T, sde, num_steps: int, method: str = "euler", t_end: float = 1e-3,
                  return_trajectory: bool = False):
    """A5: the continuous probability-flow ODE dx/dt = f(x, t) − ½g(t)²∇log p_t(x), integrated backward
    from t = 1 to t_end on the uniform grid t_i = 1 − i(1 − t_end)/N (uniform in t, as Song et al.'s
    Euler sampler; it stops at t_end > 0 because the score of sharp data blows up as t → 0).

    method='euler': x ← x − dt·v(x, t_i) (N score calls); 'heun': the explicit trapezoid
    x' = x − dt·v(x, t_i), x ← x − dt·½(v(x, t_i) + v(x', t_{i+1})) on every step (2N calls).
    ``score_fn(x, t)`` with t a float array (B,). Returns the state at t_end; shapes x_T (B, ...).
    """
    _callable(score_fn, "score_fn")
    sde = _sde(sde)
    if method not in ODE_METHODS:
        raise ValueError(f"method must be one of {list(ODE_METHODS)}, got {method!r}")
    grid = _time_grid(num_steps, t_end)
    x = _batch(x_T, "x_T")
    traj = _Trajectory(x, return_trajectory)
    for i in range(grid.size - 1):
        t, t_next = np.full((x.shape[0],), grid[i]), np.full((x.shape[0],), grid[i + 1])
        dt = grid[i] - grid[i + 1]
        v = _reverse_drift(x, t, _call(score_fn, "score_fn", x, t), sde, 0.0)
        x_euler = x - dt * v
        if method == "heun":
            v_next = _reverse_drift(x_euler, t_next, _call(score_fn, "score_fn", x_euler, t_next), sde, 0.0)
            x = x - dt * 0.5 * (v + v_next)
        else:
            x = x_euler
        traj.add(x)
    return traj.result(x)


# --------------------------------------------------------------------------------------------------------
# Langevin dynamics (A8)
# --------------------------------------------------------------------------------------------------------

def _langevin(x, score, c, z):
    """A8: x + c·∇log q(x) + √(2c)·z."""
    return x + c * score + np.sqrt(2.0 * c) * z


def langevin_sample(score_fn, x, step_size: float, num_steps: int, noise, return_trajectory: bool = False):
    """A8: unadjusted Langevin dynamics x ← x + c∇log q(x) + √(2c)ε, c = ``step_size``, ``num_steps`` times,
    with ``score_fn(x)`` (no time argument). For a Gaussian target N(m, s²) its stationary law is
    N(m, s²/(1 − c/(2s²))), not the target: the O(c) bias of the unadjusted chain.
    Shapes: x (B, ...); noise a Generator or an array (num_steps, *x.shape), slot i used at step i.
    """
    _callable(score_fn, "score_fn")
    c = check_real(step_size, "step_size", 0.0, low_open=True)
    num_steps = check_int(num_steps, "num_steps", 1)
    x = _batch(x, "x")
    get = _loop_noise(noise, num_steps, x.shape, needed=True)
    traj = _Trajectory(x, return_trajectory)
    for i in range(num_steps):
        x = _langevin(x, _call(score_fn, "score_fn", x), c, get(i))
        traj.add(x)
    return traj.result(x)


def annealed_langevin_sample(score_fn, x, sigmas, step_size: float, steps_per_level: int, noise,
                             return_trajectory: bool = False):
    """A8 (annealed; Song & Ermon 2019, Alg. 1): for each noise level σ_i of the decreasing ``sigmas``,
    ``steps_per_level`` Langevin steps x ← x + c_i·s(x, σ_i) + √(2c_i)ε with c_i = step_size·σ_i²/σ_L²
    (σ_L = sigmas[-1]; Song & Ermon's α_i is 2c_i). ``score_fn(x, sigma)`` with sigma a float array (B,)
    approximates ∇log(p_data ∗ N(0, σ²I))(x). Shapes: x (B, ...); sigmas (L,) positive, strictly
    decreasing; noise a Generator or an array (L·steps_per_level, *x.shape), slot i used at step i.
    """
    _callable(score_fn, "score_fn")
    sig = as_float_array(sigmas, "sigmas")
    if sig.ndim != 1 or sig.size < 1 or np.any(sig <= 0) or np.any(np.diff(sig) >= 0):
        raise ValueError(f"sigmas must be a non-empty 1-D array of positive, strictly decreasing noise levels, "
                         f"got {sig.tolist() if sig.ndim <= 1 else sig.shape}")
    step_size = check_real(step_size, "step_size", 0.0, low_open=True)
    steps_per_level = check_int(steps_per_level, "steps_per_level", 1)
    x = _batch(x, "x")
    get = _loop_noise(noise, sig.size * steps_per_level, x.shape, needed=True)
    traj = _Trajectory(x, return_trajectory)
    i = 0
    for level in sig:
        c = step_size * level**2 / sig[-1] ** 2
        s = np.full((x.shape[0],), level)
        for _ in range(steps_per_level):
            x = _langevin(x, _call(score_fn, "score_fn", x, s), c, get(i))
            traj.add(x)
            i += 1
    return traj.result(x)


# --------------------------------------------------------------------------------------------------------
# classifier-free guidance (A9)
# --------------------------------------------------------------------------------------------------------

def cfg(model, guidance: float, null_class: int):
    """A9: classifier-free guidance as a model callable ``guided(x_t, t, y)``:

        ε̂ = ε(x, ∅) + w·(ε(x, y) − ε(x, ∅)),  w = ``guidance`` ≥ 0 (w = 0 unconditional, w = 1 conditional),

    computed with ONE batched model call on [x, x], [t, t], [y, null_class]. The same combination is
    applied to x0- or v-outputs, which are affine in ε with coefficients fixed by (x_t, t), so guidance
    commutes with the prediction type. y (labels, (B,) or a scalar) is required. Shapes: x_t (B, ...),
    t (B,) or a scalar; returns (B, ...).
    """
    _callable(model, "model")
    w = check_real(guidance, "guidance", 0.0)
    if isinstance(null_class, bool) or not isinstance(null_class, (numbers.Integral, np.integer)):
        raise TypeError(f"null_class must be an integer label, got {type(null_class).__name__}")
    null_class = int(null_class)

    def guided(x_t, t, y=None):
        if y is None:
            raise ValueError("y (class labels) is required for classifier-free guidance; got None")
        x = _batch(x_t, "x_t")
        B = x.shape[0]
        t2 = np.broadcast_to(np.asarray(t), (B,))
        y2 = np.broadcast_to(np.asarray(y), (B,))
        out = as_float_array(model(np.concatenate([x, x]), np.concatenate([t2, t2]),
                                   np.concatenate([y2, np.full((B,), null_class, dtype=y2.dtype)])), "model output")
        if out.shape != (2 * B, *x.shape[1:]):
            raise ValueError(f"model output must have shape {(2 * B, *x.shape[1:])} for the doubled batch, "
                             f"got {out.shape}")
        cond, uncond = out[:B], out[B:]
        return uncond + w * (cond - uncond)

    return guided
