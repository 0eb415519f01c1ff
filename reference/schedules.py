"""Noise schedules (docs/formulas.md: S1–S12), in float64 with the math's time indexing.

A discrete schedule with T steps is held as tables of length T+1 indexed by math t: ``betas[0] == 0``,
``alpha_bars[0] == 1`` and t = 1..T are the noisy steps. diffusers' 0-based timestep k is math t = k+1.
The ``*_betas`` functions return the T noisy betas β_1..β_T (length T); ``Schedule.from_betas`` adds t = 0.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from ._checks import as_float_array, check_int, check_real

SCHEDULE_NAMES = ("linear", "linear_ldm", "cosine", "scaled_linear", "su")


def linear_betas(T: int, beta_start: float = 1e-4, beta_end: float = 0.02) -> np.ndarray:
    """S1/S2: β_t evenly spaced from β_1 = ``beta_start`` to β_T = ``beta_end``; shape (T,).

    S1 is Ho et al.'s 1e-4 → 0.02 at T = 1000 (Han's slide prints 10^-1: a typo); S2 is the LDM
    report's 0.001 → 0.02. Unlike improved-diffusion, the betas are not rescaled by 1000/T.
    """
    T = check_int(T, "T", 1)
    beta_start = check_real(beta_start, "beta_start", 0.0, 1.0, low_open=True, high_open=True)
    beta_end = check_real(beta_end, "beta_end", 0.0, 1.0, low_open=True, high_open=True)
    return np.linspace(beta_start, beta_end, T, dtype=np.float64)


def cosine_betas(T: int, s: float = 0.008, max_beta: float = 0.999) -> np.ndarray:
    """S3: Nichol & Dhariwal's cosine schedule; shape (T,).

    ᾱ(t) = f(t)/f(0), f(t) = cos²(((t/T) + s)/(1 + s)·π/2); β_t = min(1 − ᾱ(t)/ᾱ(t−1), max_beta).
    """
    T = check_int(T, "T", 1)
    s = check_real(s, "s", 0.0)
    max_beta = check_real(max_beta, "max_beta", 0.0, 1.0, low_open=True, high_open=True)
    t = np.arange(T + 1, dtype=np.float64) / T
    f = np.cos((t + s) / (1 + s) * np.pi / 2) ** 2
    return np.minimum(1.0 - f[1:] / f[:-1], max_beta)


def scaled_linear_betas(T: int, beta_start: float = 0.00085, beta_end: float = 0.012) -> np.ndarray:
    """S5: latent diffusion's "scaled linear" schedule, β_t = (linspace(√β_1, √β_T))²; shape (T,)."""
    T = check_int(T, "T", 1)
    beta_start = check_real(beta_start, "beta_start", 0.0, 1.0, low_open=True, high_open=True)
    beta_end = check_real(beta_end, "beta_end", 0.0, 1.0, low_open=True, high_open=True)
    return np.linspace(np.sqrt(beta_start), np.sqrt(beta_end), T, dtype=np.float64) ** 2


def su_betas(T: int) -> np.ndarray:
    """S4: Su's schedule α_t(Su) = √(1 − 0.02·t/T), i.e. DDPM β_t = 0.02·t/T for t = 1..T; shape (T,)."""
    T = check_int(T, "T", 1)
    return 0.02 * np.arange(1, T + 1, dtype=np.float64) / T


def rescale_zero_terminal_snr(betas) -> np.ndarray:
    """R2: Lin et al.'s zero-terminal-SNR rescale of β_1..β_T (their Alg. 1); shape (T,), T ≥ 2.

    With s_t = √ᾱ_t: s′_t = s_1·(s_t − s_T)/(s_1 − s_T), ᾱ′_t = s′_t², β′_t = 1 − ᾱ′_t/ᾱ′_{t−1}. So ᾱ′_T = 0
    (β′_T = 1) exactly; β′_1 = β_1 is kept as given (1 − s_1² would round it), so ᾱ′_1 = ᾱ_1 exactly and
    √ᾱ′_1 = √ᾱ_1; √ᾱ′ is an increasing affine image of √ᾱ, so ᾱ′ decreases strictly where ᾱ does. Only v- or
    x0-prediction can be sampled from such a schedule: ε-prediction's x̂_0 = (x_T − √(1−ᾱ_T) ε̂)/√ᾱ_T divides
    by √ᾱ′_T = 0 (``posterior.check_signal``; diffusers lets it, docs/anchors.md).
    """
    b = _check_betas(betas, allow_last_one=False)
    if b.size < 2:
        raise ValueError("betas must have at least 2 entries to rescale to zero terminal SNR")
    s = np.sqrt(np.cumprod(1.0 - b))
    s = s[0] * ((s - s[-1]) / (s[0] - s[-1]))
    ab = s**2
    out = np.empty_like(b)
    out[0] = b[0]
    out[1:] = 1.0 - ab[1:] / ab[:-1]
    return out


