"""Training losses and their weights (docs/formulas.md: L4, L5, L7, L8, L9, L10, L11, and F4).

Each test proves a formula against an independent truth: a hand derivation written out in the test, a
closed form for Gaussian data, an exact quadrature, or a Monte Carlo estimate with a tolerance of
5 standard errors (seeded, so deterministic). The variational bound itself (L1–L3, L6) is in test_vlb.py.
"""

from __future__ import annotations

import math

import numpy as np
import pytest

from ldmkit.reference import losses
from ldmkit.reference.forward import prior_kl
from ldmkit.reference.kl import normal_kl
from ldmkit.reference.posterior import random_walk_mean_from_eps, random_walk_posterior, x0_eps_from_output
from ldmkit.reference.schedules import Schedule

LOG_2PI = math.log(2 * math.pi)


def _hermite(n: int):
    """Probabilists' Gauss–Hermite nodes and weights for E over N(0, 1) (exact for degree <= 2n−1)."""
    z, w = np.polynomial.hermite_e.hermegauss(n)
    return z, w / math.sqrt(2.0 * math.pi)


def _within_5se(samples: np.ndarray, expected: float) -> None:
    se = samples.std(ddof=1) / math.sqrt(samples.size)
    assert abs(samples.mean() - expected) < 5 * se + 1e-12, (samples.mean(), expected, se)


# ----------------------------------------------------------------------------------------------- L4
def test_L4_simple_and_weighted_loss_by_hand():
    """L4: simple_loss is the per-example mean over all non-batch axes of (ε − ε_θ)², and weighted_loss is
    w(t) times it (scalar or (B,) weights), written out element by element here; rtol 1e-14."""
    rng = np.random.default_rng(0)
    eps, pred = rng.standard_normal((2, 3, 2, 4, 5))
    by_hand = np.array([sum((eps[b].ravel()[i] - pred[b].ravel()[i]) ** 2 for i in range(40)) / 40
                        for b in range(3)])
    np.testing.assert_allclose(losses.simple_loss(eps, pred), by_hand, rtol=1e-14)
    w = np.array([0.5, 2.0, 0.0])
    np.testing.assert_allclose(losses.weighted_loss(eps, pred, w), w * by_hand, rtol=1e-14)
    np.testing.assert_allclose(losses.weighted_loss(eps, pred, 3.0), 3 * by_hand, rtol=1e-14)


def test_L4_simple_loss_of_exact_model_is_posterior_variance_of_eps():
    """L4: for Gaussian data N(m, s²) and the exact ε* (X1), E[L_simple at t] = E Var(ε | x_t) =
    ᾱ_t s²/(ᾱ_t s² + 1 − ᾱ_t) (closed form); Monte Carlo with 40,000 draws, within 5 standard errors."""
    from ldmkit.reference.analytic import GaussianData, vp_model

    s = Schedule.named("cosine", 100)
    data = GaussianData([0.4, -0.3], 0.5)
    model = vp_model(data, s)
    rng = np.random.default_rng(1)
    for t in (5, 50, 95):
        x0 = data.sample(40_000, rng)
        eps = rng.standard_normal(x0.shape)
        x_t = math.sqrt(s.alpha_bars[t]) * x0 + math.sqrt(1 - s.alpha_bars[t]) * eps
        loss = losses.simple_loss(eps, model(x_t, t))
        ab = s.alpha_bars[t]
        _within_5se(loss, ab * 0.5 / (ab * 0.5 + 1 - ab))


