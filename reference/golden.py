"""Golden files: the reference's outputs for fixed seeds and sizes, frozen into ``golden/*.npz``.

Each case is a function returning a dict of arrays (inputs and expected outputs, keyed ``in/…`` and
``out/…``); ``regen`` writes one ``<case>.npz`` per case plus ``manifest.json`` (file, generator, sha256,
version), and ``check`` recomputes every case and compares it with the file (relative 1e-12). The files
are written byte-for-byte reproducibly (fixed zip timestamps, sorted keys), so a regen that changes
nothing leaves git clean. The engine's and the runtime's tests read the ``in/…`` arrays of these files
and hold their own outputs to the ``out/…`` arrays.

Golden files catch regressions; they prove nothing by themselves (tests/ holds the proofs).
"""

from __future__ import annotations

import hashlib
import json
import zipfile
from pathlib import Path

import numpy as np

from ldmkit.common import atomic_write

from . import analytic, forward, kl, losses, posterior, samplers, schedules

VERSION = "0.1.0"
RTOL = 1e-12


def _rng(case: str) -> np.random.Generator:
    return np.random.default_rng(int.from_bytes(hashlib.sha256(case.encode()).digest()[:8], "little"))


def case_schedules() -> dict:
    """Named schedules (S1–S5) at T = 1000 and T = 10: β, ᾱ, posterior tables (S6, S7, P1); the
    spacings (S9) for N = 3, 10, 50 at T = 1000; a respaced schedule (S8)."""
    out = {}
    for name in schedules.SCHEDULE_NAMES:
        for T in (1000, 10):
            s = schedules.Schedule.named(name, T)
            for attr in ("betas", "alpha_bars", "posterior_variance", "posterior_log_variance_clipped",
                         "posterior_mean_coef1", "posterior_mean_coef2"):
                out[f"out/{name}/{T}/{attr}"] = getattr(s, attr)
            out[f"out/{name}/{T}/log_snr"] = s.log_snr[1:]
    for spacing in ("linspace", "leading", "trailing"):
        for n in (3, 10, 50):
            out[f"out/timesteps/{spacing}/{n}"] = schedules.timesteps(n, 1000, spacing)
    sub = schedules.respace(schedules.Schedule.named("linear", 1000), schedules.timesteps(10, 1000, "leading"))
    out["out/respace/linear_leading10/betas"] = sub.betas
    out["out/respace/linear_leading10/timestep_map"] = sub.timestep_map
    return out


def _posterior_inputs(rng):
    return {"in/x0": rng.standard_normal((5, 2, 3, 3)), "in/eps": rng.standard_normal((5, 2, 3, 3)),
            "in/t": np.array([1, 2, 250, 999, 1000]), "in/t_prev": np.array([0, 1, 200, 900, 0])}


def case_forward_posterior() -> dict:
    """q_sample/q_step (F1, F2), prior KL (F4), q_posterior (P1), conversions (P3–P5), DDIM σ and
    posterior (P6, P7) on the linear T = 1000 schedule, batch of 5 with per-example t."""
    s = schedules.Schedule.named("linear", 1000)
    d = _posterior_inputs(_rng("forward_posterior"))
    x0, eps, t, tp = d["in/x0"], d["in/eps"], d["in/t"], d["in/t_prev"]
    xt = forward.q_sample(x0, t, eps, s)
    mean, var, logvar = posterior.q_posterior(x0, xt, t, s)
    sigma = posterior.ddim_sigma(t, tp, 0.5, s)
    dmean, dvar = posterior.ddim_posterior(x0, xt, t, tp, sigma, s)
    v = posterior.v_from_eps(xt, t, eps, s)
    d.update({
        "out/q_sample": xt, "out/q_step": forward.q_step(x0, t, eps, s), "out/prior_kl": forward.prior_kl(x0, s),
        "out/q_posterior/mean": mean, "out/q_posterior/var": np.broadcast_to(var, (5, 1, 1, 1)),
        "out/q_posterior/log_var": np.broadcast_to(logvar, (5, 1, 1, 1)),
        "out/x0_from_eps": posterior.x0_from_eps(xt, t, eps, s), "out/v_from_eps": v,
        "out/eps_from_v": posterior.eps_from_v(xt, t, v, s), "out/x0_from_v": posterior.x0_from_v(xt, t, v, s),
        "out/score_from_eps": posterior.score_from_eps(xt, t, eps, s),
        "out/mean_from_eps": posterior.mean_from_eps(xt, t, eps, s),
        "out/ddim_sigma_eta0.5": sigma, "out/ddim_posterior/mean": dmean,
        "out/ddim_posterior/var": np.broadcast_to(dvar, (5, 1, 1, 1)),
    })
    return d