def _check_betas(betas, allow_last_one: bool) -> np.ndarray:
    b = as_float_array(betas, "betas")
    if b.ndim != 1 or b.size < 1:
        raise ValueError(f"betas must be a 1-D array of length T >= 1, got shape {b.shape}")
    inner = b[:-1] if allow_last_one else b
    if np.any(inner <= 0) or np.any(inner >= 1) or not (0 < b[-1] <= (1 if allow_last_one else np.nextafter(1, 0))):
        valid = "(0, 1), with β_T = 1 allowed for zero terminal SNR" if allow_last_one else "(0, 1)"
        raise ValueError(f"betas must lie in {valid}; got min {b.min():g}, max {b.max():g}")
    return b


@dataclass(frozen=True, eq=False)
class Schedule:
    """A discrete noise schedule: float64 tables of length T+1 indexed by math t (S6, S7, P1).

    Attributes (each shape (T+1,)):
      betas β_t (β_0 = 0); alphas α_t = 1 − β_t; alpha_bars ᾱ_t = ∏_{s≤t} α_s (ᾱ_0 = 1);
      alpha_bars_prev ᾱ_{t−1} (ᾱ_{−1} := 1); sqrt_alpha_bars √ᾱ_t; sqrt_one_minus_alpha_bars √(1−ᾱ_t);
      sqrt_recip_alpha_bars 1/√ᾱ_t; sqrt_recipm1_alpha_bars √(1/ᾱ_t − 1);
      snr ᾱ_t/(1−ᾱ_t) (inf at t = 0; Gao 1.5 writes ᾱ_t/β̄_t in mixed notation); log_snr;
      posterior_variance β̃_t = (1−ᾱ_{t−1})/(1−ᾱ_t)·β_t (0 at t = 0 and t = 1);
      posterior_log_variance_clipped: log β̃_t with the t = 1 value (log 0) replaced by log β̃_2, as
        improved-diffusion does; t = 0 holds the same value (unused);
      posterior_mean_coef1 √ᾱ_{t−1}β_t/(1−ᾱ_t) and posterior_mean_coef2 √α_t(1−ᾱ_{t−1})/(1−ᾱ_t)
        (at t = 0: 1 and 0, the posterior of x_0 being x_0 itself);
      timestep_map: the model's timestep for each index (identity unless made by ``respace``).
    """

    betas: np.ndarray
    timestep_map: np.ndarray
    # the derived tables, computed by __post_init__ (declared here so that type checkers see them)
    alphas: np.ndarray = field(init=False, repr=False)
    alpha_bars: np.ndarray = field(init=False, repr=False)
    alpha_bars_prev: np.ndarray = field(init=False, repr=False)
    sqrt_alpha_bars: np.ndarray = field(init=False, repr=False)
    sqrt_one_minus_alpha_bars: np.ndarray = field(init=False, repr=False)
    sqrt_recip_alpha_bars: np.ndarray = field(init=False, repr=False)
    sqrt_recipm1_alpha_bars: np.ndarray = field(init=False, repr=False)
    snr: np.ndarray = field(init=False, repr=False)
    log_snr: np.ndarray = field(init=False, repr=False)
    posterior_variance: np.ndarray = field(init=False, repr=False)
    posterior_log_variance_clipped: np.ndarray = field(init=False, repr=False)
    posterior_mean_coef1: np.ndarray = field(init=False, repr=False)
    posterior_mean_coef2: np.ndarray = field(init=False, repr=False)

    @property
    def T(self) -> int:
        return self.betas.shape[0] - 1

    @classmethod
    def from_betas(cls, betas, timestep_map=None) -> Schedule:
        """Schedule from the T noisy betas β_1..β_T (shape (T,)); β_T = 1 (zero terminal SNR) is allowed."""
        b = _check_betas(betas, allow_last_one=True)
        full = np.concatenate([[0.0], b])
        if timestep_map is None:
            tmap = np.arange(full.size, dtype=np.int64)
        else:
            tmap = np.asarray(timestep_map, dtype=np.int64)
            if tmap.shape != full.shape:
                raise ValueError(f"timestep_map must have shape {full.shape}, got {tmap.shape}")
        full.setflags(write=False)
        tmap.setflags(write=False)
        return cls(betas=full, timestep_map=tmap)

    @classmethod
    def named(cls, name: str, T: int = 1000, zero_terminal_snr: bool = False) -> Schedule:
        """A named schedule: 'linear' (S1), 'linear_ldm' (S2), 'cosine' (S3), 'scaled_linear' (S5), 'su' (S4);
        with ``zero_terminal_snr`` its betas rescaled to ᾱ_T = 0 (R2, ``rescale_zero_terminal_snr``; T ≥ 2)."""
        makers = {"linear": linear_betas, "linear_ldm": lambda n: linear_betas(n, 0.001, 0.02),
                  "cosine": cosine_betas, "scaled_linear": scaled_linear_betas, "su": su_betas}
        if name not in makers:
            raise ValueError(f"schedule name must be one of {list(SCHEDULE_NAMES)}, got {name!r}")
        if not isinstance(zero_terminal_snr, (bool, np.bool_)):
            raise TypeError(f"zero_terminal_snr must be a bool, got {type(zero_terminal_snr).__name__}")
        betas = makers[name](T)
        return cls.from_betas(rescale_zero_terminal_snr(betas) if zero_terminal_snr else betas)

    def __post_init__(self):
        b = self.betas
        alphas = 1.0 - b
        ab = np.cumprod(alphas)
        ab[0] = 1.0
        ab_prev = np.concatenate([[1.0], ab[:-1]])
        one_m = 1.0 - ab
        with np.errstate(divide="ignore", invalid="ignore"):
            snr = ab / one_m
            post_var = np.where(one_m > 0, (1.0 - ab_prev) / one_m * b, 0.0)
            coef1 = np.where(one_m > 0, np.sqrt(ab_prev) * b / one_m, 1.0)
            coef2 = np.where(one_m > 0, np.sqrt(alphas) * (1.0 - ab_prev) / one_m, 0.0)
            log_snr = np.log(snr)
            recip = 1.0 / np.sqrt(ab)
            recipm1 = np.sqrt(1.0 / ab - 1.0)
        clip_src = post_var[2] if post_var.size > 2 else b[-1]
        log_var_clipped = np.log(np.concatenate([[clip_src, clip_src], post_var[2:]]))[: b.size]
        tables = dict(
            alphas=alphas, alpha_bars=ab, alpha_bars_prev=ab_prev, sqrt_alpha_bars=np.sqrt(ab),
            sqrt_one_minus_alpha_bars=np.sqrt(one_m), sqrt_recip_alpha_bars=recip,
            sqrt_recipm1_alpha_bars=recipm1, snr=snr, log_snr=log_snr, posterior_variance=post_var,
            posterior_log_variance_clipped=log_var_clipped, posterior_mean_coef1=coef1,
            posterior_mean_coef2=coef2)
        for key, value in tables.items():
            value.setflags(write=False)
            object.__setattr__(self, key, value)

    @property
    def zero_terminal_snr(self) -> bool:
        """True when ᾱ_T = 0 (β_T = 1): only v- or x0-prediction can be sampled."""
        return bool(self.alpha_bars[-1] == 0.0)


