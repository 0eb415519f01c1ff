"""The refinements R1–R5 (docs/formulas.md, section R) against derivations written out here: Min-SNR-γ weights
as one weight on ‖x_0 − x̂_0‖², the zero-terminal-SNR schedule's endpoints, guidance rescale and dynamic
thresholding on hand-computed cases and their limits, the v conversions on the exact Gaussian denoiser (X1),
and every product sampler started at ᾱ_T = 0."""

from __future__ import annotations

import numpy as np
import pytest
from independent import alpha_bar_indep

from ldmkit.reference import exact, losses, posterior, schedules
from ldmkit.reference import samplers as S
from ldmkit.reference.analytic import GaussianData, GaussianMixtureData, vp_model
from ldmkit.reference.schedules import Schedule, timesteps

T = 1000
LINEAR = Schedule.named("linear", T)
ZERO = Schedule.named("linear", T, zero_terminal_snr=True)
GAUSS = GaussianData([1.0, -0.5], [0.05, 0.3])
MIX = GaussianMixtureData([0.5, 0.3, 0.2], [[-2.0, 0.0], [1.5, 1.5], [1.0, -2.0]], [0.1, 0.05, 0.15])


def _snr(ab):
    return ab / (1.0 - ab)


def _per_example(sq):
    return sq.reshape(sq.shape[0], -1).sum(axis=1)


# ------------------------------------------------------------------------------------------------- R1
@pytest.mark.parametrize("sched", [LINEAR, ZERO], ids=["linear", "zero_snr"])
@pytest.mark.parametrize("gamma", [1.0, 5.0, 1e9])
def test_R1_min_snr_weights_are_one_weight_on_the_x0_error(sched, gamma):
    """R1: for the same x_t and one estimate x̂_0 written as ε̂ and v̂ (R5's definitions, here by hand), the
    ε-, v- and x0-losses times their Min-SNR-γ weights all equal min(SNR, γ)·‖x_0 − x̂_0‖², with SNR from ᾱ
    computed independently; γ → ∞ gives the unweighted ε-loss (ε weight 1, x0 weight SNR)."""
    rng = np.random.default_rng(0)
    t = np.array([1, 2, 30, 400, 900, 999])
    ab = alpha_bar_indep(sched.betas[1:-1])[t]  # β_T = 1 of the zero-SNR schedule is not needed (log 0)
    a, s = np.sqrt(ab)[:, None, None], np.sqrt(1 - ab)[:, None, None]
    x0, eps = rng.standard_normal((2, t.size, 3, 4))
    x0_hat = x0 + 0.3 * rng.standard_normal(x0.shape)
    x_t = a * x0 + s * eps
    eps_hat = (x_t - a * x0_hat) / s
    v, v_hat = a * eps - s * x0, a * eps_hat - s * x0_hat
    base = np.minimum(_snr(ab), gamma) * _per_example((x0 - x0_hat) ** 2)
    for pred, err in (("eps", eps - eps_hat), ("v", v - v_hat), ("x0", x0 - x0_hat)):
        w = losses.min_snr_weight(t, sched, gamma, pred)
        np.testing.assert_allclose(w * _per_example(err**2), base, rtol=1e-9, err_msg=pred)
    if gamma > 1e8:
        np.testing.assert_allclose(losses.min_snr_weight(t, sched, gamma, "eps"), 1.0, rtol=1e-12)
        np.testing.assert_allclose(losses.min_snr_weight(t, sched, gamma, "x0"), _snr(ab), rtol=1e-9)


def test_R1_weights_at_zero_snr_and_bad_gamma():
    """R1 at t = T of a zero-terminal-SNR schedule (SNR = 0): the x0 and v weights are min(0, γ) = 0, the ε
    weight its limit 1; γ must be > 0."""
    assert losses.min_snr_weight(T, ZERO, 5.0, "x0") == 0.0
    assert losses.min_snr_weight(T, ZERO, 5.0, "v") == 0.0
    assert losses.min_snr_weight(T, ZERO, 5.0, "eps") == 1.0
    with pytest.raises(ValueError, match="gamma"):
        losses.min_snr_weight(1, ZERO, 0.0)