# ----------------------------------------------------------------------------------------------- L5
@pytest.mark.parametrize("prediction", ["eps", "x0", "v", "epsilon", "sample", "v_prediction"])
def test_L5_prediction_loss_is_weight_times_eps_loss(prediction):
    """L5: for random model outputs of each type, the MSE in the model's own parameterisation equals
    w(t)·‖ε − ε̂‖² with ε̂ its ε (P3) and w derived by hand: eps 1, x0 (1−ᾱ)/ᾱ = 1/SNR, v 1/ᾱ = 1 + 1/SNR
    (x̂_0 − x_0 = √((1−ᾱ)/ᾱ)(ε − ε̂); v̂ − v = (ε̂ − ε)/√ᾱ). All t of linear T=1000 in one batch; rtol 1e-9."""
    s = Schedule.named("linear", 1000)
    rng = np.random.default_rng(2)
    t = np.arange(1, 1001)
    x0 = rng.uniform(-1, 1, (1000, 3, 2))
    eps = rng.standard_normal(x0.shape)
    a = np.sqrt(s.alpha_bars[t])[:, None, None]
    x_t = a * x0 + np.sqrt(1 - s.alpha_bars[t])[:, None, None] * eps
    out = rng.standard_normal(x0.shape)
    _, eps_hat = x0_eps_from_output(out, x_t, t, s, prediction)
    ab = s.alpha_bars[t]
    by_hand = {"eps": np.ones(1000), "x0": (1 - ab) / ab, "v": 1 / ab}
    kind = {"epsilon": "eps", "sample": "x0", "v_prediction": "v"}.get(prediction, prediction)
    w = losses.prediction_loss_weight(t, s, prediction)
    np.testing.assert_allclose(w, by_hand[kind], rtol=1e-12)
    np.testing.assert_allclose(losses.prediction_loss(out, x0, eps, x_t, t, s, prediction),
                               w * losses.simple_loss(eps, eps_hat), rtol=1e-9)
    snr = ab / (1 - ab)
    np.testing.assert_allclose(w, {"eps": 1.0, "x0": 1 / snr, "v": 1 + 1 / snr}[kind], rtol=1e-12)


def test_L5_min_snr_weights():
    """L5 helper: Min-SNR-γ (Hang et al. 2023; diffusers' recipe: min(SNR, γ), divided by SNR for ε and by
    SNR + 1 for v). Whatever the prediction, weight × prediction_loss_weight is min(SNR, γ)/SNR, the same
    effective weight on the ε-loss; checked by hand at every t of cosine T = 1000, γ = 5 and 1; rtol 1e-12."""
    s = Schedule.named("cosine", 1000)
    t = np.arange(1, 1001)
    snr = s.alpha_bars[t] / (1 - s.alpha_bars[t])
    for gamma in (5.0, 1.0):
        target = np.minimum(snr, gamma) / snr
        for pred, hand in (("eps", np.minimum(snr, gamma) / snr), ("x0", np.minimum(snr, gamma)),
                           ("v", np.minimum(snr, gamma) / (snr + 1))):
            w = losses.min_snr_weight(t, s, gamma, pred)
            np.testing.assert_allclose(w, hand, rtol=1e-12)
            np.testing.assert_allclose(w * losses.prediction_loss_weight(t, s, pred), target, rtol=1e-12)
    assert losses.min_snr_weight(1000, s, 5.0) == pytest.approx(1.0)   # SNR < γ: unweighted ε-loss
    assert losses.min_snr_weight(1, s, 5.0) == pytest.approx(5.0 / snr[0])


# ----------------------------------------------------------------------------------------------- L7 (Su)
def _su_setup(t, shape, seed):
    s = Schedule.named("su", 1000)
    a = np.sqrt(s.alphas)                 # Su's α_t, β_t (square roots of DDPM's), ᾱ_t, β̄_t
    b = np.sqrt(s.betas)
    ab, bb = np.sqrt(s.alpha_bars), np.sqrt(1 - s.alpha_bars)
    rng = np.random.default_rng(seed)
    x0 = rng.uniform(-1, 1, shape)

    def eps_model(x):  # any nonlinear ε_θ(x_t, t) for the fixed t
        return 0.7 * np.tanh(x) + 0.1 * x**2 - 0.05 * t / 1000

    return s, a[t], b[t], ab[t], bb[t], ab[t - 1], bb[t - 1], x0, rng, eps_model