def case_kl() -> dict:
    """K1–K6 on fixed random arguments."""
    rng = _rng("kl")
    m1, m2, lv1, lv2 = (rng.standard_normal((4, 6)) for _ in range(4))
    a, b = rng.standard_normal((3, 3)), rng.standard_normal((3, 3))
    c1, c2 = a @ a.T + np.eye(3), b @ b.T + 0.5 * np.eye(3)
    mu1, mu2 = rng.standard_normal(3), rng.standard_normal(3)
    x = rng.integers(0, 256, (4, 6)) / 127.5 - 1  # on the 256-level grid of K5
    p, q = rng.dirichlet(np.ones(7), size=3), rng.dirichlet(np.ones(7), size=3)
    return {
        "in/m1": m1, "in/m2": m2, "in/lv1": lv1, "in/lv2": lv2, "in/cov1": c1, "in/cov2": c2, "in/mu1": mu1,
        "in/mu2": mu2, "in/x": x, "in/p": p, "in/q": q,
        "out/normal_kl": kl.normal_kl(m1, lv1, m2, lv2),
        "out/gaussian_kl_full": np.array(kl.gaussian_kl_full(mu1, c1, mu2, c2)),
        "out/vae_kl": kl.vae_kl(m1, lv1), "out/gaussian_log_likelihood": kl.gaussian_log_likelihood(m2, m1, lv1),
        "out/discretized_gaussian_log_likelihood": kl.discretized_gaussian_log_likelihood(x, 0.5 * m1, 0.5 * lv1 - 1),
        "out/entropy": kl.entropy(p), "out/cross_entropy": kl.cross_entropy(p, q),
        "out/kl_discrete": kl.kl_discrete(p, q),
    }


def _gaussian_model_data():
    return analytic.GaussianData(mean=np.linspace(-0.4, 0.4, 8), var=0.09)


def case_losses() -> dict:
    """The VLB terms (L1, L2, K5, F4) and bits/dim (L6) of the exact denoiser of Gaussian data (X1) on
    4 examples of 8-dim data on 256 levels, cosine T = 50, both reverse variances; loss weights (L2–L5)."""
    rng = _rng("losses")
    s = schedules.Schedule.named("cosine", 50)
    data = _gaussian_model_data()
    x0 = np.clip(np.round((data.sample(4, rng) + 1) * 127.5), 0, 255) / 127.5 - 1
    noise = rng.standard_normal((50, 4, 8))
    out = {"in/x0": x0, "in/noise": noise, "in/data_mean": data.mean, "in/data_var": data.var}
    model = analytic.vp_model(data, s)
    for variance in ("beta_tilde", "beta"):
        vlb = losses.vlb_terms(model, x0, s, noise, variance=variance)
        out[f"out/vlb/{variance}/prior"] = vlb["prior"]
        out[f"out/vlb/{variance}/terms"] = vlb["terms"]
        out[f"out/vlb/{variance}/bits_per_dim"] = losses.nll_bits_per_dim(vlb)
    t = np.arange(2, 51)
    out["out/vlb_weight/beta_tilde"] = losses.vlb_weight(t, s, "beta_tilde")
    out["out/vlb_weight/beta"] = losses.vlb_weight(t, s, "beta")
    for pred in ("eps", "x0", "v"):
        out[f"out/prediction_loss_weight/{pred}"] = losses.prediction_loss_weight(t, s, pred)
    e1, e2 = rng.standard_normal((2, 4, 8))
    out["in/eps"], out["in/eps_pred"] = e1, e2
    out["out/simple_loss"] = losses.simple_loss(e1, e2)
    return out