# ------------------------------------------------------------------------------------------------- R2
@pytest.mark.parametrize("name", ["linear", "linear_ldm", "cosine", "scaled_linear", "su"])
@pytest.mark.parametrize("n", [1000, 10, 2])
def test_R2_zero_terminal_snr_schedule_endpoints_monotone_and_affine(name, n):
    """R2: Schedule.named(..., zero_terminal_snr=True) has ᾱ′_T = 0 and β′_T = 1 exactly, √ᾱ′_1 = √ᾱ_1 and
    β′_1 = β_1 exactly, ᾱ′ strictly decreasing and β′ in (0, 1]; and √ᾱ′_t = √ᾱ_1(√ᾱ_t − √ᾱ_T)/(√ᾱ_1 − √ᾱ_T)
    with the old ᾱ computed independently (a sum of logs)."""
    old, new = Schedule.named(name, n), Schedule.named(name, n, zero_terminal_snr=True)
    assert new.alpha_bars[n] == 0.0 and new.betas[n] == 1.0 and new.zero_terminal_snr
    assert new.sqrt_alpha_bars[1] == old.sqrt_alpha_bars[1] and new.betas[1] == old.betas[1]
    assert np.all(np.diff(new.alpha_bars) < 0) and np.all((new.betas[1:] > 0) & (new.betas[1:] <= 1))
    s = np.sqrt(alpha_bar_indep(old.betas[1:]))
    want = s[1] * (s - s[n]) / (s[1] - s[n])
    np.testing.assert_allclose(new.sqrt_alpha_bars[1:], want[1:], rtol=1e-10, atol=1e-15)
    assert new.snr[n] == 0.0 and np.isneginf(new.log_snr[n])


def test_R2_bad_input():
    """R2: one step cannot be rescaled; the flag must be a bool; ε-prediction is refused where ᾱ_t = 0, with
    the reason (x̂_0 divides by √ᾱ_T = 0)."""
    with pytest.raises(ValueError, match="at least 2"):
        Schedule.named("linear", 1, zero_terminal_snr=True)
    with pytest.raises(TypeError, match="zero_terminal_snr must be a bool"):
        Schedule.named("linear", 10, zero_terminal_snr="yes")
    with pytest.raises(ValueError, match=r"divides by zero.*use v- or x0-prediction"):
        posterior.x0_eps_from_output(np.zeros((1, 2)), np.ones((1, 2)), T, ZERO, "eps")
    for name in S.SAMPLERS:
        with pytest.raises(ValueError, match="alpha_bar"):
            S.sample(vp_model(GAUSS, ZERO, "eps"), np.zeros((1, 2)), ZERO, name, 5, noise=np.zeros((5, 1, 2)))


# -------------------------------------------------------------------------------- sampling from ᾱ_T = 0
def test_R2_R5_first_steps_from_zero_snr_by_hand():
    """R2/R5: from t = T with ᾱ_T = 0 the exact v-model predicts v̂ = −E[x_0] (x̂_0 = −v̂, ε̂ = x_T: R5). DDIM's
    first step is then x = √ᾱ′ E[x_0] + √(1−ᾱ′) x_T (by hand); Heun's first step is that same step (the
    limit of Euler's, its own having none: tests/../samplers.py) and DPM-Solver++(2M)'s too (h = ∞); and
    2M's second step is first order (r = ∞): DDIM's second step."""
    rng = np.random.default_rng(1)
    x_T = rng.standard_normal((4, 2))
    ts = timesteps(5, T, "trailing").tolist()
    model = vp_model(GAUSS, ZERO, "v")
    ab1, ab2 = ZERO.alpha_bars[ts[1]], ZERO.alpha_bars[ts[2]]
    first = np.sqrt(ab1) * GAUSS.mean + np.sqrt(1 - ab1) * x_T
    ddim = S.ddim_sample(model, x_T, ZERO, ts, prediction="v", return_trajectory=True)[1]
    heun = S.heun_sample(model, x_T, ZERO, ts, "v", return_trajectory=True)[1]
    dpm = S.dpmpp_2m_sample(model, x_T, ZERO, ts, "v", return_trajectory=True)[1]
    for traj in (ddim, heun, dpm):
        np.testing.assert_allclose(traj[1], first, rtol=1e-12)
    # DDIM's second step by hand from the X1 denoiser at t = ts[1]
    a1, s1 = np.sqrt(ab1), np.sqrt(1 - ab1)
    x0_hat = GAUSS.x0_mean(first, a1, s1)
    second = np.sqrt(ab2) * x0_hat + np.sqrt(1 - ab2) * (first - a1 * x0_hat) / s1
    np.testing.assert_allclose(ddim[2], second, rtol=1e-10)
    np.testing.assert_allclose(dpm[2], second, rtol=1e-10)
    assert not np.allclose(dpm[3], ddim[3], rtol=1e-6)  # from the third step on, 2M is second order again


