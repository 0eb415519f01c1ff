"""The engine's diffusion math (engine/diffusion.py) against the reference through the golden files.

Each sampler runs on the golden inputs (x_T, noise, labels, timesteps) with the golden case's exact
mixture denoiser (X2) wrapped as a torch model. In float64 the engine must reproduce the golden
trajectories to 1e-10 (the same math); in float32 within FLOAT32_ATOL, the tolerance this project states
for float32 sampling. The same tests run on CUDA under the ``gpu`` marker.
"""

from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from ldmkit.engine import diffusion as D  # noqa: E402
from ldmkit.reference import analytic, golden, posterior, samplers, schedules  # noqa: E402

GOLDEN = Path(__file__).resolve().parents[1] / "golden"
FLOAT32_ATOL = 2e-4  # absolute, on samples of scale ~1, over a whole trajectory
SCHED = schedules.Schedule.named("linear", 1000)
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)]


@pytest.fixture(scope="module")
def case():
    return golden.load(GOLDEN, "samplers")


def torch_model(np_model, counter=None):
    """A NumPy model(x_t, t, y) as a torch callable of the same signature (dtype and device kept)."""

    def model(x, t, y=None):
        if counter is not None:
            counter.append(x.shape[0])
        out = np_model(x.detach().cpu().double().numpy(), t.cpu().numpy(), None if y is None else y.cpu().numpy())
        return torch.from_numpy(out).to(device=x.device, dtype=x.dtype)

    return model


def _mixture(case):
    return analytic.GaussianMixtureData(case["in/mix_weights"], case["in/mix_means"], case["in/mix_vars"])


def _run(name, case, dtype, device):
    mix = _mixture(case)
    model = torch_model(analytic.vp_model(mix, SCHED, prediction="v" if "_v/" in name else "eps"))
    x_T = torch.tensor(case["in/x_T"], dtype=dtype, device=device)
    y = torch.tensor(case["in/y"], device=device)
    noise = torch.tensor(case["in/noise"], dtype=dtype, device=device)
    ts25, ts10 = case["in/timesteps25"], case["in/timesteps10"]
    if name.startswith("ddpm1000/"):
        return D.ddpm_sample(model, x_T, SCHED, name.split("/")[1], noise, y=y, return_trajectory=True)[1]
    if name.startswith("ddpm25/"):
        sub = schedules.respace(SCHED, ts25)
        return D.ddpm_sample(model, x_T, sub, name.split("/")[1], noise[:25], y=y, return_trajectory=True)[1]
    if name.startswith("ddim25/"):
        eta = float(name.split("eta")[1])
        return D.ddim_sample(model, x_T, SCHED, ts25, eta, noise[:25], y=y, return_trajectory=True)[1]
    if name == "ddim25_v/eta0.0":
        return D.ddim_sample(model, x_T, SCHED, ts25, 0.0, prediction="v", y=y, return_trajectory=True)[1]
    if name == "ddim25_cfg3/eta0.0":
        guided = D.cfg(model, 3.0, null_class=-1)
        return D.ddim_sample(guided, x_T, SCHED, ts25, 0.0, y=y, return_trajectory=True)[1]
    if name == "heun10":
        return D.heun_sample(model, x_T, SCHED, ts10, y=y, return_trajectory=True)[1]
    if name == "euler10":
        return D.heun_sample(model, x_T, SCHED, ts10, y=y, return_trajectory=True, second_order=False)[1]
    if name == "dpmpp_2m10":
        return D.dpmpp_2m_sample(model, x_T, SCHED, ts10, y=y, return_trajectory=True)[1]
    raise KeyError(name)


TRAJECTORIES = ["ddpm1000/beta_tilde", "ddpm1000/beta", "ddpm25/beta_tilde", "ddpm25/beta", "ddim25/eta0.0",
                "ddim25/eta0.5", "ddim25/eta1.0", "ddim25_v/eta0.0", "ddim25_cfg3/eta0.0", "heun10", "euler10",
                "dpmpp_2m10"]


def test_every_golden_trajectory_is_covered(case):
    assert sorted(TRAJECTORIES) == sorted(k[4:] for k in case if k.startswith("out/"))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name", TRAJECTORIES)
