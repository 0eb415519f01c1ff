"""The variational bound (docs/formulas.md: L1, L2, L3, L6 with K1, K4, K5, F4, P9, X1–X3).

Expectations over the forward noise are computed by quadrature, not Monte Carlo: term t of ``vlb_terms``
depends only on x_0 and the noise slot t−1, so feeding every slot the same grid of noise values and
weighting the rows gives E[L_{t−1}] for every t at once (trapezoid rule on a uniform grid for smooth
integrands, exponentially accurate; Gauss–Hermite where the integrand is a quadratic, exact). The truths
are independent: the entropy of the data pmf, mutual informations of Gaussians, the MMSE of an inline
posterior, a brute-force integral of the bound's definition over the whole path, and a transcription of
improved-diffusion's ``calc_bpd_loop``.
"""

from __future__ import annotations

import math

import numpy as np
import pytest

from ldmkit.reference import losses
from ldmkit.reference.analytic import GaussianData, GaussianMixtureData, reverse_variance, vp_model
from ldmkit.reference.schedules import Schedule, respace, vp_sde_marginal

LN2 = math.log(2.0)
_erfc = np.vectorize(math.erfc, otypes=[float])


def _normal_grid(h: float, half_width: float):
    """Uniform grid u and trapezoid weights of N(0, 1) (normalised to sum 1)."""
    u = np.arange(-half_width, half_width + h / 2, h)
    w = np.exp(-0.5 * u**2)
    return u, w / w.sum()


def _hermite(n: int):
    """Probabilists' Gauss–Hermite nodes and weights for E over N(0, 1) (exact for degree <= 2n−1)."""
    z, w = np.polynomial.hermite_e.hermegauss(n)
    return z, w / math.sqrt(2.0 * math.pi)


def _levels_pmf(K: int, m: float = 0.1, s: float = 0.4):
    """K levels in [−1, 1] with a discretised-Gaussian pmf (the data distribution of the bound tests)."""
    lv = np.linspace(-1.0, 1.0, K)
    p = np.exp(-0.5 * ((lv - m) / s) ** 2)
    return lv, p / p.sum()


def _sde_schedule(T: int, tau_min: float = 1e-3) -> Schedule:
    """S10's VP-SDE (linear β(τ), 0.1 → 20: the continuous form of S1) sampled at τ_1 = tau_min, …, τ_T = 1
    evenly: T = 11, 101, 1001 are nested grids with the same first and last noise levels."""
    tau = np.concatenate([[0.0], tau_min + (1.0 - tau_min) * np.arange(T) / (T - 1)])
    ab = vp_sde_marginal(tau)[0] ** 2
    return Schedule.from_betas(1.0 - ab[1:] / ab[:-1])


def _expected_vlb_discrete(model, schedule, lv, p, h=0.1, half_width=8.0):
    """E over x_0 ~ p and all noise of the vlb_terms dict entries, by quadrature: (prior, terms (T,), bpd)."""
    u, w = _normal_grid(h, half_width)
    K, n = lv.size, u.size
    x0 = np.repeat(lv, n)[:, None]
    weight = (p[:, None] * w[None, :]).ravel()
    noise = np.broadcast_to(np.tile(u, K)[None, :, None], (schedule.T, K * n, 1))
    vlb = losses.vlb_terms(model, x0, schedule, noise, levels=K)
    return (weight @ vlb["prior"], weight @ vlb["terms"], weight @ losses.nll_bits_per_dim(vlb))