@pytest.mark.parametrize("name", list(S.SAMPLERS))
def test_R2_every_sampler_from_zero_snr_reaches_the_data_law(name):
    """R2/R5: each product sampler, run by ``samplers.sample`` from t = T of the zero-terminal-SNR schedule
    with the exact v-model of Gaussian data (X1), has an exact output law (``exact.exact_output_law``: the
    samplers are affine here) whose W2 to the data law falls with the steps (10, 50, 200) to below 0.025,
    within 10% (+0.002) of the same sampler on the plain linear schedule; the x0-model gives the same samples."""
    def run(sched, pred, steps):
        def fn(x_T, noise):
            return S.sample(vp_model(GAUSS, sched, pred), x_T, sched, name, steps, noise=noise, prediction=pred)
        return fn

    w2 = {}
    for sched in (LINEAR, ZERO):
        for steps in (10, 50, 200):
            mean, var = exact.exact_output_law(run(sched, "v", steps), 2, steps)
            w2[sched is ZERO, steps] = exact.gaussian_w2(mean, var, GAUSS.mean, GAUSS.var)
    assert w2[True, 10] > w2[True, 50] > w2[True, 200] and w2[True, 200] < 0.025, w2
    for steps in (10, 50, 200):
        assert abs(w2[True, steps] - w2[False, steps]) <= 0.1 * w2[False, steps] + 2e-3, w2
    rng = np.random.default_rng(2)
    x_T, noise = rng.standard_normal((3, 2)), rng.standard_normal((10, 3, 2))
    np.testing.assert_allclose(run(ZERO, "x0", 10)(x_T, noise), run(ZERO, "v", 10)(x_T, noise), rtol=1e-9,
                               atol=1e-12)


# ------------------------------------------------------------------------------------------------- R3
def test_R3_rescale_guidance_hand_cases_and_limits():
    """R3 on hand-computed cases: x_cond = (1, −1, 1, −1) (std 1), x_cfg = 3·x_cond + 2 (std 3) → x_rescaled =
    x_cfg/3, and φ = 0.7 gives 0.7·x_cfg/3 + 0.3·x_cfg; φ = 0 returns x_cfg exactly, φ = 1 x_rescaled; a
    constant x_cfg (std 0) is left as it is; torch tensors give the same numbers."""
    cond = np.array([[1.0, -1.0, 1.0, -1.0], [0.5, 0.5, 0.5, -0.5]])
    guided = np.array([3 * cond[0] + 2, [4.0, 4.0, 4.0, 4.0]])
    want = np.array([0.7 * guided[0] / 3 + 0.3 * guided[0], guided[1]])
    np.testing.assert_allclose(S.rescale_guidance(guided, cond, 0.7), want, rtol=1e-15)
    np.testing.assert_array_equal(S.rescale_guidance(guided, cond, 0.0), guided)
    np.testing.assert_allclose(S.rescale_guidance(guided, cond, 1.0)[0], guided[0] / 3, rtol=1e-15)
    torch = pytest.importorskip("torch")
    got = S.rescale_guidance(torch.tensor(guided), torch.tensor(cond), 0.7)
    np.testing.assert_allclose(got.numpy(), want, rtol=1e-15)


