"""Samplers (docs/formulas.md: A1–A9): one-step updates and whole sampling loops.

Each loop is written once, here, and runs on two kinds of arrays:
- NumPy (the oracle): x_T and every model output become float64 and are checked (finite, of x's shape);
- torch tensors (the engine, on any device and dtype): used as they are, the model's output checked for shape.
Arguments are checked once, at the edge of each public function; the loop bodies are bare arithmetic on the
state with Python-float coefficients read from the schedule's float64 tables, so the same lines serve both.

Conventions:
- x is (B, ...) (NCHW for images, (B, d) for toy data); discrete time is the math t (1..T; t = 0 is clean,
  ᾱ_0 = 1); continuous time is t ∈ [0, 1] (float array of shape (B,) when passed to a score function).
- A model is ``model(x_t, t, y)`` with t an int64 NumPy array of shape (B,) holding the MODEL's timestep
  (``schedule.timestep_map[t]``, the identity unless the schedule was ``respace``d) and y the labels (as the
  caller passed them) or None; a torch model is wrapped to take those (``engine.diffusion.torch_model``).
  ``prediction`` is 'eps', 'x0' or 'v' (or diffusers' 'epsilon', 'sample', 'v_prediction'). ``denoiser``
  turns a model into D(x, t) → (x̂_0, ε̂) once per loop.
- Noise is always an argument. A step takes an array of x's shape or a ``numpy.random.Generator``. A loop
  takes a Generator (NumPy only) or an array of shape (num_steps, *x.shape) (of x's kind: a tensor for a
  tensor) whose slot i is used at loop step i; the slots of deterministic steps (DDPM's t = 1, DDIM's σ = 0
  steps) are ignored, and a Generator is drawn from only at stochastic steps. ``noise`` may be None when no
  step of the call is stochastic.
- Each loop returns the final sample, or ``(sample, trajectory)`` with ``return_trajectory=True``; the
  trajectory is an array (num_steps + 1, *x.shape) that starts with x_T.
- ``SAMPLERS`` is the table of the loops that the engine, the ONNX runtime and the command line offer by
  name; ``sample`` is the call they share (step list, guidance, argument checks).

The discrete ODE samplers (DDIM η = 0, ``euler_sample``, ``heun_sample``, ``dpmpp_2m_sample``) all
discretise the same probability-flow ODE: written in σ = √((1−ᾱ)/ᾱ) and x̃ = x/√ᾱ it is dx̃/dσ = ε̂ (A5),
whose Euler discretisation is exactly DDIM with η = 0.
"""

from __future__ import annotations

import importlib
import numbers
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from ldmkit.common import DEFAULT_SAMPLER, DEFAULT_STEPS, MAX_GUIDANCE, MAX_SAMPLES, SPACING

from ._checks import (
    as_float_array,
    check_int,
    check_real,
    check_same_shape,
    check_t_batch,
    check_timesteps,
    draw_noise,
    gather,
    prediction_name,
    variance_name,
)
from .posterior import (
    check_ddim_eta,
    check_signal,
    ddim_coefficients,
    denoised,
    posterior_mean,
    random_walk_mean_from_eps,
    x0_eps_from_output,
)
from .schedules import (
    Schedule,
    check_schedule,
    respace,
    su_from_ddpm,
    timesteps,
    ve_sde_sigma,
    vp_sde_beta,
    vp_sde_marginal,
)

__all__ = [
    "SAMPLERS", "VESDE", "VPSDE", "SamplerInfo", "annealed_langevin_sample", "cfg", "check_sampling", "class_labels",
    "ddim_sample", "ddim_step",
    "ddpm_sample", "ddpm_step", "denoiser", "dpmpp_2m_sample", "euler_sample", "heun_sample", "langevin_sample",
    "pf_ode_sample", "random_walk_sample", "rescale_guidance", "reverse_sde_sample", "reverse_sde_step", "sample",
    "su_sample",
]

ODE_METHODS = ("euler", "heun")
SU_SIGMAS = ("beta", "beta_tilde", "zero")


# --------------------------------------------------------------------------------------------------------
# the edge: arrays, models, noise, trajectories
# --------------------------------------------------------------------------------------------------------