def test_L1_L6_vlb_bounds_data_entropy_and_gap_shrinks_with_T():
    """L1/L6: for discrete data (16 levels, Gaussian pmf) and its exact denoiser (the posterior mean of a
    mixture of point masses, X2 with zero variances), E[VLB] in bits/dim is >= the data entropy H(p)
    (the bound holds for any model whose decoder is a pmf: E[VLB] = H + KL(p ‖ p_θ) + E KL(paths) >= H),
    and it decreases on nested refinements T = 11 → 101 → 1001 of the VP-SDE schedule with fixed end
    noise levels (the ε/x0 error of an MMSE denoiser is non-increasing in SNR, so splitting an interval
    lowers Σ ½ΔSNR·mmse; VDM, Kingma et al. 2021, App.). Measured gaps: 427.70, 13.556, 0.2330 bits.
    Tolerances: the quadrature is accurate to ~1e-12 (h = 0.05 and 0.1 agree), so the bound is checked
    with 1e-9 slack; the T = 1001 gap must lie in (0, 0.3) bits."""
    lv, p = _levels_pmf(16)
    H_bits = -np.sum(p * np.log(p)) / LN2  # the true NLL of the data, exactly from the pmf
    data = GaussianMixtureData(p, lv[:, None], np.zeros(lv.size))
    gaps = []
    for T in (11, 101, 1001):
        s = _sde_schedule(T)
        prior, terms, bpd = _expected_vlb_discrete(vp_model(data, s), s, lv, p)
        assert bpd == pytest.approx((prior + terms.sum()) / LN2, rel=1e-12)
        assert bpd >= H_bits - 1e-9
        gaps.append(bpd - H_bits)
    assert gaps[0] > gaps[1] > gaps[2] > 0
    assert gaps[2] < 0.3
    assert gaps[0] == pytest.approx(427.696, rel=1e-4) and gaps[1] == pytest.approx(13.5558, rel=1e-4)


@pytest.mark.parametrize("case", ["S1 linear T=1000, exact model", "cosine T=100, Gaussian-data model, beta"])
def test_L1_vlb_upper_bounds_entropy_for_any_model(case):
    """L1: E[VLB] >= H(p) for ANY model (the bound does not need the exact denoiser): the discrete data's
    exact denoiser on S1 (measured gap 0.2288 bits), and the continuous-Gaussian exact denoiser (wrong
    for discrete data) with σ² = β on cosine T = 100 (measured gap 0.4909 bits). Slack 1e-9 (quadrature)."""
    lv, p = _levels_pmf(16)
    H_bits = -np.sum(p * np.log(p)) / LN2
    if case.startswith("S1"):
        s = Schedule.named("linear", 1000)
        model = vp_model(GaussianMixtureData(p, lv[:, None], np.zeros(lv.size)), s)
        _, _, bpd = _expected_vlb_discrete(model, s, lv, p, h=0.2)
        assert bpd - H_bits == pytest.approx(0.2288, abs=2e-3)
    else:
        s = Schedule.named("cosine", 100)
        mean, var = p @ lv, p @ lv**2 - (p @ lv) ** 2
        model = vp_model(GaussianData([mean], var), s)
        u, w = _normal_grid(0.1, 8.0)
        x0 = np.repeat(lv, u.size)[:, None]
        noise = np.broadcast_to(np.tile(u, lv.size)[None, :, None], (100, x0.shape[0], 1))
        vlb = losses.vlb_terms(model, x0, s, noise, variance="beta", levels=16)
        bpd = (p[:, None] * w[None, :]).ravel() @ losses.nll_bits_per_dim(vlb)
        assert bpd - H_bits == pytest.approx(0.4909, abs=2e-3)
    assert bpd >= H_bits - 1e-9
    assert bpd - H_bits < 1.0


