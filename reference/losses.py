"""Training objectives and the variational bound (docs/formulas.md: L1–L11, with K1/K3–K5, F4, P1–P8).

Shapes: data, noise and predictions are (B, ...) arrays (NCHW for images); ``t`` is a math timestep
(1..T), a scalar or shape (B,). Unless a docstring says otherwise a loss returns one value per example,
shape (B,), the mean over the non-batch axes. The variational bound (``vlb_terms``) is in nats summed
over the data axes, as Ho et al. and improved-diffusion define it, and ``nll_bits_per_dim`` turns it
into bits per dimension.

Reverse variances σ_t² (``variance``) are named as in ``_checks.VARIANCES``: "beta_tilde" (alias
"fixed_small") is β̃_t, with improved-diffusion's clipped value β̃_2 at t = 1 (β̃_1 = 0); "beta" (alias
"fixed_large") is β_t at every t, β_1 at t = 1 included. A table of length T+1 indexed by math t (entry 0
ignored) gives any other choice, e.g. ``analytic.reverse_variance`` (P9) or Ho et al.'s / improved-
diffusion's fixed_large, which uses β̃_2 at t = 1: ``np.r_[0, schedule.posterior_variance[2], schedule.betas[2:]]``.
"""

from __future__ import annotations

import math

import numpy as np

from ._checks import (
    as_float_array,
    broadcast_t,
    check_int,
    check_real,
    check_same_shape,
    check_t_batch,
    check_timesteps,
    draw_noise,
    prediction_name,
    variance_name,
)
from .forward import prior_kl
from .kl import discretized_gaussian_log_likelihood, gaussian_log_likelihood, normal_kl, vae_kl
from .posterior import q_posterior, x0_eps_from_output
from .schedules import Schedule, check_schedule, su_from_ddpm

_LN2 = math.log(2.0)


# --------------------------------------------------------------------------------------------- helpers

def _batched(x, name: str) -> np.ndarray:
    x = as_float_array(x, name)
    if x.ndim < 1 or x.shape[0] < 1:
        raise ValueError(f"{name} must have a leading batch axis, shape (B, ...) with B >= 1, got {x.shape}")
    return x


def _pair(a, b, name_a: str, name_b: str):
    a, b = _batched(a, name_a), _batched(b, name_b)
    check_same_shape(a, b, name_a, name_b)
    return a, b


def _per_example_mean(sq: np.ndarray) -> np.ndarray:
    return sq.reshape(sq.shape[0], -1).mean(axis=1)


def _per_example_sum(x: np.ndarray) -> np.ndarray:
    return x.reshape(x.shape[0], -1).sum(axis=1)


def _t(t, schedule: Schedule, x=None, low: int = 1) -> np.ndarray:
    t = check_timesteps(t, "t", schedule.T, low=low)
    if x is not None:
        check_t_batch(t, x)
    return t


def reverse_variance_table(schedule: Schedule, variance="beta_tilde") -> np.ndarray:
    """The reverse-process variances σ_t² used by ``vlb_terms`` and ``vlb_weight`` (A1, P9); shape (T+1,),
    indexed by math t, entry 0 unused (set to NaN).

    "beta_tilde"/"fixed_small": σ_t² = β̃_t for t ≥ 2 and σ_1² = β̃_2 (improved-diffusion's
    ``posterior_log_variance_clipped``: β̃_1 = 0 would make the decoder degenerate).
    "beta"/"fixed_large": σ_t² = β_t for every t, σ_1² = β_1 included (Ho et al.'s and improved-diffusion's
    fixed_large use β̃_2 at t = 1 instead: pass that table explicitly to reproduce their numbers).
    An array of shape (T+1,) is returned as given (checked: entries 1..T finite and > 0).
    """
    schedule = check_schedule(schedule)
    T = schedule.T
    if isinstance(variance, str):
        kind = variance_name(variance)
        if kind == "beta_tilde":
            table = np.exp(schedule.posterior_log_variance_clipped)
        else:
            table = schedule.betas.copy()
    else:
        table = as_float_array(variance, "variance").copy()
        if table.shape != (T + 1,):
            raise ValueError(f"variance must be 'beta_tilde', 'beta' (or an alias) or an array of shape "
                             f"({T + 1},) indexed by math t, got shape {table.shape}")
        if np.any(table[1:] <= 0):
            raise ValueError("variance table entries 1..T must be > 0")
    table = table.astype(np.float64)
    table[0] = np.nan
    return table


