"""Noise schedules (docs/formulas.md: S1–S12, plus karras_sigmas, ancestral_sigmas, zero-terminal SNR, Su mapping).

Every expected value is computed here independently of ``reference/schedules.py`` (products as sums of
log1p, closed forms written out again, numerical quadrature) or taken from docs/anchors.md (published
numbers from diffusers / improved-diffusion / EDM; diffusers' 0-based k is our math t = k + 1).
"""

from __future__ import annotations

import math
from fractions import Fraction

import numpy as np
import pytest
from independent import alpha_bar_indep

from ldmkit.reference import forward, posterior, schedules
from ldmkit.reference.schedules import Schedule


def linear_indep(T, b1, bT):
    """β_t = b1 + (t−1)(bT − b1)/(T−1), t = 1..T, written term by term."""
    return np.array([b1 + (t - 1) * (bT - b1) / (T - 1) for t in range(1, T + 1)])


# ------------------------------------------------------------------------------------------------ S1
def test_S1_linear_betas_endpoints_and_alpha_bar_T():
    """S1: Ho's linear β_1 = 1e-4 → β_T = 0.02 at T = 1000 gives ᾱ_T ≈ 4.04e-5."""
    b = schedules.linear_betas(1000)
    assert b.shape == (1000,)
    np.testing.assert_allclose(b, linear_indep(1000, 1e-4, 0.02), rtol=1e-13, atol=0)
    ab = alpha_bar_indep(linear_indep(1000, 1e-4, 0.02))
    # published value (Ho et al. / every DDPM re-implementation): ᾱ_T ≈ 4.04e-5
    assert ab[-1] == pytest.approx(4.04e-5, rel=2e-3)
    sched = Schedule.named("linear", 1000)
    np.testing.assert_allclose(sched.alpha_bars, ab, rtol=1e-11)


def test_S1_P1_posterior_variance_anchors():
    """S1/P1: docs/anchors.md β̃ at diffusers k = 0, 487, 999 (math t = 1, 488, 1000): 0, 0.00979, 0.02."""
    sched = Schedule.named("linear", 1000)
    ab = alpha_bar_indep(linear_indep(1000, 1e-4, 0.02))
    b = np.concatenate([[0.0], linear_indep(1000, 1e-4, 0.02)])
    t = np.array([1, 488, 1000])
    tilde = (1 - ab[t - 1]) / (1 - ab[t]) * b[t]
    assert tilde[0] == 0.0
    assert tilde[1] == pytest.approx(0.00979, abs=5e-6)
    assert tilde[2] == pytest.approx(0.02, abs=5e-6)
    np.testing.assert_allclose(sched.posterior_variance[t], tilde, rtol=1e-10, atol=1e-300)


# ------------------------------------------------------------------------------------------------ S2
def test_S2_linear_ldm_endpoints():
    """S2: the LDM report's second linear setting, β from 0.001 to 0.02."""
    sched = Schedule.named("linear_ldm", 1000)
    assert sched.T == 1000
    assert sched.betas[0] == 0.0
    assert sched.betas[1] == pytest.approx(0.001, rel=1e-14)
    assert sched.betas[1000] == pytest.approx(0.02, rel=1e-14)
    np.testing.assert_allclose(sched.betas[1:], linear_indep(1000, 0.001, 0.02), rtol=1e-13)
    np.testing.assert_allclose(schedules.linear_betas(7, 0.001, 0.02), linear_indep(7, 0.001, 0.02), rtol=1e-14)


# ------------------------------------------------------------------------------------------------ S3
def _cosine_f(t, T, s=0.008):
    return math.cos(((t / T) + s) / (1 + s) * math.pi / 2) ** 2