@pytest.mark.parametrize("t", [2, 10, 500, 1000])
def test_L7_su_one_step_equals_variance_reduced_up_to_weight_and_constant_exact(t):
    """L7 (Su 1.8–1.14): fix x_0 and the total noise ε (so x_t = ᾱ_t x_0 + β̄_t ε), split the step noise into
    ε_t = (β_t ε − α_t β̄_{t−1} ω)/β̄_t and ε̄_{t−1} = (α_t β̄_{t−1} ε + β_t ω)/β̄_t. The one-step loss is a
    quadratic in ω with no cross-coordinate terms, so its mean over ω ∈ {+1, −1} (per coordinate) is
    exactly E_ω; it equals weight·variance-reduced + constant with weight = β_t⁴/(α_t²β̄_t²) = β_t²/(α_t(1−ᾱ_t))
    (DDPM) and constant = β̃_t, for a nonlinear ε_θ. Also ‖x_{t−1} − μ‖² = β_t²/α_t²·‖ε_t − ε_θ‖². rtol 1e-9."""
    s, a, b, ab, bb, ab_prev, bb_prev, x0, rng, eps_model = _su_setup(t, (6, 5), 3)
    eps = rng.standard_normal(x0.shape)
    x_t = ab * x0 + bb * eps
    eps_pred = eps_model(x_t)
    one_step = []
    for omega in (1.0, -1.0):
        eps_t = (b * eps - a * bb_prev * omega) / bb
        eps_bar_prev = (a * bb_prev * eps + b * omega) / bb
        x_prev = ab_prev * x0 + bb_prev * eps_bar_prev
        np.testing.assert_allclose(a * x_prev + b * eps_t, x_t, rtol=1e-12, atol=1e-12)
        loss = losses.su_one_step_loss(x_prev, x_t, eps_pred, t, s)
        np.testing.assert_allclose(loss, b**2 / a**2 * np.mean((eps_t - eps_pred) ** 2, axis=1), rtol=1e-9)
        one_step.append(loss)
    weight, constant = losses.su_loss_relation(t, s)
    assert weight == pytest.approx(b**4 / (a**2 * bb**2), rel=1e-12)
    assert weight == pytest.approx(s.betas[t] ** 2 / (s.alphas[t] * (1 - s.alpha_bars[t])), rel=1e-12)
    assert constant == pytest.approx(s.posterior_variance[t], rel=1e-12)
    vr = losses.su_variance_reduced_loss(eps, eps_pred, t, s)
    np.testing.assert_allclose(vr, np.mean((eps - bb / b * eps_pred) ** 2, axis=1), rtol=1e-12)
    np.testing.assert_allclose((one_step[0] + one_step[1]) / 2, weight * vr + constant, rtol=1e-9)


def test_L7_su_losses_agree_in_expectation_monte_carlo():
    """L7: sampling the forward chain as Su does (x_{t−1} ~ q(x_{t−1} | x_0), then x_t = α_t x_{t−1} + β_t ε_t),
    E[one-step loss] = E[weight·variance-reduced(ε) + constant] where ε = (x_t − ᾱ_t x_0)/β̄_t; 100,000
    draws, the mean difference within 5 standard errors of 0; and the variance-reduced form has the smaller
    per-draw variance (Su's point)."""
    t = 300
    s, a, b, ab, bb, ab_prev, bb_prev, _, rng, eps_model = _su_setup(t, (1, 1), 4)
    n = 100_000
    x0 = rng.uniform(-1, 1, (n, 1))
    x_prev = ab_prev * x0 + bb_prev * rng.standard_normal((n, 1))
    x_t = a * x_prev + b * rng.standard_normal((n, 1))
    eps = (x_t - ab * x0) / bb
    eps_pred = eps_model(x_t)
    one = losses.su_one_step_loss(x_prev, x_t, eps_pred, t, s)
    weight, constant = losses.su_loss_relation(t, s)
    reduced = weight * losses.su_variance_reduced_loss(eps, eps_pred, t, s) + constant
    _within_5se(one - reduced, 0.0)
    assert reduced.var() < one.var()