def _callable(fn, name: str):
    if not callable(fn):
        raise TypeError(f"{name} must be callable, got {type(fn).__name__}")
    return fn


def _foreign(x) -> bool:
    """True for an array of another library than NumPy (a torch tensor): used as it is, never converted."""
    return not isinstance(x, (np.ndarray, np.generic)) and hasattr(x, "__dlpack__") and hasattr(x, "shape")


def _batch(x, name: str) -> np.ndarray:
    """x as a float64 array with a leading batch axis."""
    x = as_float_array(x, name)
    if x.ndim < 1:
        raise ValueError(f"{name} must have a leading batch axis, shape (B, ...), got a scalar")
    return x


def _state(x, name: str = "x_T"):
    """A loop's starting state: NumPy input as a checked float64 array; a torch tensor as it is."""
    if not _foreign(x):
        return _batch(x, name)
    if x.ndim < 1:
        raise ValueError(f"{name} must have a leading batch axis, shape (B, ...), got a scalar")
    return x


def _library(x):
    """The array library of x (numpy, or torch for a tensor), for ``stack`` and ``concatenate``."""
    return importlib.import_module(type(x).__module__.partition(".")[0]) if _foreign(x) else np


def _expand(v: np.ndarray, ndim: int) -> np.ndarray:
    """Per-example values (shape () or (B,)) shaped to broadcast over an ndim array with batch axis first."""
    return v.reshape(v.shape + (1,) * (ndim - v.ndim)) if v.ndim else v


def _call(fn, name: str, x, *args, shape=None):
    """``fn(x, *args)``, checked to have x's shape (or ``shape``): for NumPy x a finite float64 array."""
    out = fn(x, *args)
    want = tuple(x.shape) if shape is None else shape
    if _foreign(x):
        got = tuple(getattr(out, "shape", ()))
    else:
        out = as_float_array(out, f"{name} output")
        got = out.shape
    if got != want:
        raise ValueError(f"{name} output must have the shape of x {want}, got {got}" if shape is None else
                         f"{name} output must have shape {want} for the doubled batch, got {got}")
    return out


def denoiser(model, schedule: Schedule, prediction: str = "eps", y=None, clip=None, t_max: int | None = None):
    """The model as a denoiser D(x, t) → (x̂_0, ε̂) at math step t (an int) of ``schedule`` (P3): ``model`` is
    called as model(x, timestep_map[t] as int64 (B,), y), its output (checked as in ``_call``) read as
    ``prediction`` and converted by ``posterior.denoised``, x̂_0 clipped to [−clip, clip] when ``clip`` is
    given. ``t_max``, the largest t the caller will visit, refuses ε-prediction where ᾱ = 0 (zero terminal
    SNR: x̂_0 would divide by 0). Arguments are checked here, once; D itself is bare."""
    schedule = check_schedule(schedule)
    _callable(model, "model")
    kind = prediction_name(prediction)
    clip = None if clip is None else check_real(clip, "clip", 0.0, low_open=True)
    if kind == "eps" and t_max is not None:
        check_signal(schedule, t_max)
    tmap = schedule.timestep_map

    def D(x, t: int):
        out = _call(model, "model", x, np.full((x.shape[0],), tmap[t], dtype=np.int64), y)
        return denoised(out, x, t, schedule, kind, clip)

    return D


def _step_list(timesteps, schedule: Schedule) -> list[int]:
    """Sampling timesteps: a non-empty, strictly descending 1-D list of math t in 1..T, as Python ints."""
    ts = check_timesteps(timesteps, "timesteps", schedule.T, low=1)
    if ts.ndim != 1 or ts.size < 1:
        raise ValueError(f"timesteps must be a non-empty 1-D array of math t in 1..{schedule.T}, "
                         f"got shape {ts.shape}")
    if np.any(np.diff(ts) >= 0):
        shown = ts[:8].tolist() + (["..."] if ts.size > 8 else [])
        raise ValueError(f"timesteps must be strictly descending (e.g. schedules.timesteps(...)), got {shown}")
    return ts.tolist()