def test_S3_cosine_alpha_bar_is_f_ratio_where_unclipped():
    """S3: ᾱ_t = f(t)/f(0) exactly (to rounding) wherever no β was clipped at 0.999."""
    for T in (50, 1000):
        sched = Schedule.named("cosine", T)
        f0 = _cosine_f(0, T)
        expected = np.array([_cosine_f(t, T) / f0 for t in range(T + 1)])
        clipped = np.flatnonzero(sched.betas >= 0.999)
        # only the final step is clipped for the standard setting
        assert list(clipped) == [T]
        np.testing.assert_allclose(sched.alpha_bars[:T], expected[:T], rtol=1e-11)
        # the clipped step: ᾱ_T = ᾱ_{T−1}·(1 − 0.999)
        assert sched.alpha_bars[T] == pytest.approx(expected[T - 1] * 0.001, rel=1e-11)


def test_S3_cosine_anchors():
    """S3: docs/anchors.md cosine numbers at T = 1000: β(k=0) 4.1284e-5, β(k=998) 0.749999, β(k=999) = 0.999,
    ᾱ_T ≈ 2.43e-9."""
    b = schedules.cosine_betas(1000)
    assert b[0] == pytest.approx(4.1284e-5, rel=2e-5)
    assert b[998] == pytest.approx(0.749999, abs=1e-6)
    assert b[999] == 0.999
    assert alpha_bar_indep(b)[-1] == pytest.approx(2.43e-9, rel=5e-3)


# ------------------------------------------------------------------------------------------------ S4
@pytest.mark.parametrize("T", [1, 10, 100, 1000, 4000])
def test_S4_su_schedule_and_bound(T):
    """S4: Su's β_t = 0.02·t/T (his α_t = √(1 − 0.02t/T)), and his bound log ᾱ_T(Su) < −0.005(T+1)."""
    b = schedules.su_betas(T)
    np.testing.assert_allclose(b, [0.02 * t / T for t in range(1, T + 1)], rtol=1e-14)
    # Su's ᾱ_T is the product of his α_t = √(1 − 0.02t/T): log ᾱ_T(Su) = ½ Σ log(1 − 0.02t/T)
    log_ab_su = 0.5 * sum(math.log1p(-0.02 * t / T) for t in range(1, T + 1))
    bound = -0.005 * (T + 1)
    assert log_ab_su < bound
    assert schedules.su_log_alpha_bar_bound(T) == pytest.approx(bound, rel=1e-15)
    sched = Schedule.named("su", T)
    _, _, ab_su, _ = schedules.su_from_ddpm(sched)
    assert math.log(ab_su[-1]) == pytest.approx(log_ab_su, rel=1e-10)
    assert math.log(ab_su[-1]) < schedules.su_log_alpha_bar_bound(T)


def test_S4_su_notation_mapping_and_round_trip():
    """S4 (Su mapping): Su's α, β are square roots of DDPM's (α² + β² = 1), his ᾱ_t = ∏ his α_s and
    ᾱ² + β̄² = 1; ddpm_betas_from_su inverts the map."""
    for name in ("linear", "cosine", "su"):
        sched = Schedule.named(name, 200)
        a, b, ab, bb = schedules.su_from_ddpm(sched)
        np.testing.assert_allclose(a**2 + b**2, 1.0, rtol=1e-14)
        np.testing.assert_allclose(ab**2 + bb**2, 1.0, rtol=1e-14)
        np.testing.assert_allclose(b[1:], np.sqrt(sched.betas[1:]), rtol=1e-14)
        prod = np.exp(np.concatenate([[0.0], np.cumsum(np.log(a[1:]))]))
        np.testing.assert_allclose(ab, prod, rtol=1e-11)
        np.testing.assert_allclose(schedules.ddpm_betas_from_su(a[1:]), sched.betas[1:], rtol=1e-12, atol=1e-16)


