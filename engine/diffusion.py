"""The diffusion math of the engine: torch mirrors of the reference's formulas (FORMULAS F2, P1, P3, L4,
L5, A1, A2, A5, A9), held to the reference by the golden files (tests/test_engine_diffusion.py).

Schedules are the reference's ``Schedule`` (float64 NumPy tables, math-indexed, length T+1). Here the
tables live as float64 tensors on the sample's device; every coefficient is gathered and combined in
float64 and cast to the sample's dtype only when it multiplies a sample (ANCHORS: float32 tables lose
≈3e-4 relative in 1 − ᾱ near t = 1). Per-example t is an int64 tensor (B,) or a Python int.

Noise is an argument everywhere: a ``torch.Generator`` (drawn on the sample's device), or a tensor — of
the sample's shape for a step, of shape (num_steps, *x.shape) for a loop, slot i used at loop step i —
exactly as in ``ldmkit.reference.samplers``, so both run step for step on the same noise.
"""

from __future__ import annotations

import itertools

import numpy as np
import torch

from ldmkit.reference._checks import check_real, prediction_name, variance_name
from ldmkit.reference.schedules import Schedule

_TABLES = ("betas", "alphas", "alpha_bars", "sqrt_alpha_bars", "sqrt_one_minus_alpha_bars", "posterior_variance",
           "posterior_mean_coef1", "posterior_mean_coef2", "sqrt_recipm1_alpha_bars", "log_snr")
_cache: dict = {}


def tables(schedule: Schedule, device) -> dict:
    """The schedule's tables as float64 tensors on ``device`` (cached per schedule and device)."""
    if not isinstance(schedule, Schedule):
        raise TypeError(f"schedule must be a reference Schedule, got {type(schedule).__name__}")
    key = (id(schedule), str(device))
    hit = _cache.get(key)
    if hit is None or hit[0] is not schedule:
        hit = (schedule, {n: torch.from_numpy(np.array(getattr(schedule, n))).to(device) for n in _TABLES})
        _cache[key] = hit
    return hit[1]


def _t(t, x: torch.Tensor, T: int, low: int = 1) -> torch.Tensor:
    """t as an int64 tensor on x's device, shape () or (B,), each value in low..T."""
    t = torch.as_tensor(t, device=x.device)
    if t.dtype not in (torch.int64, torch.int32, torch.int16, torch.uint8):
        raise TypeError(f"t must hold integer timesteps, got dtype {t.dtype}")
    t = t.long()
    if t.ndim > 1 or (t.ndim == 1 and t.shape[0] != x.shape[0]):
        raise ValueError(f"t must be a scalar or have shape ({x.shape[0]},), got {tuple(t.shape)}")
    if t.numel() and (int(t.min()) < low or int(t.max()) > T):
        raise ValueError(f"t must be in {low}..{T} (math t)")
    return t


