"""Sample-quality statistics (docs/formulas.md: Q1, Q2): the Fréchet distance between two Gaussians, and
between the Gaussians fitted to two sets of feature vectors, the statistic of FID (Heusel et al. 2017) in
whatever feature space the caller chooses (``ldmkit.engine.quality`` uses a small digit classifier's
penultimate layer). NumPy only, float64.

The matrix square root is taken through symmetric eigendecompositions only (``numpy.linalg.eigh``), never a
general ``sqrtm`` (scipy is not a dependency): Σ₁^{1/2} from the eigendecomposition of Σ₁, then the
eigenvalues of the symmetric positive semi-definite M = Σ₁^{1/2} Σ₂ Σ₁^{1/2}, whose square roots sum to
tr(M^{1/2}). Eigenvalues that rounding pushes below zero (a rank-deficient covariance: fewer vectors than
dimensions, or a dead feature) are taken as zero.
"""

from __future__ import annotations

import numpy as np

from ._checks import as_float_array


def _psd_sqrt(a: np.ndarray) -> np.ndarray:
    """The symmetric square root V diag(√max(w, 0)) Vᵀ of a symmetric PSD matrix a = V diag(w) Vᵀ (Q1)."""
    w, v = np.linalg.eigh(a)
    return (v * np.sqrt(np.clip(w, 0.0, None))) @ v.T


def _check_gaussian(mean, cov, name: str) -> tuple[np.ndarray, np.ndarray]:
    """(mean (d,), cov (d, d)) as float64 arrays; cov symmetric and positive semi-definite up to rounding."""
    m = as_float_array(mean, f"mean{name}")
    c = as_float_array(cov, f"cov{name}")
    if m.ndim != 1 or m.size == 0:
        raise ValueError(f"mean{name} must be a non-empty 1-D array (d,), got shape {m.shape}")
    if c.shape != (m.size, m.size):
        raise ValueError(f"cov{name} must have shape ({m.size}, {m.size}) to match mean{name}, got {c.shape}")
    scale = float(np.abs(c).max()) or 1.0
    if not np.allclose(c, c.T, rtol=0.0, atol=1e-9 * scale):
        raise ValueError(f"cov{name} must be symmetric")
    if np.linalg.eigvalsh((c + c.T) / 2)[0] < -1e-9 * scale:
        raise ValueError(f"cov{name} must be positive semi-definite (it has a negative eigenvalue)")
    return m, (c + c.T) / 2


def frechet_distance(mean1, cov1, mean2, cov2) -> float:
    """Q1: Fréchet distance between N(μ₁, Σ₁) and N(μ₂, Σ₂),
    FD = ‖μ₁ − μ₂‖² + tr(Σ₁ + Σ₂ − 2 (Σ₁Σ₂)^{1/2}), with tr((Σ₁Σ₂)^{1/2}) = tr((Σ₁^{1/2} Σ₂ Σ₁^{1/2})^{1/2})
    (the same eigenvalues), computed through symmetric eigendecompositions (module docstring).

    It is the squared 2-Wasserstein distance W2² between the two Gaussians (Dowson & Landau 1982; Givens &
    Shortt 1984); for diagonal (or commuting) covariances it is Σ_i (μ₁ᵢ − μ₂ᵢ)² + (√σ₁ᵢ² − √σ₂ᵢ²)².
    Means (d,), covariances (d, d) symmetric PSD. Returns a float ≥ 0 (a rounding error below 0 gives 0).
    """
    m1, c1 = _check_gaussian(mean1, cov1, "1")
    m2, c2 = _check_gaussian(mean2, cov2, "2")
    if m1.size != m2.size:
        raise ValueError(f"mean1 and mean2 must have the same dimension, got {m1.size} and {m2.size}")
    s1 = _psd_sqrt(c1)
    m = s1 @ c2 @ s1
    cross = float(np.sqrt(np.clip(np.linalg.eigvalsh((m + m.T) / 2), 0.0, None)).sum())
    fd = float(np.sum((m1 - m2) ** 2) + np.trace(c1) + np.trace(c2) - 2.0 * cross)
    return max(fd, 0.0)


def gaussian_fit(features) -> tuple[np.ndarray, np.ndarray]:
    """Q2: the Gaussian fitted to N feature vectors x_i (rows of ``features`` (N, d), N ≥ 2):
    μ̂ = (1/N) Σ_i x_i, Σ̂ = 1/(N − 1) Σ_i (x_i − μ̂)(x_i − μ̂)ᵀ (the unbiased covariance, as FID's code
    takes with ``numpy.cov``). Returns (μ̂ (d,), Σ̂ (d, d))."""
    x = as_float_array(features, "features")
    if x.ndim != 2 or x.shape[0] < 2 or x.shape[1] < 1:
        raise ValueError(f"features must be a 2-D array (N, d) with N >= 2 and d >= 1, got shape {x.shape}")
    mean = x.mean(axis=0)
    centred = x - mean
    return mean, centred.T @ centred / (x.shape[0] - 1)


def frechet_distance_of_samples(features1, features2) -> float:
    """Q2: FD between two sets of feature vectors, (N₁, d) and (N₂, d): Q1 between their fitted Gaussians,
    FD(X, Y) = ‖μ̂_X − μ̂_Y‖² + tr(Σ̂_X + Σ̂_Y − 2 (Σ̂_X Σ̂_Y)^{1/2}) (Heusel et al. 2017's FID in this feature
    space). It is biased upwards by O(d/N) (E‖μ̂_X − μ̂_Y‖² alone adds tr Σ_X/N₁ + tr Σ_Y/N₂), so compare
    values only at equal set sizes, or against a floor measured at the same sizes."""
    m1, c1 = gaussian_fit(features1)
    m2, c2 = gaussian_fit(features2)
    if m1.size != m2.size:
        raise ValueError(f"features1 and features2 must have the same dimension d, got {m1.size} and {m2.size}")
    return frechet_distance(m1, c1, m2, c2)