def _loop_noise(noise, num_steps: int, x, needed: bool):
    """``get(i)``: the noise of loop step i, from a Generator or from slot i of a (num_steps, *x.shape) array."""
    shape = (num_steps, *x.shape)
    if noise is None:
        if needed:
            raise TypeError(f"noise must be a numpy.random.Generator or an array of shape {shape}, "
                            "got None (this call has stochastic steps)")
        return lambda i: None
    if _foreign(x):
        if not _foreign(noise):
            raise TypeError(f"noise for a {type(x).__name__} x must be an array of its kind, shape {shape}, "
                            f"got {type(noise).__name__}")
        if tuple(noise.shape) != shape:
            raise ValueError(f"noise must have shape {shape}, got {tuple(noise.shape)}")
        return lambda i: noise[i]
    if isinstance(noise, np.random.Generator):
        return lambda i: noise.standard_normal(x.shape)
    arr = draw_noise(noise, shape)
    return lambda i: arr[i]


class _Trajectory:
    """Collects the states of a loop when asked to (the first is x_T)."""

    def __init__(self, x, keep: bool):
        self.states = [x] if keep else None

    def add(self, x) -> None:
        if self.states is not None:
            self.states.append(x)

    def result(self, x):
        return x if self.states is None else (x, _library(x).stack(self.states))


def _t_array(t, x: np.ndarray, low: float = 0.0) -> np.ndarray:
    """Continuous time(s) t in [low, 1] as a float array of shape () or (B,)."""
    t = as_float_array(t, "t")
    check_t_batch(t, x)
    if np.any(t < low) or np.any(t > 1):
        raise ValueError(f"t must lie in [{low:g}, 1] (continuous time), got {t.min() if t.size else t!r}")
    return t


def _unused_noise(noise, shape) -> None:
    """A step whose noise is not used still validates an array it was given."""
    if noise is not None and not isinstance(noise, np.random.Generator):
        draw_noise(noise, shape)


# --------------------------------------------------------------------------------------------------------
# the two discrete updates (A1, A2): the kernels of the steps and of the loops
# --------------------------------------------------------------------------------------------------------

def _ddpm_update(x0, x_t, t, std, z, schedule: Schedule):
    """A1: x_{t−1} = μ̃_t(x̂_0, x_t) + σ_t z, σ_t = ``std`` (z None: the mean alone)."""
    mean = posterior_mean(x0, x_t, t, schedule)
    return mean if z is None else mean + std * z


def _ddim_update(x0, x_t, t, t_prev, eta, z, schedule: Schedule):
    """A2 via P6/P7: x_{t_prev} = ζ x̂_0 + ξ x_t + σ z, ζ = √ᾱ_prev − ξ√ᾱ_t, ξ = √(1−ᾱ_prev−σ²)/√(1−ᾱ_t),
    σ = σ_t(η) (``posterior.ddim_coefficients``; z None: no noise). sampler.onnx builds the same form."""
    zeta, xi, sigma = ddim_coefficients(t, t_prev, eta, schedule, x_t.ndim)
    mean = zeta * x0 + xi * x_t
    return mean if z is None else mean + np.sqrt(sigma**2) * z


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
    if not np.any(t > 1):
        _unused_noise(noise, x_t.shape)
        return _ddpm_update(x0, x_t, t, None, None, schedule)
    table = schedule.posterior_variance if kind == "beta_tilde" else schedule.betas
    std = _expand(np.where(t > 1, np.sqrt(table[t]), 0.0), x_t.ndim)
    return _ddpm_update(x0, x_t, t, std, draw_noise(noise, x_t.shape), schedule)


