"""The engine's diffusion math: the training side (docs/formulas.md: F2, L4, L5, R1) in torch, and ``torch_model``, the
bridge that lets the reference's samplers run the engine's U-Net.

Sampling has no code here: ``ldmkit.reference.samplers`` (every loop, the denoiser's x̂_0/ε̂ conversion,
classifier-free guidance) runs on torch tensors directly, on the sample's device and in its dtype, with its
coefficients as Python floats read from the float64 tables; ``torch_model`` adapts a torch module to the
reference's model convention. tests/test_engine_diffusion.py holds both to the golden files.

Training: schedules are the reference's ``Schedule`` (float64 NumPy tables, math-indexed, length T+1). Here
the tables live as float64 tensors on the sample's device; every coefficient is gathered in float64 and cast
to the sample's dtype only when it multiplies a sample (docs/anchors.md: float32 tables lose ≈3e-4 relative in 1 − ᾱ
near t = 1). Per-example t is an int64 tensor (B,) or a Python int; noise is a tensor of the sample's shape
or a ``torch.Generator``.
"""

from __future__ import annotations

import numpy as np
import torch

from ldmkit.reference._checks import prediction_name
from ldmkit.reference.losses import min_snr_weight
from ldmkit.reference.schedules import Schedule

_TABLES = ("sqrt_alpha_bars", "sqrt_one_minus_alpha_bars")
_cache: dict = {}


def torch_model(module):
    """A torch module ``module(x, t, y)`` as a model of the reference's samplers: they call it with x a tensor
    and t, y int64 NumPy arrays (B,) (y may be None), which go to x's device here. Returns the module's output."""

    def model(x, t, y=None):
        t = torch.as_tensor(np.asarray(t, dtype=np.int64), device=x.device)
        return module(x, t, None if y is None else torch.as_tensor(np.asarray(y, dtype=np.int64), device=x.device))

    return model


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


def loss_weights(schedule: Schedule, prediction: str, gamma: float | None, device) -> torch.Tensor | None:
    """R1: the Min-SNR-γ weight of each math t for the loss in the prediction's own space
    (``reference.losses.min_snr_weight``), a float32 tensor (T+1,) on ``device`` indexed by t (entry 0
    unused, 0); None for uniform weighting (``gamma`` None), which training then leaves out."""
    if gamma is None:
        return None
    t = np.arange(1, schedule.T + 1)
    table = np.concatenate([[0.0], min_snr_weight(t, schedule, gamma, prediction)])
    return torch.from_numpy(table).to(device=device, dtype=torch.float32)