def test_sampler_trajectory_matches_golden_float64_A1_A2_A5_A9(case, name, device):
    traj = _run(name, case, torch.float64, device).cpu().numpy()
    np.testing.assert_allclose(traj, case[f"out/{name}"], rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name", TRAJECTORIES)
def test_sampler_trajectory_matches_golden_float32(case, name, device):
    traj = _run(name, case, torch.float32, device).cpu().numpy()
    np.testing.assert_allclose(traj, case[f"out/{name}"], rtol=0, atol=FLOAT32_ATOL)


@pytest.mark.parametrize("device", DEVICES)
def test_forward_and_conversions_match_golden_F2_P3(device):
    g = golden.load(GOLDEN, "forward_posterior")
    t = torch.tensor(g["in/t"], device=device)
    for dtype, tol in ((torch.float64, 1e-12), (torch.float32, 2e-5)):
        x0 = torch.tensor(g["in/x0"], dtype=dtype, device=device)
        eps = torch.tensor(g["in/eps"], dtype=dtype, device=device)
        xt = D.q_sample(x0, t, eps, SCHED)
        np.testing.assert_allclose(xt.cpu().numpy(), g["out/q_sample"], rtol=tol, atol=tol)
        xt = torch.tensor(g["out/q_sample"], dtype=dtype, device=device)
        x0_hat, _ = D.x0_eps_from_output(eps, xt, t, SCHED, "eps")
        # x0 from eps divides by √ᾱ_t (√ᾱ_1000 ≈ 0.0064): compare relative to that amplification.
        np.testing.assert_allclose(x0_hat.cpu().numpy(), g["out/x0_from_eps"], rtol=tol, atol=tol / 0.0064)
        v = D.training_target(x0_hat, eps, xt, t, SCHED, "v")
        np.testing.assert_allclose(v.cpu().numpy(), g["out/v_from_eps"], rtol=tol, atol=tol / 0.0064)
        x0_v, eps_v = D.x0_eps_from_output(torch.tensor(g["out/v_from_eps"], dtype=dtype, device=device), xt, t,
                                           SCHED, "v")
        np.testing.assert_allclose(eps_v.cpu().numpy(), g["out/eps_from_v"], rtol=tol, atol=tol)
        np.testing.assert_allclose(x0_v.cpu().numpy(), g["out/x0_from_v"], rtol=tol, atol=tol)


def test_steps_with_per_example_t_match_reference_A1_A2():
    """Single steps with a different t per example (as in training) against the reference steps."""
    rng = np.random.default_rng(0)
    x, out, z = (rng.standard_normal((5, 2, 3, 3)) for _ in range(3))
    t, tp = np.array([1, 2, 300, 999, 1000]), np.array([0, 1, 250, 900, 500])
    tx = {k: torch.tensor(v) for k, v in dict(x=x, out=out, z=z, t=t, tp=tp).items()}
    for pred in ("eps", "x0", "v"):
        for var in ("beta_tilde", "beta"):
            ref = samplers.ddpm_step(out, x, t, SCHED, var, z, pred)
            got = D.ddpm_step(tx["out"], tx["x"], tx["t"], SCHED, var, tx["z"], pred)
            np.testing.assert_allclose(got.numpy(), ref, rtol=1e-12, atol=1e-12)
        for eta in (0.0, 0.7, 1.0):
            ref = samplers.ddim_step(out, x, t, tp, SCHED, eta, z, pred)
            got = D.ddim_step(tx["out"], tx["x"], tx["t"], tx["tp"], SCHED, eta, tx["z"], pred)
            np.testing.assert_allclose(got.numpy(), ref, rtol=1e-12, atol=1e-12)
        x0_ref, eps_ref = posterior.x0_eps_from_output(out, x, t, SCHED, pred, clip=1.0)
        x0, eps = D.x0_eps_from_output(tx["out"], tx["x"], tx["t"], SCHED, pred, clip=1.0)
        np.testing.assert_allclose(x0.numpy(), x0_ref, rtol=1e-12, atol=1e-12)
        np.testing.assert_allclose(eps.numpy(), eps_ref, rtol=1e-12, atol=1e-12)


def test_training_target_L5():
    """L5: the targets are ε, x_0 and v = √ᾱ ε − √(1−ᾱ) x_0 (P3), and the model output that equals the
    target gives back x_0 and ε exactly."""
    g = torch.Generator().manual_seed(0)
    x0, eps = torch.randn(4, 3, generator=g, dtype=torch.float64), torch.randn(4, 3, generator=g, dtype=torch.float64)
    t = torch.tensor([1, 10, 500, 1000])
    xt = D.q_sample(x0, t, eps, SCHED)
    for pred in ("eps", "x0", "v"):
        target = D.training_target(x0, eps, xt, t, SCHED, pred)
        x0_hat, eps_hat = D.x0_eps_from_output(target, xt, t, SCHED, pred)
        torch.testing.assert_close(x0_hat, x0, rtol=1e-9, atol=1e-9)
        torch.testing.assert_close(eps_hat, eps, rtol=1e-9, atol=1e-9)
    assert D.mse_per_example(eps, eps).abs().max() == 0


def test_cfg_one_batched_call_A9(case):
    calls = []
    mix = _mixture(case)
    model = torch_model(analytic.vp_model(mix, SCHED), calls)
    x = torch.tensor(case["in/x_T"])
    t = torch.full((6,), 500)
    y = torch.tensor(case["in/y"])
    out = D.cfg(model, 1.0, null_class=-1)(x, t, y)
    assert calls == [12]
    torch.testing.assert_close(out, model(x, t, y))
    with pytest.raises(ValueError, match=r"y \(class labels\) is required"):
        D.cfg(model, 1.0, null_class=-1)(x, t, None)


def test_bad_input():
    x = torch.zeros(2, 3)
    with pytest.raises(ValueError, match=r"t must be in 1\.\.1000"):
        D.ddpm_step(x, x, torch.tensor([0, 1]), SCHED)
    with pytest.raises(ValueError, match="t must be a scalar or have shape \\(2,\\)"):
        D.q_sample(x, torch.tensor([1, 2, 3]), x, SCHED)
    with pytest.raises(TypeError, match="integer timesteps"):
        D.q_sample(x, torch.tensor([1.5, 2.0]), x, SCHED)
    with pytest.raises(ValueError, match="noise must have shape"):
        D.q_sample(x, 5, torch.zeros(3, 3), SCHED)
    with pytest.raises(ValueError, match="t_prev must be smaller"):
        D.ddim_step(x, x, 5, 5, SCHED)
    with pytest.raises(ValueError, match="eta must be in"):
        D.ddim_step(x, x, 5, 4, SCHED, eta=-1.0)
    with pytest.raises(ValueError, match="prediction must be one of"):
        D.x0_eps_from_output(x, x, 5, SCHED, "score")
    with pytest.raises(ValueError, match="strictly descending"):
        D.ddim_sample(lambda a, b, c: a, x, SCHED, [1, 5])
    with pytest.raises(ValueError, match="noise must have shape"):
        D.ddim_sample(lambda a, b, c: a, x, SCHED, [5, 1], eta=1.0, noise=torch.zeros(3, 2, 3))
    with pytest.raises(TypeError, match="reference Schedule"):
        D.q_sample(x, 1, x, "linear")
