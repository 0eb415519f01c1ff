"""The refinements through the engine and the ONNX artifact (issue 10): the diffusion config's zero terminal
SNR (R2) and Min-SNR-γ weighting (R1), recorded in the checkpoint and sampler.json; a v-prediction,
zero-terminal-SNR model sampled from ᾱ_T = 0 with the same images through the torch engine, the Python runtime
and sampler.onnx, guidance rescale (R3) included; and the refusals."""

import json
import shutil

import numpy as np
import pytest

for _name in ("torch", "onnx", "onnxscript", "onnxruntime"):
    pytest.importorskip(_name)

import onnxruntime as ort  # noqa: E402
from click.testing import CliRunner  # noqa: E402

from ldmkit.cli import main  # noqa: E402
from ldmkit.engine import diffusion as D  # noqa: E402
from ldmkit.engine.checkpoint import load_checkpoint  # noqa: E402
from ldmkit.engine.config import Config, DiffusionConfig  # noqa: E402
from ldmkit.engine.sample import generate, models_from_checkpoint, sample_noise  # noqa: E402
from ldmkit.export import runtime as rt  # noqa: E402
from ldmkit.reference.samplers import SAMPLERS  # noqa: E402
from ldmkit.reference.schedules import Schedule  # noqa: E402

pytestmark = pytest.mark.usefixtures("torch_one_thread")

SAME = 1e-5  # the bound on |images − images| (images in [0, 1])


@pytest.fixture(scope="module")
def zero_model(zero_snr_artifact):
    return models_from_checkpoint(load_checkpoint(zero_snr_artifact[0]))


def test_R2_config_records_the_schedule_and_refuses_eps():
    """R2/R1 in the config: zero_terminal_snr builds ᾱ_T = 0; ε-prediction with it is refused saying why;
    γ must be > 0; a config written before these keys existed reads as uniform weights on the plain schedule."""
    cfg = DiffusionConfig(T=20, prediction="v", zero_terminal_snr=True, min_snr_gamma=5.0)
    assert cfg.make_schedule().alpha_bars[-1] == 0.0
    np.testing.assert_array_equal(cfg.make_schedule().alpha_bars, Schedule.named("linear", 20, True).alpha_bars)
    with pytest.raises(ValueError, match=r"zero_terminal_snr needs prediction 'v' or 'x0'.*divides by zero"):
        DiffusionConfig(zero_terminal_snr=True)
    with pytest.raises(ValueError, match="min_snr_gamma must be > 0"):
        DiffusionConfig(min_snr_gamma=0.0)
    old = Config().to_dict()
    del old["diffusion"]["zero_terminal_snr"], old["diffusion"]["min_snr_gamma"]
    back = Config.from_dict(old).diffusion
    assert (back.zero_terminal_snr, back.min_snr_gamma) == (False, None)
    with pytest.raises(ValueError, match=r"config\.diffusion\.zero_terminal_snr must be"):
        Config.from_dict({**Config().to_dict(), "diffusion": {**Config().to_dict()["diffusion"],
                                                              "zero_terminal_snr": "yes"}})


def test_R1_engine_loss_weights_are_min_snr():
    """R1 in the engine: the weight table training multiplies the per-example MSE by is min(SNR, γ)/(SNR + 1)
    for v (by hand from ᾱ), 0 at t = T of the zero-SNR schedule; None (uniform) without γ."""
    sched = Schedule.named("linear", 100, True)
    w = D.loss_weights(sched, "v", 5.0, "cpu").double().numpy()
    ab = sched.alpha_bars[1:]
    snr = ab / (1 - ab)
    np.testing.assert_allclose(w[1:], np.minimum(snr, 5.0) / (snr + 1), rtol=1e-6)
    assert w[-1] == 0.0 and D.loss_weights(sched, "v", None, "cpu") is None