def test_L1_L3_kl_terms_equal_half_delta_snr_times_mmse():
    """L1 + L3 (x0 form): with σ² = β̃ the expected term E[L_{t−1}] = ½(SNR(t−1) − SNR(t))·E(x_0 − E[x_0 | x_t])²
    for t >= 2, with the posterior mean of the discrete data computed inline (a softmax over the levels,
    independent of analytic.py). Quadrature on both sides; rtol 1e-9."""
    lv, p = _levels_pmf(16)
    s = _sde_schedule(11)
    model = vp_model(GaussianMixtureData(p, lv[:, None], np.zeros(lv.size)), s)
    _, terms, _ = _expected_vlb_discrete(model, s, lv, p)
    u, w = _normal_grid(0.1, 8.0)
    for t in range(2, 12):
        a, sig = math.sqrt(s.alpha_bars[t]), math.sqrt(1.0 - s.alpha_bars[t])
        x_t = a * lv[:, None] + sig * u[None, :]                       # (K, n)
        logits = np.log(p) - 0.5 * ((x_t[..., None] - a * lv) / sig) ** 2  # (K, n, K)
        r = np.exp(logits - logits.max(axis=-1, keepdims=True))
        x0_hat = (r @ lv) / r.sum(axis=-1)
        mmse = p @ (((lv[:, None] - x0_hat) ** 2) @ w)
        snr = np.r_[np.inf, s.alpha_bars[1:] / (1.0 - s.alpha_bars[1:])]
        expected = 0.5 * (snr[t - 1] - snr[t]) * mmse
        assert terms[t - 1] == pytest.approx(expected, rel=1e-9)


@pytest.mark.parametrize("prediction", ["eps", "x0", "v"])
def test_L1_F4_P9_exact_reverse_kernels_telescope(prediction):
    """L1 with the true reverse kernels: for Gaussian data N(m, s²) the exact denoiser (X1) with the exact
    reverse variance (P9, passed as a variance table) makes p_θ(x_{t−1} | x_t) = q(x_{t−1} | x_t), so
    E[L_{t−1}] = I(x_0; x_{t−1}) − I(x_0; x_t) with I(x_0; x_t) = ½ log(1 + SNR_t s²) (the sum telescopes),
    the continuous decoder (levels=None, K4) gives E[L_0] = h(x_0 | x_1), the prior (F4) E KL(q(x_T | x_0)
    ‖ N(0, 1)), and the total is h(x_0) + KL(q(x_T) ‖ N(0, 1)). All closed forms; Gauss–Hermite quadrature
    is exact for these quadratics; rtol 1e-9. Every prediction type gives the same numbers (P3)."""
    s = Schedule.named("cosine", 60)
    m, s2 = np.array([0.3, -0.5, 0.0]), 0.3
    data = GaussianData(m, s2)
    table = np.concatenate([[0.0], reverse_variance(np.arange(1, 61), s, s2)])
    z, wz = _hermite(4)
    z0, ze = np.meshgrid(z, z, indexing="ij")
    weight = np.outer(wz, wz).ravel()
    x0 = m + math.sqrt(s2) * z0.ravel()[:, None]
    noise = np.broadcast_to(ze.ravel()[None, :, None], (60, weight.size, 3))
    vlb = losses.vlb_terms(vp_model(data, s, prediction), x0, s, noise, variance=table, prediction=prediction,
                           levels=None)
    terms, prior = weight @ vlb["terms"], weight @ vlb["prior"]
    snr = np.r_[np.inf, s.alpha_bars[1:] / (1.0 - s.alpha_bars[1:])]
    info = 0.5 * np.log1p(snr[1:] * s2)                       # I(x_0; x_t), t = 1..T, per dim
    d = 3
    np.testing.assert_allclose(terms[1:], d * (info[:-1] - info[1:]), rtol=1e-9, atol=1e-14)
    post_var = s2 * (1 - s.alpha_bars[1]) / (s.alpha_bars[1] * s2 + 1 - s.alpha_bars[1])  # Var(x_0 | x_1)
    assert terms[0] == pytest.approx(d * 0.5 * math.log(2 * math.pi * math.e * post_var), rel=1e-9)
    abT = s.alpha_bars[-1]
    prior_expected = np.sum(0.5 * (abT * (m**2 + s2) + (1 - abT) - 1 - math.log(1 - abT)))
    assert prior == pytest.approx(prior_expected, rel=1e-9)
    mT, vT = math.sqrt(abT) * m, abT * s2 + 1 - abT            # q(x_T) = N(mT, vT)
    kl_marginal = np.sum(0.5 * (mT**2 + vT - 1 - math.log(vT)))
    total = prior + terms.sum()
    assert total == pytest.approx(d * 0.5 * math.log(2 * math.pi * math.e * s2) + kl_marginal, rel=1e-9)
    assert np.all(vlb["total"] == vlb["prior"] + vlb["terms"].sum(axis=1))


