"""The engine's diffusion math against the reference through the golden files.

Sampling: the engine samples with the reference's own loops on torch tensors. Every golden sampler run
(``golden.sampler_trajectories``, the same calls that made the golden file) is repeated on torch tensors
with the golden case's exact mixture denoiser (X2) wrapped as a torch model: in float64 it must reproduce the
golden trajectories to 1e-10 (the same math), in float32 within FLOAT32_ATOL, the tolerance this project
states for float32 sampling. Training: q_sample and the regression targets (engine/diffusion.py). The same
tests run on CUDA under the ``gpu`` marker.
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


def np_as_torch_model(np_model, counter=None):
    """A NumPy model(x_t, t, y) as the reference loops call a torch model: x a tensor, t and y NumPy arrays;
    the output comes back on x's device in x's dtype."""

    def model(x, t, y=None):
        if counter is not None:
            counter.append(x.shape[0])
        out = np_model(x.detach().cpu().double().numpy(), np.asarray(t), None if y is None else np.asarray(y))
        return torch.from_numpy(out).to(device=x.device, dtype=x.dtype)

    return model


def _trajectories(case, dtype, device):
    """Every golden sampler run (``golden.sampler_trajectories``), on torch tensors of ``dtype`` on ``device``."""
    mix = analytic.GaussianMixtureData(case["in/mix_weights"], case["in/mix_means"], case["in/mix_vars"])
    model, v_model = (np_as_torch_model(analytic.vp_model(mix, SCHED, prediction=p)) for p in ("eps", "v"))
    x_T, noise = (torch.tensor(case[k], dtype=dtype, device=device) for k in ("in/x_T", "in/noise"))
    return golden.sampler_trajectories(model, v_model, x_T, noise, case)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_sampler_trajectories_on_torch_match_golden_A1_A2_A5_A9(case, dtype, device):
    """The reference's loops on torch tensors reproduce every golden trajectory: to 1e-10 in float64 (the same
    math), within FLOAT32_ATOL in float32; the results stay tensors of x's dtype on x's device."""
    runs = _trajectories(case, dtype, device)
    assert sorted(runs) == sorted(k[4:] for k in case if k.startswith("out/"))
    for name, traj in runs.items():
        assert isinstance(traj, torch.Tensor) and traj.dtype == dtype and traj.device.type == device, name
        if dtype == torch.float64:
            np.testing.assert_allclose(traj.cpu().numpy(), case[f"out/{name}"], rtol=1e-10, atol=1e-12, err_msg=name)
        else:
            np.testing.assert_allclose(traj.cpu().numpy(), case[f"out/{name}"], rtol=0, atol=FLOAT32_ATOL,
                                       err_msg=name)


def test_torch_model_moves_timesteps_and_labels_to_the_device():
    """torch_model: the reference passes t and y as NumPy int64 arrays; the module gets int64 tensors."""
    seen = {}

    def module(x, t, y):
        seen.update(t=t, y=y)
        return x

    x = torch.zeros(2, 3)
    D.torch_model(module)(x, np.array([5, 6]), np.array([1, 0]))
    assert seen["t"].dtype == torch.int64 and seen["t"].tolist() == [5, 6] and seen["y"].tolist() == [1, 0]
    D.torch_model(module)(x, np.array([5, 6]))
    assert seen["y"] is None


@pytest.mark.parametrize("device", DEVICES)
def test_forward_and_conversions_match_golden_F2_P3(device):
    g = golden.load(GOLDEN, "forward_posterior")
    t = torch.tensor(g["in/t"], device=device)
    for dtype, tol in ((torch.float64, 1e-12), (torch.float32, 2e-5)):
        x0 = torch.tensor(g["in/x0"], dtype=dtype, device=device)
        eps = torch.tensor(g["in/eps"], dtype=dtype, device=device)
        xt = D.q_sample(x0, t, eps, SCHED)
        np.testing.assert_allclose(xt.cpu().numpy(), g["out/q_sample"], rtol=tol, atol=tol)
        x0 = torch.tensor(g["in/x0"], dtype=dtype, device=device)
        v = D.training_target(x0, eps, xt, t, SCHED, "v")
        # v = √ᾱ ε − √(1−ᾱ) x_0 against the reference's (ε − √(1−ᾱ) x_t)/√ᾱ, which divides by √ᾱ_1000 ≈ 0.0064
        np.testing.assert_allclose(v.cpu().numpy(), g["out/v_from_eps"], rtol=tol, atol=tol / 0.0064)


def test_training_target_L5():
    """L5: the targets are ε, x_0 and v = √ᾱ ε − √(1−ᾱ) x_0 (P3): the model output that equals the target
    gives back x_0 and ε exactly through the reference's conversion (posterior.x0_eps_from_output)."""
    g = torch.Generator().manual_seed(0)
    x0, eps = torch.randn(4, 3, generator=g, dtype=torch.float64), torch.randn(4, 3, generator=g, dtype=torch.float64)
    t = torch.tensor([1, 10, 500, 1000])
    xt = D.q_sample(x0, t, eps, SCHED)
    for pred in ("eps", "x0", "v"):
        target = D.training_target(x0, eps, xt, t, SCHED, pred)
        x0_hat, eps_hat = posterior.x0_eps_from_output(target.numpy(), xt.numpy(), t.numpy(), SCHED, pred)
        np.testing.assert_allclose(x0_hat, x0.numpy(), rtol=1e-9, atol=1e-9)
        np.testing.assert_allclose(eps_hat, eps.numpy(), rtol=1e-9, atol=1e-9)
    assert D.mse_per_example(eps, eps).abs().max() == 0