def _mixture():
    return analytic.GaussianMixtureData(weights=[0.5, 0.3, 0.2], means=[[-1.0, 0.5], [1.0, 1.0], [0.0, -1.0]],
                                        vars=[0.04, 0.09, 0.01])


def case_samplers() -> dict:
    """Whole trajectories on fixed noise with the exact class-conditional denoiser of a 2-D Gaussian
    mixture (X2), linear T = 1000: DDPM β̃ and β (A1, 1000 steps and 25 respaced), DDIM η ∈ {0, 0.5, 1}
    (A2, 25 steps), Heun and Euler on the PF-ODE (A5, 10 steps), DPM-Solver++(2M) (10 steps), DDIM with
    v-prediction, and classifier-free guidance w = 3 (A9). Labels y = component, −1 = unconditional."""
    rng = _rng("samplers")
    s = schedules.Schedule.named("linear", 1000)
    mix = _mixture()
    B = 6
    x_T = rng.standard_normal((B, 2))
    y = np.array([0, 1, 2, 0, 1, 2])
    noise = rng.standard_normal((1000, B, 2))
    ts25, ts10 = schedules.timesteps(25, 1000, "trailing"), schedules.timesteps(10, 1000, "trailing")
    out = {"in/x_T": x_T, "in/y": y, "in/noise": noise, "in/timesteps25": ts25, "in/timesteps10": ts10,
           "in/mix_weights": mix.weights, "in/mix_means": mix.means, "in/mix_vars": mix.vars}
    runs = sampler_trajectories(analytic.vp_model(mix, s), analytic.vp_model(mix, s, prediction="v"), x_T, noise,
                                out)
    return {**out, **{f"out/{name}": traj for name, traj in runs.items()}}


def sampler_trajectories(model, v_model, x_T, noise, case: dict) -> dict:
    """The sampler runs of the "samplers" case: {name: trajectory}, on the linear T = 1000 schedule from x_T
    with the loop noise ``noise`` (1000, B, d), the case's labels and step lists (``case["in/..."]``), an
    ε-model and a v-model. x_T and noise are NumPy arrays here, torch tensors in the engine's test, which
    runs these same calls on its device: a sampler added here is held to its golden file everywhere."""
    s = schedules.Schedule.named("linear", 1000)
    y, ts25, ts10 = case["in/y"], case["in/timesteps25"], case["in/timesteps10"]
    sub = schedules.respace(s, ts25)
    out = {}
    for variance in ("beta_tilde", "beta"):
        out[f"ddpm1000/{variance}"] = samplers.ddpm_sample(model, x_T, s, variance, noise, y=y,
                                                           return_trajectory=True)[1]
        out[f"ddpm25/{variance}"] = samplers.ddpm_sample(model, x_T, sub, variance, noise[:25], y=y,
                                                         return_trajectory=True)[1]
    for eta in (0.0, 0.5, 1.0):
        out[f"ddim25/eta{eta}"] = samplers.ddim_sample(model, x_T, s, ts25, eta, noise[:25], y=y,
                                                       return_trajectory=True)[1]
    out["heun10"] = samplers.heun_sample(model, x_T, s, ts10, y=y, return_trajectory=True)[1]
    out["euler10"] = samplers.euler_sample(model, x_T, s, ts10, y=y, return_trajectory=True)[1]
    out["dpmpp_2m10"] = samplers.dpmpp_2m_sample(model, x_T, s, ts10, y=y, return_trajectory=True)[1]
    out["ddim25_v/eta0.0"] = samplers.ddim_sample(v_model, x_T, s, ts25, 0.0, prediction="v", y=y,
                                                  return_trajectory=True)[1]
    guided = samplers.cfg(model, 3.0, null_class=-1)
    out["ddim25_cfg3/eta0.0"] = samplers.ddim_sample(guided, x_T, s, ts25, 0.0, y=y, return_trajectory=True)[1]
    return out


