"""Unit tests of reference/samplers.py: each step against its formula written out by hand from the betas,
the equivalences between samplers (A1 = A2 at η = 1, A3 = A1, A5 Euler = DDIM η = 0), published algorithm
forms (EDM's Heun, k-diffusion's DPM-Solver++(2M)), classifier-free guidance (A9) against finite
differences of the mixture's log-responsibilities, the noise conventions, and argument validation.

The statistical and convergence tests (samplers reproduce the data distribution) are in
tests/test_samplers_distribution.py.
"""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ldmkit.reference import samplers as S
from ldmkit.reference.analytic import GaussianData, GaussianMixtureData, vp_model
from ldmkit.reference.posterior import random_walk_posterior, x0_eps_from_output
from ldmkit.reference.schedules import (
    Schedule,
    linear_betas,
    rescale_zero_terminal_snr,
    respace,
    su_from_ddpm,
    timesteps,
)

T = 1000
SCHED = Schedule.named("linear", T)
GAUSS = GaussianData([1.0, -0.5], [0.05, 0.3])
MIX = GaussianMixtureData([0.5, 0.3, 0.2], [[-2.0, 0.0], [1.5, 1.5], [1.0, -2.0]], [0.1, 0.05, 0.15])


def tables(betas):
    """DDPM tables written out independently of Schedule: (β, α, ᾱ, ᾱ_prev), each indexed by math t."""
    b = np.concatenate([[0.0], np.asarray(betas, dtype=np.float64)])
    a = 1.0 - b
    ab = np.cumprod(a)
    return b, a, ab, np.concatenate([[1.0], ab[:-1]])


B_, A_, AB_, ABP_ = tables(linear_betas(T))


def exact_eps(x, t, schedule=SCHED, data=MIX):
    return vp_model(data, schedule)(x, t)


class Recorder:
    """A model wrapper that records the timesteps (and counts the calls) it is given."""

    def __init__(self, model):
        self.model, self.calls = model, []

    def __call__(self, x, t, y=None):
        assert isinstance(t, np.ndarray) and t.dtype == np.int64 and t.shape == (x.shape[0],)
        self.calls.append(t.copy())
        return self.model(x, t, y)


def close(a, b, tol=1e-12):
    np.testing.assert_allclose(a, b, rtol=tol, atol=tol)


# ------------------------------------------------------------------------------------------------------
# A1: the DDPM step
# ------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("variance", ["beta_tilde", "beta", "fixed_small", "fixed_large"])
def test_ddpm_step_A1_P4_matches_hand_formula(variance):
    """A1/P4: x_{t−1} = (x_t − β_t/√(1−ᾱ_t)·ε)/√α_t + σ_t z, σ_t² = β̃_t or β_t, z = 0 at t = 1 (to 1e-12)."""
    rng = np.random.default_rng(0)
    t = np.array([1, 2, 3, 17, 500, 999, 1000])
    x, eps, z = (rng.standard_normal((t.size, 2)) for _ in range(3))
    out = S.ddpm_step(eps, x, t, SCHED, variance, z)
    mean = (x - (B_[t] / np.sqrt(1 - AB_[t]))[:, None] * eps) / np.sqrt(A_[t])[:, None]
    var = (1 - ABP_[t]) / (1 - AB_[t]) * B_[t] if variance in ("beta_tilde", "fixed_small") else B_[t]
    var = np.where(t > 1, var, 0.0)
    close(out, mean + np.sqrt(var)[:, None] * z)


def test_ddpm_step_A1_last_step_returns_x0_without_noise():
    """A1: at t = 1 the step adds no noise (noise may be None) and μ̃_1(x̂_0, x_1) = x̂_0 since ᾱ_0 = 1."""
    rng = np.random.default_rng(1)
    x = rng.standard_normal((5, 2))
    out = exact_eps(x, 1)
    x0, _ = x0_eps_from_output(out, x, 1, SCHED)
    for variance in ("beta_tilde", "beta"):
        close(S.ddpm_step(out, x, 1, SCHED, variance, None), x0)
        close(S.ddpm_step(out, x, 1, SCHED, variance, np.random.default_rng(0)), x0)


def test_ddpm_step_A1_nchw_per_example_t():
    """A1 on NCHW images with per-example t (B,) equals the step taken one example at a time."""
    rng = np.random.default_rng(2)
    x, out, z = (rng.standard_normal((3, 2, 4, 4)) for _ in range(3))
    t = np.array([1, 10, 900])
    batched = S.ddpm_step(out, x, t, SCHED, "beta", z, prediction="v")
    for i in range(3):
        close(batched[i], S.ddpm_step(out[i:i + 1], x[i:i + 1], t[i], SCHED, "beta", z[i:i + 1], "v")[0])


# ------------------------------------------------------------------------------------------------------
# A2: the DDIM step
# ------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("eta", [0.0, 0.5, 1.0])
def test_ddim_step_A2_P7_matches_hand_formula(eta):
    """A2/P6/P7: x_prev = √ᾱ_prev x̂_0 + √(1−ᾱ_prev−σ²) ε̂ + σ z, σ = η√((1−ᾱ_prev)/(1−ᾱ_t))√(1−ᾱ_t/ᾱ_prev)."""
    rng = np.random.default_rng(3)
    t = np.array([2, 50, 400, 1000, 1000])
    tp = np.array([1, 30, 1, 999, 0])
    x, eps, z = (rng.standard_normal((t.size, 2)) for _ in range(3))
    out = S.ddim_step(eps, x, t, tp, SCHED, eta, z)
    x0 = (x - np.sqrt(1 - AB_[t])[:, None] * eps) / np.sqrt(AB_[t])[:, None]
    sig = eta * np.sqrt((1 - AB_[tp]) / (1 - AB_[t])) * np.sqrt(1 - AB_[t] / AB_[tp])
    expect = np.sqrt(AB_[tp])[:, None] * x0 + np.sqrt(1 - AB_[tp] - sig**2)[:, None] * eps + sig[:, None] * z
    close(out, expect, 1e-11)


@pytest.mark.parametrize("prediction", ["eps", "x0", "v"])
@pytest.mark.parametrize("eta", [0.0, 1.0, 2.5])
def test_ddim_step_A2_clean_step_returns_x0_exactly(prediction, eta):
    """A2: t_prev = 0 is the clean step (ᾱ_0 = 1, σ = 0 for any η): it returns x̂_0 bit for bit."""
    rng = np.random.default_rng(4)
    x = rng.standard_normal((6, 2))
    t = np.array([1, 2, 10, 100, 700, 1000])
    out = vp_model(MIX, SCHED, prediction)(x, t)
    x0, _ = x0_eps_from_output(out, x, t, SCHED, prediction)
    np.testing.assert_array_equal(S.ddim_step(out, x, t, 0, SCHED, eta, None, prediction), x0)