def _phi_bin(x0, mean, std, K):
    """P(bin of level x0) under N(mean, std²) with open outer bins, via erfc (K5, written out again)."""
    half = 1.0 / (K - 1)
    lo = np.where(x0 <= -1 + 1e-9, -np.inf, (x0 - half - mean) / std)
    hi = np.where(x0 >= 1 - 1e-9, np.inf, (x0 + half - mean) / std)
    return 0.5 * (_erfc(lo / math.sqrt(2)) - _erfc(hi / math.sqrt(2)))


def _log_normal(x, mean, var):
    return -0.5 * (np.log(2 * np.pi * var) + (x - mean) ** 2 / var)


@pytest.mark.parametrize("T,variance", [(2, "beta_tilde"), (2, "beta"), (3, "beta_tilde")])
def test_L1_decomposition_equals_brute_force_path_integral(T, variance):
    """L1 (a second derivation): the bound's definition E_q[log q(x_{1:T} | x_0) − log p_θ(x_{0:T})],
    integrated by brute force over the whole path x_1..x_T on a grid (forward noises u_t on a uniform grid,
    trapezoid; the model mean written out by P4, the decoder by erfc, no posterior KLs), equals E of
    prior + Σ terms from vlb_terms, for each data level, to rtol 1e-8; and the exact NLL −log p_θ(x_0)
    (integrating the ancestral chain, its pmf summing to 1 within 1e-10) lies below it. T = 2 and 3,
    1-D data on 4 levels, a deliberately imperfect model (a wrong mixture's denoiser). Measured: the two
    agree to ~1e-13 relative (grids h = 0.1 and 0.2; h = 0.125 gives the same); for T = 3 the bound is
    5.494, 1.566, 1.445, 4.383 nats against NLLs 3.122, 0.836, 0.844, 2.380."""
    K = 4
    lv = np.linspace(-1, 1, K)
    s = Schedule.from_betas([0.05, 0.5] if T == 2 else [0.05, 0.3, 0.6])
    wrong = GaussianMixtureData([0.1, 0.4, 0.3, 0.2], 0.9 * lv[:, None], [0.02] * 4)
    model = vp_model(wrong, s)
    var = losses.reverse_variance_table(s, variance)

    def mu(x, t):  # P4, written out
        e = model(x.reshape(-1, 1), np.full(x.size, t), None).reshape(x.shape)
        return (x - s.betas[t] / math.sqrt(1 - s.alpha_bars[t]) * e) / math.sqrt(s.alphas[t])

    h, half_width = (0.1, 8.0) if T == 2 else (0.2, 7.5)
    u, _ = _normal_grid(h, half_width)
    grids = np.meshgrid(*([u] * T), indexing="ij", sparse=True)  # broadcast: each factor on its own axes
    wgrid = np.ones((u.size,) * T)
    for g in grids:
        wgrid = wgrid * np.exp(-0.5 * g**2)
    wgrid /= wgrid.sum()

    # the bound by vlb_terms, its expectation by 1-D quadrature per slot
    u1, w1 = _normal_grid(0.05, 8.0)
    x0 = np.repeat(lv, u1.size)[:, None]
    noise = np.broadcast_to(np.tile(u1, K)[None, :, None], (T, x0.shape[0], 1))
    vlb = losses.vlb_terms(model, x0, s, noise, variance=variance, levels=K)
    bound = (vlb["total"].reshape(K, -1) * w1).sum(axis=1)

    # the exact likelihood p_θ(x_0 = k): ancestral chain x_T = z_T, x_{t−1} = μ_θ(x_t) + σ_t z_{t−1}
    x = grids[-1]
    for t in range(T, 1, -1):
        x = mu(x, t) + math.sqrt(var[t]) * grids[t - 2]
    m1 = mu(x, 1)
    p_model = np.array([np.sum(wgrid * _phi_bin(level, m1, math.sqrt(var[1]), K)) for level in lv])
    assert p_model.sum() == pytest.approx(1.0, abs=1e-10)

    for k, level in enumerate(lv):
        xs = [None, math.sqrt(s.alphas[1]) * level + math.sqrt(s.betas[1]) * grids[0]]
        log_q = _log_normal(xs[1], math.sqrt(s.alphas[1]) * level, s.betas[1])
        for t in range(2, T + 1):
            xs.append(math.sqrt(s.alphas[t]) * xs[t - 1] + math.sqrt(s.betas[t]) * grids[t - 1])
            log_q = log_q + _log_normal(xs[t], math.sqrt(s.alphas[t]) * xs[t - 1], s.betas[t])
        log_p = _log_normal(xs[T], 0.0, 1.0)
        for t in range(T, 1, -1):
            log_p = log_p + _log_normal(xs[t - 1], mu(xs[t], t), var[t])
        log_p = log_p + np.log(_phi_bin(level, mu(xs[1], 1), math.sqrt(var[1]), K))
        definition = np.sum(wgrid * (log_q - log_p))
        assert bound[k] == pytest.approx(definition, rel=1e-8)
        assert bound[k] >= -math.log(p_model[k]) - 1e-9