def test_R3_cfg_rescales_x0_whatever_the_prediction():
    """R3 inside A9's guidance: for the exact class-conditional mixture model (X2) the guided call with
    rescale φ returns the output whose x̂_0 is R3 applied to the guided and conditional x̂_0 (computed here
    from the mixture's own posterior means), the same for ε-, v- and x0-models; w = 1 makes R3 the identity."""
    rng = np.random.default_rng(3)
    x, y, t = rng.standard_normal((5, 2)), np.array([0, 1, 2, 0, 1]), 300
    a, s = LINEAR.sqrt_alpha_bars[t], LINEAR.sqrt_one_minus_alpha_bars[t]
    cond = np.stack([MIX.component(k).x0_mean(x[i:i + 1], a, s)[0] for i, k in enumerate(y)])
    uncond = MIX.x0_mean(x, a, s)
    g = uncond + 4.0 * (cond - uncond)
    sd = lambda z: z.std(axis=1, keepdims=True)  # noqa: E731
    want = 0.6 * g * sd(cond) / sd(g) + 0.4 * g
    for pred in ("eps", "v", "x0"):
        out = S.cfg(vp_model(MIX, LINEAR, pred), 4.0, -1, 0.6, LINEAR, pred)(x, np.full(5, t), y)
        got, _ = posterior.x0_eps_from_output(out, x, t, LINEAR, pred)
        np.testing.assert_allclose(got, want, rtol=1e-9, err_msg=pred)
        one = S.cfg(vp_model(MIX, LINEAR, pred), 1.0, -1, 0.6, LINEAR, pred)(x, np.full(5, t), y)
        np.testing.assert_allclose(one, vp_model(MIX, LINEAR, pred)(x, t, y), rtol=1e-9, atol=1e-12)


def test_R3_sampling_with_rescale_is_prediction_invariant_and_checked():
    """R3 through ``samplers.sample``: ε-, v- and x0-models of the same mixture give the same samples with
    guidance 3 and rescale 0.7 (the rescale acts on x̂_0), and φ = 0 gives plain guidance exactly; φ outside
    [0, 1], for an unconditional model, or with a respaced schedule is refused."""
    rng = np.random.default_rng(4)
    x_T, y = rng.standard_normal((6, 2)), np.array([0, 1, 2, 0, 1, 2])
    outs = [S.sample(vp_model(MIX, LINEAR, p), x_T, LINEAR, "dpmpp2m", 10, prediction=p, y=y, guidance=3.0,
                     null_class=-1, guidance_rescale=0.7) for p in ("eps", "v", "x0")]
    for out in outs[1:]:
        np.testing.assert_allclose(out, outs[0], rtol=1e-8, atol=1e-10)
    plain = S.sample(vp_model(MIX, LINEAR), x_T, LINEAR, "ddim", 10, y=y, guidance=3.0, null_class=-1)
    zero = S.sample(vp_model(MIX, LINEAR), x_T, LINEAR, "ddim", 10, y=y, guidance=3.0, null_class=-1,
                    guidance_rescale=0.0)
    np.testing.assert_array_equal(zero, plain)
    for bad in (-0.1, 1.5, float("nan")):
        with pytest.raises(ValueError, match=r"guidance rescale must be in \[0, 1\]"):
            S.check_sampling(LINEAR, "ddim", 10, guidance=3.0, null_class=-1, guidance_rescale=bad)
    with pytest.raises(ValueError, match="unconditional"):
        S.check_sampling(LINEAR, "ddim", 10, guidance_rescale=0.5)
    with pytest.raises(ValueError, match="respaced"):
        S.cfg(vp_model(MIX, LINEAR), 3.0, -1, 0.5, schedules.respace(LINEAR, timesteps(10, T)))


# ------------------------------------------------------------------------------------------------- R4
def test_R4_dynamic_threshold_hand_cases_and_limits():
    """R4: |x| = (0.5, 2, 4, 1): p = 100 gives s = 4, x/4 (no clipping: only scaled into [−1, 1]); p = 50
    gives the median s = 1.5 (linear interpolation), clip to ±1.5 then /1.5; an example inside [−1, 1] is
    unchanged at every p (s floored at 1)."""
    x = np.array([[0.5, -2.0, 4.0, 1.0], [0.2, -0.9, 1.0, 0.0]])
    np.testing.assert_allclose(posterior.dynamic_threshold(x, 100.0)[0], [0.125, -0.5, 1.0, 0.25], rtol=1e-15)
    np.testing.assert_allclose(posterior.dynamic_threshold(x, 50.0)[0], [0.5 / 1.5, -1.0, 1.0, 1.0 / 1.5],
                               rtol=1e-15)
    for p in (1.0, 50.0, 99.5, 100.0):
        np.testing.assert_array_equal(posterior.dynamic_threshold(x, p)[1], x[1])
    big = np.random.default_rng(5).standard_normal((3, 2, 5, 5)) * 4
    out = posterior.dynamic_threshold(big, 100.0)
    np.testing.assert_allclose(np.abs(out).reshape(3, -1).max(axis=1), 1.0, rtol=1e-15)
    np.testing.assert_allclose(out * np.abs(big).reshape(3, -1).max(axis=1)[:, None, None, None], big, rtol=1e-14)
    for bad in (0.0, 100.5):
        with pytest.raises(ValueError, match="percentile"):
            posterior.dynamic_threshold(x, bad)