def test_ddim_eta1_one_step_back_equals_ddpm_beta_tilde_A2_P7():
    """P7: DDIM with η = 1 and t_prev = t − 1 is DDPM with β̃_t, at every t = 1..T (to 1e-12)."""
    rng = np.random.default_rng(5)
    t = np.arange(1, T + 1)
    x, out, z = (rng.standard_normal((T, 2)) for _ in range(3))
    close(S.ddim_step(out, x, t, t - 1, SCHED, 1.0, z), S.ddpm_step(out, x, t, SCHED, "beta_tilde", z))


@settings(max_examples=40, deadline=None)
@given(T=st.integers(2, 400), lo=st.floats(1e-5, 1e-2), hi=st.floats(0.011, 0.6), eta=st.floats(0.0, 1.0),
       data=st.data())
def test_ddim_step_identities_on_random_schedules_A2_P7(T, lo, hi, eta, data):
    """A2/P7 on random linear schedules: η = 1 with t_prev = t − 1 is the DDPM β̃ step (to 1e-10); any η to
    t_prev = 0 returns x̂_0 exactly; and the step keeps q(x_prev given x_0) when x̂_0 is the true x_0
    (one-point data): x_t = √ᾱ_t x_0 + √(1−ᾱ_t)ε maps to √ᾱ_prev x_0 + √(1−ᾱ_prev−σ²)ε + σz (P6)."""
    sched = Schedule.from_betas(linear_betas(T, lo, hi))
    t = data.draw(st.integers(1, T))
    tp = data.draw(st.integers(0, t - 1))
    rng = np.random.default_rng(t)
    x0, eps, z = (rng.standard_normal((3, 2)) for _ in range(3))
    ab = sched.alpha_bars
    x = np.sqrt(ab[t]) * x0 + np.sqrt(1 - ab[t]) * eps
    close(S.ddim_step(eps, x, t, t - 1, sched, 1.0, z), S.ddpm_step(eps, x, t, sched, "beta_tilde", z), 1e-10)
    np.testing.assert_array_equal(S.ddim_step(x0, x, t, 0, sched, eta, None, "x0"), x0)
    sig = eta * np.sqrt((1 - ab[tp]) / (1 - ab[t]) * (1 - ab[t] / ab[tp]))
    expect = np.sqrt(ab[tp]) * x0 + np.sqrt(1 - ab[tp] - sig**2) * eps + sig * z
    close(S.ddim_step(x0, x, t, tp, sched, eta, z, "x0"), expect, 1e-8)


def test_ddim_sample_eta1_full_schedule_equals_ddpm_sample_A2_P7():
    """A2 = A1: ddim_sample with η = 1 on every timestep of a schedule equals ddpm_sample (β̃) on the
    same noise array, trajectory and all (to 1e-12)."""
    sched = Schedule.from_betas(linear_betas(60, 1e-3, 0.1))
    model = vp_model(MIX, sched)
    rng = np.random.default_rng(6)
    x_T, noise = rng.standard_normal((8, 2)), rng.standard_normal((60, 8, 2))
    a, ta = S.ddim_sample(model, x_T, sched, np.arange(60, 0, -1), 1.0, noise, return_trajectory=True)
    b, tb = S.ddpm_sample(model, x_T, sched, "beta_tilde", noise, return_trajectory=True)
    close(ta, tb)
    close(a, b)


# ------------------------------------------------------------------------------------------------------
# loops: prediction types, respacing, zero terminal SNR, A5 identities, published forms
# ------------------------------------------------------------------------------------------------------

SUB100 = respace(SCHED, timesteps(100, T))
TS20 = timesteps(20, T)
LOOPS = {
    "ddpm": lambda m, x, z, p: S.ddpm_sample(m, x, SUB100, "beta", z, p, return_trajectory=True),
    "ddim": lambda m, x, z, p: S.ddim_sample(m, x, SCHED, timesteps(50, T), 0.5, z[:50], p,
                                             return_trajectory=True),
    "euler": lambda m, x, z, p: S.euler_sample(m, x, SCHED, TS20, p, return_trajectory=True),
    "heun": lambda m, x, z, p: S.heun_sample(m, x, SCHED, TS20, p, return_trajectory=True),
    "dpmpp_2m": lambda m, x, z, p: S.dpmpp_2m_sample(m, x, SCHED, TS20, p, return_trajectory=True),
    "su": lambda m, x, z, p: S.su_sample(m, x, SUB100, z, "beta_tilde", p, return_trajectory=True),
}


@pytest.mark.parametrize("name", sorted(LOOPS))
def test_eps_x0_v_outputs_give_identical_trajectories_P3(name):
    """P3: the exact mixture denoiser as an ε-, x0- or v-model (and the diffusers aliases) gives the same
    trajectory on the same noise, for every discrete loop (to 1e-9; the respaced DDPM model is the
    parent's, called at timestep_map[t])."""
    rng = np.random.default_rng(7)
    x_T, noise = rng.standard_normal((6, 2)), rng.standard_normal((100, 6, 2))
    sched = SCHED
    ref = None
    for prediction in ("eps", "x0", "v", "epsilon", "sample", "v_prediction"):
        x, traj = LOOPS[name](vp_model(MIX, sched, prediction), x_T, noise, prediction)
        assert traj.shape[1:] == x_T.shape and np.array_equal(traj[0], x_T) and np.array_equal(traj[-1], x)
        if ref is None:
            ref = traj
        np.testing.assert_allclose(traj, ref, rtol=0, atol=1e-9)


def test_respaced_ddpm_calls_model_with_parent_timesteps_S8():
    """S8: DDPM on a respaced schedule runs t = N..1 of the subsequence and calls the model with the
    parent's timesteps timestep_map[t] (int64, shape (B,))."""
    ts = timesteps(10, T)
    model = Recorder(vp_model(GAUSS, SCHED))
    S.ddpm_sample(model, np.zeros((3, 2)), respace(SCHED, ts), noise=np.random.default_rng(0))
    assert [int(c[0]) for c in model.calls] == ts.tolist()
    assert all(np.all(c == c[0]) for c in model.calls)


