"""Argument checks shared by the reference modules.

Every public reference function validates its inputs with these helpers, so a bad argument raises
``ValueError`` or ``TypeError`` with a message that names the argument and its valid range.
"""

from __future__ import annotations

import numbers

import numpy as np

PREDICTIONS = ("eps", "x0", "v")
"""What a model predicts (P3): the noise ε, the clean sample x_0, or v = √ᾱ_t ε − √(1−ᾱ_t) x_0."""

PREDICTION_ALIASES = {"eps": "eps", "epsilon": "eps", "x0": "x0", "sample": "x0", "v": "v", "v_prediction": "v"}
"""Prediction-type names and their diffusers aliases, mapped to ldmkit's canonical name."""

VARIANCES = {"beta_tilde": "beta_tilde", "fixed_small": "beta_tilde", "beta": "beta", "fixed_large": "beta"}
"""Reverse-variance names (A1, P9) and their diffusers aliases: β̃_t ("fixed_small") or β_t ("fixed_large")."""


def as_float_array(x, name: str) -> np.ndarray:
    """``x`` as a float64 array; TypeError if it is not numeric, ValueError if it holds NaN or Inf."""
    try:
        arr = np.asarray(x, dtype=np.float64)
    except (TypeError, ValueError) as exc:
        raise TypeError(f"{name} must be a numeric array, got {type(x).__name__}") from exc
    if not np.all(np.isfinite(arr)):
        raise ValueError(f"{name} must be finite (it holds NaN or Inf)")
    return arr


def check_int(value, name: str, low: int, high: int | None = None) -> int:
    """``value`` as an int in [low, high] (high None: unbounded)."""
    if isinstance(value, bool) or not isinstance(value, (numbers.Integral, np.integer)):
        raise TypeError(f"{name} must be an integer, got {type(value).__name__}")
    value = int(value)
    if value < low or (high is not None and value > high):
        rng = f"in {low}..{high}" if high is not None else f">= {low}"
        raise ValueError(f"{name} must be {rng}, got {value}")
    return value


def check_real(value, name: str, low: float | None = None, high: float | None = None,
               low_open: bool = False, high_open: bool = False) -> float:
    """``value`` as a finite float inside the given (open or closed) bounds."""
    if isinstance(value, bool) or not isinstance(value, (numbers.Real, np.floating, np.integer)):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__}")
    value = float(value)
    lo_bad = low is not None and (value <= low if low_open else value < low)
    hi_bad = high is not None and (value >= high if high_open else value > high)
    if not np.isfinite(value) or lo_bad or hi_bad:
        lo = "-inf" if low is None else f"{low:g}"
        hi = "inf" if high is None else f"{high:g}"
        rng = f"{'(' if low_open or low is None else '['}{lo}, {hi}{')' if high_open or high is None else ']'}"
        raise ValueError(f"{name} must be in {rng}, got {value!r}")
    return value


def check_timesteps(t, name: str, T: int, low: int = 1) -> np.ndarray:
    """Math timesteps ``t`` (int or int array) as an int64 array, each in low..T."""
    arr = np.asarray(t)
    if arr.dtype == bool or not np.issubdtype(arr.dtype, np.integer):
        if np.issubdtype(arr.dtype, np.floating) and np.all(arr == np.round(arr)):
            arr = arr.astype(np.int64)
        else:
            raise TypeError(f"{name} must hold integer timesteps, got dtype {arr.dtype}")
    arr = arr.astype(np.int64)
    if arr.size and (arr.min() < low or arr.max() > T):
        bad = arr[(arr < low) | (arr > T)].flat[0]
        raise ValueError(f"{name} must be in {low}..{T} (math t), got {bad}")
    return arr


def prediction_name(prediction: str) -> str:
    """Canonical prediction name for ``prediction`` ('eps', 'x0' or 'v', or a diffusers alias)."""
    if not isinstance(prediction, str) or prediction not in PREDICTION_ALIASES:
        raise ValueError(f"prediction must be one of {sorted(PREDICTION_ALIASES)}, got {prediction!r}")
    return PREDICTION_ALIASES[prediction]


def variance_name(variance: str) -> str:
    """Canonical reverse-variance name ('beta_tilde' or 'beta', or a diffusers alias)."""
    if not isinstance(variance, str) or variance not in VARIANCES:
        raise ValueError(f"variance must be one of {sorted(VARIANCES)}, got {variance!r}")
    return VARIANCES[variance]


def broadcast_t(values: np.ndarray, t: np.ndarray, ndim: int) -> np.ndarray:
    """Table ``values`` gathered at per-example ``t`` (shape () or (B,)), shaped to broadcast over an
    array of ``ndim`` dimensions whose leading axis is the batch."""
    v = values[t]
    if v.ndim == 0 or ndim == 0:
        return v
    return v.reshape(v.shape + (1,) * (ndim - v.ndim))


def gather(values: np.ndarray, t, ndim: int):
    """``values[t]``: a Python float for an integer t (what the sampling loops pass: a float multiplies NumPy
    arrays and torch tensors alike, in their own dtype), else as ``broadcast_t`` for per-example t."""
    if isinstance(t, (int, np.integer)):
        return float(values[t])
    return broadcast_t(values, t, ndim)


def check_same_shape(a: np.ndarray, b: np.ndarray, name_a: str, name_b: str) -> None:
    """ValueError unless ``a`` and ``b`` have the same shape."""
    if a.shape != b.shape:
        raise ValueError(f"{name_a} and {name_b} must have the same shape, got {a.shape} and {b.shape}")


def check_t_batch(t: np.ndarray, x: np.ndarray, name: str = "t") -> None:
    """ValueError unless per-example ``t`` is a scalar or has one entry per batch element of ``x``."""
    if t.ndim == 0:
        return
    if t.ndim != 1 or x.ndim == 0 or t.shape[0] != x.shape[0]:
        raise ValueError(f"{name} must be a scalar or have shape ({x.shape[0] if x.ndim else 1},) "
                         f"to match the batch axis of x, got shape {t.shape}")


def draw_noise(noise, shape: tuple, name: str = "noise") -> np.ndarray:
    """Noise of ``shape``: taken from an array (checked) or drawn from a ``numpy.random.Generator``."""
    if isinstance(noise, np.random.Generator):
        return noise.standard_normal(shape)
    if noise is None:
        raise TypeError(f"{name} must be an array of shape {shape} or a numpy.random.Generator, got None")
    arr = as_float_array(noise, name)
    if arr.shape != tuple(shape):
        raise ValueError(f"{name} must have shape {tuple(shape)}, got {arr.shape}")
    return arr