# ----------------------------------------------------------------------------------------------- L8 (Inouye)
@pytest.mark.parametrize("t", [2, 3, 10, 100])
def test_L8_random_walk_vlb_weight_against_normal_kl(t):
    """L8: KL(q(x_{t−1} | x_t, x_0) ‖ N(x_t − ε̃_θ/t, σ²)) on Inouye's posterior (P8, random_walk_posterior)
    computed by normal_kl (K1) equals random_walk_vlb_weight·‖ε̃ − ε̃_θ‖² exactly for the matched σ² = 1 − 1/t
    (weight 1/(2t(t−1))), and for unit σ² (Inouye's printed 1/(2t²)) up to the constant ½(−log(1−1/t) − 1/t)
    per dimension. rtol 1e-10."""
    rng = np.random.default_rng(5)
    x0 = rng.standard_normal((4, 3))
    x_t = x0 + math.sqrt(t) * rng.standard_normal(x0.shape)
    eps_tilde_pred = rng.standard_normal(x0.shape)
    mean, var = random_walk_posterior(x0, x_t, t)
    model_mean = random_walk_mean_from_eps(x_t, t, eps_tilde_pred)
    sq = np.sum((x_t - x0 - eps_tilde_pred) ** 2, axis=1)
    matched = np.sum(normal_kl(mean, np.log(var), model_mean, math.log(1 - 1 / t)), axis=1)
    w = losses.random_walk_vlb_weight(t)
    assert w == pytest.approx(1 / (2 * t * (t - 1)), rel=1e-14)
    np.testing.assert_allclose(matched, w * sq, rtol=1e-10)
    unit = np.sum(normal_kl(mean, np.log(var), model_mean, 0.0), axis=1)
    w1 = losses.random_walk_vlb_weight(t, reverse_variance=1.0)
    assert w1 == pytest.approx(1 / (2 * t**2), rel=1e-14)
    np.testing.assert_allclose(unit, w1 * sq + 3 * 0.5 * (-math.log(1 - 1 / t) - 1 / t), rtol=1e-10)
    assert losses.random_walk_vlb_weight(1) == np.inf
    np.testing.assert_allclose(losses.random_walk_vlb_weight(np.array([2.0, 4.0]), np.array([0.5, 2.0])),
                               [1 / (2 * 4 * 0.5), 1 / (2 * 16 * 2.0)], rtol=1e-14)


# ----------------------------------------------------------------------------------------------- L9 (VAE)
def test_L9_vae_loss_parts_are_K3_and_K4_sums():
    """L9: vae_loss's "recon" is −Σ log N(x; μ, σ²) (K4 written out: D/2 log 2π + Σ log σ + ½Σ(x−μ)²/σ²),
    its "kl" ½Σ(μ² + σ² − 1 − log σ²) (K3 written out), "loss" = recon + β·kl; with a scalar and a per-pixel
    recon_logvar and β = 0.25; rtol 1e-12."""
    rng = np.random.default_rng(6)
    x, recon = rng.uniform(-1, 1, (2, 3, 1, 4, 4))
    zm, zlv = rng.standard_normal((2, 3, 2, 2, 2))
    for recon_logvar in (0.0, rng.normal(-1, 0.3, (1, 4, 4))):
        out = losses.vae_loss(x, recon, zm, zlv, kl_weight=0.25, recon_logvar=recon_logvar)
        lv = np.broadcast_to(recon_logvar, x.shape)
        D = 16
        recon_hand = np.array([D / 2 * LOG_2PI + np.sum(0.5 * lv[b]) + 0.5 * np.sum((x[b] - recon[b]) ** 2
                                                                                      / np.exp(lv[b]))
                               for b in range(3)])
        kl_hand = np.array([0.5 * np.sum(zm[b] ** 2 + np.exp(zlv[b]) - 1 - zlv[b]) for b in range(3)])
        np.testing.assert_allclose(out["recon"], recon_hand, rtol=1e-12)
        np.testing.assert_allclose(out["kl"], kl_hand, rtol=1e-12)
        np.testing.assert_allclose(out["loss"], recon_hand + 0.25 * kl_hand, rtol=1e-12)