@pytest.mark.parametrize("sampler", list(SAMPLERS))
@pytest.mark.parametrize("guidance, phi", [(3.0, 0.0), (3.0, 0.7), (None, 0.0)])
def test_R2_R3_zero_snr_v_model_same_images_engine_runtime_graph(zero_snr_artifact, zero_model, sampler, guidance,
                                                                 phi):
    """Acceptance: the v-prediction, zero-terminal-SNR model sampled from t = T (ᾱ_T = 0) gives the same images
    (within 1e-5) through the torch engine, the Python runtime and, for its samplers, sampler.onnx, on the same
    noise, with guidance w = 3 and rescale φ = 0.7 (R3) or none."""
    config, vae, unet = zero_model
    runner = rt.OnnxSampler(zero_snr_artifact[1], provider="cpu")
    assert runner.schedule.alpha_bars[-1] == 0.0
    n, steps = 4, 8
    eta = 0.5 if SAMPLERS[sampler].eta else 0.0
    x_T, loop = sample_noise(config, n, steps, seed=11)
    y = np.array([2, 7, 0, 7])
    engine = generate(config, vae, unet, n, y, sampler, steps, eta, guidance, noise=(x_T, loop), guidance_rescale=phi)
    python = runner.sample(n, y, sampler, steps, eta, guidance, noise=(x_T.numpy(), loop.numpy()),
                           guidance_rescale=phi)
    assert np.all(np.isfinite(engine)) and engine.std() > 0.05
    assert np.abs(python - engine).max() <= SAME
    if sampler in runner.model.graph_samplers:
        eta0 = generate(config, vae, unet, n, y, sampler, steps, 0.0, guidance, noise=(x_T, loop),
                        guidance_rescale=phi)
        graph = runner.sample_graph(n, y, steps, guidance, noise=(x_T.numpy(), None), sampler=sampler,
                                    guidance_rescale=phi)
        assert np.abs(graph - eta0).max() <= SAME


def test_R3_rescale_changes_the_images_and_is_an_optional_graph_input(zero_snr_artifact, zero_model):
    """R3: φ = 0.7 gives other images than φ = 0; sampler.onnx's guidance_rescale is an overridable initializer
    (not among the session's inputs), so a host that does not feed it samples with φ = 0."""
    config, vae, unet = zero_model
    x_T, loop = sample_noise(config, 3, 6, seed=4)
    y = np.array([1, 5, 9])
    a, b = (generate(config, vae, unet, 3, y, "dpmpp2m", 6, 0.0, 3.0, noise=(x_T, loop), guidance_rescale=phi)
            for phi in (0.0, 0.7))
    assert np.abs(a - b).max() > 1e-3
    session = ort.InferenceSession(str(zero_snr_artifact[1] / "sampler.onnx"), providers=["CPUExecutionProvider"])
    assert [i.name for i in session.get_inputs()] == ["noise", "y", "guidance", "steps", "method"]
    assert [i.name for i in session.get_overridable_initializers()] == ["guidance_rescale"]
    feeds = {"noise": x_T.numpy(), "y": y, "guidance": np.array(3.0, np.float32), "steps": np.array(6),
             "method": np.array(1)}
    assert np.abs(session.run(None, feeds)[0] - a).max() <= SAME
    feeds["guidance_rescale"] = np.array(0.7, np.float32)
    assert np.abs(session.run(None, feeds)[0] - b).max() <= SAME


def test_R2_manifest_records_zero_snr_and_is_checked(zero_snr_artifact, tmp_path):
    """sampler.json: model.zero_terminal_snr, the ᾱ table ending at 0, defaults.guidance_rescale 0, format 3;
    a manifest that drops the flag no longer matches its table, and ε-prediction with it is refused."""
    src = zero_snr_artifact[1]
    manifest = json.loads((src / "sampler.json").read_text())
    model = manifest["model"]
    assert manifest["format"]["version"] == 3
    assert model["zero_terminal_snr"] is True and model["alpha_bars"][-1] == 0.0 and model["prediction"] == "v"
    assert model["defaults"]["guidance_rescale"] == 0.0
    for change, message in (({"zero_terminal_snr": False}, "is not the 'linear' schedule"),
                            ({"prediction": "eps"}, "zero_terminal_snr needs")):
        art = tmp_path / f"a{len(message)}"
        shutil.copytree(src, art)
        (art / "sampler.json").write_text(json.dumps({**manifest, "model": {**model, **change}}))
        with pytest.raises(ValueError, match=message):
            rt.OnnxSampler(art, provider="cpu")


def test_cli_guidance_rescale(zero_snr_artifact, tmp_path):
    """`ldmkit sample --guidance-rescale` through a checkpoint and an ONNX folder (--graph too); φ outside
    [0, 1] is one line and exit status 2."""
    ckpt, art = zero_snr_artifact
    for source, extra in ((ckpt, []), (art, []), (art, ["--graph"])):
        out = tmp_path / f"{len(extra)}{source.name}.npy"
        result = CliRunner().invoke(main, ["sample", str(source), "-n", "2", "--steps", "3", "--guidance", "3",
                                           "--guidance-rescale", "0.7", "-o", str(out), *extra])
        assert result.exit_code == 0, result.output
        assert np.all(np.isfinite(np.load(out)))
    result = CliRunner().invoke(main, ["sample", str(ckpt), "-n", "2", "--guidance-rescale", "1.5", "-o",
                                       str(tmp_path / "x.npy")])
    assert result.exit_code == 2 and "guidance rescale must be in [0, 1]" in result.output
    assert not (tmp_path / "x.npy").exists()