# --------------------------------------------------------------------------------------------- L4, L5
def simple_loss(eps, eps_pred) -> np.ndarray:
    """L4: L_simple per example, mean over the non-batch axes of (ε − ε_θ)²; (B, ...) × 2 → (B,).

    Ho et al.'s objective: eps_pred = ε_θ(√ᾱ_t x_0 + √(1−ᾱ_t) ε, t) with t uniform in 1..T.
    """
    eps, eps_pred = _pair(eps, eps_pred, "eps", "eps_pred")
    return _per_example_mean((eps - eps_pred) ** 2)


def weighted_loss(eps, eps_pred, weights) -> np.ndarray:
    """L4: the general weighted form w(t)·‖ε − ε_θ‖² (mean over non-batch axes), per example.

    ``weights``: scalar or (B,), finite and ≥ 0 (e.g. ``vlb_weight``, ``min_snr_weight`` gathered at each
    example's t). Returns (B,).
    """
    base = simple_loss(eps, eps_pred)
    w = as_float_array(weights, "weights")
    if w.ndim > 1 or (w.ndim == 1 and w.shape[0] != base.shape[0]):
        raise ValueError(f"weights must be a scalar or have shape ({base.shape[0]},), got {w.shape}")
    if np.any(w < 0):
        raise ValueError("weights must be >= 0")
    return w * base


def prediction_loss_weight(t, schedule: Schedule, prediction: str = "eps") -> np.ndarray:
    """L5: the factor w(t) with ‖target − prediction‖² = w·‖ε − ε_θ‖² at a fixed x_t, when the prediction
    is converted from ε_θ by P3: eps 1; x0 (1−ᾱ_t)/ᾱ_t = 1/SNR(t); v 1/ᾱ_t = 1 + 1/SNR(t). These are R5's
    error relations ‖v − v̂‖² = (1 + 1/SNR)‖ε − ε̂‖² = (SNR + 1)‖x_0 − x̂_0‖².

    (x̂_0 − x_0 = √((1−ᾱ)/ᾱ)(ε − ε̂) and v̂ − v = (ε̂ − ε)/√ᾱ.) t in 1..T, shape of t; inf where ᾱ_t = 0.
    """
    schedule = check_schedule(schedule)
    kind = prediction_name(prediction)
    t = _t(t, schedule)
    ab = schedule.alpha_bars[t]
    with np.errstate(divide="ignore"):
        if kind == "eps":
            return np.ones_like(ab)
        if kind == "x0":
            return (1.0 - ab) / ab
        return 1.0 / ab


def prediction_loss(model_output, x0, eps, x_t, t, schedule: Schedule, prediction: str = "eps") -> np.ndarray:
    """L5: the MSE in the model's own parameterisation, per example (mean over non-batch axes); (B,).

    Targets (P3): eps → ε; x0 → x_0; v → v = √ᾱ_t ε − √(1−ᾱ_t) x_0. It equals
    ``prediction_loss_weight(t, schedule, prediction)`` times the ε-loss of the ε_θ that the output converts
    to. ``x_t`` must be √ᾱ_t x_0 + √(1−ᾱ_t) ε (checked to 1e-6 relative: a mismatched t or noise raises).
    """
    schedule = check_schedule(schedule)
    kind = prediction_name(prediction)
    out = _batched(model_output, "model_output")
    x0, eps = _pair(x0, eps, "x0", "eps")
    x_t = _batched(x_t, "x_t")
    check_same_shape(out, x0, "model_output", "x0")
    check_same_shape(x_t, x0, "x_t", "x0")
    t = _t(t, schedule, x0)
    a = broadcast_t(schedule.sqrt_alpha_bars, t, x0.ndim)
    s = broadcast_t(schedule.sqrt_one_minus_alpha_bars, t, x0.ndim)
    expected = a * x0 + s * eps
    if np.max(np.abs(expected - x_t)) > 1e-6 * (1.0 + np.max(np.abs(x_t))):
        raise ValueError("x_t must equal sqrt(alpha_bar[t]) * x0 + sqrt(1 - alpha_bar[t]) * eps "
                         "(F2); check that t and eps are the ones used to make x_t")
    target = {"eps": eps, "x0": x0, "v": a * eps - s * x0}[kind]
    return _per_example_mean((out - target) ** 2)