def test_L9_reparameterize_moments_and_monte_carlo_kl():
    """L9: z = μ + σ ⊙ ε has mean μ and variance σ² (200,000 draws: within 5 standard errors for the mean;
    the sample variance within 5 of its standard errors, ≈ σ²√(2/n)), and the Monte Carlo KL
    E_z[log q(z) − log N(z; 0, I)] over reparameterised draws matches vae_kl (K3) within 5 standard errors."""
    rng = np.random.default_rng(7)
    mean = np.array([[0.5, -1.0, 2.0]])
    logvar = np.array([[0.0, -2.0, 0.7]])
    n = 200_000
    z = losses.reparameterize(np.repeat(mean, n, 0), np.repeat(logvar, n, 0), rng)
    var = np.exp(logvar[0])
    for i in range(3):
        _within_5se(z[:, i], mean[0, i])
        assert abs(z[:, i].var(ddof=1) - var[i]) < 5 * var[i] * math.sqrt(2 / (n - 1))
    log_q = np.sum(-0.5 * (LOG_2PI + logvar + (z - mean) ** 2 / var), axis=1)
    log_p = np.sum(-0.5 * (LOG_2PI + z**2), axis=1)
    kl = losses.vae_loss(np.zeros((1, 1)), np.zeros((1, 1)), mean, logvar)["kl"][0]
    _within_5se(log_q - log_p, kl)
    fixed = rng.standard_normal((4, 3))
    np.testing.assert_allclose(losses.reparameterize(np.repeat(mean, 4, 0), np.repeat(logvar, 4, 0), fixed),
                               mean + np.exp(0.5 * logvar) * fixed, rtol=1e-15)


# ----------------------------------------------------------------------------------------------- L10 (DSM)
def _dsm_setup():
    s = Schedule.named("cosine", 100)
    t = 40
    m, s2 = np.array([0.5, -0.2]), np.array([0.3, 0.8])
    ab = s.alpha_bars[t]
    mu, v = math.sqrt(ab) * m, ab * s2 + 1 - ab         # q(x_t) = N(mu, v) per dim (X3)
    return s, t, m, s2, ab, mu, v


def _dsm_closed(a, b, mu, v):
    """E over x_t ~ N(mu, v) of mean_d(−(x−a)/b − ∇ log q(x_t))², by hand: v(1/v − 1/b)² + (a−mu)²/b²."""
    return np.mean(v * (1 / v - 1 / b) ** 2 + (a - mu) ** 2 / b**2)


def test_L10_dsm_minimised_at_true_score_and_differences_exact():
    """L10 (Vincent's identity): for Gaussian data N(m, s²) and scores s_θ(x) = −(x − a)/b, E[DSM(θ)] differs
    from E‖s_θ − ∇ log q(x_t)‖² by a constant, so DSM(θ₁) − DSM(θ₂) equals the closed-form difference
    of the latter, and DSM is minimised at the true a = √ᾱ m, b = ᾱ s² + 1 − ᾱ. Expectations over (x_0, ε)
    by Gauss–Hermite quadrature, exact for this quadratic; rtol 1e-10. Also (1−ᾱ)·DSM = L_simple for
    ε_θ = −√(1−ᾱ) s_θ (P5)."""
    s, t, m, s2, ab, mu, v = _dsm_setup()
    z, w = _hermite(4)
    z0, ze = (g.ravel() for g in np.meshgrid(z, z, indexing="ij"))
    weight = np.outer(w, w).ravel()
    x0 = m + np.sqrt(s2) * z0[:, None]
    eps = np.repeat(ze[:, None], 2, axis=1)
    x_t = math.sqrt(ab) * x0 + math.sqrt(1 - ab) * eps

    def expected_dsm(a, b):
        return weight @ losses.dsm_loss(-(x_t - a) / b, x0, x_t, t, s)

    thetas = [(mu, v), (mu + 0.3, v), (mu, 1.5 * v), (mu - [0.2, 0.1], 0.7 * v), (np.zeros(2), np.ones(2))]
    base = expected_dsm(*thetas[0])
    for a, b in thetas[1:]:
        assert expected_dsm(a, b) > base
        assert expected_dsm(a, b) - base == pytest.approx(_dsm_closed(a, b, mu, v) - _dsm_closed(mu, v, mu, v),
                                                         rel=1e-10)
    score = -(x_t - 0.1) / 0.9
    np.testing.assert_allclose((1 - ab) * losses.dsm_loss(score, x0, x_t, t, s),
                               losses.simple_loss(eps, -math.sqrt(1 - ab) * score), rtol=1e-12)


