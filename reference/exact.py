"""Exact output distributions of the linear samplers on Gaussian data (no Monte Carlo noise).

With Gaussian data N(m, diag(s²)) the exact denoiser (X1) is affine in x_t, so every step of DDPM, DDIM,
Heun, DPM-Solver++ or the random-walk sampler is affine in the current state and in its fresh noise, and
the sampler's output is an affine function F(x_T, z_1, …, z_n) of independent standard normals. Its law
is Gaussian with mean F(0) and, per dimension, variance Σ_k (F(e_k) − F(0))² over the unit inputs e_k.

``exact_output_law`` evaluates F at all those inputs in ONE batched run of the sampler itself (row 0 the
zero input, row 1 the unit x_T, row 1+i the unit noise of slot i), so it applies to any sampler that takes
its noise as an array of shape (n_noise, B, d); ``ddim_family_law`` propagates mean and variance through
the same steps by a hand-derived closed form, an independent second derivation used to check the first.
"""

from __future__ import annotations

import numpy as np

from ._checks import as_float_array, check_int, check_real, variance_name
from .analytic import GaussianData, vp_model
from .schedules import Schedule, respace
from .schedules import timesteps as make_timesteps


def exact_output_law(sample_fn, dim: int, n_noise: int, check_affine: bool = True):
    """Mean and variance of ``sample_fn(x_T, noise)`` for x_T ~ N(0, I) and noise ~ N(0, I), exactly,
    when sample_fn is affine and acts on each data dimension separately (diagonal Gaussian data).

    sample_fn(x_T (B, dim), noise (n_noise, B, dim)) -> x_0 (B, dim). Returns (mean (dim,), var (dim,)).
    With ``check_affine`` one extra row with random inputs verifies F(r) = F(0) + Σ_k r_k (F(e_k) − F(0))
    and raises ValueError if the sampler is not affine for this model.
    """
    dim = check_int(dim, "dim", 1)
    n_noise = check_int(n_noise, "n_noise", 0)
    n_basis = 2 + n_noise
    rows = n_basis + (1 if check_affine else 0)
    x_T = np.zeros((rows, dim))
    noise = np.zeros((n_noise, rows, dim))
    x_T[1] = 1.0
    noise[np.arange(n_noise), 2 + np.arange(n_noise)] = 1.0
    if check_affine:
        r = np.random.default_rng(0).standard_normal(1 + n_noise)
        x_T[-1] = r[0]
        noise[:, -1] = r[1:, None]
    out = as_float_array(sample_fn(x_T, noise), "sample_fn output")
    if out.shape != (rows, dim):
        raise ValueError(f"sample_fn must return shape {(rows, dim)}, got {out.shape}")
    mean = out[0]
    coef = out[1:n_basis] - mean
    if check_affine:
        predicted = mean + r @ coef
        scale = np.abs(coef).sum(axis=0) + np.abs(mean) + 1.0
        if np.any(np.abs(predicted - out[-1]) > 1e-8 * scale):
            raise ValueError("sample_fn is not affine in (x_T, noise) for this model; its law is not Gaussian")
    return mean, np.sum(coef**2, axis=0)