def test_zero_terminal_snr_needs_v_prediction():
    """docs/anchors.md: on a zero-terminal-SNR schedule ε-prediction divides by √ᾱ_T = 0 (ValueError at t = T),
    while v-prediction samples; with x_T at the exact marginal mean (0) and no noise, DDPM, DDIM, Heun and
    DPM-Solver++ return the Gaussian data mean exactly (the samplers propagate the mean exactly). Heun refuses
    ε-prediction there too (tests/test_refinements.py holds the first steps at σ = ∞ to their formulas)."""
    zt = Schedule.from_betas(rescale_zero_terminal_snr(linear_betas(T)))
    assert zt.alpha_bars[T] == 0.0
    x = np.zeros((2, 2))
    ts = timesteps(50, T, "trailing")
    assert ts[0] == T
    with pytest.raises(ValueError, match="alpha_bar"):
        S.ddim_sample(vp_model(GAUSS, zt, "eps"), x, zt, ts)
    with pytest.raises(ValueError, match="alpha_bar"):
        S.ddpm_sample(vp_model(GAUSS, zt, "eps"), x, zt, noise=np.zeros((T, 2, 2)))
    v = vp_model(GAUSS, zt, "v")
    sub = respace(zt, ts)
    zeros = np.zeros((50, 2, 2))
    for out in (S.ddim_sample(v, x, zt, ts, prediction="v"), S.ddim_sample(v, x, zt, ts, 1.0, zeros, "v"),
                S.dpmpp_2m_sample(v, x, zt, ts, "v"), S.ddpm_sample(v, x, sub, "beta", zeros, "v"),
                S.heun_sample(v, x, zt, ts, "v")):
        close(out, np.broadcast_to(GAUSS.mean, x.shape), 1e-9)
    with pytest.raises(ValueError, match="alpha_bar"):
        S.heun_sample(vp_model(GAUSS, zt, "eps"), x, zt, ts)
    with pytest.raises(ValueError, match="zero-terminal-SNR"):
        S.su_sample(v, x, zt, None, "zero", "v")


def test_discrete_samplers_map_marginal_mean_to_data_mean_X1():
    """X1: with Gaussian data and x_T at the exact marginal mean √ᾱ_T m, zero noise gives exactly m for
    every discrete sampler: E[x̂_0] = m and E[ε̂] = 0 at each step (a check of each step's x̂_0 weight)."""
    ts = timesteps(30, T)
    model = vp_model(GAUSS, SCHED)
    x_full = np.broadcast_to(SCHED.sqrt_alpha_bars[T] * GAUSS.mean, (2, 2))
    x_sub = np.broadcast_to(SCHED.sqrt_alpha_bars[ts[0]] * GAUSS.mean, (2, 2))
    zeros = np.zeros((T, 2, 2))
    outs = [S.ddpm_sample(model, x_full, SCHED, "beta", zeros), S.su_sample(model, x_full, SCHED, zeros),
            S.ddpm_sample(model, x_sub, respace(SCHED, ts), "beta_tilde", zeros[:30]),
            S.ddim_sample(model, x_sub, SCHED, ts, 0.7, zeros[:30]), S.heun_sample(model, x_sub, SCHED, ts),
            S.dpmpp_2m_sample(model, x_sub, SCHED, ts)]
    for out in outs:
        close(out, np.broadcast_to(GAUSS.mean, (2, 2)), 1e-10)


@pytest.mark.parametrize("data", [GAUSS, MIX], ids=["gauss", "mixture"])
def test_euler_on_sigma_ode_is_ddim_eta0_A5(data):
    """A5 ("DDIM as its discretisation"): Euler on dx̃/dσ = ε̂ (σ = √((1−ᾱ)/ᾱ), x̃ = x/√ᾱ) is DDIM with
    η = 0, step for step (to 1e-12); a one-timestep Heun run is a single Euler step."""
    rng = np.random.default_rng(8)
    model = vp_model(data, SCHED)
    x_T = rng.standard_normal((50, 2))
    ts = timesteps(25, T, "trailing")
    _, te = S.euler_sample(model, x_T, SCHED, ts, return_trajectory=True)
    _, td = S.ddim_sample(model, x_T, SCHED, ts, return_trajectory=True)
    np.testing.assert_allclose(te, td, rtol=1e-12, atol=1e-12)
    close(S.heun_sample(model, x_T, SCHED, [600]), S.ddim_sample(model, x_T, SCHED, [600]))


def test_heun_calls_model_only_at_grid_timesteps_A5():
    """A5 (EDM): Heun with N timesteps makes 2N − 1 model calls, each at a grid timestep (the last step
    to σ = 0 is Euler)."""
    ts = timesteps(7, T)
    model = Recorder(vp_model(GAUSS, SCHED))
    S.heun_sample(model, np.ones((2, 2)), SCHED, ts)
    called = [int(c[0]) for c in model.calls]
    assert len(called) == 2 * ts.size - 1
    expected = [int(ts[0])] + [int(t) for t in ts[1:] for _ in range(2)]
    assert called == expected


def _sigma_denoiser(data, schedule):
    """D(x̃; σ_t) = x̂_0 on the σ scale (x̃ = x/√ᾱ_t), indexed by the grid timestep."""
    def denoise(x_tilde, t):
        a = schedule.sqrt_alpha_bars[t]
        return data.x0_mean(x_tilde * a, a, schedule.sqrt_one_minus_alpha_bars[t])
    return denoise


def test_heun_matches_edm_algorithm_A5():
    """A5: heun_sample equals EDM's Algorithm 1 (no churn) written on x̃ with d = (x̃ − D(x̃; σ))/σ."""
    ts = timesteps(12, T, "leading")
    sig = np.append(np.sqrt(1 / AB_[ts] - 1), 0.0)
    D = _sigma_denoiser(MIX, SCHED)
    x_T = np.random.default_rng(9).standard_normal((40, 2))
    x = x_T / np.sqrt(AB_[ts[0]])
    for i in range(ts.size):
        d = (x - D(x, ts[i])) / sig[i]
        x_next = x + (sig[i + 1] - sig[i]) * d
        if sig[i + 1] != 0:
            d2 = (x_next - D(x_next, ts[i + 1])) / sig[i + 1]
            x_next = x + (sig[i + 1] - sig[i]) * (0.5 * d + 0.5 * d2)
        x = x_next
    close(S.heun_sample(vp_model(MIX, SCHED), x_T, SCHED, ts), x, 1e-10)


def test_dpmpp_2m_matches_k_diffusion_algorithm_A5():
    """A5: dpmpp_2m_sample equals k-diffusion's sample_dpmpp_2m, written on x̃ = x/√ᾱ with σ grid
    √(1/ᾱ − 1) then 0 and t_fn(σ) = −log σ (the VP rewriting is independent of this form)."""
    ts = timesteps(15, T)
    sigmas = np.append(np.sqrt(1 / AB_[ts] - 1), 0.0)
    D = _sigma_denoiser(MIX, SCHED)
    x_T = np.random.default_rng(10).standard_normal((40, 2))
    x = x_T / np.sqrt(AB_[ts[0]])
    old = None
    for i in range(ts.size):
        denoised = D(x, ts[i])
        t, t_next = -np.log(sigmas[i]), (-np.log(sigmas[i + 1]) if sigmas[i + 1] > 0 else np.inf)
        h = t_next - t
        if old is None or sigmas[i + 1] == 0:
            x = (sigmas[i + 1] / sigmas[i]) * x - np.expm1(-h) * denoised
        else:
            r = (t - (-np.log(sigmas[i - 1]))) / h
            x = (sigmas[i + 1] / sigmas[i]) * x - np.expm1(-h) * ((1 + 1 / (2 * r)) * denoised - old / (2 * r))
        old = denoised
    close(S.dpmpp_2m_sample(vp_model(MIX, SCHED), x_T, SCHED, ts), x, 1e-10)