# ------------------------------------------------------------------------------------------------ S5
def test_S5_scaled_linear_anchors():
    """S5: scaled-linear 0.00085 → 0.012, T = 1000: ᾱ(k=999) = 0.0046601; σ = √((1−ᾱ)/ᾱ) runs 0.029167 → 14.61464."""
    T = 1000
    r1, rT = math.sqrt(0.00085), math.sqrt(0.012)
    b_indep = np.array([(r1 + (t - 1) * (rT - r1) / (T - 1)) ** 2 for t in range(1, T + 1)])
    np.testing.assert_allclose(schedules.scaled_linear_betas(T), b_indep, rtol=1e-13)
    sched = Schedule.named("scaled_linear", T)
    ab = alpha_bar_indep(b_indep)
    assert ab[-1] == pytest.approx(0.0046601, abs=5e-8)
    sigma = np.sqrt((1 - sched.alpha_bars[1:]) / sched.alpha_bars[1:])
    assert sigma[0] == pytest.approx(0.029167, abs=5e-7)
    assert sigma[-1] == pytest.approx(14.61464, abs=5e-6)
    np.testing.assert_allclose(sched.sqrt_recipm1_alpha_bars[1:], sigma, rtol=1e-12)
    assert np.all(np.diff(sigma) > 0)


# ------------------------------------------------------------------------------------------------ S6
@pytest.mark.parametrize("name", ["linear", "linear_ldm", "cosine", "scaled_linear", "su"])
def test_S6_derived_tables(name):
    """S6/P1: every derived table matches its definition computed from independent ᾱ."""
    T = 120
    sched = Schedule.named(name, T)
    b = sched.betas
    assert b[0] == 0.0 and sched.alpha_bars[0] == 1.0
    ab = alpha_bar_indep(b[1:])
    abp = np.concatenate([[1.0], ab[:-1]])
    np.testing.assert_allclose(sched.alphas, 1.0 - b, rtol=1e-15)
    np.testing.assert_allclose(sched.alpha_bars, ab, rtol=1e-12)
    np.testing.assert_allclose(sched.alpha_bars_prev, abp, rtol=1e-12)
    np.testing.assert_allclose(sched.sqrt_alpha_bars, np.sqrt(ab), rtol=1e-12)
    np.testing.assert_allclose(sched.sqrt_one_minus_alpha_bars, np.sqrt(1 - ab), rtol=1e-10)
    np.testing.assert_allclose(sched.sqrt_recip_alpha_bars, 1 / np.sqrt(ab), rtol=1e-12)
    np.testing.assert_allclose(sched.sqrt_recipm1_alpha_bars, np.sqrt(1 / ab - 1), rtol=1e-10)
    t = np.arange(1, T + 1)
    tilde = (1 - abp[t]) / (1 - ab[t]) * b[t]
    np.testing.assert_allclose(sched.posterior_variance[t], tilde, rtol=1e-10)
    np.testing.assert_allclose(sched.posterior_mean_coef1[t], np.sqrt(abp[t]) * b[t] / (1 - ab[t]), rtol=1e-10)
    np.testing.assert_allclose(sched.posterior_mean_coef2[t], np.sqrt(1 - b[t]) * (1 - abp[t]) / (1 - ab[t]),
                               rtol=1e-10, atol=1e-300)
    # improved-diffusion's clipping: log β̃_t for t ≥ 2, log β̃_2 in place of log 0 at t = 1
    np.testing.assert_allclose(sched.posterior_log_variance_clipped[2:], np.log(tilde[1:]), rtol=1e-10)
    assert sched.posterior_log_variance_clipped[1] == pytest.approx(math.log(tilde[1]), rel=1e-10)
    assert sched.posterior_variance[1] == 0.0
    # tables are read-only: the reference must not be mutated by a caller
    with pytest.raises(ValueError):
        sched.alpha_bars[3] = 0.5