def _improved_diffusion_bpd(model, x_start, betas, noise, clip_denoised, fixed_large):
    """A NumPy transcription of improved-diffusion's GaussianDiffusion.calc_bpd_loop with 0-based t, its
    own tables, FIXED_SMALL/FIXED_LARGE and clip_denoised; the decoder's CDF is the exact one instead of
    its tanh approximation. Returns (total_bpd, prior_bpd, vb (B, T) in improved-diffusion's order t =
    T−1 … 0, mse)."""
    T = betas.size
    alphas = 1.0 - betas
    acp = np.cumprod(alphas)
    acp_prev = np.append(1.0, acp[:-1])
    post_var = betas * (1.0 - acp_prev) / (1.0 - acp)
    post_log_var_clipped = np.log(np.append(post_var[1], post_var[1:]))
    c1 = betas * np.sqrt(acp_prev) / (1.0 - acp)
    c2 = (1.0 - acp_prev) * np.sqrt(alphas) / (1.0 - acp)
    model_log_var = np.log(np.append(post_var[1], betas[1:])) if fixed_large else post_log_var_clipped

    def mean_flat(a):
        return a.reshape(a.shape[0], -1).mean(axis=1)

    def normal_kl(m1, lv1, m2, lv2):
        return 0.5 * (-1.0 + lv2 - lv1 + np.exp(lv1 - lv2) + (m1 - m2) ** 2 * np.exp(-lv2))

    def dgll(x, means, log_scales):
        inv = np.exp(-log_scales)
        cdf = lambda z: 0.5 * _erfc(-z / math.sqrt(2))  # noqa: E731
        cdf_plus, cdf_min = cdf(inv * (x - means + 1 / 255)), cdf(inv * (x - means - 1 / 255))
        return np.where(x < -0.999, np.log(np.maximum(cdf_plus, 1e-12)),
                        np.where(x > 0.999, np.log(np.maximum(1 - cdf_min, 1e-12)),
                                 np.log(np.maximum(cdf_plus - cdf_min, 1e-12))))

    vb, mse = [], []
    for t in list(range(T))[::-1]:
        x_t = np.sqrt(acp[t]) * x_start + np.sqrt(1 - acp[t]) * noise[t]
        eps = model(x_t, np.full(x_start.shape[0], t + 1), None)  # ldmkit models take math t = k + 1
        pred_xstart = np.sqrt(1 / acp[t]) * x_t - np.sqrt(1 / acp[t] - 1) * eps
        if clip_denoised:
            pred_xstart = np.clip(pred_xstart, -1, 1)
        model_mean = c1[t] * pred_xstart + c2[t] * x_t
        true_mean = c1[t] * x_start + c2[t] * x_t
        kl = mean_flat(normal_kl(true_mean, post_log_var_clipped[t], model_mean, model_log_var[t])) / LN2
        nll = -mean_flat(dgll(x_start, model_mean, 0.5 * model_log_var[t])) / LN2
        vb.append(nll if t == 0 else kl)
        eps_re = (np.sqrt(1 / acp[t]) * x_t - pred_xstart) / np.sqrt(1 / acp[t] - 1)
        mse.append(mean_flat((eps_re - noise[t]) ** 2))
    vb = np.stack(vb, axis=1)
    prior = mean_flat(normal_kl(np.sqrt(acp[-1]) * x_start, np.log(1 - acp[-1]), 0.0, 0.0)) / LN2
    return vb.sum(axis=1) + prior, prior, vb, np.stack(mse, axis=1)