# ------------------------------------------------------------------------------------------------------
# A3 (Su), A4 (Inouye)
# ------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("sigma,variance", [("beta", "beta"), ("beta_tilde", "beta_tilde"),
                                            ("fixed_large", "beta")])
def test_su_sample_equals_ddpm_sample_A3(sigma, variance):
    """A3 = A1: Su's random sampler in his notation (α_t, β_t = √ of DDPM's; σ_t = β_t or β̄_{t−1}β_t/β̄_t)
    equals ddpm_sample with σ_t² = β_t or β̃_t on the same noise (Su's schedule S4, T = 1000; to 1e-10)."""
    sched = Schedule.named("su", T)
    model = vp_model(MIX, sched)
    rng = np.random.default_rng(11)
    x_T, noise = rng.standard_normal((5, 2)), rng.standard_normal((T, 5, 2))
    close(S.su_sample(model, x_T, sched, noise, sigma), S.ddpm_sample(model, x_T, sched, variance, noise), 1e-10)


def test_su_greedy_sampler_is_the_noiseless_reverse_mean_A3():
    """A3: Su's greedy sampler (σ_t = 0) is x_{t−1} = (x_t − β_t²/β̄_t ε_θ)/α_t, i.e. DDPM's mean with zero noise;
    one step checked against his formula with his α_t, β_t, β̄_t taken from su_from_ddpm."""
    sched = Schedule.named("su", 200)
    model = vp_model(GAUSS, sched)
    x_T = np.random.default_rng(12).standard_normal((5, 2))
    close(S.su_sample(model, x_T, sched, None, "zero"), S.ddpm_sample(model, x_T, sched, "beta", np.zeros((200, 5, 2))))
    one = Schedule.from_betas([0.3])
    a, b, _, bb = su_from_ddpm(one)
    eps = vp_model(GAUSS, one)(x_T, np.ones(5, dtype=np.int64))
    close(S.su_sample(vp_model(GAUSS, one), x_T, one, None, "zero"), (x_T - b[1] ** 2 / bb[1] * eps) / a[1])


def test_random_walk_sampler_steps_are_P8_posteriors_A4():
    """A4/P8: each step of Inouye's sampler draws from q(x_{t−1} given x_t, x̂_0) = N((1−1/t)x_t + x̂_0/t,
    (1−1/t) I) with x̂_0 = x_t − ε̃_θ; the model gets the math t as int64 (B,); the t = 1 step returns x̂_0."""
    rng = np.random.default_rng(13)
    x_T, z = rng.standard_normal((4, 2)), rng.standard_normal((3, 4, 2))
    seen = []

    def model(x, t, y=None):
        seen.append(t.copy())
        return 0.3 * x + 0.1 * t[:, None]

    out, traj = S.random_walk_sample(model, x_T, 3, z, return_trajectory=True)
    assert [int(t[0]) for t in seen] == [3, 2, 1] and all(t.dtype == np.int64 for t in seen)
    for i, t in enumerate([3, 2, 1]):
        x = traj[i]
        mean, var = random_walk_posterior(x - model(x, np.full(4, t)), x, t)
        close(traj[i + 1], mean + np.sqrt(var) * (z[i] if t > 1 else 0.0))
    close(out, traj[-1])


# ------------------------------------------------------------------------------------------------------
# A9: classifier-free guidance
# ------------------------------------------------------------------------------------------------------

class Counting:
    def __init__(self, model):
        self.model, self.n, self.batches = model, 0, []

    def __call__(self, x, t, y=None):
        self.n += 1
        self.batches.append((x.shape[0], np.asarray(y).copy()))
        return self.model(x, t, y)


def test_cfg_w1_is_conditional_w0_unconditional_with_one_batched_call_A9():
    """A9: ε̂ = ε(x, ∅) + w(ε(x, y) − ε(x, ∅)); w = 1 gives the conditional model, w = 0 the unconditional,
    each from ONE model call on the doubled batch [x, x] with labels [y, null]."""
    model = vp_model(MIX, SCHED)
    rng = np.random.default_rng(14)
    x, y, t = rng.standard_normal((6, 2)), np.array([0, 1, 2, 2, 1, 0]), np.full(6, 300)
    for w, expect in ((1.0, model(x, t, y)), (0.0, model(x, t, np.full(6, -1)))):
        counting = Counting(model)
        close(S.cfg(counting, w, -1)(x, t, y), expect)
        assert counting.n == 1
        assert counting.batches[0][0] == 12 and counting.batches[0][1].tolist() == y.tolist() + [-1] * 6
    with pytest.raises(ValueError, match="y"):
        S.cfg(model, 2.0, -1)(x, t, None)


@pytest.mark.parametrize("t", [50, 400, 800])
def test_cfg_guided_score_is_score_plus_w_grad_log_classifier_A9_X2(t):
    """A9/X2: with the exact mixture denoisers, the guided score −ε̂/√(1−ᾱ_t) equals
    ∇log p_t(x) + w·∇log p_t(y given x), the classifier gradient taken by central finite differences of the
    log-responsibilities log r_y(x) (step 1e-5; agreement to 1e-6)."""
    w = 3.0
    rng = np.random.default_rng(15)
    x = rng.standard_normal((20, 2)) * 1.5
    y = rng.integers(0, 3, size=20)
    a, s = SCHED.sqrt_alpha_bars[t], SCHED.sqrt_one_minus_alpha_bars[t]
    guided = -S.cfg(vp_model(MIX, SCHED), w, -1)(x, np.full(20, t), y) / s
    h = 1e-5
    grad = np.zeros_like(x)
    for j in range(2):
        e = np.zeros(2)
        e[j] = h
        up = np.log(MIX.responsibilities(x + e, a, s)[np.arange(20), y])
        down = np.log(MIX.responsibilities(x - e, a, s)[np.arange(20), y])
        grad[:, j] = (up - down) / (2 * h)
    np.testing.assert_allclose(guided, MIX.score(x, a, s) + w * grad, rtol=0, atol=1e-6)