# ------------------------------------------------------------------------------------------------ S7
@pytest.mark.parametrize("name", ["linear", "cosine", "scaled_linear"])
def test_S7_snr_identities(name):
    """S7: SNR(t) = ᾱ_t/(1 − ᾱ_t), log_snr = log SNR, SNR strictly decreasing in t, SNR(0) = ∞."""
    sched = Schedule.named(name, 1000)
    ab = alpha_bar_indep(sched.betas[1:])
    np.testing.assert_allclose(sched.snr[1:], ab[1:] / (1 - ab[1:]), rtol=1e-9)
    np.testing.assert_allclose(np.exp(sched.log_snr[1:]), sched.snr[1:], rtol=1e-12)
    np.testing.assert_allclose(sched.log_snr[1:], np.log(ab[1:]) - np.log1p(-ab[1:]), rtol=1e-9, atol=1e-9)
    assert np.all(np.diff(sched.snr[1:]) < 0)
    assert np.all(np.diff(sched.log_snr) < 0)
    assert sched.snr[0] == np.inf


# ------------------------------------------------------------------------------------------------ S8
def test_S8_respace_reproduces_alpha_bar_on_subsequence():
    """S8: ᾱ'_i = ᾱ_{τ_i} on a random subsequence (given in any order), β'_i = 1 − ᾱ_{τ_i}/ᾱ_{τ_{i−1}}."""
    rng = np.random.default_rng(0)
    for name in ("linear", "cosine"):
        sched = Schedule.named(name, 1000)
        tau = np.sort(rng.choice(np.arange(1, 1001), size=37, replace=False))
        shuffled = rng.permutation(tau)
        new = schedules.respace(sched, shuffled)
        ab = alpha_bar_indep(sched.betas[1:])
        assert new.T == 37
        np.testing.assert_allclose(new.alpha_bars[1:], ab[tau], rtol=1e-11)
        prev = np.concatenate([[1.0], ab[tau[:-1]]])
        np.testing.assert_allclose(new.betas[1:], 1 - ab[tau] / prev, rtol=1e-10)
        np.testing.assert_array_equal(new.timestep_map, np.concatenate([[0], tau]))


def test_S8_respace_ddim10_anchor():
    """S8: docs/anchors.md 'ddim10' (stride 100 from k = 0, i.e. math t = 1, 101, …, 901) on linear T = 1000:
    β' = [1e-4, 0.104769, 0.266767, …, 0.820736]."""
    sched = Schedule.named("linear", 1000)
    new = schedules.respace(sched, np.arange(1, 1001, 100))
    bp = new.betas[1:]
    assert bp.shape == (10,)
    assert bp[0] == pytest.approx(1e-4, rel=1e-12)
    assert bp[1] == pytest.approx(0.104769, abs=5e-7)
    assert bp[2] == pytest.approx(0.266767, abs=5e-7)
    assert bp[-1] == pytest.approx(0.820736, abs=5e-7)


def test_S8_respace_timestep_map_composes():
    """S8: respacing twice equals respacing once by the composed subsequence; timestep_map composes."""
    sched = Schedule.named("linear", 1000)
    tau1 = np.arange(1, 1001, 10)  # 100 steps
    inner = np.array([1, 5, 17, 50, 99, 100])  # indices into the respaced schedule (its math t)
    twice = schedules.respace(schedules.respace(sched, tau1), inner)
    once = schedules.respace(sched, tau1[inner - 1])
    np.testing.assert_array_equal(twice.timestep_map, np.concatenate([[0], tau1[inner - 1]]))
    np.testing.assert_array_equal(twice.timestep_map, once.timestep_map)
    np.testing.assert_allclose(twice.alpha_bars, once.alpha_bars, rtol=1e-11)
    # respacing with every timestep is the identity
    full = schedules.respace(sched, np.arange(1, 1001))
    np.testing.assert_allclose(full.betas, sched.betas, rtol=1e-10, atol=1e-16)