# ------------------------------------------------------------------------------------------------- R5
@pytest.mark.parametrize("sched", [LINEAR, ZERO], ids=["linear", "zero_snr"])
def test_R5_conversions_exact_on_the_gaussian_denoiser_X1(sched):
    """R5 on X1: the exact x̂_0 = E[x_0 given x_t] and ε* of Gaussian data, v* = √ᾱ ε* − √(1−ᾱ) x̂_0 (by hand):
    x̂_0 = √ᾱ x_t − √(1−ᾱ) v*, ε* = √(1−ᾱ) x_t + √ᾱ v*, and back, at every t (ᾱ_T = 0 included for the v → x̂_0,
    ε forms, where x̂_0 = −v* and ε* = x_t); the v-model outputs v*."""
    rng = np.random.default_rng(6)
    for t in (1, 2, 250, 999, 1000):
        a, s = sched.sqrt_alpha_bars[t], sched.sqrt_one_minus_alpha_bars[t]
        x_t = a * GAUSS.mean + np.sqrt(a**2 * GAUSS.var + s**2) * rng.standard_normal((4, 2))
        x0_star, eps_star = GAUSS.x0_mean(x_t, a, s), GAUSS.eps(x_t, a, s)
        v_star = a * eps_star - s * x0_star
        np.testing.assert_allclose(vp_model(GAUSS, sched, "v")(x_t, t), v_star, rtol=1e-10, atol=1e-14)
        np.testing.assert_allclose(posterior.x0_from_v(x_t, t, v_star, sched), x0_star, rtol=1e-10, atol=1e-14)
        np.testing.assert_allclose(posterior.eps_from_v(x_t, t, v_star, sched), eps_star, rtol=1e-10, atol=1e-14)
        np.testing.assert_allclose(posterior.v_from_x0(x_t, t, x0_star, sched), v_star, rtol=1e-9, atol=1e-12)
        if a > 0:
            np.testing.assert_allclose(posterior.v_from_eps(x_t, t, eps_star, sched), v_star, rtol=1e-9, atol=1e-12)
        if sched.alpha_bars[t] == 0:
            np.testing.assert_array_equal(posterior.x0_from_v(x_t, t, v_star, sched), -v_star)
            np.testing.assert_array_equal(posterior.eps_from_v(x_t, t, v_star, sched), x_t)


@pytest.mark.parametrize("t", [1, 10, 500, 1000])
def test_R5_error_relations(t):
    """R5: for one x_t and any v̂, with ε̂ and x̂_0 converted from it, ‖v − v̂‖² = (1 + 1/SNR)‖ε − ε̂‖² =
    (SNR + 1)‖x_0 − x̂_0‖² (SNR from an independent ᾱ), the same relations as L5's weights."""
    rng = np.random.default_rng(7)
    ab = alpha_bar_indep(LINEAR.betas[1:])[t]
    snr = _snr(ab)
    x0, eps = rng.standard_normal((2, 3, 6))
    x_t = np.sqrt(ab) * x0 + np.sqrt(1 - ab) * eps
    v = np.sqrt(ab) * eps - np.sqrt(1 - ab) * x0
    v_hat = v + rng.standard_normal(v.shape)
    eps_hat = posterior.eps_from_v(x_t, t, v_hat, LINEAR)
    x0_hat = posterior.x0_from_v(x_t, t, v_hat, LINEAR)
    ev, ee, ex = (_per_example((u - w) ** 2) for u, w in ((v, v_hat), (eps, eps_hat), (x0, x0_hat)))
    np.testing.assert_allclose(ev, (1 + 1 / snr) * ee, rtol=1e-9)
    np.testing.assert_allclose(ev, (snr + 1) * ex, rtol=1e-9)
    np.testing.assert_allclose(losses.prediction_loss_weight(t, LINEAR, "v"), 1 + 1 / snr, rtol=1e-9)