def test_cfg_w1_in_ddim_samples_the_class_conditional_A9():
    """A9: DDIM (100 steps) with cfg at w = 1 and label k samples component k of the mixture: sample mean
    within 5 standard errors of m_k (4000 samples per run)."""
    rng = np.random.default_rng(16)
    n = 4000
    for k in range(3):
        out = S.ddim_sample(S.cfg(vp_model(MIX, SCHED), 1.0, -1), rng.standard_normal((n, 2)), SCHED,
                            timesteps(100, T), y=np.full(n, k))
        se = np.sqrt(MIX.vars[k] / n)
        assert np.all(np.abs(out.mean(0) - MIX.means[k]) < 5 * se + 0.01 * np.sqrt(MIX.vars[k]))


# ------------------------------------------------------------------------------------------------------
# A6/A7, S10/S11: SDE steps and the SDE definitions
# ------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("sde", [S.VPSDE(), S.VESDE(), S.VPSDE(0.5, 10.0), S.VESDE(0.1, 20.0)], ids=repr)
@pytest.mark.parametrize("noise_scale", [1.0, 0.5, 0.0])
def test_reverse_sde_step_A6_A7_matches_hand_formula(sde, noise_scale):
    """A6/A7: x ← x − [f − ½(g² + σ²)·score]dt + σ√dt z with σ = noise_scale·g; VP f = −½βx, g = √β with
    β(t) = β_min + t(β_max − β_min); VE f = 0, g = σ_t√(2 log(σ_max/σ_min))."""
    rng = np.random.default_rng(17)
    x, score, z = (rng.standard_normal((4, 2)) for _ in range(3))
    t, dt = np.array([1.0, 0.5, 0.2, 0.01]), 0.005
    if isinstance(sde, S.VPSDE):
        beta = sde.beta_min + t * (sde.beta_max - sde.beta_min)
        f, g = -0.5 * beta[:, None] * x, np.sqrt(beta)
    else:
        f = 0.0
        g = sde.sigma_min * (sde.sigma_max / sde.sigma_min) ** t * np.sqrt(2 * np.log(sde.sigma_max / sde.sigma_min))
    sig = noise_scale * g
    expect = x - (f - 0.5 * (g**2 + sig**2)[:, None] * score) * dt + (sig * np.sqrt(dt))[:, None] * z
    close(S.reverse_sde_step(x, t, dt, score, sde, z if noise_scale else None, noise_scale), expect)


def test_sde_marginals_solve_their_forward_sdes_S10_S11():
    """S10/S11: the marginal (a_t, σ_t) of each SDE solves its moment equations, by central differences:
    VP da/dt = −½β a and dσ²/dt = β(1 − σ²); VE dσ²/dt = g² (to 1e-6 relative)."""
    t, h = np.array([0.05, 0.3, 0.7, 0.95]), 1e-6
    vp, ve = S.VPSDE(), S.VESDE()
    beta = vp.diffusion(t) ** 2
    (ap, sp), (am, sm) = vp.marginal(t + h), vp.marginal(t - h)
    a, s = vp.marginal(t)
    np.testing.assert_allclose((ap - am) / (2 * h), -0.5 * beta * a, rtol=1e-6)
    np.testing.assert_allclose((sp**2 - sm**2) / (2 * h), beta * (1 - s**2), rtol=1e-6)
    np.testing.assert_allclose(vp.drift(np.ones((4, 1)), t)[:, 0], -0.5 * beta)
    (_, vsp), (_, vsm) = ve.marginal(t + h), ve.marginal(t - h)
    np.testing.assert_allclose((vsp**2 - vsm**2) / (2 * h), ve.diffusion(t) ** 2, rtol=1e-6)
    assert np.all(ve.marginal(t)[0] == 1.0) and np.all(ve.drift(np.ones((4, 2)), t) == 0.0)


def test_pf_ode_euler_is_reverse_sde_with_zero_noise_A5_A7():
    """A5/A7: pf_ode_sample(method='euler') equals reverse_sde_sample with noise_scale = 0 (σ(t) = 0)."""
    sde = S.VPSDE()
    score = lambda x, t: GAUSS.score(x, *sde.marginal(t))  # noqa: E731
    x_T = np.random.default_rng(18).standard_normal((10, 2))
    close(S.pf_ode_sample(score, x_T, sde, 40), S.reverse_sde_sample(score, x_T, sde, 40, None, noise_scale=0.0))


# ------------------------------------------------------------------------------------------------------
# A8: Langevin steps
# ------------------------------------------------------------------------------------------------------

def test_langevin_steps_A8():
    """A8: x ← x + c∇log q(x) + √(2c)ε; annealed: level i uses c_i = step_size·σ_i²/σ_L² and calls
    score_fn(x, σ_i) with σ_i a float array (B,)."""
    rng = np.random.default_rng(19)
    x, z = rng.standard_normal((5, 2)), rng.standard_normal((2, 5, 2))
    score = lambda v: -(v - 1.0) / 0.5  # noqa: E731
    c = 0.01
    x1 = x + c * score(x) + np.sqrt(2 * c) * z[0]
    close(S.langevin_sample(score, x, c, 2, z), x1 + c * score(x1) + np.sqrt(2 * c) * z[1])
    sigmas, seen = np.array([2.0, 1.0, 0.5]), []

    def zero_score(v, sig):
        assert sig.shape == (5,) and sig.dtype == np.float64
        seen.append(float(sig[0]))
        return np.zeros_like(v)

    ones = np.ones((6, 5, 2))
    _, traj = S.annealed_langevin_sample(zero_score, np.zeros((5, 2)), sigmas, 0.01, 2, ones, return_trajectory=True)
    assert seen == [2.0, 2.0, 1.0, 1.0, 0.5, 0.5]
    steps = np.diff(traj[:, 0, 0])
    close(steps, np.sqrt(2 * 0.01 * np.repeat(sigmas, 2) ** 2 / 0.25))


# ------------------------------------------------------------------------------------------------------
# noise conventions and trajectories
# ------------------------------------------------------------------------------------------------------

def test_noise_slot_convention_and_generator_draws_only_at_stochastic_steps():
    """Noise of a loop: slot i at step i; slots of deterministic steps are ignored (DDPM's t = 1, DDIM's
    last step, every step at η = 0); a Generator is drawn from, in order, only at stochastic steps."""
    sched = Schedule.from_betas(linear_betas(30, 1e-3, 0.2))
    model = vp_model(MIX, sched)
    x_T = np.random.default_rng(20).standard_normal((4, 2))
    draws = np.random.default_rng(21).standard_normal((29, 4, 2))
    noise = np.concatenate([draws, np.full((1, 4, 2), 1e6)])
    close(S.ddpm_sample(model, x_T, sched, "beta", noise),
          S.ddpm_sample(model, x_T, sched, "beta", np.random.default_rng(21)))
    close(S.ddpm_sample(model, x_T, sched, "beta", noise), S.ddpm_sample(
        model, x_T, sched, "beta", np.concatenate([draws, np.zeros((1, 4, 2))])))
    ts = np.arange(30, 0, -3)
    gen = S.ddim_sample(model, x_T, sched, ts, 0.8, np.random.default_rng(21))
    close(gen, S.ddim_sample(model, x_T, sched, ts, 0.8, noise[:10]))
    close(gen, S.ddim_sample(model, x_T, sched, ts, 0.8, np.concatenate([noise[:9], np.full((1, 4, 2), 5.0)])))
    close(S.ddim_sample(model, x_T, sched, ts), S.ddim_sample(model, x_T, sched, ts, 0.0, noise[:10] + 3.0))
    with pytest.raises(TypeError, match="noise"):
        S.ddim_sample(model, x_T, sched, ts, 0.5)