# ------------------------------------------------------------------------------------------------ S9
@pytest.mark.parametrize(
    ("n", "spacing", "k_expected"),
    [
        (10, "linspace", [999, 888, 777, 666, 555, 444, 333, 222, 111, 0]),
        (10, "leading", [900, 800, 700, 600, 500, 400, 300, 200, 100, 0]),
        (10, "trailing", [999, 899, 799, 699, 599, 499, 399, 299, 199, 99]),
        (3, "linspace", [999, 500, 0]),
        (3, "leading", [666, 333, 0]),
        (3, "trailing", [999, 666, 332]),
    ],
)
def test_S9_timestep_spacings_anchor(n, spacing, k_expected):
    """S9: docs/anchors.md spacings (diffusers k) for T = 1000; ldmkit returns math t = k + 1, descending."""
    t = schedules.timesteps(n, 1000, spacing)
    assert t.dtype.kind == "i"
    np.testing.assert_array_equal(t, np.array(k_expected) + 1)


def test_S9_leading_with_offset_anchor():
    """S9: leading spacing with offset 1, N = 5: k = [801, 601, 401, 201, 1] (math t = k + 1)."""
    np.testing.assert_array_equal(schedules.timesteps(5, 1000, "leading", offset=1), [802, 602, 402, 202, 2])


def test_S9_linspace_rounds_half_to_even():
    """S9: k = round(linspace(0, T−1, N)) rounds half to even: T = 6, N = 3 has k = [0, 2.5, 5] → [0, 2, 5]."""
    np.testing.assert_array_equal(schedules.timesteps(3, 6, "linspace"), [6, 3, 1])


# ------------------------------------------------------------------------------------------------ S10
def test_S10_vp_sde_marginal_against_quadrature():
    """S10: γ_t = exp(−½∫₀ᵗβ) and σ_t² = 1 − exp(−∫₀ᵗβ), with the integral done by the trapezoid rule."""
    bmin, bmax = 0.1, 20.0
    for t_end in (0.0, 0.013, 0.3, 0.77, 1.0):
        s = np.linspace(0.0, t_end, 20001)
        beta = bmin + s * (bmax - bmin)
        integral = np.sum((beta[1:] + beta[:-1]) / 2 * np.diff(s)) if t_end > 0 else 0.0
        gamma, sigma = schedules.vp_sde_marginal(t_end, bmin, bmax)
        assert gamma == pytest.approx(math.exp(-0.5 * integral), rel=1e-10)
        assert sigma**2 == pytest.approx(-math.expm1(-integral), rel=1e-9, abs=1e-300)
        assert gamma**2 + sigma**2 == pytest.approx(1.0, rel=1e-14)
    # the rate function: d/dt(−2 log γ_t) = β(t), by central differences
    t = np.array([0.1, 0.5, 0.9])
    h = 1e-6
    d = (-2 * np.log(schedules.vp_sde_marginal(t + h)[0]) + 2 * np.log(schedules.vp_sde_marginal(t - h)[0])) / (2 * h)
    np.testing.assert_allclose(d, 0.1 + t * 19.9, rtol=1e-7)
    np.testing.assert_allclose(schedules.vp_sde_beta(t), 0.1 + t * 19.9, rtol=1e-15)


def test_S10_discrete_schedule_converges_to_vp_sde():
    """S10: the discrete β_i = β(i/T)/T has ᾱ_i → γ²_{i/T}; the error falls as T grows (≈ 1/T).
    S1 is the same process with β_1 = β_min/T, β_T = β_max/T (β_min = 0.1, β_max = 20 at T = 1000)."""
    errors, errors_s1 = [], []
    for T in (100, 1000, 10000):
        i = np.arange(1, T + 1)
        b = (0.1 + (i / T) * 19.9) / T
        ab = alpha_bar_indep(b)[1:]
        gamma, _ = schedules.vp_sde_marginal(i / T, 0.1, 20.0)
        errors.append(np.max(np.abs(np.log(ab) - np.log(gamma**2))))
        ab_s1 = Schedule.from_betas(schedules.linear_betas(T, 0.1 / T, 20.0 / T)).alpha_bars[-1]
        errors_s1.append(abs(math.log(ab_s1) - 2 * math.log(schedules.vp_sde_marginal(1.0)[0])))
    assert errors[0] > errors[1] > errors[2]
    # log-error ≈ 77/T: ½Σβ_i² ≈ ∫β²/(2T) plus the right-endpoint rule's (β_max − β_min)/(2T)
    assert errors[2] < 1e-2
    assert 8 < errors[0] / errors[1] < 12 and 8 < errors[1] / errors[2] < 12  # first order in 1/T
    assert errors_s1[0] > errors_s1[1] > errors_s1[2]
    assert errors_s1[1] < 0.1  # S1 itself: ᾱ_T = 4.04e-5 against γ_1² = e^{−10.05} = 4.32e-5