def min_snr_weight(t, schedule: Schedule, gamma: float = 5.0, prediction: str = "eps") -> np.ndarray:
    """R1: Min-SNR-γ loss weights (Hang et al. 2023; γ = 5 in the paper), for the loss in the model's own
    parameterisation, SNR = SNR(t): x0 min(SNR, γ); eps min(SNR, γ)/SNR; v min(SNR, γ)/(SNR + 1).

    With the error relations of ``prediction_loss_weight`` (L5, R5) every choice is the same weight
    min(SNR, γ) on ‖x_0 − x̂_0‖² (min(SNR, γ)/SNR on the ε-loss). At SNR = 0 (t = T of a zero-terminal-SNR
    schedule) the x0 and v weights are 0 and the ε weight is taken as its limit 1. t in 1..T, gamma > 0;
    shape of t.
    """
    schedule = check_schedule(schedule)
    kind = prediction_name(prediction)
    gamma = check_real(gamma, "gamma", 0.0, low_open=True)
    t = _t(t, schedule)
    snr = schedule.snr[t]
    clipped = np.minimum(snr, gamma)
    if kind == "x0":
        return clipped
    if kind == "v":
        return clipped / (snr + 1.0)
    with np.errstate(divide="ignore"):
        return np.minimum(1.0, gamma / snr)  # = min(SNR, γ)/SNR, and 1 at SNR = 0


# --------------------------------------------------------------------------------------------- L2, L3
def vlb_weight(t, schedule: Schedule, variance="beta_tilde") -> np.ndarray:
    """L2: the weight β_t²/(2σ_t²α_t(1−ᾱ_t)) with which L_{t−1} = KL(q(x_{t−1} given x_t, x_0) ‖ p_θ)
    depends on ‖ε − ε_θ‖² (summed over dimensions) in the ε-parameterisation; shape of t (1..T).

    σ_t² is ``reverse_variance_table(schedule, variance)[t]``. For t ≥ 2 and σ_t² = β̃_t this is the KL
    exactly (its variance part vanishes); for σ_t² ≠ β̃_t the KL adds a constant ½(log σ_t²/β̃_t − 1 +
    β̃_t/σ_t²) per dimension. At t = 1 the term is the decoder NLL L_0, and the value returned is the
    weight of Ho et al.'s Gaussian approximation of it (with σ_1² = β̃_2 for "beta_tilde"): finite,
    unlike ``vlb_weight_snr(1)``.
    """
    schedule = check_schedule(schedule)
    t = _t(t, schedule)
    sigma2 = reverse_variance_table(schedule, variance)[t]
    b, a, ab = schedule.betas[t], schedule.alphas[t], schedule.alpha_bars[t]
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(a * (1.0 - ab) > 0, b**2 / (2.0 * sigma2 * a * (1.0 - ab)), np.inf)


def vlb_weight_snr(t, schedule: Schedule) -> np.ndarray:
    """L3: the L2 weight for σ_t² = β̃_t written with the SNR: ½(SNR(t−1)/SNR(t) − 1); shape of t (1..T).

    Equal to ``vlb_weight(t, schedule, "beta_tilde")`` for t ≥ 2. At t = 1, SNR(0) = ∞ and the value is
    +inf: the exact weight for β̃_1 = 0, where the KL against the degenerate posterior has no finite value
    and the VLB uses the decoder term instead (see ``vlb_weight(1, ...)`` for its finite approximation).
    Also +inf where SNR(t) = 0 (zero terminal SNR).
    """
    schedule = check_schedule(schedule)
    t = _t(t, schedule)
    snr_prev, snr = schedule.snr[t - 1], schedule.snr[t]
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(np.isfinite(snr_prev) & (snr > 0), 0.5 * (snr_prev / snr - 1.0), np.inf)