def _loop_calls():
    gauss_score = lambda x, t: GAUSS.score(x, *S.VPSDE().marginal(t))  # noqa: E731
    ts = timesteps(5, T)
    model = vp_model(GAUSS, SCHED)
    small = respace(SCHED, ts)
    rw = lambda x, t, y: x - GAUSS.x0_mean(x, 1.0, np.sqrt(t.astype(float)))  # noqa: E731
    return {
        "ddpm_sample": (5, lambda x, z, r: S.ddpm_sample(model, x, small, "beta", z, return_trajectory=r)),
        "ddim_sample": (5, lambda x, z, r: S.ddim_sample(model, x, SCHED, ts, 1.0, z, return_trajectory=r)),
        "euler_sample": (5, lambda x, z, r: S.euler_sample(model, x, SCHED, ts, return_trajectory=r)),
        "heun_sample": (5, lambda x, z, r: S.heun_sample(model, x, SCHED, ts, return_trajectory=r)),
        "dpmpp_2m_sample": (5, lambda x, z, r: S.dpmpp_2m_sample(model, x, SCHED, ts, return_trajectory=r)),
        "su_sample": (5, lambda x, z, r: S.su_sample(model, x, small, z, return_trajectory=r)),
        "random_walk_sample": (5, lambda x, z, r: S.random_walk_sample(rw, x, 5, z, return_trajectory=r)),
        "reverse_sde_sample": (5, lambda x, z, r: S.reverse_sde_sample(gauss_score, x, S.VPSDE(), 5, z,
                                                                       return_trajectory=r)),
        "pf_ode_sample": (5, lambda x, z, r: S.pf_ode_sample(gauss_score, x, S.VPSDE(), 5, "heun",
                                                             return_trajectory=r)),
        "langevin_sample": (5, lambda x, z, r: S.langevin_sample(lambda v: -v, x, 0.1, 5, z, return_trajectory=r)),
        "annealed_langevin_sample": (6, lambda x, z, r: S.annealed_langevin_sample(
            lambda v, s: -v / (1 + s[:, None] ** 2), x, [1.0, 0.5, 0.1], 0.01, 2, z, return_trajectory=r)),
    }


@pytest.mark.parametrize("name", sorted(_loop_calls()))
def test_every_loop_returns_sample_or_sample_and_trajectory(name):
    """Each loop returns the final sample, or (sample, trajectory) with trajectory (num_steps+1, *x.shape)
    starting at x_T and ending at the sample; NCHW-shaped x works where the model is shape-agnostic."""
    steps, run = _loop_calls()[name]
    rng = np.random.default_rng(22)
    x_T, z = rng.standard_normal((3, 2)), rng.standard_normal((steps, 3, 2))
    out = run(x_T, z, False)
    out2, traj = run(x_T, z, True)
    assert traj.shape == (steps + 1, 3, 2)
    np.testing.assert_array_equal(traj[0], x_T)
    np.testing.assert_array_equal(traj[-1], out)
    np.testing.assert_array_equal(out, out2)


def test_loops_accept_nchw_latents():
    """Loops work on (B, C, H, W) latents with a model that is shape-agnostic."""
    model = lambda x, t, y=None: 0.1 * x + 0.001 * t[:, None, None, None]  # noqa: E731
    x_T = np.random.default_rng(23).standard_normal((2, 4, 3, 3))
    ts = timesteps(4, T)
    z = np.random.default_rng(24).standard_normal((4, 2, 4, 3, 3))
    for out in (S.ddim_sample(model, x_T, SCHED, ts, 0.5, z), S.heun_sample(model, x_T, SCHED, ts),
                S.dpmpp_2m_sample(model, x_T, SCHED, ts), S.ddpm_sample(model, x_T, respace(SCHED, ts), noise=z)):
        assert out.shape == x_T.shape and np.all(np.isfinite(out))


# ------------------------------------------------------------------------------------------------------
# argument validation: one test per function family
# ------------------------------------------------------------------------------------------------------

_X = np.zeros((3, 2))
_M = vp_model(GAUSS, SCHED)
_TS = timesteps(5, T)
_SC = lambda x, t: -x  # noqa: E731


@pytest.mark.parametrize("call,exc,match", [
    (lambda: S.ddpm_step(_X, _X, 5, SCHED, "learned", np.zeros((3, 2))), ValueError, "variance"),
    (lambda: S.ddpm_step(_X, _X, 5, SCHED, "beta", np.zeros((3, 2)), "noise"), ValueError, "prediction"),
    (lambda: S.ddpm_step(_X, _X, 0, SCHED), ValueError, "t must be in 1..1000"),
    (lambda: S.ddpm_step(_X, _X, 1001, SCHED), ValueError, "t must be in 1..1000"),
    (lambda: S.ddpm_step(_X, _X, 5, SCHED, "beta", np.zeros((3, 3))), ValueError, "noise must have shape"),
    (lambda: S.ddpm_step(_X, _X, 5, SCHED, "beta", None), TypeError, "noise"),
    (lambda: S.ddpm_step(_X, _X, np.array([2, 3]), SCHED), ValueError, "t must be a scalar or have shape"),
    (lambda: S.ddpm_step(_X, _X, 5, "linear"), TypeError, "schedule"),
    (lambda: S.ddpm_step(_X[:2], _X, 5, SCHED, noise=_X), ValueError, "same shape"),
    (lambda: S.ddpm_step(_X, _X, 5, SCHED, noise=_X, clip=-1.0), ValueError, "clip"),
], ids=lambda v: v if isinstance(v, str) else "")
def test_ddpm_step_rejects_bad_arguments(call, exc, match):
    with pytest.raises(exc, match=match):
        call()