def ddim_family_law(data: GaussianData, schedule: Schedule, timesteps, eta: float = 0.0,
                    variance: str | None = None):
    """The same law as ``exact_output_law`` for DDIM (P6/P7, A2) or, with ``variance`` given, DDPM on
    the respaced schedule (A1), by propagating mean μ and variance v through each affine step by hand.

    With a = √ᾱ_t, σ = √(1−ᾱ_t) and c = a s²/(a² s² + σ²) (X1): x̂_0 = (1 − ac)m + c x, ε̂ = ((1 − ac)x −
    a(1 − ac)m)/σ. DDIM: x' = a' x̂_0 + k ε̂ + σ_η z, k = √(1 − ᾱ' − σ_η²); DDPM: x' = c₁ x̂_0 + c₂ x + σ z.
    So x' = A x + B + σ z, μ' = Aμ + B, v' = A²v + σ². Starts from x_T ~ N(0, I). Returns (mean, var).
    """
    if not isinstance(data, GaussianData):
        raise TypeError(f"data must be GaussianData, got {type(data).__name__}")
    eta = check_real(eta, "eta", 0.0)
    ts = np.asarray(timesteps, dtype=np.int64)
    mu, v = np.zeros(data.dim), np.ones(data.dim)
    m, s2 = data.mean, data.var
    if variance is not None:
        kind = variance_name(variance)
        sub = respace(schedule, ts)
        for t in range(sub.T, 0, -1):
            a, sig = sub.sqrt_alpha_bars[t], sub.sqrt_one_minus_alpha_bars[t]
            c = a * s2 / (a**2 * s2 + sig**2)
            c1, c2 = sub.posterior_mean_coef1[t], sub.posterior_mean_coef2[t]
            var = 0.0 if t == 1 else (sub.posterior_variance[t] if kind == "beta_tilde" else sub.betas[t])
            A, B = c1 * c + c2, c1 * (1 - c * a) * m
            mu, v = A * mu + B, A**2 * v + var
        return mu, v
    prev = np.concatenate([ts[1:], [0]])
    for t, p in zip(ts, prev, strict=True):
        ab, abp = schedule.alpha_bars[t], schedule.alpha_bars[p]
        a, sig, ap = np.sqrt(ab), np.sqrt(1 - ab), np.sqrt(abp)
        sig_eta2 = 0.0 if p == 0 else eta**2 * (1 - abp) / (1 - ab) * (1 - ab / abp)
        k = np.sqrt(max(1 - abp - sig_eta2, 0.0))
        c = a * s2 / (a**2 * s2 + sig**2)
        A = ap * c + k * (1 - a * c) / sig
        B = (1 - a * c) * m * (ap - k * a / sig)
        mu, v = A * mu + B, A**2 * v + sig_eta2
    return mu, v


def gaussian_w2(mean1, var1, mean2, var2) -> float:
    """2-Wasserstein distance between diagonal Gaussians: W2² = Σ (m₁ − m₂)² + (√v₁ − √v₂)²."""
    m1, v1 = as_float_array(mean1, "mean1"), as_float_array(var1, "var1")
    m2, v2 = as_float_array(mean2, "mean2"), as_float_array(var2, "var2")
    if np.any(v1 < 0) or np.any(v2 < 0):
        raise ValueError("variances must be >= 0")
    return float(np.sqrt(np.sum((m1 - m2) ** 2 + (np.sqrt(v1) - np.sqrt(v2)) ** 2)))


def sampler_law(name: str, data: GaussianData, schedule: Schedule, num_steps: int, spacing: str = "trailing"):
    """Exact output law (mean, var) of sampler ``name`` with ``num_steps`` steps on the exact ε-model of
    ``data``: a name of ``samplers.SAMPLERS`` ('ddim' with η = 0, 'ddpm' with β̃ on the respaced steps, 'heun',
    'dpmpp2m'), run through ``samplers.sample`` as the engine and the runtime run it, or one of the variants
    'ddpm_beta' (β), 'ddim_eta0.5', 'ddim_eta1'. Steps are schedules.timesteps(num_steps, T, spacing)."""
    from . import samplers

    num_steps = check_int(num_steps, "num_steps", 1, schedule.T)
    model = vp_model(data, schedule)
    variants = {"ddpm_beta": ("ddpm", 0.0), "ddim_eta0.5": ("ddim", 0.5), "ddim_eta1": ("ddim", 1.0)}
    if name not in SAMPLER_NAMES:
        raise ValueError(f"name must be one of {list(SAMPLER_NAMES)}, got {name!r}")
    base, eta = variants.get(name, (name, 0.0))
    if name == "ddpm_beta":
        ts = make_timesteps(num_steps, schedule.T, spacing)

        def run(x, z):
            return samplers.ddpm_sample(model, x, respace(schedule, ts), "beta", noise=z)
    else:
        def run(x, z):
            return samplers.sample(model, x, schedule, base, num_steps, eta, z, spacing=spacing)
    stochastic = samplers.SAMPLERS[base].stochastic or eta > 0
    return exact_output_law(run, data.dim, num_steps if stochastic else 0)


SAMPLER_NAMES = ("ddpm", "ddpm_beta", "ddim", "ddim_eta0.5", "ddim_eta1", "heun", "dpmpp2m")
"""The samplers ``sampler_law`` knows: every row of ``samplers.SAMPLERS`` and three variants."""


def w2_table(data: GaussianData, schedule: Schedule, steps=(10, 20, 50, 100, 1000), spacing: str = "trailing",
             names=SAMPLER_NAMES):
    """Exact W2 between each sampler's output law and the data law, for each step count:
    {name: {num_steps: w2}}."""
    return {name: {int(n): gaussian_w2(*sampler_law(name, data, schedule, n, spacing), data.mean, data.var)
                   for n in steps} for name in names}