def case_refinements() -> dict:
    """The refinements R1–R5: Min-SNR-γ weights (R1, γ = 5, three predictions) on the linear and the
    zero-terminal-SNR linear schedule, T = 1000; zero-terminal-SNR betas (R2) of three schedules at T = 1000
    and T = 10; guidance rescale (R3, φ = 0.7) and dynamic thresholding (R4, p = 99.5 and 100) of fixed random
    arrays; v conversions (R5) on the zero-terminal-SNR schedule; and whole trajectories from t = T with
    ᾱ_T = 0 (``zero_snr_trajectories``), labels y = component, −1 = unconditional."""
    rng = _rng("refinements")
    lin, zero = schedules.Schedule.named("linear", 1000), schedules.Schedule.named("linear", 1000, True)
    t = np.arange(1, 1001)
    out = {}
    for sname, sched in (("linear", lin), ("linear_zero_snr", zero)):
        for pred in ("eps", "x0", "v"):
            out[f"out/min_snr_weight/{sname}/{pred}"] = losses.min_snr_weight(t, sched, 5.0, pred)
    for name in ("linear", "cosine", "scaled_linear"):
        for T in (1000, 10):
            out[f"out/zero_snr_betas/{name}/{T}"] = schedules.Schedule.named(name, T, True).betas
    guided, cond = 3.0 * rng.standard_normal((3, 2, 4, 4)), rng.standard_normal((3, 2, 4, 4))
    x0 = 2.0 * rng.standard_normal((3, 2, 4, 4))
    out.update({"in/guided": guided, "in/cond": cond, "in/x0": x0,
                "out/rescale_guidance/0.7": samplers.rescale_guidance(guided, cond, 0.7),
                "out/dynamic_threshold/99.5": posterior.dynamic_threshold(x0, 99.5),
                "out/dynamic_threshold/100": posterior.dynamic_threshold(x0, 100.0)})
    d = _posterior_inputs(rng)
    xt = forward.q_sample(d["in/x0"], d["in/t"], d["in/eps"], zero)
    v = posterior.v_from_x0(xt, d["in/t"], d["in/x0"], zero)
    out.update({"in/r5/x0": d["in/x0"], "in/r5/eps": d["in/eps"], "in/r5/t": d["in/t"], "out/r5/x_t": xt,
                "out/r5/v": v, "out/r5/x0_from_v": posterior.x0_from_v(xt, d["in/t"], v, zero),
                "out/r5/eps_from_v": posterior.eps_from_v(xt, d["in/t"], v, zero)})
    mix = _mixture()
    B = 6
    case = {"in/x_T": rng.standard_normal((B, 2)), "in/y": np.array([0, 1, 2, 0, 1, 2]),
            "in/noise": rng.standard_normal((10, B, 2)), "in/mix_weights": mix.weights, "in/mix_means": mix.means,
            "in/mix_vars": mix.vars}
    runs = zero_snr_trajectories(analytic.vp_model(mix, zero, "v"), analytic.vp_model(mix, zero, "x0"),
                                 case["in/x_T"], case["in/noise"], case)
    return {**out, **case, **{f"out/zero_snr/{name}": traj for name, traj in runs.items()}}


def zero_snr_trajectories(v_model, x0_model, x_T, noise, case: dict) -> dict:
    """The sampler runs of the "refinements" case: every sampler of ``samplers.SAMPLERS`` through
    ``samplers.sample`` (10 trailing steps, starting at t = T where ᾱ_T = 0, R2) on the zero-terminal-SNR
    linear T = 1000 schedule with a v-model, guided (w = 3) with guidance rescale φ = 0.7 (R3) and without;
    DDIM with an x0-model. {name: final sample (B, 2)}; NumPy here, torch tensors in the engine's test."""
    zero = schedules.Schedule.named("linear", 1000, True)
    y, out = case["in/y"], {}
    for name in samplers.SAMPLERS:
        for phi in (0.0, 0.7):
            final = samplers.sample(v_model, x_T, zero, name, 10, noise=noise, prediction="v", y=y, guidance=3.0,
                                    null_class=-1, guidance_rescale=phi)
            out[f"{name}/v/cfg3/rescale{phi}"] = final
    out["ddim/x0/cfg3/rescale0.7"] = samplers.sample(x0_model, x_T, zero, "ddim", 10, prediction="x0", y=y,
                                                     guidance=3.0, null_class=-1, guidance_rescale=0.7)
    return out


