"""Independent derivations the tests compare the reference against: written here from the formulas, not
from the reference's code, so they do not share its mistakes."""

from __future__ import annotations

import numpy as np


def alpha_bar_indep(betas) -> np.ndarray:
    """ᾱ_0..ᾱ_T from β_1..β_T as exp of a running sum of log(1 − β) (not a running product)."""
    b = np.asarray(betas, dtype=np.float64)
    return np.exp(np.concatenate([[0.0], np.cumsum(np.log1p(-b))]))


def log_normal(x, mean, var):
    """log N(x; mean, var), elementwise."""
    return -0.5 * np.log(2 * np.pi * var) - 0.5 * (x - mean) ** 2 / var