def ddim_step(model_output, x_t, t, t_prev, schedule: Schedule, eta: float = 0.0, noise=None,
              prediction: str = "eps", clip=None) -> np.ndarray:
    """A2 (via P6, P7): one DDIM step t → t_prev < t on any timestep subsequence,
    x_prev = √ᾱ_prev x̂_0 + √(1−ᾱ_prev−σ²)·ε̂ + σ z, with σ = σ_t(η) of P7.

    Computed as the mean of P6's q_σ(x_prev given x_t, x̂_0), ζ x̂_0 + ξ x_t, plus σ z. t_prev = 0 is the
    clean step (ᾱ_0 = 1, σ = 0): it returns x̂_0 exactly. η = 0 is deterministic; η = 1 with t_prev = t − 1
    is DDPM with β̃_t. Take t_prev from the timestep list (never t − T//N, docs/anchors.md). ``clip`` as in
    ``ddpm_step``.

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
    check_ddim_eta(eta, t, t_prev, schedule)
    x0, _ = x0_eps_from_output(model_output, x_t, t, schedule, prediction, clip)
    if eta == 0 or not np.any(t_prev > 0):
        _unused_noise(noise, x_t.shape)
        return _ddim_update(x0, x_t, t, t_prev, eta, None, schedule)
    return _ddim_update(x0, x_t, t, t_prev, eta, draw_noise(noise, x_t.shape), schedule)


# --------------------------------------------------------------------------------------------------------
# discrete loops (A1, A2, A3, A4, A5)
# --------------------------------------------------------------------------------------------------------

def ddpm_sample(model, x_T, schedule: Schedule, variance: str = "beta_tilde", noise=None, prediction: str = "eps",
                y=None, clip=None, return_trajectory: bool = False, timesteps=None):
    """A1 loop: x_{t−1} = μ̃_t(x̂_0, x_t) + σ_t z for t = T..1 of ``schedule`` (``ddpm_step``).

    ``timesteps`` (or a ``schedule`` made by ``respace``) runs DDPM on that subsequence (S8), the model
    being called with the parent's timesteps ``timestep_map[t]``. Shapes: x_T (B, ...); noise a Generator or
    an array (S, *x_T.shape), S the number of steps, slot i used at step i (slot S−1, for the last step, is
    ignored).
    """
    schedule = check_schedule(schedule)
    if timesteps is not None:
        schedule = respace(schedule, _step_list(timesteps, schedule))
    kind = variance_name(variance)
    x = _state(x_T)
    T = schedule.T
    D = denoiser(model, schedule, prediction, y, clip, t_max=T)
    get = _loop_noise(noise, T, x, needed=T > 1)
    std = np.sqrt(schedule.posterior_variance if kind == "beta_tilde" else schedule.betas)
    traj = _Trajectory(x, return_trajectory)
    for i, t in enumerate(range(T, 0, -1)):
        x0, _ = D(x, t)
        x = _ddpm_update(x0, x, t, float(std[t]), get(i) if t > 1 else None, schedule)
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
    ts = _step_list(timesteps, schedule)
    eta = check_real(eta, "eta", 0.0)
    prevs = [*ts[1:], 0]
    check_ddim_eta(eta, np.array(ts), np.array(prevs), schedule)
    x = _state(x_T)
    D = denoiser(model, schedule, prediction, y, clip, t_max=ts[0])
    get = _loop_noise(noise, len(ts), x, needed=eta > 0 and len(ts) > 1)
    traj = _Trajectory(x, return_trajectory)
    for i, (t, t_prev) in enumerate(zip(ts, prevs, strict=True)):
        x0, _ = D(x, t)
        x = _ddim_update(x0, x, t, t_prev, eta, get(i) if eta > 0 and t_prev > 0 else None, schedule)
        traj.add(x)
    return traj.result(x)


def _ode_sample(model, x_T, schedule, timesteps, prediction, y, clip, return_trajectory, second_order):
    """EDM's sampler on dx̃/dσ = ε̂ (A5), σ = √(1/ᾱ − 1), x̃ = x/√ᾱ; Euler, or Heun except on the last step.

    From σ = ∞ (ᾱ_t = 0: t = T of a zero-terminal-SNR schedule, R2) x̃ is undefined; the step taken there is
    the limit of Euler's x̃ + (σ' − σ)ε̂ = x̂_0 + σ'ε̂ (x̂_0 = x̃ − σε̂), i.e. DDIM's step, finite for v- or
    x0-prediction. Heun's average has no such limit (its correction ½(σ' − σ)(ε̂' − ε̂) grows without bound),
    so that step is Euler's, and Heun makes one model call fewer."""
    schedule = check_schedule(schedule)
    ts = _step_list(timesteps, schedule)
    x = _state(x_T)
    D = denoiser(model, schedule, prediction, y, clip, t_max=ts[0])
    sig = schedule.sqrt_recipm1_alpha_bars.tolist()  # σ(0) = 0
    root = schedule.sqrt_alpha_bars.tolist()  # √ᾱ_0 = 1
    traj = _Trajectory(x, return_trajectory)
    xt = None if root[ts[0]] == 0 else x / root[ts[0]]
    for t, t_next in zip(ts, [*ts[1:], 0], strict=True):
        if xt is None:  # σ_t = ∞
            x0, d = D(x, t)
            xt = x0 + sig[t_next] * d
            traj.add(xt * root[t_next])
            continue
        _, d = D(xt * root[t], t)
        h = sig[t_next] - sig[t]
        x_euler = xt + h * d
        if second_order and t_next > 0:
            _, d_next = D(x_euler * root[t_next], t_next)
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
    is Euler, as in EDM, and returns x̂_0. The trajectory holds x = √ᾱ·x̃ at each grid point. From t = T of a
    zero-terminal-SNR schedule (σ = ∞) the first step is Euler's limit, DDIM's step (2N − 2 calls).
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

    From t = T of a zero-terminal-SNR schedule (R2: ᾱ_T = 0, λ_T = −∞) the first h is +∞: the step is
    √(1−ᾱ_{i+1})·x_T + √ᾱ_{i+1}·x̂_0 (expm1(−∞) = −1), DDIM's step, and on the second step r = h_{i−1}/h = ∞
    makes the correction 1/(2r) vanish: its first-order step, the limit of 2M as ᾱ_T → 0 (diffusers instead
    moves ᾱ_T to 2^−24). v- or x0-prediction only there.
    """
    schedule = check_schedule(schedule)
    ts = _step_list(timesteps, schedule)
    x = _state(x_T)
    D = denoiser(model, schedule, prediction, y, clip, t_max=ts[0])
    lam = (0.5 * schedule.log_snr).tolist()
    s, a = schedule.sqrt_one_minus_alpha_bars.tolist(), schedule.sqrt_alpha_bars.tolist()
    traj = _Trajectory(x, return_trajectory)
    old_x0, h_last = None, None
    for t, t_next in zip(ts, [*ts[1:], 0], strict=True):
        x0, _ = D(x, t)
        if t_next == 0:
            x = x0
        else:
            h = lam[t_next] - lam[t]
            d = x0 if old_x0 is None else (1 + 0.5 * h / h_last) * x0 - 0.5 * h / h_last * old_x0
            x = (s[t_next] / s[t]) * x - float(a[t_next] * np.expm1(-h)) * d
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
    names = (*SU_SIGMAS, "fixed_large", "fixed_small")
    if not isinstance(sigma, str) or sigma not in names:
        raise ValueError(f"sigma must be one of {sorted(names)}, got {sigma!r}")
    kind = "zero" if sigma == "zero" else variance_name(sigma)
    if schedule.zero_terminal_snr:
        raise ValueError("su_sample divides by Su's alpha_T = 0 on a zero-terminal-SNR schedule; use ddpm_sample")
    alpha, beta, _, beta_bar = (v.tolist() for v in su_from_ddpm(schedule))
    x = _state(x_T)
    D = denoiser(model, schedule, prediction, y, clip)
    T = schedule.T
    get = _loop_noise(noise, T, x, needed=kind != "zero" and T > 1)
    traj = _Trajectory(x, return_trajectory)
    for i, t in enumerate(range(T, 0, -1)):
        _, eps = D(x, t)
        x = (x - beta[t] ** 2 / beta_bar[t] * eps) / alpha[t]
        if t > 1 and kind != "zero":
            s = beta[t] if kind == "beta" else beta_bar[t - 1] * beta[t] / beta_bar[t]
            x = x + s * get(i)
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
    get = _loop_noise(noise, T, x, needed=T > 1)
    traj = _Trajectory(x, return_trajectory)
    for i, t in enumerate(range(T, 0, -1)):
        eps = _call(model, "model", x, np.full((x.shape[0],), t, dtype=np.int64), y)
        x = random_walk_mean_from_eps(x, float(t), eps)
        if t > 1:
            x = x + np.sqrt(1.0 - 1.0 / t) * get(i)
        traj.add(x)
    return traj.result(x)


# --------------------------------------------------------------------------------------------------------
# the table of samplers that the engine, the runtime and the command line offer, and their shared call
# --------------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class SamplerInfo:
    """One row of ``SAMPLERS``. ``sample`` is a loop above, called by ``sample()`` as
    ``sample(model, x_T, schedule, timesteps=ts, prediction=..., y=...)`` plus ``eta=`` where ``eta`` is True
    and ``noise=`` where the call is stochastic (``stochastic``, or η > 0)."""

    sample: Callable
    stochastic: bool  # fresh noise at every step but the last, whatever the arguments
    eta: bool  # takes DDIM's η (stochastic when η > 0)
    model_calls: Callable[[int], int]  # model calls for N timesteps (guidance makes each one batched call on 2B)


SAMPLERS: dict[str, SamplerInfo] = {
    "ddim": SamplerInfo(ddim_sample, stochastic=False, eta=True, model_calls=lambda n: n),  # A2
    "ddpm": SamplerInfo(ddpm_sample, stochastic=True, eta=False, model_calls=lambda n: n),  # A1, respaced steps
    # A5; 2N − 2 calls from t = T of a zero-terminal-SNR schedule (its first step is Euler's, see heun_sample)
    "heun": SamplerInfo(heun_sample, stochastic=False, eta=False, model_calls=lambda n: 2 * n - 1),
    "dpmpp2m": SamplerInfo(dpmpp_2m_sample, stochastic=False, eta=False, model_calls=lambda n: n),  # A5
}
"""The samplers offered by name (``ldmkit sample --sampler``, the engine's ``generate``, the ONNX runtime)."""


def sampler_info(name: str) -> SamplerInfo:
    """The row of ``SAMPLERS`` called ``name``; ValueError naming the valid ones."""
    if not isinstance(name, str) or name not in SAMPLERS:
        raise ValueError(f"sampler must be one of {list(SAMPLERS)}, got {name!r}")
    return SAMPLERS[name]


def check_sampling(schedule: Schedule, sampler: str, num_steps: int, eta: float = 0.0, guidance=None,
                   null_class=None, guidance_rescale: float = 0.0) -> SamplerInfo:
    """The checks of ``sample``, for a caller that draws noise first: the sampler's row, or ValueError naming
    the argument (an unknown sampler, steps outside 1..T, η < 0 or η with a sampler that has none, guidance
    below 0, above ``common.MAX_GUIDANCE`` or for an unconditional model, ``null_class`` None, a guidance
    rescale φ outside [0, 1] or for an unconditional model)."""
    info = sampler_info(sampler)
    if isinstance(num_steps, bool) or not isinstance(num_steps, numbers.Integral) or not 1 <= num_steps <= schedule.T:
        raise ValueError(f"steps must be in 1..{schedule.T} (the model's T), got {num_steps!r}")
    if not _nonnegative(eta):
        raise ValueError(f"eta must be >= 0, got {eta!r}")
    if eta > 0 and not info.eta:
        with_eta = [name for name, row in SAMPLERS.items() if row.eta]
        raise ValueError(f"eta applies to the {' and '.join(with_eta)} sampler only, got eta={eta} with {sampler!r}")
    if guidance is not None:
        if null_class is None:
            raise ValueError("guidance was given but the model is unconditional (no null class to guide from)")
        if not _nonnegative(guidance) or guidance > MAX_GUIDANCE:
            raise ValueError(f"guidance must be >= 0 and at most {MAX_GUIDANCE:g}, got {guidance!r}")
    if not _nonnegative(guidance_rescale) or guidance_rescale > 1:
        raise ValueError(f"guidance rescale must be in [0, 1], got {guidance_rescale!r}")
    if guidance_rescale > 0 and null_class is None:
        raise ValueError("guidance rescale was given but the model is unconditional (it rescales guidance)")
    return info


def _nonnegative(value) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool) and 0 <= value < np.inf


def class_labels(n: int, num_classes: int, labels=None):
    """Labels y (n,) int64 for n samples of a model with ``num_classes`` classes: None → 0, 1, …, K−1 in turn; a
    class id → all that class; an array of n class ids, checked; n at most ``common.MAX_SAMPLES``. None for an
    unconditional model (K = 0), which refuses labels. ValueError naming the problem."""
    if isinstance(n, bool) or not isinstance(n, numbers.Integral) or not 1 <= n <= MAX_SAMPLES:
        raise ValueError(f"n must be an int >= 1 and at most {MAX_SAMPLES}, got {n!r:.40}")
    if num_classes == 0:
        if labels is not None:
            raise ValueError("labels were given but the model is unconditional (trained without labels)")
        return None
    if labels is None:
        return np.arange(n, dtype=np.int64) % num_classes
    if isinstance(labels, (numbers.Integral, np.integer)) and not isinstance(labels, bool):
        if not 0 <= labels < num_classes:  # before int64 could overflow
            raise ValueError(f"class id must be in 0..{num_classes - 1}, got {int(labels)!r:.40}")
        labels = np.full(n, int(labels), dtype=np.int64)
    arr = np.asarray(labels)
    if arr.shape != (n,) or not np.issubdtype(arr.dtype, np.integer):
        raise ValueError(f"labels must be a class id or {n} integer class ids, got {arr.dtype} {arr.shape}")
    bad = arr[(arr < 0) | (arr >= num_classes)]
    if bad.size:
        raise ValueError(f"class id must be in 0..{num_classes - 1}, got {int(bad[0])}")
    return arr.astype(np.int64)


def sample(model, x_T, schedule: Schedule, sampler: str = DEFAULT_SAMPLER, num_steps: int = DEFAULT_STEPS,
           eta: float = 0.0, noise=None, prediction: str = "eps", y=None, guidance=None, null_class=None,
           spacing: str = SPACING, guidance_rescale: float = 0.0):
    """The sampling call shared by the engine and the ONNX runtime: ``SAMPLERS[sampler]`` over
    ``timesteps(num_steps, T, spacing)`` ("trailing": it starts at t = T) from x_T, returning x_0.

    With labels ``y`` and ``guidance`` w other than None or 1, the model is guided (``cfg``, A9: one batched
    call on 2B per model call, labels [y, null_class]), with its x̂_0 rescaled by ``guidance_rescale`` φ (R3;
    0: none); None or 1 is plain conditional sampling (where R3 is the identity).
    ``noise``: the loop noise (num_steps, *x_T.shape), used only where the call is stochastic (ddpm, or ddim
    with η > 0) and then required. NumPy arrays or torch tensors, as every loop here.
    """
    info = check_sampling(schedule, sampler, num_steps, eta, guidance, null_class, guidance_rescale)
    if y is not None and guidance is not None and guidance != 1.0:
        model = cfg(model, guidance, null_class, guidance_rescale, schedule, prediction)
    extra = {"eta": eta} if info.eta else {}
    if info.stochastic or eta > 0:
        extra["noise"] = noise
    return info.sample(model, x_T, schedule, timesteps=timesteps(num_steps, schedule.T, spacing),
                       prediction=prediction, y=y, **extra)


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
    get = _loop_noise(noise, grid.size - 1, x, needed=noise_scale > 0)
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
    get = _loop_noise(noise, num_steps, x, needed=True)
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
    get = _loop_noise(noise, sig.size * steps_per_level, x, needed=True)
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

def cfg(model, guidance: float, null_class: int, rescale: float = 0.0, schedule: Schedule | None = None,
        prediction: str = "eps"):
    """A9: classifier-free guidance as a model callable ``guided(x_t, t, y)``:

        ε̂ = ε(x, ∅) + w·(ε(x, y) − ε(x, ∅)),  w = ``guidance`` ≥ 0 (w = 0 unconditional, w = 1 conditional),

    computed with ONE batched model call on [x, x], [t, t], [y, null_class]. The same combination is
    applied to x0- or v-outputs, which are affine in ε with coefficients fixed by (x_t, t), so guidance
    commutes with the prediction type. y (labels, (B,) or a scalar, NumPy) is required. Shapes: x_t (B, ...),
    a NumPy array or a torch tensor; t (B,) or a scalar; returns (B, ...) of x_t's kind.

    ``rescale`` φ in [0, 1] (R3, Lin et al. 2024): the guided prediction is rescaled in x̂_0 space, whatever
    the model predicts: x̂_0 of the guided and of the conditional output (P3 on ``schedule``, the model's own,
    whose table the model's timesteps t index; read as ``prediction``), then ``rescale_guidance``, then back
    to the model's prediction type. x̂_0 is what over-saturates at high w; rescaling it keeps the result
    independent of the parameterisation (diffusers rescales the raw output instead, ε for an ε-model, where
    std(ε̂) ≈ 1 at every t, see docs/diffusers.md). φ = 0 is plain guidance, computed as before.
    """
    _callable(model, "model")
    w = check_real(guidance, "guidance", 0.0)
    phi = check_real(rescale, "rescale", 0.0, 1.0)
    if isinstance(null_class, bool) or not isinstance(null_class, (numbers.Integral, np.integer)):
        raise TypeError(f"null_class must be an integer label, got {type(null_class).__name__}")
    null_class = int(null_class)
    if phi > 0:
        schedule = check_schedule(schedule)
        kind = prediction_name(prediction)
        if not np.array_equal(schedule.timestep_map, np.arange(schedule.T + 1)):
            raise ValueError("cfg's schedule must be the model's own, not a respaced one: the model's timesteps "
                             "index it")

    def guided(x_t, t, y=None):
        if y is None:
            raise ValueError("y (class labels) is required for classifier-free guidance; got None")
        x = _state(x_t, "x_t")
        B = x.shape[0]
        t2 = np.broadcast_to(np.asarray(t), (B,))
        y2 = np.broadcast_to(np.asarray(y), (B,))
        out = _call(model, "model", _library(x).concatenate([x, x]), np.concatenate([t2, t2]),
                    np.concatenate([y2, np.full((B,), null_class, dtype=y2.dtype)]), shape=(2 * B, *x.shape[1:]))
        cond, uncond = out[:B], out[B:]
        g = uncond + w * (cond - uncond)
        if phi == 0:
            return g
        tt = int(t2[0]) if np.all(t2 == t2[0]) else t2  # an int serves NumPy and torch alike
        x0_g, _ = denoised(g, x, tt, schedule, kind)
        x0_c, _ = denoised(cond, x, tt, schedule, kind)
        return _output_from_x0(rescale_guidance(x0_g, x0_c, phi), x, tt, schedule, kind)

    return guided


def _output_from_x0(x0, x_t, t, schedule: Schedule, prediction: str):
    """P3, the inverse of ``posterior.denoised`` for a given x̂_0: the output of type ``prediction`` that gives
    it, x0 itself; ε = (x_t − √ᾱ_t x_0)/√(1−ᾱ_t); v = (√ᾱ_t x_t − x_0)/√(1−ᾱ_t). t as in ``denoised``."""
    if prediction == "x0":
        return x0
    nd = x_t.ndim
    a, s = gather(schedule.sqrt_alpha_bars, t, nd), gather(schedule.sqrt_one_minus_alpha_bars, t, nd)
    return (x_t - a * x0) / s if prediction == "eps" else (a * x_t - x0) / s


def _std(x):
    """Per-example standard deviation over all but the batch axis (NumPy or torch), shape (B,)."""
    f = x.reshape(x.shape[0], -1)
    d = f - f.mean(1)[:, None]
    return (d * d).mean(1) ** 0.5


def rescale_guidance(guided, cond, phi: float):
    """R3: Lin et al.'s guidance rescale (2024, eq. 15–16), per example: with x_cfg = ``guided`` (A9's
    combination) and x_cond = ``cond``, x_rescaled = x_cfg·std(x_cond)/std(x_cfg), and the result is
    φ·x_rescaled + (1 − φ)·x_cfg. std over all but the batch axis (the N or N − 1 of its variance cancels in
    the ratio). φ = 0 gives x_cfg; an example with std(x_cfg) = 0 (constant) is returned unchanged.

    guided, cond: (B, ...), NumPy arrays or torch tensors; phi a float (checked by ``cfg``). Returns (B, ...).
    """
    zero = _std(guided) == 0
    ratio = (_std(cond) * ~zero + zero) / (_std(guided) + zero)  # 1 where std(x_cfg) = 0
    ratio = ratio.reshape((guided.shape[0],) + (1,) * (guided.ndim - 1))
    return phi * (guided * ratio) + (1.0 - phi) * guided