def test_L10_dsm_differences_monte_carlo():
    """L10: the same identity by Monte Carlo (50,000 draws of (x_0, ε), common to both θ): the mean of
    DSM(θ₁) − DSM(θ₂) lies within 5 standard errors of the closed-form difference."""
    s, t, m, s2, ab, mu, v = _dsm_setup()
    rng = np.random.default_rng(8)
    x0 = m + np.sqrt(s2) * rng.standard_normal((50_000, 2))
    x_t = math.sqrt(ab) * x0 + math.sqrt(1 - ab) * rng.standard_normal(x0.shape)
    a1, b1, a2, b2 = mu + 0.4, 1.3 * v, mu, v
    diff = (losses.dsm_loss(-(x_t - a1) / b1, x0, x_t, t, s) - losses.dsm_loss(-(x_t - a2) / b2, x0, x_t, t, s))
    _within_5se(diff, _dsm_closed(a1, b1, mu, v) - _dsm_closed(a2, b2, mu, v))


# ----------------------------------------------------------------------------------------------- L11 (ISM)
M_ISM, S2_ISM = np.array([0.5, -1.0, 0.2]), np.array([0.4, 1.5, 0.9])


def _ism_half_fisher_gap(a, b):
    """½E‖s_θ − ∇ log p‖² for p = N(m, s²), s_θ = −(x − a)/b, by hand: ½Σ[s²(1/s² − 1/b)² + (a − m)²/b²]."""
    return 0.5 * np.sum(S2_ISM * (1 / S2_ISM - 1 / b) ** 2 + (a - M_ISM) ** 2 / b**2)


def test_L11_ism_closed_form_minimum_and_hyvarinen_identity():
    """L11: for data N(m, s²) (d = 3) and s_θ = −(x − a)/b, E[ISM(θ)] (by Gauss–Hermite quadrature, exact for
    the quadratic part; the finite-difference divergence adds ~1e-9) equals ½E‖s_θ − ∇ log p‖² − ½Σ1/s²
    (Hyvärinen's identity, closed forms), hence ISM(θ₁) − ISM(θ₂) is the difference of the Fisher gaps and
    the minimum is at a = m, b = s²; rtol 1e-7."""
    z, w = _hermite(3)
    x = M_ISM + np.sqrt(S2_ISM) * z[:, None]          # per-dim nodes shared across the row: E of the sum
    for a, b in [(M_ISM, S2_ISM), (M_ISM + 0.3, S2_ISM), (M_ISM, 2 * S2_ISM), (np.zeros(3), np.ones(3))]:
        ism = w @ losses.implicit_score_matching_loss(lambda y, a=a, b=b: -(y - a) / b, x)
        assert ism == pytest.approx(_ism_half_fisher_gap(a, b) - 0.5 * np.sum(1 / S2_ISM), rel=1e-7)
        if b is not S2_ISM or a is not M_ISM:
            true = w @ losses.implicit_score_matching_loss(lambda y: -(y - M_ISM) / S2_ISM, x)
            assert ism > true


def test_L11_ism_differences_monte_carlo():
    """L11: Monte Carlo (20,000 draws, common to both θ): the mean of ISM(θ₁) − ISM(θ₂) is within 5 standard
    errors of ½E‖s_θ₁ − ∇ log p‖² − ½E‖s_θ₂ − ∇ log p‖² (closed forms)."""
    rng = np.random.default_rng(9)
    x = M_ISM + np.sqrt(S2_ISM) * rng.standard_normal((20_000, 3))
    a1, b1, a2, b2 = M_ISM - 0.2, 0.8 * S2_ISM, M_ISM + 0.1, 1.2 * S2_ISM
    diff = (losses.implicit_score_matching_loss(lambda y: -(y - a1) / b1, x)
            - losses.implicit_score_matching_loss(lambda y: -(y - a2) / b2, x))
    _within_5se(diff, _ism_half_fisher_gap(a1, b1) - _ism_half_fisher_gap(a2, b2))


