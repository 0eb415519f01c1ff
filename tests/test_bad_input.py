"""Bad arguments raise ValueError/TypeError naming the argument (docs/design.md, "Errors"), for every public
function of reference/{_checks, schedules, forward, posterior, kl, analytic}.

Each case names the formula ID (docs/formulas.md) of the function it guards (S1–S12, F1–F4, P1–P9, K1–K7, X1–X3).
"""

from __future__ import annotations

import math

import numpy as np
import pytest

from ldmkit.reference import _checks, analytic, forward, kl, posterior, schedules
from ldmkit.reference.schedules import Schedule

S = Schedule.named("linear", 10)
ZSNR = Schedule.from_betas(schedules.rescale_zero_terminal_snr(schedules.linear_betas(10, 0.01, 0.2)))
X = np.zeros((2, 3))
GAUSS = analytic.GaussianData([0.0, 1.0], 0.5)
MIX = analytic.GaussianMixtureData([0.5, 0.5], [[0.0, 0.0], [1.0, 1.0]], [0.1, 0.2])

CASES = [
    # ------------------------------------------------------------------ schedules (S1–S12)
    ("S1 T = 0", lambda: schedules.linear_betas(0), ValueError, r"T must be >= 1, got 0"),
    ("S1 T not an int", lambda: schedules.linear_betas(10.5), TypeError, r"T must be an integer"),
    ("S1 T a bool", lambda: schedules.linear_betas(True), TypeError, r"T must be an integer"),
    ("S1 beta_start = 0", lambda: schedules.linear_betas(10, 0.0, 0.02), ValueError, r"beta_start"),
    ("S1 beta_end = 1", lambda: schedules.linear_betas(10, 1e-4, 1.0), ValueError, r"beta_end"),
    ("S2 beta_end NaN", lambda: schedules.linear_betas(10, 1e-3, float("nan")), ValueError, r"beta_end"),
    ("S3 max_beta = 1", lambda: schedules.cosine_betas(10, max_beta=1.0), ValueError, r"max_beta"),
    ("S3 s < 0", lambda: schedules.cosine_betas(10, s=-0.1), ValueError, r"\bs must be"),
    ("S4 T = 0", lambda: schedules.su_betas(0), ValueError, r"T must be"),
    ("S4 bound T = 0", lambda: schedules.su_log_alpha_bar_bound(0), ValueError, r"T must be"),
    ("S4 alpha_su = 1", lambda: schedules.ddpm_betas_from_su([0.5, 1.0]), ValueError, r"alpha_su"),
    ("S4 su_from_ddpm not a Schedule", lambda: schedules.su_from_ddpm(np.ones(3)), TypeError, r"schedule"),
    ("S5 beta_start > 1", lambda: schedules.scaled_linear_betas(10, 2.0), ValueError, r"beta_start"),
    ("S6 betas > 1", lambda: Schedule.from_betas([0.1, 1.2]), ValueError, r"betas must lie in"),
    ("S6 betas = 0", lambda: Schedule.from_betas([0.0, 0.1]), ValueError, r"betas must lie in"),
    ("S6 betas negative", lambda: Schedule.from_betas([-0.1, 0.1]), ValueError, r"betas"),
    ("S6 inner beta = 1", lambda: Schedule.from_betas([0.1, 1.0, 0.2]), ValueError, r"betas"),
    ("S6 betas 2-D", lambda: Schedule.from_betas([[0.1, 0.2]]), ValueError, r"betas must be a 1-D"),
    ("S6 betas empty", lambda: Schedule.from_betas([]), ValueError, r"betas"),
    ("S6 betas NaN", lambda: Schedule.from_betas([0.1, float("nan")]), ValueError, r"betas must be finite"),
    ("S6 betas strings", lambda: Schedule.from_betas(["a", "b"]), TypeError, r"betas must be a numeric"),
    ("S6 timestep_map shape", lambda: Schedule.from_betas([0.1, 0.2], timestep_map=[0, 1]), ValueError,
     r"timestep_map"),
    ("S6 unknown schedule name", lambda: Schedule.named("quadratic", 10), ValueError, r"schedule name"),
    ("S8 respace t = 0", lambda: schedules.respace(S, [0, 5]), ValueError, r"timesteps must be distinct"),
    ("S8 respace t > T", lambda: schedules.respace(S, [5, 11]), ValueError, r"timesteps"),
    ("S8 respace duplicate", lambda: schedules.respace(S, [3, 3]), ValueError, r"timesteps"),
    ("S8 respace float t", lambda: schedules.respace(S, np.array([1.5, 3.0])), ValueError, r"timesteps"),
    ("S8 respace empty", lambda: schedules.respace(S, np.array([], dtype=int)), ValueError, r"timesteps"),
    ("S8 respace not a Schedule", lambda: schedules.respace("linear", [1]), TypeError, r"schedule"),
    ("S9 num_steps = 0", lambda: schedules.timesteps(0, 10), ValueError, r"num_steps must be in 1\.\.10"),
    ("S9 num_steps > T", lambda: schedules.timesteps(11, 10), ValueError, r"num_steps must be in 1\.\.10"),
    ("S9 unknown spacing", lambda: schedules.timesteps(5, 10, "uniform"), ValueError, r"spacing"),
    ("S9 offset too large", lambda: schedules.timesteps(5, 10, "leading", offset=2), ValueError, r"offset"),
    ("S9 negative offset", lambda: schedules.timesteps(5, 10, "leading", offset=-1), ValueError, r"offset"),
    ("S9 offset with linspace", lambda: schedules.timesteps(5, 10, "linspace", offset=1), ValueError, r"offset"),
    ("S10 t > 1", lambda: schedules.vp_sde_marginal(1.5), ValueError, r"\bt must lie in \[0, 1\]"),
    ("S10 t < 0", lambda: schedules.vp_sde_marginal(-0.1), ValueError, r"\bt must lie"),
    ("S10 beta_min = 0", lambda: schedules.vp_sde_marginal(0.5, 0.0, 20.0), ValueError, r"beta_min"),
    ("S10 beta_max < beta_min", lambda: schedules.vp_sde_marginal(0.5, 1.0, 0.5), ValueError, r"beta_max"),
    ("S11 t > 1", lambda: schedules.ve_sde_sigma(1.1), ValueError, r"\bt must lie"),
    ("S11 sigma_min = 0", lambda: schedules.ve_sde_sigma(0.5, 0.0, 1.0), ValueError, r"sigma_min"),
    ("S11 sigma_max < sigma_min", lambda: schedules.ve_sde_sigma(0.5, 1.0, 0.5), ValueError, r"sigma_max"),
    ("S12 t < 0", lambda: schedules.random_walk_variance(-1.0), ValueError, r"\bt must be >= 0"),
    ("karras levels < 2", lambda: schedules.karras_sigmas(1), ValueError, r"num_steps"),
    ("karras sigma_min = 0", lambda: schedules.karras_sigmas(10, sigma_min=0.0), ValueError, r"sigma_min"),
    ("karras rho = 0", lambda: schedules.karras_sigmas(10, rho=0.0), ValueError, r"rho"),
    ("ancestral sigma_to > sigma_from", lambda: schedules.ancestral_sigmas(5.0, 10.0), ValueError, r"sigma_to"),
    ("ancestral sigma_from = 0", lambda: schedules.ancestral_sigmas(0.0, 0.0), ValueError, r"sigma_from"),
    ("ancestral negative eta", lambda: schedules.ancestral_sigmas(10.0, 5.0, -0.5), ValueError, r"eta"),
    ("zero-SNR one beta", lambda: schedules.rescale_zero_terminal_snr([0.1]), ValueError, r"betas"),
    ("zero-SNR beta = 1", lambda: schedules.rescale_zero_terminal_snr([0.1, 1.0]), ValueError, r"betas"),
    ("F3 t > T", lambda: schedules.su_merged_noise_variance(S, 11), ValueError, r"\bt must be in 0\.\.10"),
    # ------------------------------------------------------------------ forward (F1–F4, S12)
    ("F2 t > T", lambda: forward.q_sample(X, 11, np.zeros_like(X), S), ValueError, r"\bt must be in 0\.\.10"),
    ("F2 t < 0", lambda: forward.q_sample(X, -1, np.zeros_like(X), S), ValueError, r"\bt must be in 0\.\.10"),
    ("F2 t fractional", lambda: forward.q_sample(X, 2.5, np.zeros_like(X), S), TypeError, r"\bt must hold integer"),
    ("F2 t bool", lambda: forward.q_sample(X, True, np.zeros_like(X), S), TypeError, r"\bt must hold integer"),
    ("F2 t batch mismatch", lambda: forward.q_sample(X, np.array([1, 2, 3]), np.zeros_like(X), S), ValueError,
     r"\bt must be a scalar or have shape \(2,\)"),
    ("F2 noise shape", lambda: forward.q_sample(X, 1, np.zeros((3, 2)), S), ValueError, r"noise must have shape"),
    ("F2 noise None", lambda: forward.q_sample(X, 1, None, S), TypeError, r"noise must be an array"),
    ("F2 x0 NaN", lambda: forward.q_sample(np.array([np.nan]), 1, np.zeros(1), S), ValueError, r"x0 must be finite"),
    ("F2 not a Schedule", lambda: forward.q_sample(X, 1, np.zeros_like(X), "linear"), TypeError, r"schedule"),
    ("F2 q_mean_variance t > T", lambda: forward.q_mean_variance(X, 11, S), ValueError, r"\bt must be in"),
    ("F1 q_step t = 0", lambda: forward.q_step(X, 0, np.zeros_like(X), S), ValueError, r"\bt must be in 1\.\.10"),
    ("F1 q_step noise shape", lambda: forward.q_step(X, 1, np.zeros(3), S), ValueError, r"noise"),
    ("F4 prior_kl not a Schedule", lambda: forward.prior_kl(X, None), TypeError, r"schedule"),
    ("F4 prior_kl x0 inf", lambda: forward.prior_kl(np.array([np.inf]), S), ValueError, r"x0"),
    ("S12 random walk t < 0", lambda: forward.random_walk_q_sample(X, -1.0, np.zeros_like(X)), ValueError, r"\bt must"),
    # ------------------------------------------------------------------ posterior (P1–P8)
    ("P1 shape mismatch", lambda: posterior.q_posterior(np.zeros((2, 3)), np.zeros((3, 2)), 1, S), ValueError,
     r"x_t and x0 must have the same shape"),
    ("P1 t = 0", lambda: posterior.q_posterior(X, X, 0, S), ValueError, r"\bt must be in 1\.\.10"),
    ("P1 t > T", lambda: posterior.q_posterior(X, X, 11, S), ValueError, r"\bt must be in 1\.\.10"),
    ("P1 t batch", lambda: posterior.q_posterior(X, X, np.array([[1, 2]]), S), ValueError, r"\bt must be a scalar"),
    ("P2 shape mismatch", lambda: posterior.gaussian_product(np.zeros(2), np.eye(2), np.zeros(3), np.eye(3)),
     ValueError, r"means must have shape"),
    ("P3 x0_from_eps shape", lambda: posterior.x0_from_eps(X, 1, np.zeros(3), S), ValueError, r"x_t and eps"),
    ("P3 x0_from_eps zero SNR", lambda: posterior.x0_from_eps(X, 10, X, ZSNR), ValueError,
     r"alpha_bar\[t\] = 0.*divides by zero.*v- or x0-prediction"),
    ("P3 v_from_eps t = 0", lambda: posterior.v_from_eps(X, 0, X, S), ValueError, r"\bt must be in"),
    ("P3 eps_from_v shape", lambda: posterior.eps_from_v(X, 1, np.zeros((2, 2)), S), ValueError, r"x_t and v"),
    ("P3 unknown prediction", lambda: posterior.x0_eps_from_output(X, X, 1, S, prediction="noise"), ValueError,
     r"prediction must be one of"),
    ("P3 clip = 0", lambda: posterior.x0_eps_from_output(X, X, 1, S, clip=0.0), ValueError, r"clip"),
    ("P4 mean_from_eps t > T", lambda: posterior.mean_from_eps(X, 12, X, S), ValueError, r"\bt must be in"),
    ("P5 score_from_eps shape", lambda: posterior.score_from_eps(X, 1, np.zeros(2), S), ValueError, r"eps"),
    ("P5 eps_from_score bad t dtype", lambda: posterior.eps_from_score(X, "3", X, S), TypeError, r"\bt must hold"),
    ("P6 sigma too large", lambda: posterior.ddim_posterior(X, X, 5, 4, 1.0, S), ValueError,
     r"sigma must satisfy 0 <= sigma_t\*\*2 <= 1 - alpha_bar\[t_prev\]"),
    ("P6 sigma negative", lambda: posterior.ddim_posterior(X, X, 5, 4, -0.01, S), ValueError, r"sigma must satisfy"),
    ("P6 sigma > 0 at t_prev = 0", lambda: posterior.ddim_posterior(X, X, 5, 0, 0.01, S), ValueError, r"sigma"),
    ("P6 t_prev = t", lambda: posterior.ddim_posterior(X, X, 5, 5, 0.0, S), ValueError, r"t_prev must be smaller"),
    ("P6 t_prev < 0", lambda: posterior.ddim_posterior(X, X, 5, -1, 0.0, S), ValueError, r"t_prev must be in 0\.\.10"),
    ("P6 sigma batch", lambda: posterior.ddim_posterior(X, X, 5, 4, np.zeros(3), S), ValueError, r"sigma must be"),
    ("P7 negative eta", lambda: posterior.ddim_sigma(5, 4, -0.1, S), ValueError, r"eta must be in \[0, inf\)"),
    ("P7 eta NaN", lambda: posterior.ddim_sigma(5, 4, float("nan"), S), ValueError, r"eta"),
    ("P7 eta a string", lambda: posterior.ddim_sigma(5, 4, "1", S), TypeError, r"eta must be a real"),
    ("P7 t_prev > t", lambda: posterior.ddim_sigma(5, 7, 1.0, S), ValueError, r"t_prev"),
    ("P7 t > T", lambda: posterior.ddim_sigma(11, 7, 1.0, S), ValueError, r"\bt must be in 1\.\.10"),
    ("P8 t < 1", lambda: posterior.random_walk_posterior(X, X, 0.5), ValueError, r"\bt must be >= 1"),
    ("P8 shape mismatch", lambda: posterior.random_walk_posterior(np.zeros(2), np.zeros(3), 2), ValueError,
     r"x_t and x0"),
    ("P8 mean_from_eps t < 1", lambda: posterior.random_walk_mean_from_eps(X, 0, X), ValueError, r"\bt must be >= 1"),
    # ------------------------------------------------------------------ kl (K1–K7)
    ("K1 NaN", lambda: kl.normal_kl(np.nan, 0.0, 0.0, 0.0), ValueError, r"mean1 must be finite"),
    ("K1 not numeric", lambda: kl.normal_kl("a", 0.0, 0.0, 0.0), TypeError, r"mean1 must be a numeric"),
    ("K2 not positive definite", lambda: kl.gaussian_kl_full(np.zeros(2), np.eye(2), np.zeros(2),
                                                             np.diag([1.0, -1.0])), ValueError,
     r"cov2 must be positive definite"),
    ("K2 asymmetric", lambda: kl.gaussian_kl_full(np.zeros(2), np.array([[1.0, 0.5], [0.0, 1.0]]), np.zeros(2),
                                                  np.eye(2)), ValueError, r"cov1 must be symmetric"),
    ("K2 cov shape", lambda: kl.gaussian_kl_full(np.zeros(2), np.eye(3), np.zeros(2), np.eye(2)), ValueError,
     r"cov1 must have shape \(2, 2\)"),
    ("K2 mean shape", lambda: kl.gaussian_kl_full(np.zeros(2), np.eye(2), np.zeros(3), np.eye(2)), ValueError,
     r"mu1 and mu2"),
    ("K3 shape mismatch", lambda: kl.vae_kl(np.zeros((2, 3)), np.zeros((2, 4))), ValueError, r"mean and logvar"),
    ("K3 scalar", lambda: kl.vae_kl(0.0, 0.0), ValueError, r"mean and logvar"),
    ("K4 logvar inf", lambda: kl.gaussian_log_likelihood(0.0, 0.0, np.inf), ValueError, r"logvar must be finite"),
    ("K5 levels < 2", lambda: kl.discretized_gaussian_log_likelihood(0.0, 0.0, 0.0, levels=1), ValueError,
     r"levels must be >= 2, got 1"),
    ("K5 levels float", lambda: kl.discretized_gaussian_log_likelihood(0.0, 0.0, 0.0, levels=2.0), TypeError,
     r"levels must be an integer"),
    ("K5 x outside [-1, 1]", lambda: kl.discretized_gaussian_log_likelihood(1.5, 0.0, 0.0), ValueError,
     r"x must lie in \[-1, 1\]"),
    ("K5 x off the grid", lambda: kl.discretized_gaussian_log_likelihood(0.1, 0.0, 0.0, levels=3), ValueError,
     r"x must lie on the grid"),
    ("K6 negative p", lambda: kl.entropy(np.array([1.5, -0.5])), ValueError, r"\bp must be a probability"),
    ("K6 q not summing to 1", lambda: kl.kl_discrete(np.array([0.5, 0.5]), np.array([0.5, 0.4])), ValueError,
     r"\bq must be a probability"),
    ("K6 cross_entropy scalar", lambda: kl.cross_entropy(1.0, 1.0), ValueError, r"\bp must be"),
    ("K7 1-D tables", lambda: kl.kl_chain_rule(np.array([0.5, 0.5]), np.array([0.5, 0.5])), ValueError,
     r"p_joint and q_joint must be 2-D"),
    ("K7 first_axis = 2", lambda: kl.kl_chain_rule(np.full((2, 2), 0.25), np.full((2, 2), 0.25), first_axis=2),
     ValueError, r"first_axis must be in 0\.\.1"),
    ("K7 not a pmf", lambda: kl.kl_chain_rule(np.full((2, 2), 0.3), np.full((2, 2), 0.25)), ValueError, r"p_joint"),
    # ------------------------------------------------------------------ analytic (X1–X3, P9)
    ("X1 negative var", lambda: analytic.GaussianData([0.0], -1.0), ValueError, r"var must be >= 0"),
    ("X1 x wrong dim", lambda: GAUSS.x0_mean(np.zeros((2, 3)), 0.5, 0.5), ValueError,
     r"x must have shape \(\.\.\., 2\)"),
    ("X1 a batch mismatch", lambda: GAUSS.score(np.zeros((2, 2)), np.ones(3), 0.5), ValueError,
     r"\ba must be a scalar"),
    ("X1 sigma NaN", lambda: GAUSS.eps(np.zeros((2, 2)), 0.5, np.nan), ValueError, r"sigma must be finite"),
    ("X2 weights sum", lambda: analytic.GaussianMixtureData([0.5, 0.6], [[0.0], [1.0]], [1.0, 1.0]), ValueError,
     r"weights must be non-negative and sum to 1"),
    ("X2 shapes", lambda: analytic.GaussianMixtureData([0.5, 0.5], [[0.0], [1.0], [2.0]], [1.0, 1.0]), ValueError,
     r"weights \(K,\), means \(K, d\) and vars \(K,\) must agree"),
    ("X2 negative var", lambda: analytic.GaussianMixtureData([1.0], [[0.0]], [-1.0]), ValueError, r"vars must be >= 0"),
    ("X2 x wrong dim", lambda: MIX.score(np.zeros(3), 0.5, 0.5), ValueError, r"x must have shape"),
    ("X2 sigma batch", lambda: MIX.responsibilities(np.zeros((2, 2)), 0.5, np.ones(4)), ValueError, r"sigma must be"),
    ("X3 vp_model unknown prediction", lambda: analytic.vp_model(GAUSS, S, "score"), ValueError,
     r"prediction must be one of"),
    ("X3 vp_model not a Schedule", lambda: analytic.vp_model(GAUSS, "linear"), TypeError, r"schedule"),
    ("X3 vp_model t = 0", lambda: analytic.vp_model(GAUSS, S)(np.zeros((1, 2)), 0), ValueError,
     r"\bt must be in 1\.\.10"),
    ("P9 negative data_var", lambda: analytic.reverse_variance(3, S, -0.1), ValueError,
     r"data_var must be in \[0, inf\)"),
    ("P9 t > T", lambda: analytic.reverse_variance(11, S, 0.5), ValueError, r"\bt must be in 1\.\.10"),
    ("P9 not a Schedule", lambda: analytic.reverse_variance(3, None), TypeError, r"schedule"),
]