@pytest.mark.parametrize("call,exc,match", [
    (lambda: S.ddim_step(_X, _X, 5, 3, SCHED, -0.1), ValueError, "eta"),
    (lambda: S.ddim_step(_X, _X, 5, 5, SCHED), ValueError, "t_prev must be smaller"),
    (lambda: S.ddim_step(_X, _X, 5, -1, SCHED), ValueError, "t_prev"),
    (lambda: S.ddim_step(_X, _X, 500, 499, SCHED, 50.0, _X), ValueError, "eta"),
    (lambda: S.ddim_step(_X, _X, 5, 3, SCHED, 1.0, None), TypeError, "noise"),
    (lambda: S.ddim_step(_X, _X, 5, 3, SCHED, "0.5"), TypeError, "eta"),
    (lambda: S.ddim_step(_X, _X, 5.5, 3, SCHED), TypeError, "t"),
], ids=lambda v: v if isinstance(v, str) else "")
def test_ddim_step_rejects_bad_arguments(call, exc, match):
    with pytest.raises(exc, match=match):
        call()


@pytest.mark.parametrize("fn", [S.ddim_sample, S.euler_sample, S.heun_sample, S.dpmpp_2m_sample])
@pytest.mark.parametrize("kwargs,exc,match", [
    ({"timesteps": _TS[::-1]}, ValueError, "strictly descending"),
    ({"timesteps": [1001, 500]}, ValueError, "timesteps must be in 1..1000"),
    ({"timesteps": [500, 0]}, ValueError, "timesteps must be in 1..1000"),
    ({"timesteps": [500, 500, 3]}, ValueError, "strictly descending"),
    ({"timesteps": np.array([[5, 3]])}, ValueError, "1-D"),
    ({"timesteps": []}, ValueError, "timesteps"),
    ({"timesteps": _TS, "prediction": "score"}, ValueError, "prediction"),
    ({"timesteps": _TS, "model": None}, TypeError, "model must be callable"),
    ({"timesteps": _TS, "x_T": np.float64(1.0)}, ValueError, "x_T"),
    ({"timesteps": _TS, "model": lambda x, t, y: x[:1]}, ValueError, "model output"),
    ({"timesteps": _TS, "x_T": np.full((3, 2), np.nan)}, ValueError, "x_T must be finite"),
], ids=lambda v: v if isinstance(v, str) else "")
def test_discrete_loops_reject_bad_arguments(fn, kwargs, exc, match):
    args = {"model": _M, "x_T": _X, "schedule": SCHED, **kwargs}
    with pytest.raises(exc, match=match):
        fn(**args)


@pytest.mark.parametrize("call,exc,match", [
    (lambda: S.ddim_sample(_M, _X, SCHED, _TS, 0.5, np.zeros((4, 3, 2))), ValueError,
     r"noise must have shape \(5, 3, 2\)"),
    (lambda: S.ddim_sample(_M, _X, SCHED, _TS, -1.0), ValueError, "eta"),
    (lambda: S.ddpm_sample(_M, _X, SCHED, "beta", np.zeros((999, 3, 2))), ValueError, "noise must have shape"),
    (lambda: S.ddpm_sample(_M, _X, SCHED, "large"), ValueError, "variance"),
    (lambda: S.ddpm_sample(_M, _X, SCHED), TypeError, "noise"),
    (lambda: S.su_sample(_M, _X, SCHED, None, "huge"), ValueError, "sigma"),
    (lambda: S.su_sample(_M, _X, SCHED, None, "beta"), TypeError, "noise"),
    (lambda: S.random_walk_sample(_M, _X, 0), ValueError, r"T must be .*1"),
    (lambda: S.random_walk_sample(_M, _X, 2.5), TypeError, "T must be an integer"),
    (lambda: S.random_walk_sample(_M, _X, 3, np.zeros((2, 3, 2))), ValueError, "noise must have shape"),
], ids=lambda v: v if isinstance(v, str) else "")
def test_ancestral_loops_reject_bad_arguments(call, exc, match):
    with pytest.raises(exc, match=match):
        call()


@pytest.mark.parametrize("call,exc,match", [
    (lambda: S.reverse_sde_step(_X, 0.5, 0.0, _X, S.VPSDE(), _X), ValueError, "dt"),
    (lambda: S.reverse_sde_step(_X, 0.1, 0.2, _X, S.VPSDE(), _X), ValueError, "dt must satisfy"),
    (lambda: S.reverse_sde_step(_X, 1.5, 0.1, _X, S.VPSDE(), _X), ValueError, "t must lie in"),
    (lambda: S.reverse_sde_step(_X, 0.5, 0.1, _X[:2], S.VPSDE(), _X), ValueError, "score"),
    (lambda: S.reverse_sde_step(_X, 0.5, 0.1, _X, S.VPSDE(), _X, 1.5), ValueError, "noise_scale"),
    (lambda: S.reverse_sde_step(_X, 0.5, 0.1, _X, "vp", _X), TypeError, "sde"),
    (lambda: S.reverse_sde_step(_X, 0.5, 0.1, _X, S.VESDE(), None), TypeError, "noise"),
    (lambda: S.reverse_sde_sample(_SC, _X, S.VPSDE(), 0, None), ValueError, "num_steps"),
    (lambda: S.reverse_sde_sample(_SC, _X, S.VPSDE(), 4, np.zeros((3, 3, 2))), ValueError, "noise must have shape"),
    (lambda: S.reverse_sde_sample(_SC, _X, S.VPSDE(), 4, None, t_end=1.0), ValueError, "t_end"),
    (lambda: S.reverse_sde_sample(None, _X, S.VPSDE(), 4, None), TypeError, "score_fn"),
    (lambda: S.reverse_sde_sample(lambda x, t: x[0], _X, S.VPSDE(), 4, None, noise_scale=0.0), ValueError,
     "score_fn output"),
    (lambda: S.pf_ode_sample(_SC, _X, S.VPSDE(), 4, "rk4"), ValueError, "method"),
    (lambda: S.pf_ode_sample(_SC, _X, S.VPSDE(), 0), ValueError, "num_steps"),
    (lambda: S.pf_ode_sample(_SC, _X, S.VPSDE(), 4, t_end=-0.1), ValueError, "t_end"),
    (lambda: S.VPSDE(beta_min=-1.0), ValueError, "beta_min"),
    (lambda: S.VPSDE(1.0, 0.5), ValueError, "beta_max"),
    (lambda: S.VESDE(1.0, 0.5), ValueError, "sigma_max"),
    (lambda: S.VESDE(sigma_min=0.0), ValueError, "sigma_min"),
], ids=lambda v: v if isinstance(v, str) else "")
def test_sde_samplers_reject_bad_arguments(call, exc, match):
    with pytest.raises(exc, match=match):
        call()