# --------------------------------------------------------------------------------------------- L1, L6
def _check_on_grid(x0: np.ndarray, levels: int) -> None:
    if np.any(np.abs(x0) > 1.0):
        raise ValueError("x0 must lie in [-1, 1] for the discretised decoder (K5)")
    k = (x0 + 1.0) * (levels - 1) / 2.0
    if np.any(np.abs(k - np.round(k)) > 1e-6):
        raise ValueError(f"x0 must lie on the grid of levels={levels} values in [-1, 1] (x0 = -1 + 2k/(levels-1))")


def vlb_terms(model, x0, schedule: Schedule, noise, variance="beta_tilde", prediction: str = "eps",
              levels: int | None = 256, y=None, clip=None) -> dict:
    """L1: the terms of the variational bound −log p_θ(x_0) ≤ L_T + Σ_{t≥2} L_{t−1} + L_0, in nats summed
    over the data axes, one Monte Carlo draw of x_t per t (Ho et al.'s and improved-diffusion's
    ``calc_bpd_loop``).

    model(x_t, t, y) → prediction of type ``prediction``; it is called with the model timesteps
    ``schedule.timestep_map[t]`` (t itself unless the schedule was respaced) as an int64 array (B,), and
    y (None included), as the samplers call it. x0: (B, ...) on ``levels`` evenly spaced values in [−1, 1]; or, with
    levels=None, continuous data (e.g. latents), any real values.
    noise: a Generator, or an array of shape (T, *x0.shape) whose slot t−1 makes x_t = q_sample(x0, t, ·).
    variance: the reverse variance σ_t² ("beta_tilde", "beta", aliases, or a (T+1,) table; see
    ``reverse_variance_table``). clip: None or c > 0 to clip x̂_0 to [−c, c] (improved-diffusion's
    bpd loop uses clip_denoised=True, i.e. c = 1).

    μ_θ = μ̃_t(x̂_0, x_t) (P1 at the model's x̂_0; = P4 for ε-prediction). Terms:
      t ≥ 2: L_{t−1} = Σ_dims KL(N(μ̃_t, β̃_t) ‖ N(μ_θ, σ_t²)) (K1, ``kl.normal_kl``);
      t = 1: L_0 = −Σ_dims log p(x_0 given x_1), the discretised Gaussian (K5) with mean μ_θ and log-scale
      ½ log σ_1²; with levels=None the Gaussian density N(x_0; μ_θ, σ_1²) (K4) instead, so the bound is
      on a differential entropy (it can be negative);
      prior: L_T = Σ_dims KL(q(x_T given x_0) ‖ N(0, I)) (F4, ``forward.prior_kl``).
    Returns a dict: "prior" (B,), "terms" (B, T) with terms[:, t−1] = L_{t−1}, "total" (B,) = prior +
    Σ terms, "mse" (B, T) mean (ε − ε̂)², "x0_mse" (B, T) mean (x_0 − x̂_0)², "dims" D (int).
    """
    schedule = check_schedule(schedule)
    if not callable(model):
        raise TypeError(f"model must be callable as model(x_t, t, y), got {type(model).__name__}")
    x0 = _batched(x0, "x0")
    if levels is not None:
        levels = check_int(levels, "levels", 2)
        _check_on_grid(x0, levels)
    kind = prediction_name(prediction)
    sigma2 = reverse_variance_table(schedule, variance)
    if clip is not None:
        clip = check_real(clip, "clip", 0.0, low_open=True)
    T, B = schedule.T, x0.shape[0]
    gen = noise if isinstance(noise, np.random.Generator) else None
    noise_all = None if gen is not None else draw_noise(noise, (T, *x0.shape))

    terms = np.empty((B, T))
    mse = np.empty((B, T))
    x0_mse = np.empty((B, T))
    for t in range(1, T + 1):
        eps = gen.standard_normal(x0.shape) if gen is not None else noise_all[t - 1]
        x_t = schedule.sqrt_alpha_bars[t] * x0 + schedule.sqrt_one_minus_alpha_bars[t] * eps
        t_model = np.full(B, schedule.timestep_map[t], dtype=np.int64)
        out = model(x_t, t_model, y)
        out = as_float_array(out, "model output")
        if out.shape != x0.shape:
            raise ValueError(f"model output must have the shape of x0 {x0.shape}, got {out.shape}")
        x0_hat, eps_hat = x0_eps_from_output(out, x_t, t, schedule, kind, clip=clip)
        model_mean = q_posterior(x0_hat, x_t, t, schedule)[0]
        log_var = math.log(sigma2[t])
        if t == 1:
            if levels is None:
                ll = gaussian_log_likelihood(x0, model_mean, log_var)
            else:
                ll = discretized_gaussian_log_likelihood(x0, model_mean, 0.5 * log_var, levels=levels)
            terms[:, 0] = -_per_example_sum(ll)
        else:
            true_mean, _, true_log_var = q_posterior(x0, x_t, t, schedule)
            terms[:, t - 1] = _per_example_sum(normal_kl(true_mean, true_log_var, model_mean, log_var)
                                               * np.ones_like(x0))
        mse[:, t - 1] = _per_example_mean((eps - eps_hat) ** 2)
        x0_mse[:, t - 1] = _per_example_mean((x0 - x0_hat) ** 2)
    prior = _per_example_sum(prior_kl(x0, schedule))
    return {"prior": prior, "terms": terms, "total": prior + terms.sum(axis=1), "mse": mse,
            "x0_mse": x0_mse, "dims": int(np.prod(x0.shape[1:], dtype=np.int64))}