def _cast(v: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Float64 per-example values (shape () or (B,)) cast to x's dtype, shaped to broadcast over x."""
    return v.to(x.dtype).reshape(v.shape + (1,) * (x.ndim - v.ndim))


def _noise(noise, shape, like: torch.Tensor, name: str = "noise") -> torch.Tensor:
    if isinstance(noise, torch.Generator):
        return torch.randn(shape, generator=noise, device=like.device, dtype=like.dtype)
    if not isinstance(noise, torch.Tensor):
        raise TypeError(f"{name} must be a tensor of shape {tuple(shape)} or a torch.Generator, "
                        f"got {type(noise).__name__}")
    if tuple(noise.shape) != tuple(shape):
        raise ValueError(f"{name} must have shape {tuple(shape)}, got {tuple(noise.shape)}")
    return noise.to(device=like.device, dtype=like.dtype)


def q_sample(x0: torch.Tensor, t, noise, schedule: Schedule) -> torch.Tensor:
    """F2: x_t = √ᾱ_t x_0 + √(1−ᾱ_t) ε; x0 (B, ...), t in 0..T; returns (B, ...)."""
    tab, t = tables(schedule, x0.device), _t(t, x0, schedule.T, low=0)
    eps = _noise(noise, x0.shape, x0)
    return _cast(tab["sqrt_alpha_bars"][t], x0) * x0 + _cast(tab["sqrt_one_minus_alpha_bars"][t], x0) * eps


def x0_eps_from_output(model_output, x_t, t, schedule: Schedule, prediction: str = "eps", clip=None):
    """P3: (x̂_0, ε̂) from a model output of type ``prediction`` ('eps', 'x0', 'v' or aliases); ``clip``
    None or c > 0 clips x̂_0 to [−c, c] and recomputes ε̂ from it. Shapes (B, ...)."""
    kind = prediction_name(prediction)
    tab, t = tables(schedule, x_t.device), _t(t, x_t, schedule.T)
    a, s = tab["sqrt_alpha_bars"][t], tab["sqrt_one_minus_alpha_bars"][t]
    if kind == "eps":
        if bool((a == 0).any()):
            raise ValueError("eps-prediction needs alpha_bar[t] > 0; a zero-terminal-SNR schedule needs v or x0")
        x0 = _cast(1 / a, x_t) * x_t - _cast(s / a, x_t) * model_output
        eps = model_output
    elif kind == "x0":
        x0 = model_output
        eps = (x_t - _cast(a, x_t) * x0) / _cast(s, x_t)
    else:
        x0 = _cast(a, x_t) * x_t - _cast(s, x_t) * model_output
        eps = _cast(a, x_t) * model_output + _cast(s, x_t) * x_t
    if clip is not None:
        clip = check_real(clip, "clip", 0.0, low_open=True)
        x0 = x0.clamp(-clip, clip)
        eps = (x_t - _cast(a, x_t) * x0) / _cast(s, x_t)
    return x0, eps


def training_target(x0, eps, x_t, t, schedule: Schedule, prediction: str = "eps") -> torch.Tensor:
    """L4/L5: what the model regresses: ε, x_0, or v = √ᾱ_t ε − √(1−ᾱ_t) x_0 (P3)."""
    kind = prediction_name(prediction)
    if kind == "eps":
        return eps
    if kind == "x0":
        return x0
    tab, t = tables(schedule, x_t.device), _t(t, x_t, schedule.T)
    return _cast(tab["sqrt_alpha_bars"][t], x_t) * eps - _cast(tab["sqrt_one_minus_alpha_bars"][t], x_t) * x0


def mse_per_example(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """L4: mean over the non-batch axes of (target − pred)², per example; (B, ...) → (B,)."""
    return (pred.float() - target.float()).pow(2).flatten(1).mean(1)


def ddpm_step(model_output, x_t, t, schedule: Schedule, variance: str = "beta_tilde", noise=None,
              prediction: str = "eps", clip=None) -> torch.Tensor:
    """A1 (mirrors reference.samplers.ddpm_step): x_{t−1} = μ̃_t(x̂_0, x_t) + σ_t z, σ_t² ∈ {β̃_t, β_t},
    z = 0 where t = 1 (noise may then be None)."""
    kind = variance_name(variance)
    tab, t = tables(schedule, x_t.device), _t(t, x_t, schedule.T)
    x0, _ = x0_eps_from_output(model_output, x_t, t, schedule, prediction, clip)
    mean = _cast(tab["posterior_mean_coef1"][t], x_t) * x0 + _cast(tab["posterior_mean_coef2"][t], x_t) * x_t
    if not bool((t > 1).any()):
        return mean
    var = tab["posterior_variance" if kind == "beta_tilde" else "betas"][t]
    std = torch.where(t > 1, var.sqrt(), torch.zeros_like(var))
    return mean + _cast(std, x_t) * _noise(noise, x_t.shape, x_t)


def ddim_step(model_output, x_t, t, t_prev, schedule: Schedule, eta: float = 0.0, noise=None,
              prediction: str = "eps", clip=None) -> torch.Tensor:
    """A2 via P6/P7 (mirrors reference.samplers.ddim_step): x_prev = √ᾱ_prev x̂_0 + √(1−ᾱ_prev−σ²) ε̂ + σ z,
    σ = η√((1−ᾱ_prev)/(1−ᾱ_t))√(1−ᾱ_t/ᾱ_prev); t_prev = 0 is the clean step (returns x̂_0)."""
    eta = check_real(eta, "eta", 0.0)
    tab = tables(schedule, x_t.device)
    t, t_prev = _t(t, x_t, schedule.T), _t(t_prev, x_t, schedule.T, low=0)
    if bool((t_prev >= t).any()):
        raise ValueError("t_prev must be smaller than t (t_prev in 0..t-1; 0 is the clean step)")
    ab, abp = tab["alpha_bars"][t], tab["alpha_bars"][t_prev]
    sigma = eta * torch.sqrt((1 - abp) / (1 - ab)) * torch.sqrt(1 - ab / abp)
    room = 1 - abp - sigma**2
    if bool((room < -1e-12).any()):
        raise ValueError(f"eta={eta!r} is too large for this step: sigma_t(eta)**2 must be <= 1 - alpha_bar[t_prev]")
    x0, eps = x0_eps_from_output(model_output, x_t, t, schedule, prediction, clip)
    x = _cast(abp.sqrt(), x_t) * x0 + _cast(room.clamp(min=0).sqrt(), x_t) * eps
    if not bool((sigma > 0).any()):
        return x
    return x + _cast(sigma, x_t) * _noise(noise, x_t.shape, x_t)


def _call(model, x, t: int, schedule: Schedule, y):
    """The model at math step t of ``schedule``, called with the model timestep ``timestep_map[t]`` as (B,)."""
    t_model = torch.full((x.shape[0],), int(schedule.timestep_map[t]), dtype=torch.long, device=x.device)
    out = model(x, t_model, y)
    if out.shape != x.shape:
        raise ValueError(f"model output must have the shape of x {tuple(x.shape)}, got {tuple(out.shape)}")
    return out


def _steps(timesteps, schedule: Schedule) -> list[int]:
    ts = [int(v) for v in np.asarray(timesteps).reshape(-1)]
    if not ts or any(not 1 <= v <= schedule.T for v in ts) or any(a <= b for a, b in itertools.pairwise(ts)):
        raise ValueError(f"timesteps must be a non-empty, strictly descending list of math t in 1..{schedule.T}")
    return ts


def _slot(noise, i: int, n: int, x: torch.Tensor):
    """Loop noise for step i: a Generator, or slot i of an (n, *x.shape) tensor."""
    if isinstance(noise, torch.Generator) or noise is None:
        return noise
    if tuple(noise.shape) != (n, *x.shape):
        raise ValueError(f"noise must have shape {(n, *x.shape)} or be a torch.Generator, got {tuple(noise.shape)}")
    return noise[i]


class _Trajectory:
    def __init__(self, x, keep: bool):
        self.states = [x] if keep else None

    def add(self, x):
        if self.states is not None:
            self.states.append(x)

    def result(self, x):
        return x if self.states is None else (x, torch.stack(self.states))


@torch.no_grad()
def ddpm_sample(model, x_T, schedule: Schedule, variance: str = "beta_tilde", noise=None, prediction: str = "eps",
                y=None, clip=None, return_trajectory: bool = False):
    """A1 loop (mirrors reference.samplers.ddpm_sample): t = T..1 of ``schedule`` (respaced or not);
    noise a Generator or a tensor (schedule.T, *x_T.shape), slot i used at t = T − i."""
    x, traj = x_T, _Trajectory(x_T, return_trajectory)
    for i, t in enumerate(range(schedule.T, 0, -1)):
        out = _call(model, x, t, schedule, y)
        x = ddpm_step(out, x, t, schedule, variance, _slot(noise, i, schedule.T, x) if t > 1 else None, prediction,
                      clip)
        traj.add(x)
    return traj.result(x)


@torch.no_grad()
def ddim_sample(model, x_T, schedule: Schedule, timesteps, eta: float = 0.0, noise=None, prediction: str = "eps",
                y=None, clip=None, return_trajectory: bool = False):
    """A2 loop (mirrors reference.samplers.ddim_sample): timesteps[i] → timesteps[i+1], the last to 0."""
    ts = _steps(timesteps, schedule)
    x, traj = x_T, _Trajectory(x_T, return_trajectory)
    for i, (t, t_prev) in enumerate(zip(ts, [*ts[1:], 0], strict=True)):
        out = _call(model, x, t, schedule, y)
        z = _slot(noise, i, len(ts), x) if eta > 0 and t_prev > 0 else None
        x = ddim_step(out, x, t, t_prev, schedule, eta, z, prediction, clip)
        traj.add(x)
    return traj.result(x)


@torch.no_grad()
def heun_sample(model, x_T, schedule: Schedule, timesteps, prediction: str = "eps", y=None, clip=None,
                return_trajectory: bool = False, second_order: bool = True):
    """A5 (mirrors reference.samplers.heun_sample / euler_sample with second_order=False): EDM's Heun on
    dx̃/dσ = ε̂, σ = √(1/ᾱ − 1), x̃ = x/√ᾱ; the last step (to σ = 0) is Euler."""
    ts = _steps(timesteps, schedule)
    sig, root = schedule.sqrt_recipm1_alpha_bars, schedule.sqrt_alpha_bars
    if root[ts[0]] == 0:
        raise ValueError("the first timestep has alpha_bar = 0 (sigma = inf): start below T or use ddim")
    traj = _Trajectory(x_T, return_trajectory)
    xt = x_T / float(root[ts[0]])
    for t, t_next in zip(ts, [*ts[1:], 0], strict=True):
        _, d = x0_eps_from_output(_call(model, xt * float(root[t]), t, schedule, y), xt * float(root[t]), t, schedule,
                                  prediction, clip)
        h = float(sig[t_next] - sig[t])
        x_euler = xt + h * d
        if second_order and t_next > 0:
            xn = x_euler * float(root[t_next])
            _, d2 = x0_eps_from_output(_call(model, xn, t_next, schedule, y), xn, t_next, schedule, prediction, clip)
            xt = xt + (0.5 * h) * (d + d2)
        else:
            xt = x_euler
        traj.add(xt * float(root[t_next]))
    return traj.result(xt)


@torch.no_grad()
def dpmpp_2m_sample(model, x_T, schedule: Schedule, timesteps, prediction: str = "eps", y=None, clip=None,
                    return_trajectory: bool = False):
    """A5 (mirrors reference.samplers.dpmpp_2m_sample): DPM-Solver++(2M) on x̂_0 in λ = ½ log SNR; the
    last step (to t = 0) returns x̂_0."""
    ts = _steps(timesteps, schedule)
    lam, s, a = 0.5 * schedule.log_snr, schedule.sqrt_one_minus_alpha_bars, schedule.sqrt_alpha_bars
    x, traj = x_T, _Trajectory(x_T, return_trajectory)
    old_x0, h_last = None, None
    for t, t_next in zip(ts, [*ts[1:], 0], strict=True):
        x0, _ = x0_eps_from_output(_call(model, x, t, schedule, y), x, t, schedule, prediction, clip)
        if t_next == 0:
            x = x0
        else:
            h = float(lam[t_next] - lam[t])
            d = x0 if old_x0 is None else (1 + 0.5 * h / h_last) * x0 - (0.5 * h / h_last) * old_x0
            x = float(s[t_next] / s[t]) * x - float(a[t_next] * np.expm1(-h)) * d
            h_last = h
        old_x0 = x0
        traj.add(x)
    return traj.result(x)


def cfg(model, guidance: float, null_class: int):
    """A9 (mirrors reference.samplers.cfg): ε̂ = ε(x, ∅) + w(ε(x, y) − ε(x, ∅)) with ONE batched model
    call on [x, x], [t, t], [y, null]. Returns a model callable ``guided(x_t, t, y)``; y is required."""
    w = check_real(guidance, "guidance", 0.0)

    def guided(x_t, t, y=None):
        if y is None:
            raise ValueError("y (class labels) is required for classifier-free guidance; got None")
        B = x_t.shape[0]
        y = torch.as_tensor(y, device=x_t.device).long().expand(B)
        out = model(torch.cat([x_t, x_t]), torch.cat([t, t]), torch.cat([y, torch.full_like(y, null_class)]))
        cond, uncond = out[:B], out[B:]
        return uncond + w * (cond - uncond)

    return guided