@pytest.mark.parametrize("call,exc,match", [
    (lambda: S.langevin_sample(lambda x: -x, _X, 0.0, 3, None), ValueError, "step_size"),
    (lambda: S.langevin_sample(lambda x: -x, _X, 0.1, 0, None), ValueError, "num_steps"),
    (lambda: S.langevin_sample(lambda x: -x, _X, 0.1, 3, None), TypeError, "noise"),
    (lambda: S.langevin_sample(lambda x: -x, _X, 0.1, 3, np.zeros((3, 2))), ValueError, "noise must have shape"),
    (lambda: S.annealed_langevin_sample(_SC, _X, [0.1, 1.0], 0.1, 3, None), ValueError, "sigmas"),
    (lambda: S.annealed_langevin_sample(_SC, _X, [1.0, -0.1], 0.1, 3, None), ValueError, "sigmas"),
    (lambda: S.annealed_langevin_sample(_SC, _X, [1.0, 0.1], -0.1, 3, None), ValueError, "step_size"),
    (lambda: S.annealed_langevin_sample(_SC, _X, [1.0, 0.1], 0.1, 0, None), ValueError, "steps_per_level"),
    (lambda: S.annealed_langevin_sample(_SC, _X, [1.0, 0.1], 0.1, 3, np.zeros((3, 3, 2))), ValueError,
     r"noise must have shape \(6, 3, 2\)"),
], ids=lambda v: v if isinstance(v, str) else "")
def test_langevin_samplers_reject_bad_arguments(call, exc, match):
    with pytest.raises(exc, match=match):
        call()


@pytest.mark.parametrize("call,exc,match", [
    (lambda: S.cfg(_M, -1.0, -1), ValueError, "guidance"),
    (lambda: S.cfg(_M, float("nan"), -1), ValueError, "guidance"),
    (lambda: S.cfg(_M, 2.0, 1.5), TypeError, "null_class"),
    (lambda: S.cfg("model", 2.0, -1), TypeError, "model must be callable"),
    (lambda: S.cfg(lambda x, t, y: x, 2.0, -1)(_X, 5, None), ValueError, "y"),
    (lambda: S.cfg(lambda x, t, y: x[:3], 2.0, -1)(_X, 5, 0), ValueError, "doubled batch"),
], ids=lambda v: v if isinstance(v, str) else "")
def test_cfg_rejects_bad_arguments(call, exc, match):
    with pytest.raises(exc, match=match):
        call()


# ------------------------------------------------------------------------------------------------------
# the table of samplers and the call the engine and the runtime share
# ------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(S.SAMPLERS))
def test_sampler_table_row_is_what_its_loop_does(name):
    """Each row of SAMPLERS states its loop's model calls for N steps and whether it draws loop noise, and
    S.sample runs that loop on the trailing step list, exactly as a direct call (A1/A2/A5)."""
    row, steps = S.SAMPLERS[name], 7
    rng = np.random.default_rng(31)
    x_T, z = rng.standard_normal((3, 2)), rng.standard_normal((steps, 3, 2))
    calls = []
    model = vp_model(MIX, SCHED)

    def counted(x, t, y=None):
        calls.append(int(t[0]))
        return model(x, t, y)

    out = S.sample(counted, x_T, SCHED, name, steps, noise=z)
    assert len(calls) == row.model_calls(steps)
    ts = timesteps(steps, T, "trailing")
    assert calls[0] == ts[0] and set(calls) <= set(ts.tolist())
    kwargs = {"noise": z} if row.stochastic else {}
    direct = row.sample(model, x_T, SCHED, timesteps=ts, **kwargs)
    np.testing.assert_array_equal(out, direct)
    moved = S.sample(model, x_T, SCHED, name, steps, noise=z + 1.0)
    assert (np.abs(moved - out).max() > 1e-6) == row.stochastic  # only stochastic loops read the noise
    if row.eta:
        assert np.abs(S.sample(model, x_T, SCHED, name, steps, eta=1.0, noise=z) - out).max() > 1e-6


def test_sample_guides_only_with_labels_and_w_other_than_one_A9():
    """S.sample applies cfg (one batched call on 2B) for w ≠ 1 with labels; w = 1 or None is one call on B."""
    rng = np.random.default_rng(32)
    x_T, y = rng.standard_normal((3, 2)), np.array([0, 1, 2])
    model = vp_model(MIX, SCHED)
    sizes = []

    def counted(x, t, labels=None):
        sizes.append(len(x))
        return model(x, t, labels)

    guided = S.sample(counted, x_T, SCHED, "ddim", 4, y=y, guidance=2.5, null_class=-1)
    assert sizes == [6] * 4
    direct = S.ddim_sample(S.cfg(model, 2.5, -1), x_T, SCHED, timesteps(4, T, "trailing"), y=y)
    np.testing.assert_array_equal(guided, direct)
    sizes.clear()
    plain = S.sample(counted, x_T, SCHED, "ddim", 4, y=y, guidance=1.0, null_class=-1)
    assert sizes == [3] * 4
    np.testing.assert_array_equal(plain, S.ddim_sample(model, x_T, SCHED, timesteps(4, T, "trailing"), y=y))


@pytest.mark.parametrize("kwargs,message", [
    ({"sampler": "euler_a"}, "sampler must be one of ['ddim', 'ddpm', 'heun', 'dpmpp2m']"),
    ({"num_steps": 0}, "steps must be in 1..1000"),
    ({"num_steps": 1001}, "steps must be in 1..1000"),
    ({"num_steps": 2.0}, "steps must be in 1..1000"),
    ({"eta": -0.5}, "eta must be >= 0"),
    ({"eta": float("nan")}, "eta must be >= 0"),
    ({"sampler": "heun", "eta": 0.5}, "eta applies to the ddim sampler only"),
    ({"guidance": 2.0}, "guidance was given but the model is unconditional"),
    ({"guidance": -1.0, "null_class": 3}, "guidance must be >= 0"),
    ({"sampler": "ddpm"}, "noise"),
])
def test_sample_rejects_bad_arguments(kwargs, message):
    args = {"sampler": "ddim", "num_steps": 5, **kwargs}
    with pytest.raises((ValueError, TypeError)) as info:
        S.sample(_M, _X, SCHED, **args)
    assert message in str(info.value)


def test_class_labels():
    np.testing.assert_array_equal(S.class_labels(12, 10), [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 0, 1])
    np.testing.assert_array_equal(S.class_labels(3, 10, 7), [7, 7, 7])
    assert S.class_labels(3, 0) is None
    for labels, message in ((10, "class id must be in 0..9, got 10"), ([0, 1], "3 integer class ids"),
                            ([0.5, 1, 2], "3 integer class ids")):
        with pytest.raises(ValueError, match=message):
            S.class_labels(3, 10, labels)
    with pytest.raises(ValueError, match="the model is unconditional"):
        S.class_labels(3, 0, 1)
    with pytest.raises(ValueError, match="n must be an int >= 1"):
        S.class_labels(0, 10)