def test_L11_finite_difference_divergence_equals_analytic():
    """L11: ISM − ½‖s‖² is the divergence; central differences give −Σ1/b for the linear score (abs 1e-8)
    and −Σ(sech²x_i + 0.3x_i²) for s(x) = −tanh(x) − 0.1x³ (central differences err by O(h²): rtol 1e-7 at
    h = 1e-4, 1e-5 at h = 1e-3)."""
    rng = np.random.default_rng(10)
    x = rng.standard_normal((7, 4))
    b = np.array([0.5, 1.0, 2.0, 4.0])
    for h, rtol in ((1e-4, 1e-7), (1e-3, 1e-5)):
        lin = losses.implicit_score_matching_loss(lambda y: -(y - 0.3) / b, x, h=h)
        np.testing.assert_allclose(lin - 0.5 * np.sum(((x - 0.3) / b) ** 2, axis=1), -np.sum(1 / b), atol=1e-8)
        s_val = -np.tanh(x) - 0.1 * x**3
        non = losses.implicit_score_matching_loss(lambda y: -np.tanh(y) - 0.1 * y**3, x, h=h)
        div = -np.sum(1 / np.cosh(x) ** 2 + 0.3 * x**2, axis=1)
        np.testing.assert_allclose(non - 0.5 * np.sum(s_val**2, axis=1), div, rtol=rtol)


# ----------------------------------------------------------------------------------------------- F4
def test_F4_prior_kl_against_K1_and_monte_carlo():
    """F4: prior_kl = KL(N(√ᾱ_T x_0, 1−ᾱ_T) ‖ N(0, 1)) elementwise equals normal_kl (K1), is ~0 for the
    named T = 1000 schedules, and matches a Monte Carlo estimate E_q[log q(x_T | x_0) − log N(x_T; 0, 1)] on
    a short schedule with a large prior term (200,000 draws, within 5 standard errors)."""
    s = Schedule.from_betas(np.linspace(0.01, 0.2, 8))
    x0 = np.array([[-1.0, 0.0, 0.6]])
    ab = s.alpha_bars[-1]
    kl = prior_kl(x0, s)
    np.testing.assert_allclose(kl, normal_kl(math.sqrt(ab) * x0, math.log(1 - ab), 0.0, 0.0), rtol=1e-12)
    rng = np.random.default_rng(11)
    x_T = math.sqrt(ab) * x0 + math.sqrt(1 - ab) * rng.standard_normal((200_000, 3))
    log_ratio = (-0.5 * (math.log(1 - ab) + (x_T - math.sqrt(ab) * x0) ** 2 / (1 - ab))) - (-0.5 * x_T**2)
    for i in range(3):
        _within_5se(log_ratio[:, i], kl[0, i])
    for name in ("linear", "cosine"):
        assert np.all(prior_kl(x0, Schedule.named(name, 1000)) < 1e-4)


# ----------------------------------------------------------------------------------------------- bad input
def test_L4_L5_bad_arguments():
    """L4/L5: bad arguments name the argument and its valid range."""
    s = Schedule.named("linear", 10)
    e = np.zeros((2, 3))
    with pytest.raises(ValueError, match=r"eps and eps_pred must have the same shape"):
        losses.simple_loss(e, np.zeros((2, 4)))
    with pytest.raises(ValueError, match="eps must have a leading batch axis"):
        losses.simple_loss(0.0, 0.0)
    with pytest.raises(TypeError, match="eps_pred must be a numeric array"):
        losses.simple_loss(e, "x")
    with pytest.raises(ValueError, match="eps_pred must be finite"):
        losses.simple_loss(e, e + np.nan)
    with pytest.raises(ValueError, match=r"weights must be a scalar or have shape \(2,\)"):
        losses.weighted_loss(e, e, np.ones(3))
    with pytest.raises(ValueError, match="weights must be >= 0"):
        losses.weighted_loss(e, e, -1.0)
    with pytest.raises(ValueError, match="prediction must be one of"):
        losses.prediction_loss_weight(1, s, "score")
    with pytest.raises(ValueError, match=r"t must be in 1\.\.10 \(math t\), got 11"):
        losses.prediction_loss_weight(11, s, "eps")
    with pytest.raises(ValueError, match="x_t must equal"):
        losses.prediction_loss(e, e, e + 1, e, 3, s, "eps")
    with pytest.raises(ValueError, match=r"t must be a scalar or have shape \(2,\)"):
        losses.prediction_loss(e, e, e, e, np.array([1, 2, 3]), s)
    with pytest.raises(ValueError, match=r"gamma must be in \(0, inf\)"):
        losses.min_snr_weight(1, s, gamma=0.0)
    with pytest.raises(TypeError, match="schedule must be a Schedule"):
        losses.min_snr_weight(1, None)