def nll_bits_per_dim(vlb: dict) -> np.ndarray:
    """L6: the bound in bits per dimension, (prior + Σ_t terms)/(D·ln 2), from a ``vlb_terms`` dict; (B,)."""
    if not isinstance(vlb, dict) or not {"prior", "terms", "dims"} <= set(vlb):
        raise TypeError("vlb must be the dict returned by vlb_terms (keys 'prior', 'terms', 'dims')")
    prior = as_float_array(vlb["prior"], "vlb['prior']")
    terms = as_float_array(vlb["terms"], "vlb['terms']")
    dims = check_int(vlb["dims"], "vlb['dims']", 1)
    if prior.ndim != 1 or terms.ndim != 2 or terms.shape[0] != prior.shape[0]:
        raise ValueError(f"vlb['prior'] must be (B,) and vlb['terms'] (B, T), got {prior.shape} and {terms.shape}")
    return (prior + terms.sum(axis=1)) / (dims * _LN2)


# --------------------------------------------------------------------------------------------- L7 (Su)
def su_one_step_loss(x_prev, x_t, eps_pred, t, schedule: Schedule) -> np.ndarray:
    """L7 (Su 1.8–1.10, Su notation): ‖x_{t−1} − μ(x_t)‖² with μ(x_t) = (x_t − β_t ε_θ(x_t, t))/α_t, per
    example as the mean over non-batch axes; (B,).

    Su's α_t, β_t are the square roots of DDPM's (``schedules.su_from_ddpm``). x_prev is x_{t−1} and
    x_t = α_t x_{t−1} + β_t ε_t, so the loss is (β_t²/α_t²)·‖ε_t − ε_θ‖². eps_pred = ε_θ(x_t, t), the
    model's estimate of the one-step noise ε_t. t in 1..T.
    """
    schedule = check_schedule(schedule)
    x_prev, x_t = _pair(x_prev, x_t, "x_prev", "x_t")
    eps_pred = _batched(eps_pred, "eps_pred")
    check_same_shape(x_t, eps_pred, "x_t", "eps_pred")
    t = _t(t, schedule, x_t)
    alpha, beta, _, _ = su_from_ddpm(schedule)
    a, b = broadcast_t(alpha, t, x_t.ndim), broadcast_t(beta, t, x_t.ndim)
    return _per_example_mean((x_prev - (x_t - b * eps_pred) / a) ** 2)


def su_variance_reduced_loss(eps, eps_pred, t, schedule: Schedule) -> np.ndarray:
    """L7 (Su 1.11–1.14, Su notation): ‖ε − (β̄_t/β_t)·ε_θ(ᾱ_t x_0 + β̄_t ε, t)‖², mean over non-batch axes;
    (B,). eps is the total noise ε of x_t = ᾱ_t x_0 + β̄_t ε, eps_pred the model's output at that x_t.

    With ``su_loss_relation``: E_ω[su_one_step_loss] = weight·su_variance_reduced_loss + constant, where
    the expectation is over the part ω of the step noise that is independent of x_t. t in 1..T.
    """
    schedule = check_schedule(schedule)
    eps, eps_pred = _pair(eps, eps_pred, "eps", "eps_pred")
    t = _t(t, schedule, eps)
    _, beta, _, beta_bar = su_from_ddpm(schedule)
    ratio = broadcast_t(beta_bar, t, eps.ndim) / broadcast_t(beta, t, eps.ndim)
    return _per_example_mean((eps - ratio * eps_pred) ** 2)