# ------------------------------------------------------------------------------------------------ S11
def test_S11_ve_sde_geometric_sigma():
    """S11: σ_t = σ_min(σ_max/σ_min)^t — endpoints, constant ratio on an even grid, and the VE-SDE
    diffusion d σ²/dt = 2σ² log(σ_max/σ_min) by central differences."""
    smin, smax = 0.01, 50.0
    t = np.linspace(0, 1, 11)
    sig = schedules.ve_sde_sigma(t, smin, smax)
    assert sig[0] == pytest.approx(smin, rel=1e-14)
    assert sig[-1] == pytest.approx(smax, rel=1e-13)
    np.testing.assert_allclose(sig[1:] / sig[:-1], (smax / smin) ** 0.1, rtol=1e-12)
    h = 1e-6
    tm = np.array([0.2, 0.5, 0.8])
    dvar = (schedules.ve_sde_sigma(tm + h, smin, smax) ** 2 - schedules.ve_sde_sigma(tm - h, smin, smax) ** 2) / (2 * h)
    np.testing.assert_allclose(dvar, 2 * schedules.ve_sde_sigma(tm, smin, smax) ** 2 * math.log(smax / smin), rtol=1e-7)


# ------------------------------------------------------------------------------------------------ S12
def test_S12_random_walk_variance_monte_carlo():
    """S12: t steps of x ← x + ε (ε ~ N(0, 1)) give Var = t; the variance is checked by MC to 5 SE
    (SE of a sample variance = t√(2/(n−1))), and random_walk_q_sample has the same moments."""
    rng = np.random.default_rng(12)
    n, T = 100_000, 8
    x0 = 0.7
    x = np.full(n, x0)
    for t in range(1, T + 1):
        x = x + rng.standard_normal(n)
        var = schedules.random_walk_variance(t)
        assert var == t
        assert abs(x.var(ddof=1) - var) < 5 * var * math.sqrt(2 / (n - 1))
        assert abs(x.mean() - x0) < 5 * math.sqrt(var / n)
    xs = forward.random_walk_q_sample(np.full(n, x0), 5.0, rng)
    assert abs(xs.var(ddof=1) - 5.0) < 5 * 5.0 * math.sqrt(2 / (n - 1))
    assert abs(xs.mean() - x0) < 5 * math.sqrt(5.0 / n)
    # with explicit noise it is x_0 + √t ε exactly
    eps = rng.standard_normal(4)
    np.testing.assert_allclose(forward.random_walk_q_sample(np.ones(4), 3, eps), 1 + math.sqrt(3) * eps, rtol=1e-15)


# ----------------------------------------------------------------------------------- karras / ancestral
def test_karras_sigmas_anchor():
    """EDM Karras σ (N = 18, σ ∈ [0.002, 80], ρ = 7): 80, 57.586, 40.786, …, 0.02293, 0.00753, 0.002, then 0."""
    s = schedules.karras_sigmas(18, 0.002, 80.0, 7.0)
    assert s.shape == (19,)
    assert s[0] == pytest.approx(80.0, rel=1e-14)
    assert s[1] == pytest.approx(57.586, abs=5e-4)
    assert s[2] == pytest.approx(40.786, abs=5e-4)
    assert s[-4] == pytest.approx(0.02293, abs=5e-6)
    assert s[-3] == pytest.approx(0.00753, abs=5e-6)
    assert s[-2] == pytest.approx(0.002, rel=1e-12)
    assert s[-1] == 0.0
    # σ^{1/ρ} is evenly spaced (independent characterisation of the ramp)
    root = s[:-1] ** (1 / 7)
    np.testing.assert_allclose(np.diff(root), (0.002 ** (1 / 7) - 80 ** (1 / 7)) / 17, rtol=1e-10)