@pytest.mark.parametrize("fixed_large", [False, True])
def test_L6_reproduces_improved_diffusion_calc_bpd_loop(fixed_large):
    """L6/L1: improved-diffusion's numbers (calc_bpd_loop with clip_denoised=True, its linear schedule at
    T = 50, i.e. β scaled by 1000/T) come out of vlb_terms with clip=1 and, for FIXED_LARGE, the variance
    table np.r_[0, β̃_2, β_2..β_T] (it uses β̃_2 at t = 1); its vb columns run t = T−1 … 0 (0-based), ours
    t = 1 … T; its noise for 0-based k is our slot k. rtol 1e-10."""
    T = 50
    betas = np.linspace(1000 / T * 1e-4, 1000 / T * 0.02, T)
    s = Schedule.from_betas(betas)
    rng = np.random.default_rng(7)
    data = GaussianData(np.linspace(-0.5, 0.5, 12), 0.2)
    flat = vp_model(data, s)

    def model(x, t, y=None):
        return flat(x.reshape(x.shape[0], -1), t, y).reshape(x.shape)

    x0 = np.clip(np.round((rng.uniform(-1.1, 1.1, (5, 3, 2, 2)) + 1) * 127.5), 0, 255) / 127.5 - 1
    noise = rng.standard_normal((T, *x0.shape))
    total, prior, vb, mse = _improved_diffusion_bpd(model, x0, betas, noise, True, fixed_large)
    variance = np.r_[0.0, s.posterior_variance[2], s.betas[2:]] if fixed_large else "fixed_small"
    ours = losses.vlb_terms(model, x0, s, noise, variance=variance, clip=1.0)
    np.testing.assert_allclose(losses.nll_bits_per_dim(ours), total, rtol=1e-10)
    np.testing.assert_allclose(ours["prior"] / (12 * LN2), prior, rtol=1e-10)
    np.testing.assert_allclose(ours["terms"][:, ::-1] / (12 * LN2), vb, rtol=1e-10, atol=1e-15)
    np.testing.assert_allclose(ours["mse"][:, ::-1], mse, rtol=1e-10)


@pytest.mark.parametrize("name", ["linear", "cosine"])
@pytest.mark.parametrize("variance", ["beta_tilde", "beta"])
def test_L2_vlb_kl_term_is_weight_times_eps_error(name, variance):
    """L2 vs K1: for every t = 2..T of T = 1000, the KL term of vlb_terms (normal_kl of the P1 posterior
    and the model Gaussian) equals vlb_weight·‖ε − ε_θ‖² for random ε_θ, plus, for σ² = β, the variance
    constant ½(log β_t/β̃_t − 1 + β̃_t/β_t) per dimension (written out here). rtol 1e-9."""
    s = Schedule.named(name, 1000)
    rng = np.random.default_rng(1)
    shape = (3, 2, 2)
    x0 = rng.integers(0, 256, shape) / 127.5 - 1
    noise = rng.standard_normal((1000, *shape))
    eps_pred = rng.standard_normal((1000, *shape))

    def model(x, t, y=None):
        return eps_pred[t[0] - 1]

    vlb = losses.vlb_terms(model, x0, s, noise, variance=variance)
    t = np.arange(2, 1001)
    sq = np.sum((noise[1:] - eps_pred[1:]) ** 2, axis=(2, 3))      # (T−1, B)
    w = losses.vlb_weight(t, s, variance)
    b, bt = s.betas[t], s.posterior_variance[t]
    const = 0.0 if variance == "beta_tilde" else 0.5 * (np.log(b / bt) - 1 + bt / b) * 4
    np.testing.assert_allclose(vlb["terms"][:, 1:], (w[:, None] * sq + np.broadcast_to(const, t.shape)[:, None]).T,
                               rtol=1e-9)