def test_L7_L8_bad_arguments():
    """L7/L8: bad arguments name the argument and its valid range."""
    s = Schedule.named("su", 10)
    e = np.zeros((2, 3))
    with pytest.raises(ValueError, match=r"x_t and eps_pred must have the same shape"):
        losses.su_one_step_loss(e, e, np.zeros((2, 2)), 1, s)
    with pytest.raises(ValueError, match=r"t must be in 1\.\.10"):
        losses.su_variance_reduced_loss(e, e, 0, s)
    with pytest.raises(ValueError, match=r"t must be in 1\.\.10"):
        losses.su_loss_relation(12, s)
    with pytest.raises(ValueError, match="t must be >= 1 for the random-walk VLB weight"):
        losses.random_walk_vlb_weight(0.5)
    with pytest.raises(ValueError, match="reverse_variance must be > 0"):
        losses.random_walk_vlb_weight(3, reverse_variance=0.0)


def test_L9_bad_arguments():
    """L9: bad arguments name the argument and its valid range."""
    x = np.zeros((2, 4))
    with pytest.raises(ValueError, match="mean and logvar must have the same shape"):
        losses.reparameterize(np.zeros(3), np.zeros(2), np.zeros(3))
    with pytest.raises(ValueError, match=r"noise must have shape \(3,\)"):
        losses.reparameterize(np.zeros(3), np.zeros(3), np.zeros(4))
    with pytest.raises(ValueError, match=r"kl_weight must be in \[0, inf\)"):
        losses.vae_loss(x, x, x, x, kl_weight=-1.0)
    with pytest.raises(ValueError, match="z_mean and x must have the same batch size"):
        losses.vae_loss(x, x, np.zeros((3, 2)), np.zeros((3, 2)))
    with pytest.raises(ValueError, match="recon_logvar must broadcast to x's shape"):
        losses.vae_loss(x, x, x, x, recon_logvar=np.zeros(3))
    with pytest.raises(ValueError, match="z_mean and z_logvar must have the same shape"):
        losses.vae_loss(x, x, x, np.zeros((2, 3)))


def test_L10_L11_bad_arguments():
    """L10/L11: bad arguments name the argument and its valid range."""
    s = Schedule.named("linear", 10)
    x = np.zeros((2, 3))
    with pytest.raises(ValueError, match="score_pred and x_t must have the same shape"):
        losses.dsm_loss(np.zeros((2, 2)), x, x, 1, s)
    with pytest.raises(ValueError, match=r"t must be in 1\.\.10"):
        losses.dsm_loss(x, x, x, 0, s)
    with pytest.raises(TypeError, match="score_fn must be callable"):
        losses.implicit_score_matching_loss(None, x)
    with pytest.raises(ValueError, match=r"x must have shape \(B, d\)"):
        losses.implicit_score_matching_loss(lambda y: y, np.zeros(3))
    with pytest.raises(ValueError, match=r"h must be in \(0, inf\)"):
        losses.implicit_score_matching_loss(lambda y: y, x, h=0.0)
    with pytest.raises(ValueError, match="score_fn output must have the shape of x"):
        losses.implicit_score_matching_loss(lambda y: y[:, :2], x)