def test_ancestral_sigmas_k_diffusion_formula():
    """k-diffusion's ancestral split from σ 10 → 5 (η = 1): σ_up = √(σ_to²(σ_from²−σ_to²)/σ_from²) = 4.3301,
    σ_down = √(σ_to² − σ_up²) = 2.5 (the list these numbers came from has the two swapped; the formula gives these).
    Returns (σ_down, σ_up) as k-diffusion's get_ancestral_step does."""
    down, up = schedules.ancestral_sigmas(10.0, 5.0, 1.0)
    assert up == pytest.approx(math.sqrt(25 * 75 / 100), rel=1e-14)
    assert up == pytest.approx(4.3301, abs=5e-5)
    assert down == pytest.approx(2.5, rel=1e-12)
    assert down**2 + up**2 == pytest.approx(25.0, rel=1e-14)
    # η = 0: deterministic, σ_down = σ_to; a large η is capped at σ_up = σ_to
    assert schedules.ancestral_sigmas(10.0, 5.0, 0.0) == (pytest.approx(5.0), 0.0)
    down, up = schedules.ancestral_sigmas(10.0, 5.0, 3.0)
    assert up == pytest.approx(5.0) and down == pytest.approx(0.0, abs=1e-12)
    # final step to σ = 0
    assert schedules.ancestral_sigmas(3.0, 0.0, 1.0) == (0.0, 0.0)


@pytest.mark.parametrize("eta", [0.3, 1.0])
def test_ancestral_sigmas_equal_ddim_P7_step(eta):
    """P7 × ancestral: in σ = √((1−ᾱ)/ᾱ) coordinates (x̃ = x/√ᾱ) the ancestral split of t → t_prev is
    the DDIM step: σ_up = σ_t(η)/√ᾱ_prev and σ_down = √(1 − ᾱ_prev − σ_t(η)²)/√ᾱ_prev."""
    sched = Schedule.named("linear", 1000)
    for t, tp in [(1000, 900), (421, 401), (50, 1), (2, 1)]:
        ab, abp = sched.alpha_bars[t], sched.alpha_bars[tp]
        s_from, s_to = math.sqrt((1 - ab) / ab), math.sqrt((1 - abp) / abp)
        down, up = schedules.ancestral_sigmas(s_from, s_to, eta)
        sig = float(posterior.ddim_sigma(t, tp, eta, sched))
        assert up == pytest.approx(sig / math.sqrt(abp), rel=1e-10)
        assert down == pytest.approx(math.sqrt(1 - abp - sig**2) / math.sqrt(abp), rel=1e-10)


# ------------------------------------------------------------------------------------ zero terminal SNR
@pytest.mark.parametrize("name", ["linear", "scaled_linear", "cosine"])
def test_zero_terminal_snr_rescale(name):
    """Lin et al.'s rescale: ᾱ_T = 0 exactly, β_1 unchanged, and √ᾱ is an affine image of the old √ᾱ
    (s ← (s − s_T)·s_1/(s_1 − s_T))."""
    sched = Schedule.named(name, 1000)
    nb = schedules.rescale_zero_terminal_snr(sched.betas[1:])
    new = Schedule.from_betas(nb)
    assert new.alpha_bars[-1] == 0.0
    assert new.zero_terminal_snr and not sched.zero_terminal_snr
    assert nb[-1] == 1.0
    assert nb[0] == pytest.approx(sched.betas[1], rel=1e-12)
    old_s = np.sqrt(alpha_bar_indep(sched.betas[1:])[1:])
    new_s = np.sqrt(alpha_bar_indep(nb[:-1])[1:])  # t = 1..T−1 (log of β_T = 1 is −∞)
    expect = (old_s - old_s[-1]) * old_s[0] / (old_s[0] - old_s[-1])
    np.testing.assert_allclose(new_s, expect[:-1], rtol=1e-9)
    assert np.all((nb[:-1] > 0) & (nb[:-1] < 1))
    assert np.all(np.diff(new.snr[1:]) < 0)
    assert new.snr[-1] == 0.0