@pytest.mark.parametrize("name", ["linear", "cosine"])
def test_L3_snr_weight_equals_L2_weight_for_beta_tilde(name):
    """L3 = L2 with σ² = β̃: ½(SNR(t−1)/SNR(t) − 1) = β_t²/(2β̃_tα_t(1−ᾱ_t)) for every t = 2..T (T = 1000),
    both also written out from the betas in plain Python floats here; rtol 1e-10. At t = 1 the SNR form is
    +inf (SNR(0) = ∞) and the L2 form is finite (σ_1² = β̃_2, the decoder's Gaussian approximation)."""
    s = Schedule.named(name, 1000)
    t = np.arange(2, 1001)
    np.testing.assert_allclose(losses.vlb_weight_snr(t, s), losses.vlb_weight(t, s, "beta_tilde"), rtol=1e-10)
    b = [float(v) for v in s.betas]
    ab, prod = [1.0], 1.0
    for v in b[1:]:
        prod *= 1.0 - v
        ab.append(prod)
    for tt in (2, 3, 500, 999, 1000):
        bt = (1 - ab[tt - 1]) / (1 - ab[tt]) * b[tt]
        l2 = b[tt] ** 2 / (2 * bt * (1 - b[tt]) * (1 - ab[tt]))
        l3 = 0.5 * ((ab[tt - 1] / (1 - ab[tt - 1])) / (ab[tt] / (1 - ab[tt])) - 1)
        assert float(losses.vlb_weight(tt, s)) == pytest.approx(l2, rel=1e-10)
        assert float(losses.vlb_weight_snr(tt, s)) == pytest.approx(l3, rel=1e-10)
    assert losses.vlb_weight_snr(1, s) == np.inf
    assert np.isfinite(losses.vlb_weight(1, s))
    bt2 = (1 - ab[1]) / (1 - ab[2]) * b[2]
    assert float(losses.vlb_weight(1, s)) == pytest.approx(b[1] ** 2 / (2 * bt2 * (1 - b[1]) * (1 - ab[1])), rel=1e-10)
    assert float(losses.vlb_weight(1, s, "beta")) == pytest.approx(1 / (2 * (1 - b[1])), rel=1e-12)