def su_loss_relation(t, schedule: Schedule):
    """L7: (weight, constant) with E_ω[su_one_step_loss] = weight·su_variance_reduced_loss + constant
    (per-dimension means), for the same x_t and ε_θ; each of the shape of t (1..T).

    Su notation: with β̄_t ε = α_t β̄_{t−1} ε̄_{t−1} + β_t ε_t and β̄_t ω = β_t ε̄_{t−1} − α_t β̄_{t−1} ε_t,
    ε_t = (β_t ε − α_t β̄_{t−1} ω)/β̄_t, so weight = β_t⁴/(α_t² β̄_t²) and constant = β_t² β̄_{t−1}²/β̄_t².
    In DDPM notation: weight = β_t²/(α_t(1−ᾱ_t)), constant = β̃_t.
    """
    schedule = check_schedule(schedule)
    t = _t(t, schedule)
    alpha, beta, _, beta_bar = su_from_ddpm(schedule)
    weight = beta[t] ** 4 / (alpha[t] ** 2 * beta_bar[t] ** 2)
    constant = beta[t] ** 2 * beta_bar[t - 1] ** 2 / beta_bar[t] ** 2
    return weight, constant


# --------------------------------------------------------------------------------------------- L8 (Inouye)
def random_walk_vlb_weight(t, reverse_variance=None) -> np.ndarray:
    """L8: the weight 1/(2t²σ²) of ‖ε̃ − ε̃_θ‖² in KL(q(x_{t−1} given x_t, x_0) ‖ N(x_t − ε̃_θ/t, σ²)) for
    Inouye's random walk (S12, P8; ε̃ = x_t − x_0); shape of t.

    Default σ² = 1 − 1/t, the posterior variance (matched: the KL is exactly weight·‖ε̃ − ε̃_θ‖² =
    ‖ε̃ − ε̃_θ‖²/(2t(t−1)); +inf at t = 1, where the posterior is a point mass). Inouye's slide writes
    1/(2t²), which is the weight for unit reverse variance σ² = 1 (his std-vs-variance erratum); then the
    KL adds ½(−log(1 − 1/t) − 1/t) per dimension. t ≥ 1 (real); reverse_variance > 0, scalar or shape of t.
    """
    t = as_float_array(t, "t")
    if np.any(t < 1):
        raise ValueError("t must be >= 1 for the random-walk VLB weight")
    if reverse_variance is None:
        var = 1.0 - 1.0 / t
    else:
        var = as_float_array(reverse_variance, "reverse_variance")
        if np.any(var <= 0):
            raise ValueError("reverse_variance must be > 0")
    with np.errstate(divide="ignore"):
        return 1.0 / (2.0 * t**2 * var)


# --------------------------------------------------------------------------------------------- L9 (VAE)
def reparameterize(mean, logvar, noise) -> np.ndarray:
    """L9: z = μ + σ ⊙ ε with σ = exp(½ log σ²); mean and logvar of one shape, noise an array of that
    shape or a Generator. Returns z of the shape of mean."""
    mean, logvar = as_float_array(mean, "mean"), as_float_array(logvar, "logvar")
    check_same_shape(mean, logvar, "mean", "logvar")
    eps = draw_noise(noise, mean.shape)
    return mean + np.exp(0.5 * logvar) * eps