def check_schedule(schedule) -> Schedule:
    """``schedule`` itself if it is a ``Schedule``; TypeError naming the argument otherwise."""
    if not isinstance(schedule, Schedule):
        raise TypeError(f"schedule must be a Schedule, got {type(schedule).__name__}")
    return schedule


def timesteps(num_steps: int, T: int, spacing: str = "linspace", offset: int = 0) -> np.ndarray:
    """S9: N sampling timesteps in math t (1..T), distinct and descending, for diffusers' three spacings
    (diffusers' k = t − 1), i = 0..N−1:

        linspace: k_i = round(i·(T−1)/(N−1)), computed as np.linspace(0, T−1, N).round();
        leading:  k_i = i·(T//N) + offset (exact; ``offset`` is diffusers' ``steps_offset``);
        trailing: k_i = round(T − i·T/N) − 1, exact: integer arithmetic, round half to even.

    linspace rounds float64 values as diffusers does (np.round, half to even): where the exact fraction is half
    an integer, float error may round it the other way (T = 1000: at 92 values of N, e.g. 27, where diffusers
    gives the same lists). trailing, the product's spacing, is computed exactly, so that the NumPy runtime,
    the torch engine and sampler.onnx (in float64 or float32) compute the same list without floats. The lists
    equal diffusers' DDIMScheduler.set_timesteps for linspace and leading at every N. For trailing, diffusers
    computes np.round(np.arange(T, 0, −T/N)) − 1 in float64, which differs at 111 values of N for T = 1000: at
    some (61, 103, 121, 122, 201, …) it has N + 1 entries ending at k = −1, at others (48, 96, …) it breaks a
    tie another way. Always N steps here; see docs/diffusers.md.
    """
    T = check_int(T, "T", 1)
    num_steps = check_int(num_steps, "num_steps", 1, T)
    if spacing == "linspace":
        k = np.linspace(0, T - 1, num_steps).round()
    elif spacing == "leading":
        offset = check_int(offset, "offset", 0, T - 1 - (num_steps - 1) * (T // num_steps))
        k = np.arange(num_steps) * (T // num_steps) + offset
    elif spacing == "trailing":
        k = _round_half_even(T * (num_steps - np.arange(num_steps)), num_steps) - 1
    else:
        raise ValueError(f"spacing must be one of ['leading', 'linspace', 'trailing'], got {spacing!r}")
    if spacing != "leading" and offset != 0:
        raise ValueError(f"offset applies only to spacing='leading', got offset={offset} with {spacing!r}")
    return np.sort(k.astype(np.int64) + 1)[::-1].copy()


def _round_half_even(p: np.ndarray, q: int) -> np.ndarray:
    """p/q for integers p ≥ 0 and q > 0, rounded to the nearest integer, ties to even, in integer arithmetic."""
    n, r = np.divmod(p, q)
    return n + ((2 * r > q) | ((2 * r == q) & (n % 2 == 1)))


def respace(schedule: Schedule, timesteps) -> Schedule:
    """S8: the schedule restricted to a subsequence τ of timesteps (any order, distinct, in 1..T).

    ᾱ'_i = ᾱ_{τ_i}, β'_i = 1 − ᾱ_{τ_i}/ᾱ_{τ_{i−1}} (τ_0 = 0, ᾱ_0 = 1); ``timestep_map[i]`` is the parent's
    model timestep for τ_i, so a model is still called with the timesteps it was trained on.
    """
    check_schedule(schedule)
    tau = np.asarray(timesteps)
    if tau.ndim != 1 or tau.size < 1 or not np.issubdtype(tau.dtype, np.integer):
        raise ValueError(f"timesteps must be a non-empty 1-D integer array, got shape {tau.shape} dtype {tau.dtype}")
    tau = np.sort(tau.astype(np.int64))
    if tau[0] < 1 or tau[-1] > schedule.T or np.any(np.diff(tau) == 0):
        raise ValueError(f"timesteps must be distinct values in 1..{schedule.T}")
    ab = schedule.alpha_bars[np.concatenate([[0], tau])]
    betas = 1.0 - ab[1:] / ab[:-1]
    return Schedule.from_betas(betas, timestep_map=schedule.timestep_map[np.concatenate([[0], tau])])


def vp_sde_marginal(t, beta_min: float = 0.1, beta_max: float = 20.0):
    """S10: the VP-SDE with linear β(s) = β_min + s(β_max − β_min), s ∈ [0, 1].

    Returns (γ_t, σ_t) with γ_t = exp(−½∫₀ᵗβ(s)ds) and σ_t² = 1 − exp(−∫₀ᵗβ(s)ds); shapes of ``t``.
    The discrete schedule β_i = β(i/T)/T has ᾱ_i → γ²_{i/T} as T grows (β_min = 0.1, β_max = 20 is S1).
    """
    t = as_float_array(t, "t")
    if np.any(t < 0) or np.any(t > 1):
        raise ValueError("t must lie in [0, 1] for the VP-SDE")
    beta_min = check_real(beta_min, "beta_min", 0.0, low_open=True)
    beta_max = check_real(beta_max, "beta_max", beta_min)
    integral = beta_min * t + 0.5 * t**2 * (beta_max - beta_min)
    return np.exp(-0.5 * integral), np.sqrt(-np.expm1(-integral))


def vp_sde_beta(t, beta_min: float = 0.1, beta_max: float = 20.0):
    """S10: the VP-SDE rate β(t) = β_min + t(β_max − β_min); drift f = −½β(t)x, diffusion g = √β(t)."""
    t = as_float_array(t, "t")
    return beta_min + t * (beta_max - beta_min)


def ve_sde_sigma(t, sigma_min: float = 0.01, sigma_max: float = 50.0):
    """S11: the VE-SDE's geometric noise level σ_t = σ_min (σ_max/σ_min)^t, t ∈ [0, 1];
    x_t given x_0 ~ N(x_0, σ_t² I), diffusion g(t) = σ_t √(2 log(σ_max/σ_min))."""
    t = as_float_array(t, "t")
    if np.any(t < 0) or np.any(t > 1):
        raise ValueError("t must lie in [0, 1] for the VE-SDE")
    sigma_min = check_real(sigma_min, "sigma_min", 0.0, low_open=True)
    sigma_max = check_real(sigma_max, "sigma_max", sigma_min, low_open=True)
    return sigma_min * (sigma_max / sigma_min) ** t


def random_walk_variance(t):
    """S12: Inouye's random-walk process q(x_t given x_{t−1}) = N(x_{t−1}, I), so q(x_t given x_0) = N(x_0, t·I).
    Returns the marginal variance t (shape of ``t``); t must be ≥ 0."""
    t = as_float_array(t, "t")
    if np.any(t < 0):
        raise ValueError("t must be >= 0 for the random-walk process")
    return t


def karras_sigmas(num_steps: int, sigma_min: float = 0.002, sigma_max: float = 80.0, rho: float = 7.0):
    """EDM's noise levels σ_i = (σ_max^{1/ρ} + i/(N−1)(σ_min^{1/ρ} − σ_max^{1/ρ}))^ρ, then a final 0;
    shape (N+1,)."""
    num_steps = check_int(num_steps, "num_steps", 2)
    sigma_min = check_real(sigma_min, "sigma_min", 0.0, low_open=True)
    sigma_max = check_real(sigma_max, "sigma_max", sigma_min, low_open=True)
    rho = check_real(rho, "rho", 0.0, low_open=True)
    ramp = np.linspace(0, 1, num_steps)
    s = (sigma_max ** (1 / rho) + ramp * (sigma_min ** (1 / rho) - sigma_max ** (1 / rho))) ** rho
    return np.concatenate([s, [0.0]])


def ancestral_sigmas(sigma_from: float, sigma_to: float, eta: float = 1.0):
    """k-diffusion's ancestral split of a step σ_from → σ_to into (σ_down, σ_up):
    σ_up = min(σ_to, η·√(σ_to²(σ_from² − σ_to²)/σ_from²)), σ_down = √(σ_to² − σ_up²).
    In VP terms (σ = √((1−ᾱ)/ᾱ)) this is the DDIM step with σ_t(η) of P7."""
    sigma_from = check_real(sigma_from, "sigma_from", 0.0, low_open=True)
    sigma_to = check_real(sigma_to, "sigma_to", 0.0, sigma_from)
    eta = check_real(eta, "eta", 0.0)
    up = min(sigma_to, eta * np.sqrt(sigma_to**2 * (sigma_from**2 - sigma_to**2) / sigma_from**2))
    return float(np.sqrt(sigma_to**2 - up**2)), float(up)


def su_from_ddpm(schedule: Schedule):
    """S4/Su notation: Su's α_t, β_t are the square roots of DDPM's (his α_t² + β_t² = 1), his ᾱ_t is
    √(DDPM ᾱ_t) and his β̄_t = √(1 − DDPM ᾱ_t). Returns (alpha, beta, alpha_bar, beta_bar), each (T+1,)."""
    check_schedule(schedule)
    return (np.sqrt(schedule.alphas), np.sqrt(schedule.betas), schedule.sqrt_alpha_bars,
            schedule.sqrt_one_minus_alpha_bars)


def ddpm_betas_from_su(alpha_su) -> np.ndarray:
    """Inverse of the Su mapping: DDPM β_t = 1 − α_t(Su)² from Su's α_1..α_T; shape (T,)."""
    a = as_float_array(alpha_su, "alpha_su")
    if a.ndim != 1 or np.any(a <= 0) or np.any(a >= 1):
        raise ValueError("alpha_su must be a 1-D array with entries in (0, 1)")
    return 1.0 - a**2


def su_log_alpha_bar_bound(T: int) -> float:
    """S4: Su's bound log ᾱ_T(Su) < −0.005(T+1) for his schedule (ᾱ(Su) = √(DDPM ᾱ))."""
    T = check_int(T, "T", 1)
    return -0.005 * (T + 1)


def su_merged_noise_variance(schedule: Schedule, t: int) -> float:
    """F3: variance of Su's merged noise Σ_{i≤t} (α_t⋯α_{i+1})β_i ε_i (Su notation, eq. 1.3), computed
    term by term. Su's eq. 1.4 says it equals 1 − ᾱ_t(Su)² = 1 − DDPM ᾱ_t."""
    check_schedule(schedule)
    t = check_int(t, "t", 0, schedule.T)
    a_su, b_su, _, _ = su_from_ddpm(schedule)
    total = 0.0
    for i in range(1, t + 1):
        total += np.prod(a_su[i + 1 : t + 1] ** 2) * b_su[i] ** 2
    return float(total)