def test_L1_vlb_noise_generator_prediction_types_respacing_and_bits():
    """L1/L6 bookkeeping: a Generator gives the same terms as the array it would draw (slot t−1 at t); the
    x0- and v-prediction versions of one model give the same terms (P3); a respaced schedule calls the model
    with the parent's timesteps (timestep_map); bits/dim = total/(D ln 2) with D the data dims; mse/x0_mse
    are those of the exact model's ε̂ and x̂_0; clip=1 changes nothing when x̂_0 stays inside [−1, 1]."""
    rng = np.random.default_rng(3)
    parent = Schedule.named("cosine", 40)
    s = respace(parent, np.arange(1, 41, 4))
    data = GaussianData(np.zeros(6), 0.05)
    x0 = rng.integers(0, 256, (4, 6)) / 127.5 - 1
    seen = []

    def model(x, t, y=None):
        seen.append(int(t[0]))
        return vp_model(data, parent)(x, t, y)

    a = losses.vlb_terms(model, x0, s, np.random.default_rng(11))
    noise = np.random.default_rng(11).standard_normal((s.T, *x0.shape))
    b = losses.vlb_terms(model, x0, s, noise)
    assert seen[: s.T] == list(range(1, 41, 4))
    for key in ("prior", "terms", "total", "mse", "x0_mse"):
        np.testing.assert_array_equal(a[key], b[key])
    for pred in ("x0", "v_prediction"):
        c = losses.vlb_terms(vp_model(data, parent, pred), x0, s, noise, prediction=pred)
        np.testing.assert_allclose(c["terms"], b["terms"], rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(losses.nll_bits_per_dim(b), b["total"] / (6 * LN2), rtol=1e-14)
    assert b["dims"] == 6
    x_t = math.sqrt(s.alpha_bars[3]) * x0 + math.sqrt(1 - s.alpha_bars[3]) * noise[2]
    eps_hat = vp_model(data, parent)(x_t, np.full(4, 9))
    np.testing.assert_allclose(b["mse"][:, 2], np.mean((noise[2] - eps_hat) ** 2, axis=1), rtol=1e-12)
    x0_hat = (x_t - math.sqrt(1 - s.alpha_bars[3]) * eps_hat) / math.sqrt(s.alpha_bars[3])
    np.testing.assert_allclose(b["x0_mse"][:, 2], np.mean((x0 - x0_hat) ** 2, axis=1), rtol=1e-10)


def test_L1_L6_vlb_bad_arguments():
    """L1/L6: bad arguments raise ValueError/TypeError naming the argument and its valid range."""
    s = Schedule.named("linear", 10)
    x0 = -np.ones((2, 3))
    model = vp_model(GaussianData(np.zeros(3), 0.1), s)
    noise = np.zeros((10, 2, 3))
    with pytest.raises(TypeError, match="model must be callable"):
        losses.vlb_terms(None, x0, s, noise)
    with pytest.raises(TypeError, match="schedule must be a Schedule"):
        losses.vlb_terms(model, x0, "linear", noise)
    with pytest.raises(ValueError, match=r"noise must have shape \(10, 2, 3\)"):
        losses.vlb_terms(model, x0, s, np.zeros((9, 2, 3)))
    with pytest.raises(TypeError, match="noise must be an array"):
        losses.vlb_terms(model, x0, s, None)
    with pytest.raises(ValueError, match="x0 must lie on the grid of levels=256"):
        losses.vlb_terms(model, x0 + 0.001, s, noise)
    with pytest.raises(ValueError, match=r"x0 must lie in \[-1, 1\]"):
        losses.vlb_terms(model, x0 - 2, s, noise)
    with pytest.raises(ValueError, match="levels must be >= 2, got 1"):
        losses.vlb_terms(model, x0, s, noise, levels=1)
    with pytest.raises(ValueError, match="variance must be one of"):
        losses.vlb_terms(model, x0, s, noise, variance="large")
    with pytest.raises(ValueError, match=r"variance must be .* shape \(11,\)"):
        losses.vlb_terms(model, x0, s, noise, variance=np.ones(10))
    with pytest.raises(ValueError, match=r"variance table entries 1\.\.T must be > 0"):
        losses.vlb_terms(model, x0, s, noise, variance=np.r_[1.0, 0.0, np.ones(9)])
    with pytest.raises(ValueError, match="prediction must be one of"):
        losses.vlb_terms(model, x0, s, noise, prediction="score")
    with pytest.raises(ValueError, match=r"clip must be in \(0"):
        losses.vlb_terms(model, x0, s, noise, clip=0.0)
    with pytest.raises(ValueError, match="model output must have the shape of x0"):
        losses.vlb_terms(lambda x, t, y: x[:, :2], x0, s, noise)
    with pytest.raises(ValueError, match="x0 must have a leading batch axis"):
        losses.vlb_terms(model, 0.0, s, noise)
    with pytest.raises(TypeError, match="vlb must be the dict returned by vlb_terms"):
        losses.nll_bits_per_dim(np.zeros(3))
    with pytest.raises(ValueError, match=r"t must be in 1\.\.10"):
        losses.vlb_weight(0, s)
    with pytest.raises(ValueError, match=r"t must be in 1\.\.10"):
        losses.vlb_weight_snr(11, s)
    with pytest.raises(TypeError, match="t must hold integer timesteps"):
        losses.vlb_weight(1.5, s)