# ------------------------------------------------------------------------------------ S9 (exact definitions)
def _round_half_even(p, q):
    """p/q (int arrays or ints, q > 0) rounded to the nearest integer, ties to even, in exact integer
    arithmetic; also where p/q is a tie (exactly half an integer)."""
    n, r = np.divmod(p, q)
    tie = 2 * r == q
    return n + ((2 * r > q) | (tie & (n % 2 == 1))), tie


def _exact_spacing(num_steps, T, spacing, offset=0):
    """The spacing definitions in exact rational arithmetic, i = 0..N−1, diffusers' 0-based k:
    linspace k_i = round(i·(T−1)/(N−1)); leading k_i = i·⌊T/N⌋ + offset; trailing k_i = round(T − i·T/N) − 1,
    with round half to even of the exact fraction. Returns (k, tie), descending; tie marks the k that round
    an exact half."""
    i = np.arange(num_steps, dtype=np.int64)
    if spacing == "leading":
        k, tie = i * (T // num_steps) + offset, np.zeros(num_steps, dtype=bool)
    elif spacing == "linspace":
        k, tie = _round_half_even(i * (T - 1), max(num_steps - 1, 1))
    else:
        k, tie = _round_half_even(T * num_steps - i * T, num_steps)
        k = k - 1
    order = np.argsort(-k, kind="stable")
    return k[order], tie[order]


def _spacing_cases(T, spacing):
    """(N, offset) for every N in 1..T, and offset 1 too for 'leading' where it fits (k_max ≤ T − 1)."""
    for n in range(1, T + 1):
        yield n, 0
        if spacing == "leading" and (n - 1) * (T // n) + 1 <= T - 1:
            yield n, 1


def test_exact_rounding_oracle_is_fraction_rounding():
    """The oracle of the step-list tests below: its integer round-half-to-even equals round() of a Fraction
    (which rounds half to even) for every p/q with |p| ≤ 60 and 1 ≤ q ≤ 12, and it flags exactly the halves."""
    p = np.arange(-60, 61)
    for q in range(1, 13):
        k, tie = _round_half_even(p, q)
        assert k.tolist() == [round(Fraction(int(v), q)) for v in p]
        assert tie.tolist() == [Fraction(int(v), q).denominator == 2 for v in p]


@pytest.mark.parametrize("T", [1000, 37, 7])
@pytest.mark.parametrize("spacing", ["linspace", "leading", "trailing"])
def test_S9_timesteps_equal_exact_definition_except_float_ties(spacing, T):
    """S9: for every N in 1..T, timesteps(N, T, spacing) is N distinct math t in 1..T, descending, and equals
    k + 1 of the exact definition everywhere except where the exact value is a tie (half an integer), and
    there it may be the other neighbour: the lists are computed in float64 as diffusers computes them, and float
    error decides some exact ties (T = 1000: linspace at 92 values of N, e.g. 27, where diffusers agrees with
    ldmkit; trailing at 11, e.g. 240; none at T = 37 or 7). docs/diffusers.md lists them."""
    for n, offset in _spacing_cases(T, spacing):
        t = schedules.timesteps(n, T, spacing, offset=offset)
        assert t.dtype.kind == "i" and t.shape == (n,), (n, offset)
        assert t[-1] >= 1 and t[0] <= T and np.all(np.diff(t) < 0), (n, offset)
        k_exact, tie = _exact_spacing(n, T, spacing, offset)
        off = np.nonzero(t - 1 != k_exact)[0]
        assert np.all(tie[off]) and np.all(np.abs(t[off] - 1 - k_exact[off]) == 1), (n, offset, off)

