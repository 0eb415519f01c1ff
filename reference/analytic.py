"""Analytic oracles (docs/formulas.md: X1–X3, P9): data distributions whose optimal denoisers, scores and noisy
marginals are known in closed form, for validating samplers, losses and the VLB.

The noisy variable is x_t = a·x_0 + σ·ε (VP: a = √ᾱ_t, σ = √(1−ᾱ_t); VE: a = 1, σ = σ_t; random walk:
a = 1, σ = √t). Points are arrays of shape (..., d) with the data dimension last; ``a`` and ``sigma`` are
scalars or broadcast against the leading axes (shape (B,) for per-example noise levels with x of (B, d)).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ._checks import as_float_array, broadcast_t, check_real, check_timesteps, prediction_name
from .schedules import Schedule, check_schedule


def _level(v, x, name):
    v = as_float_array(v, name)
    if v.ndim and v.shape[0] != x.shape[0]:
        raise ValueError(f"{name} must be a scalar or have one entry per row of x ({x.shape[0]}), got {v.shape}")
    return v.reshape(v.shape + (1,) * (x.ndim - v.ndim)) if v.ndim else v


@dataclass(frozen=True)
class GaussianData:
    """X1: data x_0 ~ N(m, diag(s²)) in d dimensions (``mean`` (d,), ``var`` scalar or (d,))."""

    mean: np.ndarray
    var: np.ndarray

    def __post_init__(self):
        m = as_float_array(self.mean, "mean").reshape(-1)
        v = np.broadcast_to(as_float_array(self.var, "var"), m.shape).astype(np.float64)
        if np.any(v < 0):
            raise ValueError("var must be >= 0")
        object.__setattr__(self, "mean", m)
        object.__setattr__(self, "var", v)

    @property
    def dim(self) -> int:
        return self.mean.shape[0]

    def _x(self, x):
        x = as_float_array(x, "x")
        if x.ndim < 1 or x.shape[-1] != self.dim:
            raise ValueError(f"x must have shape (..., {self.dim}), got {x.shape}")
        return x

    def marginal(self, a, sigma):
        """X3: q(x_t) = N(a m, a² s² + σ²); returns (mean, var) broadcast to (..., d)."""
        return a * self.mean, a**2 * self.var + sigma**2

    def x0_mean(self, x, a, sigma):
        """X1: E[x_0 given x_t] = m + a s²/(a² s² + σ²)·(x_t − a m)."""
        x = self._x(x)
        a, sigma = _level(a, x, "a"), _level(sigma, x, "sigma")
        return self.mean + a * self.var / (a**2 * self.var + sigma**2) * (x - a * self.mean)

    def score(self, x, a, sigma):
        """X1: ∇ log q(x_t) = −(x_t − a m)/(a² s² + σ²)."""
        x = self._x(x)
        a, sigma = _level(a, x, "a"), _level(sigma, x, "sigma")
        return -(x - a * self.mean) / (a**2 * self.var + sigma**2)

    def eps(self, x, a, sigma):
        """X1: the optimal ε* = (x_t − a·E[x_0 given x_t])/σ = −σ·score."""
        x = self._x(x)
        return -_level(sigma, x, "sigma") * self.score(x, a, sigma)

    def log_prob(self, x, a=1.0, sigma=0.0):
        """X3: log q(x_t), summed over the data dimension; shape x.shape[:-1]."""
        x = self._x(x)
        a, sigma = _level(a, x, "a"), _level(sigma, x, "sigma")
        m, v = self.marginal(a, sigma)
        return np.sum(-0.5 * (np.log(2 * np.pi * v) + (x - m) ** 2 / v), axis=-1)

    def sample(self, n: int, rng: np.random.Generator):
        """n draws of x_0; shape (n, d)."""
        return self.mean + np.sqrt(self.var) * rng.standard_normal((n, self.dim))


@dataclass(frozen=True)
class GaussianMixtureData:
    """X2: data x_0 ~ Σ_k w_k N(m_k, s_k² I) (``weights`` (K,), ``means`` (K, d), ``vars`` (K,) isotropic)."""

    weights: np.ndarray
    means: np.ndarray
    vars: np.ndarray

    def __post_init__(self):
        w = as_float_array(self.weights, "weights").reshape(-1)
        m = as_float_array(self.means, "means")
        v = as_float_array(self.vars, "vars").reshape(-1)
        if m.ndim != 2 or m.shape[0] != w.shape[0] or v.shape != w.shape:
            raise ValueError(f"weights (K,), means (K, d) and vars (K,) must agree, "
                             f"got {w.shape}, {m.shape}, {v.shape}")
        if np.any(w < 0) or not np.isclose(w.sum(), 1.0) or np.any(v < 0):
            raise ValueError("weights must be non-negative and sum to 1; vars must be >= 0")
        object.__setattr__(self, "weights", w)
        object.__setattr__(self, "means", m)
        object.__setattr__(self, "vars", v)

    @property
    def dim(self) -> int:
        return self.means.shape[1]

    def _x(self, x):
        x = as_float_array(x, "x")
        if x.ndim < 1 or x.shape[-1] != self.dim:
            raise ValueError(f"x must have shape (..., {self.dim}), got {x.shape}")
        return x

    def _component_terms(self, x, a, sigma):
        """Per-component noisy variance (…, K, 1) and log w_k N(x_t; a m_k, v_k I) (…, K)."""
        x = self._x(x)
        a, sigma = _level(a, x, "a"), _level(sigma, x, "sigma")
        # scalar levels broadcast as they are; per-example levels (B, 1) gain the component axis
        a_k = a[..., None, :] if a.ndim else a
        s_k = sigma[..., None, :] if sigma.ndim else sigma
        v = a_k**2 * self.vars[:, None] + s_k**2
        diff = x[..., None, :] - a_k * self.means
        logp = np.log(self.weights) - 0.5 * np.sum(np.log(2 * np.pi * v) + diff**2 / v, axis=-1)
        return x, a_k, s_k, v, diff, logp

    def responsibilities(self, x, a, sigma):
        """X2: posterior component probabilities p(k given x_t) ∝ w_k N(x_t; a m_k, (a² s_k² + σ²) I); (…, K)."""
        *_, logp = self._component_terms(x, a, sigma)
        logp = logp - logp.max(axis=-1, keepdims=True)
        r = np.exp(logp)
        return r / r.sum(axis=-1, keepdims=True)

    def score(self, x, a, sigma):
        """X2: ∇ log q(x_t) = Σ_k r_k·(−(x_t − a m_k)/(a² s_k² + σ²))."""
        x, _, _, v, diff, logp = self._component_terms(x, a, sigma)
        r = np.exp(logp - logp.max(axis=-1, keepdims=True))
        r /= r.sum(axis=-1, keepdims=True)
        return np.sum(r[..., None] * (-diff / v), axis=-2)

    def x0_mean(self, x, a, sigma):
        """X2: E[x_0 given x_t] = Σ_k r_k·(m_k + a s_k²/(a² s_k² + σ²)·(x_t − a m_k)), which equals Tweedie's
        (x_t + σ²·score)/a but stays finite at a = 0 (pure noise: ᾱ_T = 0), where it is Σ_k w_k m_k."""
        x, a_k, _, v, diff, logp = self._component_terms(x, a, sigma)
        r = np.exp(logp - logp.max(axis=-1, keepdims=True))
        r /= r.sum(axis=-1, keepdims=True)
        return np.sum(r[..., None] * (self.means + a_k * self.vars[:, None] / v * diff), axis=-2)

    def eps(self, x, a, sigma):
        """X2: the optimal ε* = −σ·score."""
        x = self._x(x)
        return -_level(sigma, x, "sigma") * self.score(x, a, sigma)

    def log_prob(self, x, a=1.0, sigma=0.0):
        """X3: log q(x_t) = log Σ_k w_k N(x_t; a m_k, (a² s_k² + σ²) I); shape x.shape[:-1]."""
        *_, logp = self._component_terms(x, a, sigma)
        mx = logp.max(axis=-1)
        return mx + np.log(np.sum(np.exp(logp - mx[..., None]), axis=-1))

    def sample(self, n: int, rng: np.random.Generator):
        """n draws of x_0 and their component labels; shapes (n, d) and (n,)."""
        k = rng.choice(self.weights.shape[0], size=n, p=self.weights)
        return self.means[k] + np.sqrt(self.vars[k])[:, None] * rng.standard_normal((n, self.dim)), k

    def component(self, k: int) -> GaussianData:
        """Component k alone, as Gaussian data (the class-conditional distribution for label k)."""
        return GaussianData(self.means[k], self.vars[k])


def vp_model(data, schedule: Schedule, prediction: str = "eps"):
    """The exact denoiser of ``data`` (GaussianData or GaussianMixtureData) as a discrete-time model
    ``model(x_t, t, y=None) -> prediction`` on ``schedule`` (x_t of shape (B, d), t scalar or (B,)).

    Outputs ε* (X1/X2), x̂_0 = E[x_0 given x_t], or v = √ᾱ ε − √(1−ᾱ) x̂_0. With a mixture and a label
    array ``y``, row i uses component y[i] (a class-conditional model); y = -1 selects the mixture.
    """
    kind = prediction_name(prediction)
    check_schedule(schedule)

    def model(x_t, t, y=None):
        x_t = as_float_array(x_t, "x_t")
        t = check_timesteps(t, "t", schedule.T, low=1)
        a = broadcast_t(schedule.sqrt_alpha_bars, t, 1)
        s = broadcast_t(schedule.sqrt_one_minus_alpha_bars, t, 1)
        if y is None or not isinstance(data, GaussianMixtureData):
            x0 = data.x0_mean(x_t, a, s)
        else:
            y = np.broadcast_to(np.asarray(y), (x_t.shape[0],))
            a_b, s_b = np.broadcast_to(a, y.shape), np.broadcast_to(s, y.shape)
            x0 = np.empty_like(x_t)
            for label in np.unique(y):
                rows = y == label
                src = data if label < 0 else data.component(int(label))
                x0[rows] = src.x0_mean(x_t[rows], a_b[rows], s_b[rows])
        a2, s2 = (a[..., None], s[..., None]) if np.ndim(a) else (a, s)
        if kind == "x0":
            return x0
        eps = (x_t - a2 * x0) / s2
        return eps if kind == "eps" else a2 * eps - s2 * x0

    return model


def reverse_variance(t, schedule: Schedule, data_var=1.0):
    """P9: the exact variance of q(x_{t−1} given x_t) when the data are N(m, s²) (per dimension):
    with v = ᾱ_{t−1}s² + 1 − ᾱ_{t−1}, Var = v β_t/(α_t v + β_t). At s² = 0 (one-point data) it is β̃_t, at
    s² = 1 (standard normal data) it is β_t: Su's two optimal reverse variances. Shape of t."""
    check_schedule(schedule)
    t = check_timesteps(t, "t", schedule.T, low=1)
    s2 = check_real(data_var, "data_var", 0.0)
    v = schedule.alpha_bars_prev[t] * s2 + 1.0 - schedule.alpha_bars_prev[t]
    return v * schedule.betas[t] / (schedule.alphas[t] * v + schedule.betas[t])