CASES = {"schedules": case_schedules, "forward_posterior": case_forward_posterior, "kl": case_kl,
         "losses": case_losses, "samplers": case_samplers, "refinements": case_refinements}


def _write_npz(path: Path, arrays: dict) -> None:
    """Write ``arrays`` as an .npz with fixed timestamps and sorted keys (reproducible bytes), atomically."""
    with atomic_write(path) as out, zipfile.ZipFile(out, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        for key in sorted(arrays):
            info = zipfile.ZipInfo(key + ".npy", date_time=(1980, 1, 1, 0, 0, 0))
            info.compress_type = zipfile.ZIP_DEFLATED
            with zf.open(info, "w") as f:
                np.lib.format.write_array(f, np.array(arrays[key], order="C"), allow_pickle=False)


def _sha256(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def load(directory, case: str) -> dict:
    """The arrays of golden case ``case`` in ``directory`` (e.g. ``load(dir, "samplers")["in/x_T"]``)."""
    path = Path(directory) / f"{case}.npz"
    if not path.is_file():
        raise FileNotFoundError(f"golden file not found: {path}")
    with np.load(path, allow_pickle=False) as f:
        return {k: f[k] for k in f.files}


def regen(directory) -> list[str]:
    """Recompute every case and write ``<case>.npz`` and ``manifest.json`` into ``directory``."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    entries = []
    for name, fn in CASES.items():
        path = directory / f"{name}.npz"
        _write_npz(path, fn())
        entries.append({"file": path.name, "generator": f"{__name__}.{fn.__name__}", "sha256": _sha256(path),
                        "description": " ".join(fn.__doc__.split("\n\n")[0].split())})
    manifest = {"version": VERSION, "rtol": RTOL, "files": entries}
    with atomic_write(directory / "manifest.json", binary=False) as f:
        f.write(json.dumps(manifest, indent=2) + "\n")
    return [e["file"] for e in entries] + ["manifest.json"]


def compare(expected: dict, actual: dict, rtol: float = RTOL) -> list[str]:
    """Problems found comparing two case dicts (missing keys, shapes, values beyond ``rtol``)."""
    problems = []
    for key in sorted(set(expected) | set(actual)):
        if key not in actual or key not in expected:
            problems.append(f"{key}: {'missing from the recomputation' if key not in actual else 'not in the file'}")
            continue
        e, a = np.asarray(expected[key]), np.asarray(actual[key])
        if e.shape != a.shape:
            problems.append(f"{key}: shape {a.shape}, expected {e.shape}")
            continue
        scale = np.max(np.abs(e[np.isfinite(e)]), initial=0.0)
        if not np.allclose(a, e, rtol=rtol, atol=rtol * 1e-3 * scale, equal_nan=True):
            err = np.max(np.abs(a - e) / np.maximum(np.abs(e), 1e-300), where=np.isfinite(e), initial=0.0)
            problems.append(f"{key}: max relative error {err:.3g} > {rtol:g}")
    return problems


def check(directory) -> list[str]:
    """Recompute every case and compare with the files in ``directory``; returns the problems found
    (each starts with the file name), empty when all match."""
    directory = Path(directory)
    manifest_path = directory / "manifest.json"
    if not manifest_path.is_file():
        return [f"manifest.json: not found in {directory}"]
    try:
        manifest = json.loads(manifest_path.read_text())
        entries = {e["file"]: e for e in manifest["files"]}
    except (ValueError, KeyError, TypeError) as exc:
        return [f"manifest.json: unreadable ({exc})"]
    problems = []
    for name, fn in CASES.items():
        fname = f"{name}.npz"
        path = directory / fname
        if fname not in entries:
            problems.append(f"{fname}: not listed in manifest.json")
            continue
        if not path.is_file():
            problems.append(f"{fname}: file missing")
            continue
        if _sha256(path) != entries[fname]["sha256"]:
            problems.append(f"{fname}: sha256 differs from manifest.json (file changed)")
        problems += [f"{fname}: {p}" for p in compare(load(directory, name), fn())]
    unknown = sorted(set(entries) - {f"{n}.npz" for n in CASES})
    problems += [f"{f}: listed in manifest.json but no such case" for f in unknown]
    return problems