def vae_loss(x, recon_mean, z_mean, z_logvar, kl_weight: float = 1.0, recon_logvar=0.0) -> dict:
    """L9: the (β-)VAE loss per example, −log p(x given z) + β·KL(q(z given x) ‖ N(0, I)), in nats.

    recon = −Σ_dims log N(x; recon_mean, exp(recon_logvar)) (K4, ``kl.gaussian_log_likelihood``; recon_logvar
    a scalar or an array broadcasting to x, e.g. LDM's learned log-variance); kl = Σ_dims ½(μ² + σ² − 1 −
    log σ²) (K3, ``kl.vae_kl``); kl_weight β ≥ 0. x, recon_mean: (B, ...); z_mean, z_logvar: (B, ...).
    Returns a dict of (B,) arrays: "loss" = recon + β·kl, "recon", "kl".
    """
    x, recon_mean = _pair(x, recon_mean, "x", "recon_mean")
    z_mean, z_logvar = _pair(z_mean, z_logvar, "z_mean", "z_logvar")
    if z_mean.shape[0] != x.shape[0]:
        raise ValueError(f"z_mean and x must have the same batch size, got {z_mean.shape[0]} and {x.shape[0]}")
    kl_weight = check_real(kl_weight, "kl_weight", 0.0)
    recon_logvar = as_float_array(recon_logvar, "recon_logvar")
    try:
        np.broadcast_shapes(recon_logvar.shape, x.shape)
    except ValueError as exc:
        raise ValueError(f"recon_logvar must broadcast to x's shape {x.shape}, got {recon_logvar.shape}") from exc
    ll = np.broadcast_to(gaussian_log_likelihood(x, recon_mean, recon_logvar), x.shape)
    recon = -_per_example_sum(ll)
    kl = vae_kl(z_mean, z_logvar)
    return {"loss": recon + kl_weight * kl, "recon": recon, "kl": kl}


# --------------------------------------------------------------------------------------------- L10, L11
def dsm_loss(score_pred, x0, x_t, t, schedule: Schedule) -> np.ndarray:
    """L10: denoising score matching ‖s_θ(x_t, t) − ∇ log q(x_t given x_0)‖², mean over non-batch axes;
    (B,). The target is −(x_t − √ᾱ_t x_0)/(1 − ᾱ_t) (= −ε/√(1−ᾱ_t), P5); t in 1..T.

    (1−ᾱ_t)·dsm_loss equals simple_loss for ε_θ = −√(1−ᾱ_t)·s_θ (L4), the usual λ(t) = σ_t² weighting.
    """
    schedule = check_schedule(schedule)
    score_pred = _batched(score_pred, "score_pred")
    x0, x_t = _pair(x0, x_t, "x0", "x_t")
    check_same_shape(score_pred, x_t, "score_pred", "x_t")
    t = _t(t, schedule, x_t)
    a = broadcast_t(schedule.sqrt_alpha_bars, t, x_t.ndim)
    var = broadcast_t(1.0 - schedule.alpha_bars, t, x_t.ndim)
    target = -(x_t - a * x0) / var
    return _per_example_mean((score_pred - target) ** 2)


def implicit_score_matching_loss(score_fn, x, h: float = 1e-4) -> np.ndarray:
    """L11: Hyvärinen's implicit score matching ½‖s(x)‖² + tr ∇_x s(x) per example; x (B, d) → (B,).

    Unlike the other losses this is the SUM over the d coordinates (the trace is a sum), so that
    E[ISM(θ)] = ½E‖s_θ − ∇ log p‖² − ½E‖∇ log p‖². The divergence is by central differences,
    ∂s_i/∂x_i ≈ (s_i(x + h e_i) − s_i(x − h e_i))/(2h), one pair of calls of score_fn((B, d)) → (B, d)
    per coordinate. h > 0.
    """
    if not callable(score_fn):
        raise TypeError(f"score_fn must be callable as score_fn(x) -> (B, d), got {type(score_fn).__name__}")
    x = as_float_array(x, "x")
    if x.ndim != 2 or x.shape[0] < 1 or x.shape[1] < 1:
        raise ValueError(f"x must have shape (B, d), got {x.shape}")
    h = check_real(h, "h", 0.0, low_open=True)

    def call(z):
        s = as_float_array(score_fn(z), "score_fn output")
        if s.shape != x.shape:
            raise ValueError(f"score_fn output must have the shape of x {x.shape}, got {s.shape}")
        return s

    s0 = call(x)
    div = np.zeros(x.shape[0])
    for i in range(x.shape[1]):
        step = np.zeros_like(x)
        step[:, i] = h
        div += (call(x + step)[:, i] - call(x - step)[:, i]) / (2.0 * h)
    return 0.5 * np.sum(s0**2, axis=1) + div