def test_cfg_on_torch_is_one_batched_call_A9(case):
    """A9 on tensors: one model call on the doubled batch; w = 1 gives the conditional output itself."""
    calls = []
    mix = analytic.GaussianMixtureData(case["in/mix_weights"], case["in/mix_means"], case["in/mix_vars"])
    model = np_as_torch_model(analytic.vp_model(mix, SCHED), calls)
    x = torch.tensor(case["in/x_T"])
    t, y = np.full(6, 500), case["in/y"]
    out = samplers.cfg(model, 1.0, null_class=-1)(x, t, y)
    assert calls == [12] and isinstance(out, torch.Tensor)
    torch.testing.assert_close(out, model(x, t, y))
    with pytest.raises(ValueError, match=r"y \(class labels\) is required"):
        samplers.cfg(model, 1.0, null_class=-1)(x, t, None)


def test_bad_input():
    x = torch.zeros(2, 3)
    with pytest.raises(ValueError, match="t must be a scalar or have shape \\(2,\\)"):
        D.q_sample(x, torch.tensor([1, 2, 3]), x, SCHED)
    with pytest.raises(TypeError, match="integer timesteps"):
        D.q_sample(x, torch.tensor([1.5, 2.0]), x, SCHED)
    with pytest.raises(ValueError, match="noise must have shape"):
        D.q_sample(x, 5, torch.zeros(3, 3), SCHED)
    with pytest.raises(ValueError, match="prediction must be one of"):
        D.training_target(x, x, x, 5, SCHED, "score")
    with pytest.raises(TypeError, match="reference Schedule"):
        D.q_sample(x, 1, x, "linear")
    # the reference loops on tensors check at their edge as on NumPy arrays
    model = D.torch_model(lambda a, b, c: a)
    with pytest.raises(ValueError, match="strictly descending"):
        samplers.ddim_sample(model, x, SCHED, [1, 5])
    with pytest.raises(ValueError, match=r"noise must have shape \(2, 2, 3\)"):
        samplers.ddim_sample(model, x, SCHED, [5, 1], eta=1.0, noise=torch.zeros(3, 2, 3))
    with pytest.raises(TypeError, match="noise for a Tensor x must be an array of its kind"):
        samplers.ddim_sample(model, x, SCHED, [5, 1], eta=1.0, noise=np.zeros((2, 2, 3)))
    with pytest.raises(ValueError, match=r"model output must have the shape of x \(2, 3\)"):
        samplers.ddim_sample(D.torch_model(lambda a, b, c: a[:1]), x, SCHED, [5, 1])
    with pytest.raises(ValueError, match="eta must be in"):
        samplers.ddim_sample(model, x, SCHED, [5, 1], eta=-1.0)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_zero_snr_runs_on_torch_match_golden_R2_R3(dtype, device):
    """R2/R3 on torch: every golden run from t = T of the zero-terminal-SNR schedule (``golden.zero_snr_trajectories``:
    each product sampler, v- and x0-models, guidance 3 with rescale 0.7 and without) repeated on torch tensors:
    to 1e-10 in float64, within FLOAT32_ATOL in float32."""
    case = golden.load(GOLDEN, "refinements")
    mix = analytic.GaussianMixtureData(case["in/mix_weights"], case["in/mix_means"], case["in/mix_vars"])
    zero = schedules.Schedule.named("linear", 1000, zero_terminal_snr=True)
    v_model, x0_model = (np_as_torch_model(analytic.vp_model(mix, zero, prediction=p)) for p in ("v", "x0"))
    x_T, noise = (torch.tensor(case[k], dtype=dtype, device=device) for k in ("in/x_T", "in/noise"))
    runs = golden.zero_snr_trajectories(v_model, x0_model, x_T, noise, case)
    assert sorted(runs) == sorted(k[len("out/zero_snr/"):] for k in case if k.startswith("out/zero_snr/"))
    for name, out in runs.items():
        assert isinstance(out, torch.Tensor) and out.dtype == dtype, name
        tol = dict(rtol=1e-10, atol=1e-12) if dtype == torch.float64 else dict(rtol=0, atol=FLOAT32_ATOL)
        np.testing.assert_allclose(out.cpu().numpy(), case[f"out/zero_snr/{name}"], err_msg=name, **tol)