@pytest.mark.parametrize(("call", "exc", "match"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_input_raises_naming_argument(call, exc, match):
    """S1–S12, F1–F4, P1–P9, K1–K7, X1–X3: a bad argument raises ValueError/TypeError whose message names it."""
    with pytest.raises(exc, match=match):
        call()


def test_checks_helpers_name_the_argument():
    """_checks: the shared validators reject bools as ints, out-of-range values, non-finite reals and
    non-integer timesteps, naming the argument and the range."""
    with pytest.raises(TypeError, match=r"steps must be an integer, got bool"):
        _checks.check_int(True, "steps", 1)
    with pytest.raises(ValueError, match=r"steps must be in 1\.\.5, got 6"):
        _checks.check_int(6, "steps", 1, 5)
    with pytest.raises(ValueError, match=r"eta must be in \[0, inf\), got inf"):
        _checks.check_real(math.inf, "eta", 0.0)
    with pytest.raises(ValueError, match=r"rate must be in \(0, 1\)"):
        _checks.check_real(1.0, "rate", 0.0, 1.0, low_open=True, high_open=True)
    with pytest.raises(TypeError, match=r"tt must hold integer timesteps"):
        _checks.check_timesteps(np.array([1.0, 2.5]), "tt", 10)
    with pytest.raises(ValueError, match=r"variance must be one of"):
        _checks.variance_name("learned")
    # accepted forms: integral floats for t, numpy integers, diffusers aliases
    np.testing.assert_array_equal(_checks.check_timesteps(np.array([1.0, 3.0]), "t", 10), [1, 3])
    assert _checks.check_int(np.int64(3), "n", 1) == 3
    assert _checks.prediction_name("v_prediction") == "v" and _checks.variance_name("fixed_large") == "beta"


def test_zero_terminal_snr_refuses_eps_prediction_at_T_but_allows_v():
    """docs/anchors.md trap: zero terminal SNR with ε-prediction divides by √ᾱ_T = 0 — refused with a clear error;
    v- and x0-prediction stay finite at t = T."""
    with pytest.raises(ValueError, match=r"v- or x0-prediction"):
        posterior.x0_eps_from_output(np.zeros((1, 2)), np.ones((1, 2)), 10, ZSNR, prediction="eps")
    x0, eps = posterior.x0_eps_from_output(np.ones((1, 2)), np.ones((1, 2)), 10, ZSNR, prediction="v")
    assert np.all(np.isfinite(x0)) and np.all(np.isfinite(eps))
